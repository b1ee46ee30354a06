"""A model's predictions on held-out faces: a dataset split's faces, clean or degraded, and the
calibration temperature fitted on validation splits.

The data side of `agejax.robustness` and of `python -m agejax.export --calibrate`; it imports no
exported-model or prediction code (an exported model comes in as an argument with `.predict`,
`.image_size` and `.grid`).
"""

from __future__ import annotations

import os

import numpy as np

from agejax import calibration

CLEAN = "clean"


def split_images(source, size: int, limit: int | None = None):
  """(uint8 faces (N, size, size, 3), ages (N,)) of the first `limit` records (all when None),
  decoded as the training pipeline decodes them."""
  from agejax.data import pipeline
  n = len(source) if not limit else min(limit, len(source))
  rows = [source[i] for i in range(n)]
  faces = np.stack([pipeline.decode_face(r["image"], size) for r in rows])
  return faces, np.asarray([r["age"] for r in rows], np.float32)


def _apply_jit(name, key, images, ids):
  import jax

  from agejax.data import degrade
  global _JITTED
  if _JITTED is None:
    _JITTED = jax.jit(degrade.apply, static_argnums=0)
  return _JITTED(name, key, images, ids)


_JITTED = None


def predict_raw(model, faces: np.ndarray, degradation: str = CLEAN, seed: int = 0, batch_size: int = 64,
                bar=None) -> dict[str, np.ndarray]:
  """The model's uncalibrated outputs for `faces`, degraded first unless CLEAN (`degrade.apply`
  with the face's position as its id: the damage depends on the seed, the degradation and the
  face alone, not on the batch size or the other degradations)."""
  import jax

  from agejax.data import degrade
  outs = []
  for i in range(0, len(faces), batch_size):
    x = faces[i:i + batch_size]
    if degradation != CLEAN:
      x = np.asarray(_apply_jit(degradation, jax.random.PRNGKey(seed), x, np.arange(i, i + len(x))))
    outs.append(model.predict(x, batch_size=batch_size, calibrated=False))
    if bar is not None:
      bar.update(1, images=len(x))
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def open_split(name: str, split_kind: str = "test", data_dir: str | None = None):
  """The data source of a dataset's protocol split ("train", "validation" = its selection split,
  "test"), building it first from `$<NAME>_DIR` if needed."""
  from agejax.data import builders, mixture
  (dname, config, _), = mixture.parse(f"{name}:1")
  train, select, report = mixture.PROTOCOLS[dname]
  split = {"train": train, "validation": select, "test": report}[split_kind]
  b = builders.ensure_built(dname, config or None, data_dir, os.environ.get(f"{dname.upper()}_DIR") or None)
  return b.as_data_source(split), split


def fit_on_validation(model, names: list[str], data_dir: str | None = None, limit: int | None = None,
                      progress: bool = True, degradations: tuple[str, ...] = (), floor: float | None = None) -> dict:
  """calibration.fit_temperature on the pooled validation splits of the datasets `names` (their
  intervals to hold 90%), with what it was fitted on; with `degradations` (`agejax.data.degrade`
  names) and `floor`, each dataset's faces, clean and under each degradation, must also hold at
  least `floor` (the cells of a dataset x degradation table)."""
  from agejax.reporting import Progress
  conditions = (CLEAN, *degradations)
  clean, ages, used, also = [], [], [], {}
  for name in names:
    source, split = open_split(name, "validation", data_dir)
    faces, a = split_images(source, model.image_size, limit)
    for condition in conditions:
      bar = Progress(-(-len(faces) // 64), f"calibrate {name} {condition}", unit="batch", enabled=progress)
      probs = predict_raw(model, faces, condition, bar=bar)["probs"]
      bar.close()
      if condition == CLEAN:
        clean.append(probs)
      if degradations:
        also[f"{name} {condition}"] = (probs, a)
    ages.append(a)
    used.append(f"{name} {split} ({len(a)})")
  fit = calibration.fit_temperature(np.concatenate(clean), model.grid, np.concatenate(ages),
                                    also=also or None, floor=floor if also else None)
  fit["fitted_on"] = used + ([f"each also {', '.join(degradations)}"] if degradations else [])
  return fit
