"""Batch normalisation for XLA:CPU: `BatchNorm` is `nn.BatchNorm` with its per-channel sums as
fused reduces and matrix-vector products (`channel_sum`), which XLA:CPU runs at memory speed.

Same variables (params `scale`, `bias`; batch_stats `mean`, `var`), running-average update and
"fast variance" E[x^2] - E[x]^2 as nn.BatchNorm; statistics in float32. On sharded inputs the sums
run over the global batch, as nn.BatchNorm's do. The training-mode gradient is the textbook one,
written out (`normalize`): dx = scale * r / n * (n g - sum(g) - x_hat sum(g x_hat)), with x_hat
centred before anything is summed, so it keeps nn.BatchNorm's precision. Measurements: docs/CPU.md.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax.cpu.stored import stored


def channel_sum(x):
  """Sum over every axis but the last, in float32: a fused reduce, then dots with ones.

  Three levels, for speed and precision. The n rows of x.reshape(n, C) are summed in runs
  of k <= 32 by a reduce that XLA fuses with x's producer (x * x is never written out);
  the n / k run sums are cut into B <= 64 blocks summed by one batched matrix-vector
  product at HIGHEST precision; the B partial sums are added. As precise as XLA's tree
  reduction or more (a single n-term dot was not).
  """
  c = x.shape[-1]
  n = x.size // c
  k = next(d for d in (32, 16, 8, 4, 2, 1) if n % d == 0)
  runs = jnp.sum(x.reshape(n // k, k, c), axis=1, dtype=jnp.float32) if k > 1 else x
  m = n // k
  b = next(d for d in (64, 32, 16, 8, 4, 2, 1) if m % d == 0)
  blocks = runs.reshape(b, m // b, c)
  # HIGHEST: full float32 products on every backend (DEFAULT is TF32 on recent NVIDIA GPUs and
  # bfloat16 passes on TPU, which would round the statistics); on the CPU it changes nothing.
  partial = jax.lax.dot_general(jnp.ones((b, m // b), blocks.dtype), blocks, (((1,), (1,)), ((0,), (0,))),
                                precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return jnp.dot(jnp.ones((b,), jnp.float32), partial, precision=jax.lax.Precision.HIGHEST)


def _affine(x, mean, var, scale, bias, epsilon):
  """(x - mean) / sqrt(var + epsilon) * scale + bias as one multiply-add in x's dtype."""
  a = scale * jax.lax.rsqrt(var + epsilon)
  return x * a.astype(x.dtype) + (bias - mean * a).astype(x.dtype)


@jax.custom_vjp
def normalize(x, scale, bias, epsilon):
  """Training-mode BN over all axes but the last: returns (y, batch mean, batch variance)."""
  n = x.size // x.shape[-1]
  mean = channel_sum(x) / n
  var = jnp.maximum(channel_sum(jnp.square(x)) / n - jnp.square(mean), 0.0)
  return _affine(x, mean, var, scale, bias, epsilon), mean, var


def _normalize_fwd(x, scale, bias, epsilon):
  y, mean, var = normalize(x, scale, bias, epsilon)
  return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale, epsilon)


def _normalize_bwd(res, cts):
  x, mean, r, scale, epsilon = res
  g, g_mean, g_var = cts
  # g and dx each feed three or more fusions (two sums and dx; the input and kernel gradients of
  # the convolution before): stored once, so XLA:CPU does not recompute their producers in each.
  g = stored(g)
  n = x.size // x.shape[-1]
  x_hat = (x - mean.astype(x.dtype)) * r.astype(x.dtype)
  sum_g = channel_sum(g)
  sum_g_xhat = channel_sum(g * x_hat)
  k = scale * r / n
  dx = (g * (k * n).astype(g.dtype) - (k * sum_g).astype(g.dtype) - x_hat * (k * sum_g_xhat).astype(g.dtype))
  # Cotangents of the returned statistics (zero when they only feed the running averages).
  dx = dx + (g_mean / n).astype(g.dtype) + x_hat * (2.0 * g_var / (n * r)).astype(g.dtype)
  return stored(dx.astype(x.dtype)), sum_g_xhat.astype(scale.dtype), sum_g.astype(scale.dtype), jnp.zeros_like(epsilon)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (same fields, variables and update) with dot reductions, over the last axis with
  scale and bias; other uses (`axis`, `axis_name`, no scale or bias, exact variance) are nn.BatchNorm's."""

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if (mask is not None or self.axis not in (-1, x.ndim - 1) or self.axis_name is not None
        or not (self.use_scale and self.use_bias) or not self.use_fast_variance):
      return super().__call__(x, use_running_average, mask=mask)
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype).astype(jnp.float32)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype).astype(jnp.float32)
    x = x.astype(self.dtype or x.dtype)
    if use_ra:
      return _affine(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
    y, mean, var = normalize(x, scale, bias, jnp.float32(self.epsilon))
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    return y
