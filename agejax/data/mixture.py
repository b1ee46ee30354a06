"""The datasets a config trains on: one (`config.dataset.name`) or a weighted mixture of several.

    --config.dataset.mixture="utkface:0.75,aaf:0.25"      each entry NAME[/BUILDER_CONFIG]:WEIGHT

A mixture draws each training example from source k with probability weight_k (grain's
`MapDataset.mix` over each source shuffled and repeated on its own: every source keeps its own
epochs, and the iterator's state, one position in the mixed index space, fixes where every source
is, so a resumed run sees exactly the batches it would have seen). Each source trains on its own
protocol's training split and is validated and tested on its own splits (`PROTOCOLS`); checkpoint
selection uses the pooled validation splits of all sources, never a test split. All sources share
the config's label grid, which must cover their ages; heads whose label a source lacks (AAF has no
race) are masked by the label -1, as for a single dataset.

Where the files are: the config's `dataset.manual_dir` for the source that is `dataset.name`,
else `$<NAME>_DIR` (e.g. `AAF_DIR`, `UTKFACE_DIR`), else TFDS's `<data_dir>/downloads/manual`.
Needed only for a dataset's first build.
"""

from __future__ import annotations

import dataclasses
import os

# Each builder's protocol: (train, select, report) splits, as its configs/ file sets them.
PROTOCOLS = {
    "utkface": ("train", "validation", "test"),
    "aaf": ("train", "validation", "test"),
    "chalearn15": ("train", "holdout", "validation"),
    "chalearn16": ("train+validation", "holdout", "test"),
    "morph": ("train", "holdout", "test"),
    "adience": ("train", "holdout", "test"),
    "folder": ("train", "validation", "test"),
}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One dataset of what a config trains on."""
  name: str
  config: str            # builder config ("" for the default)
  weight: float
  train_split: str
  eval_split: str
  test_split: str
  manual_dir: str

  @property
  def label(self) -> str:
    """How reports name it: `utkface`, `utkface/coral2019`."""
    return self.name + (f"/{self.config}" if self.config and self.config != "default" else "")


def parse(spec: str) -> list[tuple[str, str, float]]:
  """[(name, builder config, weight)] from "utkface:0.75,aaf:0.25"; ValueError naming the bad entry."""
  out = []
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    name, sep, weight = entry.rpartition(":")
    if not sep or not name:
      raise ValueError(f"config.dataset.mixture: {entry!r} is not NAME[/CONFIG]:WEIGHT.")
    try:
      w = float(weight)
    except ValueError:
      raise ValueError(f"config.dataset.mixture: the weight of {entry!r} is not a number.") from None
    if not (w > 0 and w < float("inf")):
      raise ValueError(f"config.dataset.mixture: the weight of {entry!r} must be a positive number.")
    name, _, config = name.partition("/")
    if name not in PROTOCOLS:
      raise ValueError(f"config.dataset.mixture: unknown dataset {name!r}; choose from {sorted(PROTOCOLS)}.")
    out.append((name, config, w))
  if not out:
    raise ValueError("config.dataset.mixture names no dataset.")
  labels = [n + "/" + c for n, c, _ in out]
  if len(set(labels)) != len(labels):
    raise ValueError(f"config.dataset.mixture names a dataset twice: {spec!r}.")
  return out


def sources(dataset_config) -> list[SourceSpec]:
  """The sources of a config's `dataset` section: its mixture, or the one dataset it names (with
  the config's own splits). Weights are normalised to sum to 1."""
  d = dataset_config
  mixture = d.get("mixture", "")
  if not mixture:
    return [SourceSpec(d.name, d.config or "", 1.0, d.train_split, d.eval_split, d.test_split, d.manual_dir or "")]
  entries = parse(mixture)
  total = sum(w for _, _, w in entries)
  out = []
  for name, config, w in entries:
    train, select, report = PROTOCOLS[name]
    if name == d.name and config in ("", d.config or ""):  # the config's own dataset keeps its splits and files
      config = d.config or ""
      train, select, report, manual = d.train_split, d.eval_split, d.test_split, d.manual_dir or ""
    else:
      manual = os.environ.get(f"{name.upper()}_DIR", "")
    if not d.eval_split:  # full_train: no source selects checkpoints
      select = ""
    out.append(SourceSpec(name, config, w / total, train, select, report, manual))
  return out
