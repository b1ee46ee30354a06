"""Dataset builders by name, and the check that tells a user where to put the files."""

from __future__ import annotations

import os
import sys

from etils import epath

from agejax.data.builders.aaf import Aaf
from agejax.data.builders.adience import Adience
from agejax.data.builders.base import BadInputError, FaceBuilder
from agejax.data.builders.chalearn import Chalearn15, Chalearn16
from agejax.data.builders.folder import Folder
from agejax.data.builders.morph import Morph
from agejax.data.builders.utkface import Utkface

BUILDERS: dict[str, type[FaceBuilder]] = {
    "utkface": Utkface, "chalearn15": Chalearn15, "chalearn16": Chalearn16,
    "morph": Morph, "adience": Adience, "folder": Folder, "aaf": Aaf,
}


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is neither built nor present in the manual directory."""


def default_data_dir() -> str:
  return os.environ.get("AGEJAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")  # empty counts as unset


def get_builder(name: str, config: str | None = None, data_dir: str | None = None, **kwargs) -> FaceBuilder:
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(BUILDERS)}.")
  return BUILDERS[name](data_dir=data_dir or default_data_dir(), config=config or None, **kwargs)


def missing_files(cls: type[FaceBuilder], manual_dir) -> list[str]:
  manual_dir = epath.Path(manual_dir)
  return [f for f in cls.REQUIRED_FILES if " " not in f and not (manual_dir / f.rstrip("/")).exists()]


def ensure_built(name: str, config: str | None, data_dir: str | None, manual_dir: str | None,
                 on_error: str = "raise") -> FaceBuilder:
  """The builder of a prepared dataset, building it first from `manual_dir` if needed.

  Raises DatasetNotFoundError naming the directory and the files to put there.
  """
  builder = get_builder(name, config, data_dir, on_error=on_error)
  if builder.is_prepared():
    return builder
  cls = BUILDERS[name]
  manual = manual_dir or os.path.join(builder.data_dir_root, "downloads", "manual")
  missing = missing_files(cls, manual) if os.path.isdir(manual) else list(cls.REQUIRED_FILES)
  if missing:
    raise DatasetNotFoundError(
        f"Dataset {name!r} is not built in {builder.data_dir_root} and its files are missing from the manual "
        f"directory {manual}: missing {', '.join(missing)}. {cls.MANUAL_DOWNLOAD_INSTRUCTIONS} "
        f"Then run: python -m agejax.data.build {name} --manual_dir {manual} --data_dir {builder.data_dir_root}")
  import tensorflow_datasets as tfds
  remove_incomplete(builder)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  stats = getattr(builder, "build_stats", None)
  if stats:  # how the build went (e.g. AAF's alignment routes), kept beside the records
    import json
    with open(os.path.join(os.fspath(builder.data_dir), "build_stats.json"), "w") as f:
      json.dump(stats, f, indent=1)
  return builder


def remove_incomplete(builder: FaceBuilder) -> list[str]:
  """Delete what interrupted builds of this dataset and config left (TFDS's `incomplete.*` folders
  beside the version folder); returns their paths. A build that is complete is never touched."""
  import shutil
  parent = os.path.dirname(os.fspath(builder.data_dir))
  if not os.path.isdir(parent):
    return []
  removed = []
  for name in sorted(os.listdir(parent)):
    path = os.path.join(parent, name)
    if name.startswith("incomplete.") and os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
      print(f"Removed {path}, left by an interrupted build.", file=sys.stderr)
  return removed


__all__ = ["BUILDERS", "BadInputError", "DatasetNotFoundError", "ensure_built", "get_builder", "default_data_dir"]
