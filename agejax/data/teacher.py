"""Teacher files: a teacher's age distribution for every record of a training split, the labels
of `loss=distill` (written by `python -m agejax.distill`).

A file (numpy .npz) holds the (N, K) float32 distributions in the split's record order, the label
grid, each record's age and file name, and the split's identity (dataset, config, split), so a
student on another dataset, split, record order or grid fails before its first step, naming what
differs; records swapped among equal ages are caught by their file names.
"""

from __future__ import annotations

import json
import os

import numpy as np

FORMAT_VERSION = 2  # 2: the records' file names and the split's identity are checked


IDENTITY = ("dataset", "config", "split")


def save(path: str, probs: np.ndarray, ages: np.ndarray, grid: np.ndarray, meta: dict,
         filenames: list[str] | np.ndarray | None = None) -> None:
  """Write the teacher file atomically (a partial file never has the final name). `meta` should
  name the dataset, config and split; `filenames` the records' file names, in record order."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  names = np.asarray([_text(n) for n in (filenames if filenames is not None else [""] * len(ages))], dtype=str)
  np.savez(tmp, probs=np.asarray(probs, np.float32), age=np.asarray(ages, np.float32), filename=names,
           grid=np.asarray(grid, np.float32), meta=np.asarray(json.dumps({"format_version": FORMAT_VERSION, **meta})))
  os.replace(tmp, path)


def _text(name) -> str:
  return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def load(path: str, grid, ages, split: str = "the training split", filenames=None,
         identity: dict | None = None) -> np.ndarray:
  """The (N, K) float32 distributions of a teacher file, checked against the student's label
  `grid`, the (N,) `ages` and `filenames` of its training records (in record order) and the
  split's `identity` ({"dataset", "config", "split"}); ValueError naming what differs otherwise."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.loss.teacher: {path} does not exist; make it with "
                            f"python -m agejax.distill --config <the student's config> --out {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
    meta = json.loads(str(data["meta"]))
  except (ValueError, KeyError, OSError) as e:
    raise ValueError(f"{path}: not a teacher file of agejax.distill ({type(e).__name__}: {e}).") from None
  missing = [k for k in ("probs", "age", "grid") if k not in data]
  if missing:
    raise ValueError(f"{path}: not a teacher file of agejax.distill (missing {', '.join(missing)}).")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format version {meta.get('format_version')!r}; this agejax reads {FORMAT_VERSION}.")
  grid, ages, probs = np.asarray(grid, np.float32), np.asarray(ages, np.float32), data["probs"]
  if data["grid"].shape != grid.shape or not np.allclose(data["grid"], grid):
    raise ValueError(f"{path}: the teacher's label grid ({len(data['grid'])} ages, "
                     f"{data['grid'][0]:g}..{data['grid'][-1]:g}) is not the student's "
                     f"({len(grid)} ages, {grid[0]:g}..{grid[-1]:g}).")
  if len(probs) != len(ages):
    raise ValueError(f"{path}: {len(probs)} distributions for {split}'s {len(ages)} records "
                     f"(made for {meta.get('dataset', '?')}/{meta.get('config', '?')} {meta.get('split', '?')}).")
  wrong = np.flatnonzero(np.abs(data["age"] - ages) > 1e-3)
  if len(wrong):
    raise ValueError(f"{path}: the records' ages differ from {split}'s at {len(wrong)} of {len(ages)} records "
                     f"(first: record {wrong[0]}, {data['age'][wrong[0]]:g} against {ages[wrong[0]]:g}): made "
                     f"for another split or order ({meta.get('dataset', '?')}/{meta.get('config', '?')} "
                     f"{meta.get('split', '?')}).")
  for key, want in (identity or {}).items():
    if key in IDENTITY and str(meta.get(key, "") or "") != str(want or ""):
      raise ValueError(f"{path}: made for {key} {meta.get(key)!r}, the student trains on {want!r} "
                       f"({meta.get('dataset', '?')}/{meta.get('config', '?')} {meta.get('split', '?')}).")
  if filenames is not None:
    stored = data.get("filename")
    names = np.asarray([_text(n) for n in filenames], dtype=str)
    if stored is None or len(stored) != len(names):
      raise ValueError(f"{path}: holds no file names of its records; make it again with python -m agejax.distill.")
    differ = np.flatnonzero(stored != names)
    if len(differ):
      i = differ[0]
      raise ValueError(f"{path}: the records' file names differ from {split}'s at {len(differ)} of {len(names)} "
                       f"records (first: record {i}, {str(stored[i])!r} against {str(names[i])!r}): made for another "
                       "split or order.")
  sums = probs.sum(-1)
  if not (np.all(np.isfinite(probs)) and np.all(probs >= 0) and np.allclose(sums, 1.0, atol=1e-3)):
    raise ValueError(f"{path}: the distributions are not finite, non-negative rows summing to 1.")
  return probs.astype(np.float32)
