"""An exported model on datasets' test splits, clean and under each photo degradation, in one table.

    python -m agejax.robustness --model runs/mix/seed0/export --datasets utkface,aaf --out runs/mix/seed0/robustness
    python -m agejax.robustness --datasets utkface,aaf --limit 500          # the bundled model, 500 faces each

For every dataset (its protocol's test split, `agejax.data.mixture.PROTOCOLS`) and every degradation of
`agejax.data.degrade` (and "clean"), the model predicts each face (flip-averaged, as `predict.py`)
and the table gives MAE, bias, CS@5 and the 90% interval's coverage before and after the model's
calibration temperature (`model.json`'s "calibration", from `python -m agejax.export --calibrate`;
or fitted here on the validation splits of `--calibrate_on`). Degradations are applied to the
aligned chip at the model's input size with a fixed key per face, so every model sees the same
damaged faces. Writes <out>/robustness.json (every cell) and <out>/robustness.md (the table).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from agejax import calibration
from agejax.heldout import CLEAN, fit_on_validation, open_split, predict_raw, split_images


def cell(out: dict[str, np.ndarray], ages: np.ndarray, grid: np.ndarray, temperature: float | None) -> dict:
  """MAE, bias, CS@5, 90% coverage (and after the temperature) of one set of predictions."""
  err = out["age"] - ages
  c = {"n": int(len(ages)), "mae": float(np.mean(np.abs(err))), "bias": float(np.mean(err)),
       "cs5": float(np.mean(np.abs(err) <= 5)), "coverage90": calibration.coverage(out["probs"], grid, ages)}
  if temperature is not None:
    c["coverage90_calibrated"] = calibration.coverage(calibration.apply_temperature(out["probs"], temperature),
                                                      grid, ages)
  return c


def run(model, datasets: list[str], degradations: list[str], temperature: float | None,
        data_dir: str | None = None, limit: int | None = None, progress: bool = True) -> list[dict]:
  """Every (dataset, degradation) cell, as dicts with their labels."""
  from agejax.reporting import Progress
  cells = []
  for name in datasets:
    source, split = open_split(name, "test", data_dir)
    faces, ages = split_images(source, model.image_size, limit)
    bar = Progress(len(degradations) * -(-len(faces) // 64), f"robustness {name}", unit="batch", enabled=progress)
    for d in degradations:
      out = predict_raw(model, faces, d, bar=bar)
      cells.append({"dataset": name, "split": split, "degradation": d, **cell(out, ages, model.grid, temperature)})
    bar.close()
  return cells


def table(cells: list[dict]) -> str:
  """Markdown: a row per degradation, per dataset MAE / bias / CS@5 / 90% coverage (-> calibrated)."""
  datasets = list(dict.fromkeys(c["dataset"] for c in cells))
  degs = list(dict.fromkeys(c["degradation"] for c in cells))
  by = {(c["dataset"], c["degradation"]): c for c in cells}
  head = "| photos | " + " | ".join(f"{d} MAE | {d} bias | {d} CS@5 | {d} 90% cov." for d in datasets) + " |"
  lines = [head, "|---|" + "---|" * (4 * len(datasets))]
  for g in degs:
    row = [g]
    for d in datasets:
      c = by.get((d, g))
      if c is None:
        row += ["-"] * 4
        continue
      cov = f"{c['coverage90']:.1%}"
      if "coverage90_calibrated" in c:
        cov += f" -> {c['coverage90_calibrated']:.1%}"
      row += [f"{c['mae']:.2f}", f"{c['bias']:+.2f}", f"{c['cs5']:.1%}", cov]
    lines.append("| " + " | ".join(row) + " |")
  n = {d: next(c["n"] for c in cells if c["dataset"] == d) for d in datasets}
  lines.append("")
  lines.append("Faces: " + ", ".join(f"{d} {next(c['split'] for c in cells if c['dataset'] == d)} {n[d]}"
                                      for d in datasets) + ". Coverage: before -> after the calibration temperature.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  import argparse

  from agejax.data import degrade
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default=None, help="exported model folder (default: the bundled model)")
  ap.add_argument("--datasets", default="utkface,aaf", help="comma-separated dataset names (their test splits)")
  ap.add_argument("--degradations", default="all",
                  help=f"comma-separated, from {CLEAN},{','.join(degrade.DEGRADATIONS)}; 'all' for every one")
  ap.add_argument("--calibrate_on", default="",
                  help="fit the temperature on these datasets' validation splits (default: model.json's calibration)")
  ap.add_argument("--limit", type=int, default=0, help="at most this many faces per dataset (0: all)")
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--out", default=None, help="folder for robustness.json and .md (default: print only)")
  from agejax import export, predict_lib
  ap.add_argument("--runtime", default="auto", choices=list(export.RUNTIMES), help=export.RUNTIME_HELP)
  a = ap.parse_args(argv)
  from agejax.data import builders
  degs = [CLEAN, *degrade.DEGRADATIONS] if a.degradations == "all" else [d.strip() for d in a.degradations.split(",")]
  bad = [d for d in degs if d != CLEAN and d not in degrade.DEGRADATIONS]
  if bad:
    print(f"error: unknown degradation(s) {bad}; choose from {CLEAN}, {', '.join(degrade.DEGRADATIONS)}.",
          file=sys.stderr)
    return 2
  try:
    model = export.load(a.model or predict_lib.DEFAULT_MODEL, a.runtime)
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    fit = None
    if a.calibrate_on:
      fit = fit_on_validation(model, [n.strip() for n in a.calibrate_on.split(",")], a.data_dir, a.limit or None)
      temperature = fit["temperature"]
    else:
      temperature = (model.meta.get("calibration") or {}).get("temperature")
    cells = run(model, names, degs, temperature, a.data_dir, a.limit or None)
  except (FileNotFoundError, ValueError, builders.BadInputError, builders.DatasetNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  md = table(cells) + f"Runtime: {model.runtime}.\n"
  if temperature is not None:
    md += f"Temperature {temperature:.3f}" + (f", fitted on {', '.join(fit['fitted_on'])}" if fit else
                                              " (the model's own)") + ".\n"
  print(md)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "robustness.json"), "w") as f:
      json.dump({"model": a.model or "bundled", "runtime": model.runtime, "temperature": temperature, "calibration_fit": fit, "cells": cells},
                f, indent=1)
    with open(os.path.join(a.out, "robustness.md"), "w") as f:
      f.write(md)
  return 0


if __name__ == "__main__":
  from agejax import cli
  cli.start_process()
  sys.exit(main())
