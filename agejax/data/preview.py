"""A contact sheet of augmented training samples with their labels: see what the network sees.

    python -m agejax.data.preview --config configs/utkface.py:tiny,cpu --out preview.png [--rows 4 --cols 8]

Draws one training batch through the same pipeline and on-device augmentation
as train.py (the normalisation undone for display).
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
  c = FLAGS.config
  b = builders.ensure_built(c.dataset.name, c.dataset.config or None, c.dataset.data_dir or None,
                            c.dataset.manual_dir or None, on_error=c.dataset.on_error)
  n = FLAGS.rows * FLAGS.cols
  it = pipeline.train_iterator(b.as_data_source(c.dataset.train_split), size=c.image_size, global_batch=n,
                               seed=c.seed, process_index=0, process_count=1)
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
  print(f"wrote {FLAGS.out} ({n} augmented samples of {c.dataset.name} {c.dataset.train_split})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
