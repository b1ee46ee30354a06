"""Evaluation metrics for age estimation: pure array functions, hand-checkable.

All take predictions and truths of shape (N,) (numpy or jax arrays) and return
float32 scalars or small arrays. Per-group metrics return NaN for empty groups.
"""

from __future__ import annotations

import jax.numpy as jnp

from agejax import ldl

# Age groups used in per-group reports: [0,3), [3,7), ..., [70, inf).
DEFAULT_AGE_GROUPS = (0, 3, 7, 13, 20, 30, 40, 50, 60, 70)

# Adience's eight age groups (inclusive ranges), as in its fold files.
ADIENCE_GROUPS = ((0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def mae(pred, true):
  """Mean absolute error mean_i |y_hat_i - y_i|.

  Args:
    pred: (N,) predicted ages.
    true: (N,) true ages.

  Returns:
    () float32.

  References:
    The standard age-estimation error; Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
    Learning", IJCAI 2018, Sec. 4.
  """
  return jnp.mean(jnp.abs(_f32(pred) - _f32(true)))


def epsilon_error(pred, mean, std):
  """ChaLearn LAP epsilon-error: mean_i (1 - exp(-(y_hat_i - mu_i)^2 / (2 sigma_i^2))).

  Args:
    pred: (N,) predicted ages.
    mean: (N,) mean apparent ages mu.
    std: (N,) their standard deviations sigma (clamped at 1e-6).

  Returns:
    () float32 in [0, 1].

  References:
    Escalera et al., "ChaLearn Looking at People 2015: Apparent Age and Cultural Event
    Recognition Datasets and Results", ICCV Workshops 2015.
  """
  std = jnp.maximum(_f32(std), 1e-6)
  return jnp.mean(1.0 - jnp.exp(-((_f32(pred) - _f32(mean)) ** 2) / (2.0 * std ** 2)))


def cumulative_score(pred, true, k):
  """CS@k: the share of images with |y_hat - y| <= k.

  Args:
    pred: (N,) predicted ages.
    true: (N,) true ages.
    k: a threshold in years, or an array of them.

  Returns:
    float32 of k's shape.

  References:
    Geng, Zhou, Smith-Miles, "Automatic Age Estimation Based on Facial Aging Patterns",
    IEEE TPAMI 2007.
  """
  err = jnp.abs(_f32(pred) - _f32(true))
  k = _f32(k)
  return jnp.mean(err[..., None] <= k.reshape(-1), axis=0).reshape(k.shape)


def group_index(ages, edges=DEFAULT_AGE_GROUPS):
  """The index of each age's group [edges[i], edges[i+1]); the last group is open.

  Args:
    ages: (N,) ages.
    edges: increasing group starts (default 0, 3, 7, 13, 20, 30, ..., 70).

  Returns:
    (N,) int indices in [0, len(edges)).

  References:
    agejax's report groups (`DEFAULT_AGE_GROUPS`).
  """
  return jnp.clip(jnp.searchsorted(_f32(edges), _f32(ages), side="right") - 1, 0, len(edges) - 1)


def per_group_errors(pred, true, edges=DEFAULT_AGE_GROUPS):
  """MAE, mean signed error (bias, y_hat - y) and count per true-age group.

  Args:
    pred: (N,) predicted ages.
    true: (N,) true ages.
    edges: group starts, as in `group_index`.

  Returns:
    {"mae", "bias", "count"}: (G,) float32 each; NaN where a group is empty.

  References:
    agejax's report groups (`DEFAULT_AGE_GROUPS`).
  """
  pred, true = _f32(pred), _f32(true)
  onehot = (group_index(true, edges)[:, None] == jnp.arange(len(edges))).astype(jnp.float32)
  count = onehot.sum(0)
  safe = jnp.where(count > 0, count, jnp.nan)
  err = pred - true
  return {"mae": (jnp.abs(err) @ onehot) / safe, "bias": (err @ onehot) / safe, "count": count}


def accuracy(pred_labels, true_labels):
  """Accuracy over the examples whose label is known (>= 0).

  Args:
    pred_labels: (N,) predicted class indices.
    true_labels: (N,) true class indices, -1 where unknown.

  Returns:
    () float32; NaN if no label is known.

  References:
    The gender and race accuracy of MTMSA (Shi et al., IET Signal Processing 2023).
  """
  true_labels = jnp.asarray(true_labels)
  known = true_labels >= 0
  hits = (jnp.asarray(pred_labels) == true_labels) & known
  n = known.sum()
  return jnp.where(n > 0, hits.sum() / jnp.maximum(n, 1), jnp.nan).astype(jnp.float32)


def age_to_adience_group(ages, groups=ADIENCE_GROUPS):
  """Each age mapped to the Adience group whose range is nearest (ages in gaps go to the nearer side).

  Args:
    ages: (N,) ages.
    groups: inclusive (low, high) ranges (default Adience's eight).

  Returns:
    (N,) int32 group indices.

  References:
    Eidinger, Enbar, Hassner, "Age and Gender Estimation of Unfiltered Faces", IEEE TIFS 2014.
  """
  ages = _f32(ages)
  lo = _f32([g[0] for g in groups])
  hi = _f32([g[1] for g in groups])
  dist = jnp.maximum(lo - ages[:, None], 0) + jnp.maximum(ages[:, None] - hi, 0)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def exact_and_one_off(pred_groups, true_groups):
  """Adience's exact and 1-off accuracy: mean(|g_hat - g| == 0) and mean(|g_hat - g| <= 1).

  Args:
    pred_groups: (N,) predicted group indices.
    true_groups: (N,) true group indices.

  Returns:
    (exact, one_off), float32 scalars.

  References:
    Eidinger, Enbar, Hassner, "Age and Gender Estimation of Unfiltered Faces", IEEE TIFS 2014.
  """
  d = jnp.abs(jnp.asarray(pred_groups) - jnp.asarray(true_groups))
  return jnp.mean(d == 0).astype(jnp.float32), jnp.mean(d <= 1).astype(jnp.float32)


def interval_coverage(probs, grid, true, mass=0.9):
  """The share of true ages inside each predicted distribution's central `mass` interval.

  A calibrated model covers about `mass` of the ages; much less means over-confidence.

  Args:
    probs: (N, K) predicted distributions.
    grid: (K,) label values.
    true: (N,) true ages.
    mass: the interval's probability, in (0, 1).

  Returns:
    () float32 in [0, 1].

  References:
    The coverage of central prediction intervals (Gneiting, Raftery, JASA 2007); the
    interval is `ldl.central_interval`.
  """
  low, high = ldl.central_interval(probs, grid, mass)
  true = _f32(true)
  return jnp.mean((true >= low) & (true <= high)).astype(jnp.float32)
