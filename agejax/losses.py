"""Age-estimation losses as small pure functions of arrays.

Every loss here returns one value per example, shape (B,), float32 (bf16 inputs
are upcast first), and is finite with finite gradients for logits as extreme as
+-1e4. Reduce with `batch_mean(values, mask)`, which skips examples whose label
is missing. Each loss names its *decoding rule*: how an age is read from the
head's output (`decode_*` below).

Usage for loss research, with no model or trainer attached:

    from agejax import ldl, losses
    grid = ldl.label_grid()
    loss = losses.batch_mean(losses.dldl_v2(logits, ages, 2.0, grid))
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from agejax import ldl

# Log-variance bounds for `gaussian_nll`: exp(+-20) stays finite in float32.
LOG_VAR_RANGE = (-20.0, 20.0)


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def batch_mean(values, mask=None) -> jax.Array:
  """Mean of per-example values over the examples where `mask` is true.

  An all-false mask gives 0, not NaN, so a batch with no labels for a task adds
  nothing to a multi-task loss.
  """
  values = _f32(values)
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask).astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------
# Label distribution learning.


def kl_divergence(logits, target) -> jax.Array:
  """KL(target || softmax(logits)) = sum_k t_k (log t_k - log p_k), per example.

  0 log 0 is taken as 0, so one-hot targets are fine. Gradient w.r.t. the
  logits: softmax(logits) - target.
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  target = _f32(target)
  return jnp.sum(jax.scipy.special.xlogy(target, target) - target * logp, axis=-1)


def dldl(logits, ages, sigmas, grid) -> jax.Array:
  """DLDL (Gao et al., TIP 2017): KL from the Gaussian label distribution. Decode: expectation."""
  return kl_divergence(logits, ldl.gaussian_label_distribution(ages, sigmas, grid))


def dldl_v2(logits, ages, sigmas, grid, lam: float = 1.0, kl_reduction: str = "sum") -> jax.Array:
  """DLDL-v2 (Gao et al., IJCAI 2018): KL(p || p_hat) + lam * |y_hat - y|.

  y_hat = sum_k p_hat_k l_k is the expectation layer. Gradient w.r.t. logit k:
  (p_hat_k - p_k) + lam * sign(y_hat - y) * p_hat_k * (l_k - y_hat).

  kl_reduction: "sum" sums the KL over the K labels of each example (the
    PyTorch ports; default). "mean" divides it by K, as the official code, which
    averages the KL over all B*K elements but the L1 over B only; there lam acts
    K times larger relative to the KL.
  """
  if kl_reduction not in ("sum", "mean"):
    raise ValueError(f"dldl_v2: kl_reduction must be 'sum' or 'mean', got {kl_reduction!r}.")
  kl = dldl(logits, ages, sigmas, grid)
  if kl_reduction == "mean":
    kl = kl / jnp.shape(grid)[-1]
  y_hat = ldl.expectation_from_logits(logits, grid)
  return kl + lam * jnp.abs(y_hat - _f32(ages))


def sord(logits, ages, grid, alpha: float = 1.0) -> jax.Array:
  """SORD (Diaz & Marathe, CVPR 2019): soft ordinal targets softmax(-alpha (l - y)^2).

  The loss is the KL to those targets. Decode: expectation.
  """
  d2 = (_f32(grid) - _f32(ages)[..., None]) ** 2
  target = jax.nn.softmax(-alpha * (d2 - jnp.min(d2, axis=-1, keepdims=True)), axis=-1)
  return kl_divergence(logits, target)


# ----------------------------------------------------------------------------
# Classification.


def softmax_cross_entropy(logits, labels) -> jax.Array:
  """Cross-entropy with integer labels; label < 0 (missing) gives 0. For gender and race."""
  labels = jnp.asarray(labels).astype(jnp.int32)
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(labels >= 0, -picked, 0.0)


def dex(logits, ages, grid) -> jax.Array:
  """DEX (Rothe et al., IJCV 2018): cross-entropy to the nearest label. Decode: expectation."""
  return softmax_cross_entropy(logits, ldl.nearest_label_index(ages, grid))


def mean_variance(logits, ages, grid, lam_mean: float = 0.2, lam_var: float = 0.05) -> jax.Array:
  """Mean-variance loss (Pan et al., CVPR 2018), with the softmax loss it is added to.

  CE(nearest label) + lam_mean * (m - y)^2 / 2 + lam_var * sum_k p_k (l_k - m)^2,
  where m is the expectation. Decode: expectation.
  """
  probs = jax.nn.softmax(_f32(logits), axis=-1)
  grid = _f32(grid)
  m = ldl.expectation(probs, grid)
  var = jnp.sum(probs * (grid - m[..., None]) ** 2, axis=-1)
  return dex(logits, ages, grid) + lam_mean * 0.5 * (m - _f32(ages)) ** 2 + lam_var * var


# ----------------------------------------------------------------------------
# Ordinal regression with K-1 binary tasks: logits shape (B, K-1).


def _binary_ce(logits, targets) -> jax.Array:
  """Elementwise -[t log s(z) + (1 - t) log(1 - s(z))], stable for any z."""
  z = _f32(logits)
  return -(targets * jax.nn.log_sigmoid(z) + (1.0 - targets) * jax.nn.log_sigmoid(-z))


