"""Contact sheets of faces with their labels: see what the network sees.

    python -m agejax.data.preview --config configs/utkface.py:tiny,cpu --out preview.png [--rows 4 --cols 8]
    python -m agejax.data.preview --config configs/utkface.py:face_resnet --datasets utkface,aaf --out chips.png
    python -m agejax.data.preview --config configs/utkface.py:face_resnet --degradations --out looks.png

The first draws one training batch through the same pipeline and on-device augmentation
as train.py (the normalisation undone for display); a config with a mixture draws from the mixture.
--datasets shows `--cols` unaugmented training chips of each named dataset, a row each (AAF's
alignment beside UTKFace's chips). --degradations shows `--rows` faces, each clean and under every
degradation of `agejax.data.degrade` at full probability.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from agejax.data import labels

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
flags.DEFINE_string("out", "preview.png", "Output PNG.")
flags.DEFINE_integer("rows", 4, "Rows of faces.")
flags.DEFINE_integer("cols", 8, "Columns of faces.")
flags.DEFINE_integer("seed", 0, "Augmentation seed.")
flags.DEFINE_list("datasets", [], "Show unaugmented chips of these datasets, a row each (e.g. utkface,aaf).")
flags.DEFINE_bool("degradations", False, "Show faces clean and under each degradation (agejax.data.degrade).")



def contact_sheet(images: np.ndarray, labels: list[str], cols: int, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = int(np.ceil(len(images) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, img, label in zip(axes.flat, images, labels):
    ax.imshow(img)
    ax.set_title(label, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from agejax.data import augment, builders, pipeline
  from agejax.data import mixture
  c = FLAGS.config
  specs = mixture.sources(c.dataset)
  if FLAGS.datasets:
    return dataset_sheet(c, FLAGS.datasets, FLAGS.cols, FLAGS.out)
  built = [builders.ensure_built(s.name, s.config or None, c.dataset.data_dir or None, s.manual_dir or None,
                                 on_error=c.dataset.on_error) for s in specs]
  train = [b.as_data_source(s.train_split) for b, s in zip(built, specs)]
  if FLAGS.degradations:
    return degradation_sheet(train[0], c.image_size, FLAGS.rows, FLAGS.seed, FLAGS.out)
  n = FLAGS.rows * FLAGS.cols
  it = pipeline.train_iterator(train if len(train) > 1 else train[0], size=c.image_size, global_batch=n,
                               seed=c.seed, process_index=0, process_count=1,
                               weights=[s.weight for s in specs] if len(train) > 1 else None)
  batch = next(it)
  x = augment.augment(jax.random.PRNGKey(FLAGS.seed), jnp.asarray(batch["image"]), dict(c.augment),
                      jnp.asarray(batch["index"]))
  shown = np.clip(np.asarray(x) * np.array(augment.STD) + np.array(augment.MEAN), 0, 1)
  captions = []
  for i in range(n):
    parts = [f"age {batch['age'][i]:.0f}"]
    if batch["sigma"][i] > 0:
      parts.append(f"σ {batch['sigma'][i]:.1f}")
    if batch["gender"][i] >= 0:
      parts.append(labels.GENDER_NAMES[batch["gender"][i]][0].upper())
    if batch["race"][i] >= 0:
      parts.append(labels.RACE_NAMES[batch["race"][i]])
    captions.append(" ".join(parts))
  contact_sheet(shown, captions, FLAGS.cols, FLAGS.out)
  print(f"wrote {FLAGS.out} ({n} augmented samples of {' + '.join(s.label for s in specs)} training data)")


def dataset_sheet(c, names: list[str], cols: int, out: str) -> None:
  """`cols` unaugmented training chips of each dataset, a row each, as the builders stored them."""
  from agejax.data import builders, mixture, pipeline
  images, captions = [], []
  for spec in mixture.sources(mixture_config(c, names)):
    b = builders.ensure_built(spec.name, spec.config or None, c.dataset.data_dir or None, spec.manual_dir or None)
    src = b.as_data_source(spec.train_split)
    for i in np.random.RandomState(0).choice(len(src), size=min(cols, len(src)), replace=False):
      images.append(pipeline.decode_face(src[int(i)]["image"], 200))
      captions.append(f"{spec.label} {src[int(i)]['age']:.0f}")
  contact_sheet(np.stack(images), captions, cols, out)
  print(f"wrote {out} ({cols} training chips each of {', '.join(names)})")


def mixture_config(c, names):
  d = c.dataset.copy_and_resolve_references()
  with d.unlocked():
    d.mixture = ",".join(f"{n}:1" for n in names)
  return d


def degradation_sheet(source, size: int, rows: int, seed: int, out: str) -> None:
  """`rows` training faces, each clean and under every degradation."""
  import jax
  from agejax.data import degrade, pipeline
  pick = np.random.RandomState(seed).choice(len(source), size=rows, replace=False)
  faces = np.stack([pipeline.decode_face(source[int(i)]["image"], size) for i in pick])
  names = list(degrade.DEGRADATIONS)
  columns = [faces] + [np.asarray(degrade.apply(n, jax.random.PRNGKey(seed + k), faces)) for k, n in enumerate(names)]
  grid = np.stack(columns, axis=1).reshape(-1, size, size, 3)
  captions = (["clean"] + names) * rows
  contact_sheet(grid, captions, len(columns), out)
  print(f"wrote {out} ({rows} faces, clean and under {', '.join(names)})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
