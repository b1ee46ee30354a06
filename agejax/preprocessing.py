"""The input every network takes: RGB scaled to [0, 1], then normalised per channel by MEAN and STD.

Every agejax checkpoint and export assumes these MEAN and STD. Augmentation, training, evaluation
and exports apply `normalize`; the face ResNet maps this input back to dlib's own normalisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MEAN = (0.5958, 0.4637, 0.4065)
STD = (0.2693, 0.2409, 0.2352)


# normalize as one multiply-add per pixel (constants in float64, then float32): XLA fuses any form,
# while an exported ONNX graph runs each elementwise op over the whole image batch.
_SCALE = (1.0 / (255.0 * np.asarray(STD))).astype(np.float32)
_OFFSET = (-np.asarray(MEAN) / np.asarray(STD)).astype(np.float32)


def normalize(images) -> jax.Array:
  """uint8 (or [0, 255] float) RGB -> the network's input: (x / 255 - mean) / std, float32."""
  return images.astype(jnp.float32) * _SCALE + _OFFSET
