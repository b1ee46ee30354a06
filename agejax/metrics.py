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
  """Mean absolute error."""
  return jnp.mean(jnp.abs(_f32(pred) - _f32(true)))


def epsilon_error(pred, mean, std):
  """ChaLearn LAP epsilon-error: mean(1 - exp(-(y_hat - mu)^2 / (2 sigma^2)))."""
  std = jnp.maximum(_f32(std), 1e-6)
  return jnp.mean(1.0 - jnp.exp(-((_f32(pred) - _f32(mean)) ** 2) / (2.0 * std ** 2)))


def cumulative_score(pred, true, k):
  """CS@k: share of images with |y_hat - y| <= k. `k` may be an array of thresholds."""
  err = jnp.abs(_f32(pred) - _f32(true))
  k = _f32(k)
  return jnp.mean(err[..., None] <= k.reshape(-1), axis=0).reshape(k.shape)


def group_index(ages, edges=DEFAULT_AGE_GROUPS):
  """Index of the age group [edges[i], edges[i+1]) of each age; the last is open."""
  return jnp.clip(jnp.searchsorted(_f32(edges), _f32(ages), side="right") - 1, 0, len(edges) - 1)


def per_group_errors(pred, true, edges=DEFAULT_AGE_GROUPS):
  """MAE, mean signed error (bias, y_hat - y) and count per true-age group.

  Returns a dict of (G,) arrays: "mae", "bias", "count"; NaN where a group is empty.
  """
  pred, true = _f32(pred), _f32(true)
  onehot = (group_index(true, edges)[:, None] == jnp.arange(len(edges))).astype(jnp.float32)
  count = onehot.sum(0)
  safe = jnp.where(count > 0, count, jnp.nan)
  err = pred - true
  return {"mae": (jnp.abs(err) @ onehot) / safe, "bias": (err @ onehot) / safe, "count": count}


def accuracy(pred_labels, true_labels):
  """Accuracy over examples whose label is known (>= 0); NaN if none is."""
  true_labels = jnp.asarray(true_labels)
  known = true_labels >= 0
  hits = (jnp.asarray(pred_labels) == true_labels) & known
  n = known.sum()
  return jnp.where(n > 0, hits.sum() / jnp.maximum(n, 1), jnp.nan).astype(jnp.float32)


def age_to_adience_group(ages, groups=ADIENCE_GROUPS):
  """Map ages to the Adience group whose range is nearest (ages in gaps go to the nearer side)."""
  ages = _f32(ages)
  lo = _f32([g[0] for g in groups])
  hi = _f32([g[1] for g in groups])
  dist = jnp.maximum(lo - ages[:, None], 0) + jnp.maximum(ages[:, None] - hi, 0)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def exact_and_one_off(pred_groups, true_groups):
  """Adience exact and 1-off accuracy over group indices."""
  d = jnp.abs(jnp.asarray(pred_groups) - jnp.asarray(true_groups))
  return jnp.mean(d == 0).astype(jnp.float32), jnp.mean(d <= 1).astype(jnp.float32)


def interval_coverage(probs, grid, true, mass=0.9):
  """Share of true ages inside each predicted distribution's central `mass` interval.

  A calibrated model covers about `mass` of the ages; much less means it is
  over-confident.
  """
  low, high = ldl.central_interval(probs, grid, mass)
  true = _f32(true)
  return jnp.mean((true >= low) & (true <= high)).astype(jnp.float32)
