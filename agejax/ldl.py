"""Label distributions over an age grid and the expectation layer.

Pure `jax.numpy` functions (no Flax, no state): jit-able, vmap-able and
differentiable. They are the encodings of DLDL / DLDL-v2:

  Gao et al., "Deep Label Distribution Learning With Label Ambiguity", TIP 2017.
  Gao et al., "Age Estimation Using Expectation of Label Distribution Learning",
  IJCAI 2018 (DLDL-v2).

The read-outs (`cumulative`, `expectation`, `distribution_std`, `quantile`, `central_interval`)
compute in numpy where every input is a numpy array or a Python number, so a deployed model
(ONNX Runtime, `agejax.predict_lib`) reads its ages without importing JAX; otherwise, and in every
other function, in `jax.numpy`.

Conventions: `grid` is a 1-D array of the K label values l_0 < ... < l_{K-1}
(`label_grid()` gives 0..100, K = 101); ages and sigmas are arrays of shape
(...,); distributions have shape (..., K). All arithmetic runs in float32 even
for bf16 inputs, because exponentials of squared distances underflow in bf16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  import jax

# Smallest sigma used in the Gaussian encoding. Below it the distribution is the
# one-hot of the nearest label (to float32 precision), which is also the limit.
MIN_SIGMA = 1e-4


def label_grid(start: float = 0, stop: float = 100, step: float = 1) -> jax.Array:
  """The label grid l_k = start + k * step, k = 0..K-1, with l_{K-1} = stop.

  Args:
    start: the first label (an age in years).
    stop: the last label, inclusive; stop >= start.
    step: the spacing, > 0.

  Returns:
    (K,) float32 grid, K = round((stop - start) / step) + 1.

  References:
    Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
      Learning", IJCAI 2018 (the 0..100 grid of its experiments).
  """
  if step <= 0:
    raise ValueError(f"label_grid: step must be positive, got {step}.")
  if stop < start:
    raise ValueError(f"label_grid: stop ({stop}) is below start ({start}).")
  num = int(round((stop - start) / step)) + 1
  jnp = _jnp()
  return start + step * jnp.arange(num, dtype=jnp.float32)


def _xp(*arrays):
  """numpy where every input is numpy or a Python number, else jax.numpy (imported here)."""
  if all(isinstance(a, (np.ndarray, np.generic, int, float, list, tuple)) for a in arrays):
    return np
  import jax.numpy as jnp
  return jnp


def _jnp():
  import jax.numpy as jnp
  return jnp


def _f32(x, xp=None) -> jax.Array:
  xp = xp or _jnp()
  return xp.asarray(x).astype(xp.float32)


def gaussian_label_distribution(ages, sigmas, grid) -> jax.Array:
  """Discretised Gaussian label distribution over the grid.

  p_k = exp(-(l_k - y)^2 / (2 sigma^2)) / sum_j exp(-(l_j - y)^2 / (2 sigma^2)).

  Computed as a softmax of -(d^2 - min d^2) / (2 sigma^2), so a row never divides 0 by 0.
  Sigma is clamped at `MIN_SIGMA`: as sigma -> 0 the result tends to the one-hot of the
  nearest label, even for off-grid ages (an age exactly between two labels splits its
  mass evenly). Ages outside the grid are not clipped: the Gaussian is truncated to the
  grid and renormalised, so its mass piles up at the nearest end.

  Args:
    ages: (...,) true (or mean apparent) ages y, any float dtype.
    sigmas: scalar or (...,) standard deviations (ChaLearn gives one per image).
    grid: (K,) label values.

  Returns:
    (..., K) float32 distribution, each row summing to 1.

  References:
    Gao, Xing, Xie, Wu, Geng, "Deep Label Distribution Learning With Label
      Ambiguity", IEEE TIP 2017, Eq. 1.
  """
  import jax
  jnp = _jnp()
  ages, sigmas, grid = _f32(ages), _f32(sigmas), _f32(grid)
  sigmas = jnp.maximum(jnp.broadcast_to(sigmas, ages.shape), MIN_SIGMA)
  d2 = (grid - ages[..., None]) ** 2
  d2 = d2 - jnp.min(d2, axis=-1, keepdims=True)
  return jax.nn.softmax(-d2 / (2.0 * sigmas[..., None] ** 2), axis=-1)


def ranking_targets(ages, grid) -> jax.Array:
  """The K-1 ordinal targets t_k = 1[y > l_k], k = 0..K-2.

  Args:
    ages: (...,) ages y.
    grid: (K,) label values.

  Returns:
    (..., K-1) float32 in {0, 1}.

  References:
    Niu, Zhou, Wang, Gao, Hua, "Ordinal Regression with Multiple Output CNN for Age
    Estimation", CVPR 2016 (OR-CNN); Cao, Mirjalili, Raschka, "Rank Consistent Ordinal
    Regression for Neural Networks", Pattern Recognit. Lett. 2020 (CORAL).
  """
  ages, grid = _f32(ages), _f32(grid)
  return (ages[..., None] > grid[:-1]).astype(_jnp().float32)


def ranking_prior_logits(ages, grid, pseudo_count: float = 1.0) -> jax.Array:
  """The label prior of K-1 ranking tasks: logit P(y > l_k) over a set of ages.

  P(y > l_k) = (#{i : y_i > l_k} + c) / (N + 2c) with pseudo-count c. As the biases of a
  CORAL / OR-CNN head they start every image at the prior instead of at one shared logit
  for all tasks (zero biases put every first prediction at one end of the grid).

  Args:
    ages: (N,) training ages.
    grid: (K,) label values.
    pseudo_count: c >= 0, keeps the logits finite for tasks no age passes.

  Returns:
    (K-1,) float32 logits.

  References:
    Cao, Mirjalili, Raschka, Pattern Recognit. Lett. 2020 (CORAL; its code starts the
    biases at zero, this is agejax's alternative).
  """
  jnp = _jnp()
  targets = ranking_targets(ages, grid)
  p = (jnp.sum(targets, axis=0) + pseudo_count) / (targets.shape[0] + 2.0 * pseudo_count)
  return jnp.log(p) - jnp.log1p(-p)


def cumulative(probs) -> jax.Array:
  """The cumulative distribution F_k = sum_{j <= k} p_j over the last axis.

  1 - F_k over the first K-1 labels equals P(y > l_k), which tends to `ranking_targets`
  as sigma -> 0: ranking is learning a label distribution.

  Args:
    probs: (..., K) distributions.

  Returns:
    (..., K) float32, non-decreasing along the last axis.

  References:
    Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
      Learning", IJCAI 2018, Sec. 3.2.
  """
  xp = _xp(probs)
  return xp.cumsum(_f32(probs, xp), axis=-1)


def expectation(probs, grid) -> jax.Array:
  """The expectation layer: y_hat = sum_k p_k l_k. Parameter free.

  Args:
    probs: (..., K) distributions over the grid.
    grid: (K,) label values.

  Returns:
    (...,) float32 expected ages.

  References:
    Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
      Learning", IJCAI 2018, Eq. 6.
  """
  xp = _xp(probs, grid)
  return xp.asarray(xp.sum(_f32(probs, xp) * _f32(grid, xp), axis=-1))


def expectation_from_logits(logits, grid) -> jax.Array:
  """The expectation layer on logits: sum_k softmax(z)_k l_k.

  Args:
    logits: (..., K) unnormalised scores z.
    grid: (K,) label values.

  Returns:
    (...,) float32 expected ages.

  References:
    Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
      Learning", IJCAI 2018, Eq. 6.
  """
  import jax
  return expectation(jax.nn.softmax(_f32(logits), axis=-1), grid)


def distribution_std(probs, grid) -> jax.Array:
  """The standard deviation of a distribution over the grid: sqrt(sum_k p_k (l_k - y_hat)^2).

  agejax reports it as each prediction's uncertainty.

  Args:
    probs: (..., K) distributions.
    grid: (K,) label values.

  Returns:
    (...,) float32 standard deviations (>= 0).

  References:
    Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
      Learning", IJCAI 2018 (the expectation y_hat, Eq. 6).
  """
  xp = _xp(probs, grid)
  probs, grid = _f32(probs, xp), _f32(grid, xp)
  mean = expectation(probs, grid)
  var = xp.sum(probs * (grid - mean[..., None]) ** 2, axis=-1)
  return xp.asarray(xp.sqrt(xp.maximum(var, xp.float32(0.0))))


def quantile(probs, grid, q) -> jax.Array:
  """The q-quantile of a distribution over the grid: the first l_k with F_k >= q.

  Args:
    probs: (..., K) distributions.
    grid: (K,) label values.
    q: scalar or (...,) levels in [0, 1].

  Returns:
    (...,) float32 labels from the grid.

  References:
    The discrete quantile function; see `cumulative`.
  """
  xp = _xp(probs, grid, q)
  cdf = cumulative(_f32(probs, xp))
  idx = xp.sum(cdf < xp.asarray(q, xp.float32)[..., None] - xp.float32(1e-6), axis=-1)  # q: scalar or (...,)
  return xp.asarray(_f32(grid, xp)[xp.clip(idx, 0, cdf.shape[-1] - 1)])


def central_interval(probs, grid, mass: float = 0.9) -> tuple[jax.Array, jax.Array]:
  """The equal-tailed interval of grid labels holding at least `mass` (each tail at most (1 - mass) / 2).

  Labels l_a..l_b with a the first index whose cumulative mass exceeds (1 - mass) / 2 and b the
  first whose cumulative mass reaches (1 + mass) / 2. The mass below l_a and the mass above l_b are each at most (1 - mass) / 2, and
  dropping l_a or l_b would break that; both bounds belong to the set (an age y is inside when
  l_a <= y <= l_b).

  Example: probabilities (0, .05, .9, .05, 0) on 0..4 give the 90% set {2}: 0.05 lies below it
  and 0.05 above.

  Args:
    probs: (..., K) distributions.
    grid: (K,) label values.
    mass: the probability inside, in (0, 1); 0.9 gives the 90% interval.

  Returns:
    (low, high), each (...,) float32 labels from the grid.

  References:
    The equal-tailed interval of a discrete distribution (each tail at most (1 - mass) / 2);
    cumulative sums as in `cumulative`, with a 1e-6 tolerance for float32 rounding.
  """
  if not 0.0 < mass < 1.0:
    raise ValueError(f"central_interval: mass must be in (0, 1), got {mass}.")
  tail = (1.0 - mass) / 2.0
  xp = _xp(probs, grid)
  cdf = cumulative(_f32(probs, xp))
  k = cdf.shape[-1]
  lo = xp.sum(cdf <= tail + 1e-6, axis=-1)          # labels wholly inside the lower tail
  hi = xp.sum(cdf < 1.0 - tail - 1e-6, axis=-1)     # the first label reaching 1 - tail
  g = _f32(grid, xp)
  return xp.asarray(g[xp.clip(lo, 0, k - 1)]), xp.asarray(g[xp.clip(hi, 0, k - 1)])


def nearest_label_index(ages, grid) -> jax.Array:
  """The index of the grid label nearest each age: argmin_k |l_k - y|.

  Args:
    ages: (...,) ages.
    grid: (K,) label values.

  Returns:
    (...,) int32 indices in [0, K).

  References:
    Rothe, Timofte, Van Gool, "Deep Expectation of Real and Apparent Age from a Single
    Image Without Facial Landmarks", IJCV 2018 (DEX's one-hot target).
  """
  jnp = _jnp()
  return jnp.argmin(jnp.abs(_f32(grid) - _f32(ages)[..., None]), axis=-1).astype(jnp.int32)
