"""Batch normalisation whose per-channel sums are matrix-vector products.

A drop-in for `nn.BatchNorm` over the last axis, with the same variables
(params `scale`, `bias`; batch_stats `mean`, `var`), the same running-average
update and the same "fast variance" E[x^2] - E[x]^2. Why it exists: XLA:CPU
rewrites every large reduction into a tree of reduce-windows, and the 4
per-channel reductions of each BN layer (2 forward, 2 backward) took about
100 ms of a 480 ms TinyAgeNet step at 64 px. Written as dots with a vector of
ones they run at memory speed. On sharded inputs the dots reduce over the
global batch, as nn.BatchNorm does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def channel_sum(x):
  """Sum over every axis but the last, as ones @ x.reshape(-1, C) (float32 accumulation)."""
  flat = x.reshape(-1, x.shape[-1])
  return jnp.dot(jnp.ones((flat.shape[0],), flat.dtype), flat, preferred_element_type=jnp.float32)


@jax.custom_vjp
def scale_shift(x, a, b):
  """x * a + b with per-channel a, b; its gradients for a and b are dots too."""
  return x * a.astype(x.dtype) + b.astype(x.dtype)


def _scale_shift_fwd(x, a, b):
  return scale_shift(x, a, b), (x, a)


def _scale_shift_bwd(res, g):
  x, a = res
  return g * a.astype(g.dtype), channel_sum(g * x).astype(a.dtype), channel_sum(g).astype(a.dtype)


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


class BatchNorm(nn.Module):
  """nn.BatchNorm(axis=-1) with dot reductions; statistics in float32 whatever `dtype` is."""
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      n = x.size // c
      mean = channel_sum(x) / n
      var = jnp.maximum(channel_sum(jnp.square(x)) / n - jnp.square(mean), 0.0)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    a = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
    return scale_shift(x, a, bias.astype(jnp.float32) - mean * a)
