"""Any labelled folder: a CSV of path, age and optional sigma, gender, race, split.

Manual directory:
  labels.csv   header naming at least `path` and `age`; optional columns `sigma`,
               `gender` (0/1 or m/f), `race` (0-4), `split` (train / validation /
               test; rows without it go to train)
  the images, at the CSV's paths relative to the manual directory
"""

from __future__ import annotations

import os

from agejax.data.builders.base import (BadInputError, FaceBuilder, Record, file_loader, image_path, parse_float,
                                      read_csv_with_header)

SPLITS = ("train", "validation", "test")


def _int_label(value: str, where: str, what: str, mapping=None) -> int:
  v = value.strip().lower()
  if v in ("", "-1", "none", "unknown"):
    return -1
  if mapping and v in mapping:
    return mapping[v]
  try:
    return int(float(v))
  except ValueError:
    raise BadInputError(f"{where}: cannot parse {what} from {value!r}.") from None


def folder_records(manual_dir, split):
  path = os.fspath(manual_dir / "labels.csv")
  header, rows = read_csv_with_header(path)
  cols = {c.lower(): i for i, c in enumerate(header)}
  if "path" not in cols or "age" not in cols:  # no row can be read: an error even when skipping bad rows
    raise BadInputError(f"{path}:1: the header must name columns path and age; got {header!r}.")
  get = lambda row, c: row[cols[c]] if c in cols and cols[c] < len(row) else ""
  for line, row in rows:
    where = f"labels.csv:{line}"
    row_split = get(row, "split").lower() or "train"
    if row_split not in SPLITS:
      yield BadInputError(f"{where}: split {row_split!r} is not one of {SPLITS}.")
      continue
    if row_split != split:
      continue
    try:
      age = parse_float(get(row, "age"), where, "the age")
      sigma = parse_float(get(row, "sigma") or "0", where, "sigma")
      gender = _int_label(get(row, "gender"), where, "gender", {"m": 0, "male": 0, "f": 1, "female": 1})
      race = _int_label(get(row, "race"), where, "race")
      rel = get(row, "path")
      p = image_path(manual_dir, rel, where)
    except BadInputError as e:
      yield e
      continue
    yield Record(key=rel, where=f"{where} ({p})", load=file_loader(p), age=age, sigma=sigma, gender=gender, race=race)


class Folder(FaceBuilder, skip_registration=True):
  """Your own labelled faces: labels.csv (path, age[, sigma, gender, race, split]) over an image folder."""
  REQUIRED_FILES = ("labels.csv",)
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put labels.csv (path,age[,sigma,gender,race,split]) and the images it names into the manual directory."

  def _split_records(self, manual_dir):
    path = os.fspath(manual_dir / "labels.csv")
    present = set()
    header, rows = read_csv_with_header(path)
    header = [c.lower() for c in header]
    if "split" in header:
      i = header.index("split")
      present = {(r[i].lower() if i < len(r) and r[i] else "train") for _, r in rows} & set(SPLITS)
    present = present or {"train"}
    return {s: folder_records(manual_dir, s) for s in SPLITS if s in present}
