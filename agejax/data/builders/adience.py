"""Adience (Eidinger, Enbar, Hassner, TIFS 2014): 8 age groups, 5 subject-exclusive folds.

Manual directory (the official "aligned" release):
  aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>
  fold_0_data.txt ... fold_4_data.txt   (tab separated, header user_id, original_image,
                                         face_id, age, gender, ...)
Ages are groups such as "(25, 32)"; a few rows give one number ("35"), which goes
to the nearest group; rows with "None" have no age and are skipped (counted).
Gender: m -> 0, f -> 1, u or empty -> -1. Config `foldK` tests on fold K and
trains on the other four. Each record's `age` is its group's midpoint.
Split `holdout` (version 1.1.0): 10% of the training folds' users, moved out of
`train`, for checkpoint selection apart from the test fold.
"""

from __future__ import annotations

import os
import re

import tensorflow_datasets as tfds

from agejax.data.builders.base import (BadInputError, FaceBuilder, Record, file_loader, image_path,
                                      read_csv_with_header, split_off_holdout)
from agejax.metrics import ADIENCE_GROUPS

NUM_FOLDS = 5


def parse_age_group(text: str) -> int | None:
  """Group index from "(25, 32)" or a single number; None for "None" / empty."""
  nums = [int(n) for n in re.findall(r"\d+", text)]
  if not nums:
    return None
  if len(nums) == 2 and tuple(nums) in ADIENCE_GROUPS:
    return ADIENCE_GROUPS.index(tuple(nums))
  age = sum(nums) / len(nums)
  dist = [max(lo - age, 0, age - hi) for lo, hi in ADIENCE_GROUPS]
  return dist.index(min(dist))


def fold_records(manual_dir, fold: int):
  path = os.fspath(manual_dir / f"fold_{fold}_data.txt")
  base = os.path.basename(path)
  header, rows = read_csv_with_header(path)
  cols = {c.strip().lower(): i for i, c in enumerate(header)}
  for line, row in rows:
    where = f"{base}:{line}"
    try:
      user, orig, face_id, age_text = (row[cols[c]] for c in ("user_id", "original_image", "face_id", "age"))
      gender = {"m": 0, "f": 1}.get(row[cols["gender"]].lower() if "gender" in cols else "", -1)
    except (IndexError, KeyError):
      yield BadInputError(f"{where}: too few fields for the header {header!r}.")
      continue
    group = parse_age_group(age_text)
    if group is None:
      yield BadInputError(f"{where}: no age label ({age_text!r}).")
      continue
    lo, hi = ADIENCE_GROUPS[group]
    rel = os.path.join("aligned", user, f"landmark_aligned_face.{face_id}.{orig}")
    try:
      p = image_path(manual_dir, rel, where)
    except BadInputError as e:
      yield e
      continue
    yield Record(key=rel, where=f"{where} ({p})", load=file_loader(p), age=(lo + hi) / 2, gender=gender,
                 age_group=group, subject=user)


def _chain(*iterables):
  for it in iterables:
    yield from it


class Adience(FaceBuilder, skip_registration=True):
  """Adience aligned faces with 8 age groups and gender; 5-fold subject-exclusive CV."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "A holdout split: 10% of the training folds' users, for checkpoint selection."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"fold{k}", description=f"Test on fold {k}.")
                     for k in range(NUM_FOLDS)]
  REQUIRED_FILES = ("aligned/",) + tuple(f"fold_{k}_data.txt" for k in range(NUM_FOLDS))
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put Adience's aligned/ folder and fold_*_data.txt into the manual directory."

  def __init__(self, *, on_error: str = "skip", **kwargs):
    # Adience's fold files contain rows without an age by design: skip and count them.
    super().__init__(on_error=on_error, **kwargs)

  def _split_records(self, manual_dir):
    test = int(self.builder_config.name[len("fold"):])
    train = [k for k in range(NUM_FOLDS) if k != test]
    kept, holdout = split_off_holdout(_chain(*(fold_records(manual_dir, k) for k in train)))
    return {"train": kept, "holdout": holdout, "test": fold_records(manual_dir, test)}
