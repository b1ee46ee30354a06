"""How much averaging several trained models would gain: the MAE of each model's predictions and of
their mean, from the prediction CSVs `evaluate.py` writes (`<split>_predictions.csv`).

    python -m agejax.ensemble runs/cross/mixture_seed{0,1,2}/eval/utkface_test_predictions.csv

Prints one JSON line: {"files", "faces", "mae": [each model's], "mae_mean_of_models", "mae_of_mean",
"error_correlation": [[Pearson's r of the signed errors of model i and j]]}. Averaging the
ages is what an ensemble exported as one model would answer (up to the expectation of averaged
distributions, which is the same number). The files must list the same faces in the same order.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

import numpy as np


def read_predictions(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(file names, true ages, predicted ages) of one prediction CSV."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"file", "true_age", "predicted_age"} <= set(rows[0]):
    raise ValueError(f"{path}: not a predictions CSV of evaluate.py (file, true_age, predicted_age)")
  return ([r["file"] for r in rows], np.array([float(r["true_age"]) for r in rows]),
          np.array([float(r["predicted_age"]) for r in rows]))


def compare(paths: list[str]) -> dict:
  """The summary printed by the command line (see the module docstring)."""
  if len(paths) < 2:
    raise ValueError("give two or more prediction CSVs")
  files, ages, preds = None, None, []
  for path in paths:
    names, true, pred = read_predictions(path)
    if files is None:
      files, ages = names, true
    elif names != files or not np.array_equal(true, ages):
      raise ValueError(f"{path}: lists other faces (or another order) than {paths[0]}")
    preds.append(pred)
  preds = np.stack(preds)
  mae = np.abs(preds - ages).mean(axis=1)
  return {"files": list(paths), "faces": len(files), "mae": [round(float(m), 4) for m in mae],
          "mae_mean_of_models": round(float(mae.mean()), 4),
          "mae_of_mean": round(float(np.abs(preds.mean(axis=0) - ages).mean()), 4),
          "error_correlation": _correlation(preds - ages)}


def _correlation(errors: np.ndarray) -> list[list[float | None]]:
  """Pearson's r between the rows; None where a row is constant."""
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.corrcoef(errors)
  return [[None if np.isnan(c) else round(float(c), 3) for c in row] for row in r]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("csv", nargs="+", help="prediction CSVs of the same split (evaluate.py's eval folder)")
  a = ap.parse_args(argv)
  try:
    print(json.dumps(compare(a.csv)))
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
