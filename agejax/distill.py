"""A teacher's age distributions for every training image: the labels of `loss=distill`.

  python -m agejax.distill --config configs/utkface.py:tiny,cpu,distill --out runs/teacher/utkface.npz
  python train.py --config configs/utkface.py:tiny,cpu,distill --config.loss.teacher=runs/teacher/utkface.npz ...

The teacher is an exported model (`agejax.export`; default the bundled one). It sees each image of
the config's training split once, decoded at its own input size, without augmentation, and
predicts as the export does (flip-averaged). The student's augmented views are labelled with the
clean image's distribution. The file's format and checks: `agejax.data.teacher`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from agejax import ldl
from agejax.reporting import Progress
from agejax.data import pipeline, teacher as teacher_file


def teacher_distributions(teacher, source, batch_size: int = 64, progress: bool = True) -> dict[str, np.ndarray]:
  """The teacher's predictions for every record of `source`, in record order: "probs" (N, K),
  "pred_age" (N,) and the records' "age" (N,). `teacher` is an `agejax.export.ExportedModel`."""
  n = len(source)
  batches = pipeline.eval_batches(source, size=teacher.image_size, global_batch=batch_size,
                                  process_index=0, process_count=1)
  bar = Progress(-(-n // batch_size), "teacher", unit="batch", enabled=progress)
  probs, pred_age, ages, index = [], [], [], []
  for b in batches:
    keep = b["valid"] > 0
    out = teacher.predict(b["image"][keep], batch_size=batch_size, calibrated=False)
    probs.append(out["probs"].astype(np.float32))
    pred_age.append(out["age"].astype(np.float32))
    ages.append(b["age"][keep])
    index.append(b["index"][keep])
    bar.update(1, images=int(keep.sum()))
  bar.close()
  index = np.concatenate(index)
  if not np.array_equal(index, np.arange(n)):
    raise RuntimeError("the evaluation batches did not visit the records in order")
  return {"probs": np.concatenate(probs), "pred_age": np.concatenate(pred_age), "age": np.concatenate(ages)}


def main(argv=None):
  """python -m agejax.distill --config CONFIG --out FILE [--teacher MODEL_DIR]"""
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "The student's config (its dataset, training split and grid).",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "The teacher file to write (.npz).")
  flags.DEFINE_string("teacher", None, "An exported model's folder (default: the bundled model).")
  flags.DEFINE_integer("batch_size", 64, "Images a call of the teacher.")
  flags.mark_flags_as_required(["config", "out"])

  def run(_):
    from agejax import export
    from agejax.data import builders
    from agejax.predict_lib import DEFAULT_MODEL
    config = flags.FLAGS.config
    teacher_dir = flags.FLAGS.teacher or DEFAULT_MODEL
    teacher = export.load(teacher_dir)
    g = config.label_grid
    grid = np.asarray(ldl.label_grid(g.start, g.stop, g.step), np.float32)
    if teacher.grid.shape != grid.shape or not np.allclose(teacher.grid, grid):
      sys.exit(f"{teacher_dir}: the teacher's label grid ({len(teacher.grid)} ages, {teacher.grid[0]:g}.."
               f"{teacher.grid[-1]:g}) is not the config's ({len(grid)} ages, {grid[0]:g}..{grid[-1]:g}).")
    ds = config.dataset
    builder = builders.ensure_built(ds.name, ds.config or None, ds.data_dir or None, ds.manual_dir or None,
                                    on_error=ds.on_error)
    source = builder.as_data_source(ds.train_split)
    t0 = time.time()
    out = teacher_distributions(teacher, source, flags.FLAGS.batch_size)
    seconds = time.time() - t0
    meta = {"teacher": os.path.abspath(teacher_dir), "dataset": ds.name, "config": ds.config,
            "version": str(builder.version), "split": ds.train_split, "records": len(source),
            "teacher_mae": float(np.mean(np.abs(out["pred_age"] - out["age"])))}
    teacher_file.save(flags.FLAGS.out, out["probs"], out["age"], grid, meta,
                      filenames=pipeline.label_array(source, "filename"))
    print(json.dumps({**meta, "out": flags.FLAGS.out, "minutes": round(seconds / 60, 2),
                      "images_per_sec": round(len(source) / seconds, 1)}))

  app.run(run, argv)


if __name__ == "__main__":
  from agejax import cli
  cli.start_process()  # XLA flags and huge pages, before JAX loads
  main()
