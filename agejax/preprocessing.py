"""The input every network takes: RGB scaled to [0, 1], then normalised per channel by MEAN and STD.

Every agejax checkpoint and export assumes these MEAN and STD. Augmentation, training, evaluation
and exports apply `normalize`; the face ResNet maps this input back to dlib's own normalisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MEAN = (0.5958, 0.4637, 0.4065)
STD = (0.2693, 0.2409, 0.2352)


def normalize(images) -> jax.Array:
  """uint8 (or [0, 255] float) RGB -> the network's input: (x / 255 - mean) / std, float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.array(MEAN)) / jnp.array(STD)
