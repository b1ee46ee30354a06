"""Max-pools for XLA:CPU: `max_pool` is `nn.max_pool`, with the 2x2/2 and 3x3/2 pools as a max over
reshaped or strided-sliced views, whose gradient is a compare-and-select rather than XLA's
select-and-scatter (docs/CPU.md). The values are nn.max_pool's; where several inputs tie for the
maximum the gradient is split evenly among them rather than given to one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), strides=(2, 2)) on NHWC (VALID: floor mode), as a reshape and a max."""
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


def _pads(padding) -> int | None:
  """nn.max_pool's padding as one symmetric amount for both axes, or None."""
  if padding == "VALID":
    return 0
  if isinstance(padding, str):
    return None
  pads = [tuple(p) for p in padding]
  return pads[0][0] if len(pads) == 2 and all(p == (pads[0][0],) * 2 for p in pads) else None


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
  """nn.max_pool(inputs, window_shape, strides, padding) on NHWC; the 2x2/2 VALID pool and the 3x3/2
  pool with padding 0 or 1 by reshapes and strided slices, any other by nn.max_pool."""
  window, strides, pad = tuple(window_shape), tuple(strides or window_shape), _pads(padding)
  if inputs.ndim == 4 and strides == (2, 2):
    if window == (2, 2) and pad == 0:
      return max_pool_2x2(inputs)
    if window == (3, 3) and pad in (0, 1):
      return max_pool_3x3_s2(inputs, pad)
  return nn.max_pool(inputs, window, strides, padding)
