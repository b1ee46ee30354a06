"""Label distributions over an age grid and the expectation layer.

Pure `jax.numpy` functions (no Flax, no state): jit-able, vmap-able and
differentiable. They are the encodings of DLDL / DLDL-v2:

  Gao et al., "Deep Label Distribution Learning With Label Ambiguity", TIP 2017.
  Gao et al., "Age Estimation Using Expectation of Label Distribution Learning",
  IJCAI 2018 (DLDL-v2).

Conventions: `grid` is a 1-D array of the K label values l_0 < ... < l_{K-1}
(`label_grid()` gives 0..100, K = 101); ages and sigmas are arrays of shape
(...,); distributions have shape (..., K). All arithmetic runs in float32 even
for bf16 inputs, because exponentials of squared distances underflow in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Smallest sigma used in the Gaussian encoding. Below it the distribution is the
# one-hot of the nearest label (to float32 precision), which is also the limit.
MIN_SIGMA = 1e-4


def label_grid(start: float = 0, stop: float = 100, step: float = 1) -> jax.Array:
  """The K label values start, start + step, ..., stop (inclusive), float32."""
  if step <= 0:
    raise ValueError(f"label_grid: step must be positive, got {step}.")
  if stop < start:
    raise ValueError(f"label_grid: stop ({stop}) is below start ({start}).")
  num = int(round((stop - start) / step)) + 1
  return start + step * jnp.arange(num, dtype=jnp.float32)


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def gaussian_label_distribution(ages, sigmas, grid) -> jax.Array:
  """Discretised Gaussian label distribution (DLDL eq. 1).

  p_k = exp(-(l_k - y)^2 / (2 sigma^2)) / sum_j exp(-(l_j - y)^2 / (2 sigma^2)).

  Args:
    ages: (...,) true (or mean apparent) ages y.
    sigmas: scalar or (...,) standard deviations; ChaLearn gives one per image.
    grid: (K,) label values.

  Returns:
    (..., K) float32 distribution, each row summing to 1.

  Numerics: computed as a softmax of -(d^2 - min d^2) / (2 sigma^2), so the row
  never divides 0 by 0. Sigma is clamped at `MIN_SIGMA`: as sigma -> 0 the result
  tends to the one-hot of the nearest label, even for off-grid ages (an age
  exactly between two labels splits its mass evenly). Ages outside the grid are
  not clipped: the Gaussian is truncated to the grid and renormalised, so its
  mass piles up at the nearest end (one-hot there for ages far outside).
  """
  ages, sigmas, grid = _f32(ages), _f32(sigmas), _f32(grid)
  sigmas = jnp.maximum(jnp.broadcast_to(sigmas, ages.shape), MIN_SIGMA)
  d2 = (grid - ages[..., None]) ** 2
  d2 = d2 - jnp.min(d2, axis=-1, keepdims=True)
  return jax.nn.softmax(-d2 / (2.0 * sigmas[..., None] ** 2), axis=-1)


def ranking_targets(ages, grid) -> jax.Array:
  """The K-1 ordinal targets 1[y > l_k], k = 0..K-2 (OR-CNN, CORAL), float32."""
  ages, grid = _f32(ages), _f32(grid)
  return (ages[..., None] > grid[:-1]).astype(jnp.float32)


def ranking_prior_logits(ages, grid, pseudo_count: float = 1.0) -> jax.Array:
  """logit P(y > l_k), k = 0..K-2, over a set of ages (smoothed by `pseudo_count`).

  As the biases of a CORAL / OR-CNN head they start every image at the label
  prior instead of at one shared logit for all K-1 tasks (zero biases), which
  puts every first prediction at one end of the grid.
  """
  targets = ranking_targets(ages, grid)
  p = (jnp.sum(targets, axis=0) + pseudo_count) / (targets.shape[0] + 2.0 * pseudo_count)
  return jnp.log(p) - jnp.log1p(-p)


def cumulative(probs) -> jax.Array:
  """The cumulative distribution F_k = sum_{j <= k} p_j over the last axis.

  DLDL-v2 shows ranking is learning a label distribution: 1 - F_k over the first
  K-1 labels equals P(y > l_k), which tends to `ranking_targets` as sigma -> 0.
  """
  return jnp.cumsum(_f32(probs), axis=-1)


def expectation(probs, grid) -> jax.Array:
  """The expectation layer: y_hat = sum_k p_k l_k (DLDL-v2, eq. 6). Parameter free."""
  return jnp.sum(_f32(probs) * _f32(grid), axis=-1)


def expectation_from_logits(logits, grid) -> jax.Array:
  """`expectation(softmax(logits), grid)`."""
  return expectation(jax.nn.softmax(_f32(logits), axis=-1), grid)


def distribution_std(probs, grid) -> jax.Array:
  """Standard deviation of a distribution over the grid: the per-image uncertainty."""
  probs, grid = _f32(probs), _f32(grid)
  mean = expectation(probs, grid)
  var = jnp.sum(probs * (grid - mean[..., None]) ** 2, axis=-1)
  return jnp.sqrt(jnp.maximum(var, 0.0))


def quantile(probs, grid, q) -> jax.Array:
  """The q-quantile of a distribution over the grid (the first l_k with F_k >= q)."""
  cdf = cumulative(probs)
  idx = jnp.sum(cdf < jnp.asarray(q, jnp.float32) - 1e-6, axis=-1)
  return _f32(grid)[jnp.clip(idx, 0, cdf.shape[-1] - 1)]


def central_interval(probs, grid, mass: float = 0.9) -> tuple[jax.Array, jax.Array]:
  """The central interval holding `mass` of the distribution: (low, high)."""
  if not 0.0 < mass < 1.0:
    raise ValueError(f"central_interval: mass must be in (0, 1), got {mass}.")
  tail = (1.0 - mass) / 2.0
  return quantile(probs, grid, tail), quantile(probs, grid, 1.0 - tail)


def nearest_label_index(ages, grid) -> jax.Array:
  """Index of the grid label nearest each age (int32)."""
  return jnp.argmin(jnp.abs(_f32(grid) - _f32(ages)[..., None]), axis=-1).astype(jnp.int32)
