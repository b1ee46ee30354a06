"""Max-pools with cheap gradients on XLA:CPU.

`nn.max_pool`'s gradient is XLA's select-and-scatter, which XLA:CPU runs slowly:
131 ms of a 580 ms TinyAgeNet step at 64 px, and about 300 ms for ResNet's stem
pool at 112 px, batch 32. A max over reshaped or strided-sliced views gives the
same values, and its gradient is a compare-and-select (28 ms and 130 ms). With
tied maxima the gradient is split evenly among them rather than given to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), strides=(2, 2)) on NHWC (floor mode), as a reshape and a max."""
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def max_pool_3x3_s2(x, pad: int = 1):
  """nn.max_pool(x, (3, 3), strides=(2, 2), padding=((pad, pad), (pad, pad))) on NHWC: ResNet's stem
  pool (pad 1) or dlib's (pad 0).

  Separable: a max over 3 row-strided slices, then over 3 column-strided slices.
  """
  n, h, w, c = x.shape
  ho, wo = (h + 2 * pad - 3) // 2 + 1, (w + 2 * pad - 3) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf) if pad else x
  rows = [jax.lax.slice(xp, (0, i, 0, 0), (n, i + 2 * ho - 1, w + 2 * pad, c), (1, 2, 1, 1)) for i in range(3)]
  r = jnp.maximum(jnp.maximum(rows[0], rows[1]), rows[2])
  cols = [jax.lax.slice(r, (0, 0, j, 0), (n, ho, j + 2 * wo - 1, c), (1, 1, 2, 1)) for j in range(3)]
  return jnp.maximum(jnp.maximum(cols[0], cols[1]), cols[2])
