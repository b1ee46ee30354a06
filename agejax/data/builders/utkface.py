"""UTKFace (Zhang, Song, Qi, CVPR 2017), aligned and cropped faces, read from the official archive.

Put `UTKFace.tar.gz` (23,708 200x200 chips named AGE_GENDER_RACE_DATE.jpg.chip.jpg)
into the manual directory; nothing is unpacked. Non-commercial research use only.

Configs:
  default    agejax's duplicate-safe split: duplicate groups (same md5 or near
             duplicates) never straddle splits; train/validation/test =
             18,951 / 2,426 / 2,331. `label_conflict` marks files whose duplicate
             copies disagree on a label, so evaluation can report the clean part.
  coral2019  the CORAL paper's split (Cao et al. 2019; ages 21-60): train and
             test as published (13,147 / 3,287); validation = the published train
             files in agejax's validation split (deterministic), train = the rest.
The split assignment ships with agejax (`agejax/data/splits/utkface.csv.gz`,
derived from the project's labels.csv).
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import os
import re
import tarfile

import tensorflow_datasets as tfds

from agejax.data.builders.base import BadInputError, FaceBuilder, Record

ARCHIVE = "UTKFace.tar.gz"
# AGE_GENDER[_RACE]_DATE, then ".jpg.chip.jpg" with the dot or a space sometimes off.
NAME_RE = re.compile(r"^(\d+)_([01])_(?:([0-4])_)?(\d+)\s*\.?jpg\.chip\.jpg$")


def parse_name(name: str) -> tuple[int, int, int]:
  """(age, gender, race) from a UTKFace file name; race -1 where the name has none."""
  m = NAME_RE.match(os.path.basename(name))
  if not m:
    raise BadInputError(f"{name}: not a UTKFace name AGE_GENDER_RACE_DATE.jpg.chip.jpg.")
  return int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) is not None else -1


def split_table() -> dict[str, dict[str, str]]:
  """filename -> {group, label_conflict, split, coral2019} from the shipped split file."""
  path = importlib.resources.files("agejax.data") / "splits" / "utkface.csv.gz"
  with gzip.open(path, "rt", newline="") as f:
    return {r["filename"]: r for r in csv.DictReader(f)}


def coral_test_groups(table: dict[str, dict[str, str]]) -> set[str]:
  return {r["group"] for r in table.values() if r["coral2019"] == "test"}


def _split_of(row: dict[str, str], config: str, coral_test: set[str] = frozenset()) -> str | None:
  """The split of a file under a config. coral2019: CORAL's test; validation = our val rows of CORAL's
  train minus copies of test images (its train and test share 161 duplicate groups, the
  published protocol; validation must not select on test faces); the rest of CORAL's train."""
  names = {"train": "train", "val": "validation", "test": "test"}
  if config == "default":
    return names[row["split"]]
  if row["coral2019"] == "test":
    return "test"
  if row["coral2019"] == "train":
    if row["split"] == "val":
      return None if row["group"] in coral_test else "validation"
    return "train"
  return None


class Utkface(FaceBuilder, skip_registration=True):
  """UTKFace aligned & cropped faces with age, gender and race (non-commercial research only)."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "coral2019: validation no longer holds copies of test images (26 duplicate groups)."}

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="default", description="Duplicate-safe train/validation/test split."),
      tfds.core.BuilderConfig(name="coral2019", description="CORAL 2019 split, ages 21-60."),
  ]
  REQUIRED_FILES = (ARCHIVE,)
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the official {ARCHIVE} (aligned & cropped faces) into the manual directory."

  def _split_records(self, manual_dir):
    table = split_table()
    archive = os.fspath(manual_dir / ARCHIVE)
    splits = ("train", "validation", "test")
    return {s: self._records(archive, table, s) for s in splits}

  def _records(self, archive, table, split):
    coral_test = coral_test_groups(table)
    with tarfile.open(archive, "r:gz") as tar:
      for i, member in enumerate(tar):
        if not member.isfile():
          continue
        name = os.path.basename(member.name)
        where = f"{ARCHIVE}:{member.name}"
        row = table.get(name)
        if row is None:
          if split == "train":  # report unknown files once, not once per split
            yield BadInputError(f"{where}: not in agejax's UTKFace split table (is this the official archive?).")
          continue
        if _split_of(row, self.builder_config.name, coral_test) != split:
          continue
        try:
          age, gender, race = parse_name(name)
        except BadInputError as e:
          yield BadInputError(f"{ARCHIVE}: {e}")
          continue
        data = tar.extractfile(member).read()
        yield Record(key=name, where=where, load=lambda d=data: d, age=float(age), gender=gender, race=race,
                     label_conflict=int(row["label_conflict"]))