def ranking_bce(logits, ages, grid, importance=None) -> jax.Array:
  """OR-CNN (Niu et al., CVPR 2016): sum over K-1 tasks of BCE to 1[y > l_k].

  `importance` (K-1,) weights the tasks. Decode: `decode_ordinal`.
  """
  bce = _binary_ce(logits, ldl.ranking_targets(ages, grid))
  if importance is not None:
    bce = bce * _f32(importance)
  return jnp.sum(bce, axis=-1)


def coral(logits, ages, grid, importance=None) -> jax.Array:
  """CORAL (Cao, Mirjalili, Raschka, Pattern Recognit. Lett. 2020).

  The loss is the task-weighted BCE of OR-CNN; what makes CORAL rank-consistent
  is the head (one shared weight vector, K-1 biases: `models.heads`), so this
  function equals `ranking_bce`. Decode: `decode_ordinal`.
  """
  return ranking_bce(logits, ages, grid, importance)


def corn(logits, ages, grid) -> jax.Array:
  """CORN (Shi, Cao, Raschka, 2021): conditional binary tasks.

  Task k predicts P(y > l_k | y > l_{k-1}) and is trained only on examples with
  y > l_{k-1} (task 0 on all). Per example: the sum of its eligible tasks' BCE.
  The paper divides the batch total by the number of eligible (example, task)
  pairs; `batch_mean` divides by B instead, a per-batch constant factor.
  Decode: `decode_corn`.
  """
  targets = ldl.ranking_targets(ages, grid)
  eligible = jnp.concatenate([jnp.ones_like(targets[..., :1]), targets[..., :-1]], axis=-1)
  return jnp.sum(eligible * _binary_ce(logits, targets), axis=-1)


# ----------------------------------------------------------------------------
# Regression heads.


def l1(pred, ages) -> jax.Array:
  """|y_hat - y| on a scalar prediction. Decode: the prediction."""
  return jnp.abs(_f32(pred) - _f32(ages))


def l2(pred, ages) -> jax.Array:
  """(y_hat - y)^2 / 2 on a scalar prediction. Decode: the prediction."""
  return 0.5 * (_f32(pred) - _f32(ages)) ** 2


def gaussian_nll(mu, log_var, ages) -> jax.Array:
  """MTMSA's "KL between a Dirac delta label and a Gaussian prediction".

  For a prediction N(mu, sigma^2) with a = log sigma^2, the KL from a Dirac
  delta at y equals the negative log-likelihood up to a constant (the delta's
  infinite entropy): 0.5 * exp(-a) * (y - mu)^2 + 0.5 * a. `a` is clipped to
  `LOG_VAR_RANGE` so extreme outputs stay finite. Decode: mu (std: exp(a / 2)).
  """
  a = jnp.clip(_f32(log_var), *LOG_VAR_RANGE)
  return 0.5 * jnp.exp(-a) * (_f32(ages) - _f32(mu)) ** 2 + 0.5 * a


# ----------------------------------------------------------------------------
# Decoding rules.


def decode_expectation(logits, grid) -> jax.Array:
  """Age from a distribution head: the expectation of softmax(logits)."""
  return ldl.expectation_from_logits(logits, grid)


def decode_ordinal(logits, grid) -> jax.Array:
  """Age from K-1 binary tasks (OR-CNN, CORAL): l_0 + step * #{k : sigmoid(z_k) > 0.5}."""
  grid = _f32(grid)
  step = grid[1] - grid[0]
  return grid[0] + step * jnp.sum(_f32(logits) > 0.0, axis=-1)


def decode_corn(logits, grid) -> jax.Array:
  """Age from CORN tasks: P(y > l_k) = prod_{j <= k} sigmoid(z_j); count those > 0.5."""
  grid = _f32(grid)
  step = grid[1] - grid[0]
  probs = jnp.cumprod(jax.nn.sigmoid(_f32(logits)), axis=-1)
  return grid[0] + step * jnp.sum(probs > 0.5, axis=-1)


def ordinal_to_distribution(exceed_probs) -> jax.Array:
  """Label distribution from P(y > l_k), k = 0..K-2: p_k = P(y > l_{k-1}) - P(y > l_k).

  Rank consistency is not guaranteed for OR-CNN, so differences are clipped at
  0 and renormalised.
  """
  p = _f32(exceed_probs)
  ones = jnp.ones_like(p[..., :1])
  upper = jnp.concatenate([ones, p], axis=-1)
  lower = jnp.concatenate([p, jnp.zeros_like(ones)], axis=-1)
  dist = jnp.maximum(upper - lower, 0.0)
  return dist / jnp.maximum(jnp.sum(dist, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------
# Multi-task.


def multitask(losses: Mapping[str, jax.Array], weights: Mapping[str, float] | None = None,
              masks: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of batch-mean task losses; a missing label contributes nothing.

  Args:
    losses: task name -> per-example losses (B,).
    weights: task name -> weight (default 1 each).
    masks: task name -> (B,) bool, false where that task's label is missing
      (race -1, or a dataset without race). A task absent from `masks` counts
      every example.

  Returns:
    (total, {task: batch-mean loss}).
  """
  weights = weights or {}
  masks = masks or {}
  parts = {name: batch_mean(v, masks.get(name)) for name, v in losses.items()}
  total = sum(weights.get(name, 1.0) * v for name, v in parts.items())
  return jnp.asarray(total, jnp.float32), parts
