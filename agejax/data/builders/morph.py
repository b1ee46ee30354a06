"""MORPH II (Ricanek & Tesafaye, 2006), from an image folder and one of two label files.

Manual directory:
  images/                 the MORPH II photos (any sub-folders)
  and either
  morph_train.csv, morph_test.csv   DLDL-v2's lists: name,age,sigma (its random
                                    80/20 split), or
  morph.csv                         metadata with a header naming at least the
                                    columns photo (or file), age, gender (M/F)
                                    and race (W/B/A/H/O...), as the commercial
                                    release's CSV; split 80/20 by subject
                                    (id_num), deterministically, so one person
                                    never appears in train and test.
Split `holdout` (version 1.1.0): 10% of the training subjects (id_num, or the
file name's leading number), moved out of `train`, for checkpoint selection.
"""

from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

from agejax.data.builders.base import (BadInputError, FaceBuilder, Record, file_loader, image_path, parse_float,
                                      read_csv, read_csv_with_header, split_off_holdout)

# MORPH race letters -> agejax's race index (White, Black, Asian, Indian, Other).
RACE_CODES = {"W": 0, "B": 1, "A": 2, "I": 3, "H": 4, "O": 4}


def _list_records(images, path, split):
  base = os.path.basename(path)
  for line, row in read_csv(path):
    where = f"{base}:{line}"
    if line == 1 and row[0].lower() in ("name", "file", "image", "photo"):
      continue
    if len(row) < 2:
      yield BadInputError(f"{where}: expected name,age[,sigma]; got {row!r}.")
      continue
    try:
      age = parse_float(row[1], where, "the age")
      sigma = parse_float(row[2], where, "sigma") if len(row) > 2 and row[2] else 0.0
      p = image_path(images, row[0], where)
    except BadInputError as e:
      yield e
      continue
    yield Record(key=f"{split}/{row[0]}", where=f"{where} ({p})", load=file_loader(p), age=age, sigma=sigma,
                 subject=os.path.basename(row[0]).split("_")[0])


def subject_split(subject: str) -> str:
  """Deterministic 80/20 train/test assignment of a subject id."""
  return "test" if int(hashlib.md5(subject.encode()).hexdigest(), 16) % 5 == 0 else "train"


def _meta_records(images, path, split):
  base = os.path.basename(path)
  header, rows = read_csv_with_header(path)
  cols = {c.lower(): i for i, c in enumerate(header)}
  file_col = cols.get("photo", cols.get("file"))
  if file_col is None or "age" not in cols:
    raise BadInputError(f"{path}:1: the header must name columns photo (or file) and age; got {header!r}.")
  for line, row in rows:
    where = f"{base}:{line}"
    try:
      rel = row[file_col]
      subject = row[cols["id_num"]] if "id_num" in cols else os.path.basename(rel).split("_")[0]
      if subject_split(subject) != split:
        continue
      age = parse_float(row[cols["age"]], where, "the age")
      gender = {"M": 0, "F": 1}.get(row[cols["gender"]].upper(), -1) if "gender" in cols else -1
      race = RACE_CODES.get(row[cols["race"]].upper()[:1], -1) if "race" in cols else -1
      p = image_path(images, rel, where)
    except IndexError:
      yield BadInputError(f"{where}: too few fields ({len(row)}) for the header.")
      continue
    except BadInputError as e:
      yield e
      continue
    yield Record(key=rel, where=f"{where} ({p})", load=file_loader(p), age=age, gender=gender, race=race,
                 subject=subject)


class Morph(FaceBuilder, skip_registration=True):
  """MORPH II with age (and gender and race from the metadata CSV)."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "A holdout split: 10% of the training subjects, for checkpoint selection."}
  REQUIRED_FILES = ("images/", "morph_train.csv + morph_test.csv, or morph.csv")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put MORPH II photos under images/ and its label files beside them: " + ", ".join(REQUIRED_FILES)

  def _split_records(self, manual_dir):
    images = os.fspath(manual_dir / "images")
    lists = {s: os.fspath(manual_dir / f"morph_{s}.csv") for s in ("train", "test")}
    if all(os.path.exists(p) for p in lists.values()):
      out = {s: _list_records(images, p, s) for s, p in lists.items()}
    else:
      meta = os.fspath(manual_dir / "morph.csv")
      if not os.path.exists(meta):
        raise BadInputError(f"{manual_dir}: found neither morph_train.csv + morph_test.csv nor morph.csv.")
      out = {s: _meta_records(images, meta, s) for s in ("train", "test")}
    out["train"], out["holdout"] = split_off_holdout(out["train"])
    return out
