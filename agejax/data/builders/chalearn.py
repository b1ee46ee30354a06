"""ChaLearn Looking-at-People apparent age, 2015 (ICCV) and 2016 (CVPR), official layouts.

Each image has the mean and standard deviation of its apparent-age votes; the
standard deviation becomes the per-image sigma of DLDL-v2's label distribution.

Manual directory layout (as the challenge distributed it, unpacked):
  2015:  Train/*.jpg        Train.csv          (image;mean;std or image,mean,std)
         Validation/*.jpg   Validation.csv
  2016:  train/*.jpg        train_gt.csv       (header image,mean,stdv)
         valid/*.jpg        valid_gt.csv
         test/*.jpg         test_gt.csv
A header row is optional; the delimiter (",", ";" or tab) is detected.
DLDL-v2's protocols: 2015 trains on train and reports on validation; 2016
trains on train+validation and reports on test (see configs/). Split `holdout`
(version 1.1.0) is 10% of the official train images, moved out of `train`, for
checkpoint selection apart from the reported split (the images name no people).
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from agejax.data.builders.base import (BadInputError, FaceBuilder, Record, file_loader, image_path, parse_float,
                                      read_csv, split_off_holdout)

LAYOUTS = {
    2015: {"train": ("Train", "Train.csv"), "validation": ("Validation", "Validation.csv")},
    2016: {"train": ("train", "train_gt.csv"), "validation": ("valid", "valid_gt.csv"),
           "test": ("test", "test_gt.csv")},
}


def gt_records(folder, csv_path, split_name):
  """Records from an (image, mean, std) ground-truth file; a header row is skipped."""
  base = os.path.basename(csv_path)
  for line, row in read_csv(csv_path):
    where = f"{base}:{line}"
    if line == 1 and row and row[0].lower() in ("image", "file", "filename", "name", "path"):
      continue
    if len(row) < 3:
      yield BadInputError(f"{where}: expected image, mean, std; got {row!r}.")
      continue
    try:
      mean = parse_float(row[1], where, "the mean age")
      std = parse_float(row[2], where, "the standard deviation")
      path = image_path(folder, row[0], where)
    except BadInputError as e:
      yield e
      continue
    yield Record(key=f"{split_name}/{row[0]}", where=f"{where} ({path})", load=file_loader(path),
                 age=mean, sigma=std)


class _ChaLearn(FaceBuilder, skip_registration=True):
  YEAR = 0
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "A holdout split: 10% of train, for checkpoint selection."}

  def _split_records(self, manual_dir):
    out = {}
    for split, (folder, gt) in LAYOUTS[self.YEAR].items():
      out[split] = gt_records(os.fspath(manual_dir / folder), os.fspath(manual_dir / gt), split)
    out["train"], out["holdout"] = split_off_holdout(out["train"])
    return out


class Chalearn15(_ChaLearn, skip_registration=True):
  """ChaLearn LAP 2015 apparent age: Train / Validation with vote mean and std."""
  YEAR = 2015
  REQUIRED_FILES = ("Train/", "Train.csv", "Validation/", "Validation.csv")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Unpack the ChaLearn LAP 2015 Train and Validation images and CSVs: " + ", ".join(REQUIRED_FILES)


class Chalearn16(_ChaLearn, skip_registration=True):
  """ChaLearn LAP 2016 apparent age: train / valid / test with vote mean and std."""
  YEAR = 2016
  REQUIRED_FILES = ("train/", "train_gt.csv", "valid/", "valid_gt.csv", "test/", "test_gt.csv")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Unpack the ChaLearn LAP 2016 images and ground truth: " + ", ".join(REQUIRED_FILES)
