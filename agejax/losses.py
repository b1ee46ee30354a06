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

  sum_i m_i v_i / max(sum_i m_i, 1): an all-false mask gives 0, not NaN, so a batch with
  no labels for a task adds nothing to a multi-task loss.

  Args:
    values: (B,) per-example losses.
    mask: optional (B,) bool or 0/1; None counts every example.

  Returns:
    () float32.

  References:
    agejax's reduction for the per-example losses of this module.
  """
  values = _f32(values)
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask).astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------
# Label distribution learning.


def kl_divergence(logits, target) -> jax.Array:
  """KL(t || softmax(z)) = sum_k t_k (log t_k - log p_k), per example.

  0 log 0 is taken as 0, so one-hot targets are fine. Gradient w.r.t. the logits:
  softmax(z) - t.

  Args:
    logits: (B, K) scores z.
    target: (B, K) target distributions t.

  Returns:
    (B,) float32, >= 0.

  References:
    Gao, Xing, Xie, Wu, Geng, "Deep Label Distribution Learning With Label
    Ambiguity", IEEE TIP 2017, Eq. 6.
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  target = _f32(target)
  return jnp.sum(jax.scipy.special.xlogy(target, target) - target * logp, axis=-1)


def dldl(logits, ages, sigmas, grid) -> jax.Array:
  """DLDL: KL from the Gaussian label distribution to the prediction. Decode: expectation.

  KL(N_grid(y, sigma) || softmax(z)), with `ldl.gaussian_label_distribution`.

  Args:
    logits: (B, K) scores.
    ages: (B,) ages y.
    sigmas: scalar or (B,) label standard deviations.
    grid: (K,) label values.

  Returns:
    (B,) float32.

  References:
    Gao, Xing, Xie, Wu, Geng, "Deep Label Distribution Learning With Label
    Ambiguity", IEEE TIP 2017.
  """
  return kl_divergence(logits, ldl.gaussian_label_distribution(ages, sigmas, grid))


def dldl_v2(logits, ages, sigmas, grid, lam: float = 1.0, kl_reduction: str = "sum") -> jax.Array:
  """DLDL-v2: KL(p || p_hat) + lam * |y_hat - y|, with y_hat the expectation layer's age.

  Gradient w.r.t. logit k: (p_hat_k - p_k) + lam * sign(y_hat - y) * p_hat_k * (l_k - y_hat).

  Args:
    logits: (B, K) scores.
    ages: (B,) ages y.
    sigmas: scalar or (B,) label standard deviations (the paper: 2, or ChaLearn's per image).
    grid: (K,) label values.
    lam: weight of the L1 term (the paper: 1).
    kl_reduction: "sum" sums the KL over the K labels of each example (the PyTorch ports;
      default). "mean" divides it by K, as the official code, which averages the KL over
      all B*K elements but the L1 over B only; there lam acts K times larger.

  Returns:
    (B,) float32.

  References:
    Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
    Learning", IJCAI 2018, Eq. 8.
  """
  if kl_reduction not in ("sum", "mean"):
    raise ValueError(f"dldl_v2: kl_reduction must be 'sum' or 'mean', got {kl_reduction!r}.")
  kl = dldl(logits, ages, sigmas, grid)
  if kl_reduction == "mean":
    kl = kl / jnp.shape(grid)[-1]
  y_hat = ldl.expectation_from_logits(logits, grid)
  return kl + lam * jnp.abs(y_hat - _f32(ages))


def distillation(logits, teacher_probs, ages, sigmas, grid, lam: float = 1.0,
                 teacher_weight: float = 1.0) -> jax.Array:
  """DLDL-v2 with a teacher's distribution as the label: KL(t || p_hat) + lam * |y_hat - y|,
  t = w * teacher + (1 - w) * N_grid(y, sigma).

  The label distribution a network learns from need not be a fixed Gaussian: a stronger
  network's predicted distribution carries its per-image ambiguity (dark knowledge). The
  expectation term still pulls towards the true age y.

  Args:
    logits: (B, K) the student's scores.
    teacher_probs: (B, K) the teacher's distributions over the same grid (rows sum to 1).
    ages: (B,) true ages y.
    sigmas: scalar or (B,) the Gaussian label's standard deviations (used where w < 1).
    grid: (K,) label values.
    lam: weight of the L1 term.
    teacher_weight: w in [0, 1]; 1 learns the teacher's distribution alone.

  Returns:
    (B,) float32.

  References:
    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 (soft targets);
    Gao et al., IJCAI 2018, Eq. 8 (the loss with a Gaussian label).
  """
  target = (teacher_weight * _f32(teacher_probs)
            + (1.0 - teacher_weight) * ldl.gaussian_label_distribution(ages, sigmas, grid))
  y_hat = ldl.expectation_from_logits(logits, grid)
  return kl_divergence(logits, target) + lam * jnp.abs(y_hat - _f32(ages))


def sord(logits, ages, grid, alpha: float = 1.0) -> jax.Array:
  """SORD: KL to soft ordinal targets t_k = softmax_k(-alpha (l_k - y)^2). Decode: expectation.

  Args:
    logits: (B, K) scores.
    ages: (B,) ages y.
    grid: (K,) label values.
    alpha: sharpness of the targets (the squared distance's scale).

  Returns:
    (B,) float32.

  References:
    Diaz, Marathe, "Soft Labels for Ordinal Regression", CVPR 2019.
  """
  d2 = (_f32(grid) - _f32(ages)[..., None]) ** 2
  target = jax.nn.softmax(-alpha * (d2 - jnp.min(d2, axis=-1, keepdims=True)), axis=-1)
  return kl_divergence(logits, target)


# ----------------------------------------------------------------------------
# Classification.


def softmax_cross_entropy(logits, labels) -> jax.Array:
  """Cross-entropy -log softmax(z)_c with integer labels c; a label < 0 (missing) gives 0.

  Used for gender and race, and by `dex`.

  Args:
    logits: (B, C) scores.
    labels: (B,) int class indices, -1 where unknown.

  Returns:
    (B,) float32.

  References:
    The multinomial logistic loss; MTMSA's gender and race heads (Shi et al., IET Signal
    Processing 2023).
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(labels >= 0, -picked, 0.0)


def dex(logits, ages, grid) -> jax.Array:
  """DEX: cross-entropy to the nearest grid label. Decode: expectation.

  -log softmax(z)_{k*}, k* = argmin_k |l_k - y|.

  Args:
    logits: (B, K) scores.
    ages: (B,) ages y.
    grid: (K,) label values.

  Returns:
    (B,) float32.

  References:
    Rothe, Timofte, Van Gool, "Deep Expectation of Real and Apparent Age from a Single
    Image Without Facial Landmarks", IJCV 2018.
  """
  return softmax_cross_entropy(logits, ldl.nearest_label_index(ages, grid))


def mean_variance(logits, ages, grid, lam_mean: float = 0.2, lam_var: float = 0.05) -> jax.Array:
  """Mean-variance loss with the softmax loss it is added to. Decode: expectation.

  CE(nearest label) + lam_mean * (m - y)^2 / 2 + lam_var * sum_k p_k (l_k - m)^2,
  where m = sum_k p_k l_k.

  Args:
    logits: (B, K) scores.
    ages: (B,) ages y.
    grid: (K,) label values.
    lam_mean: weight of the mean term (the paper: 0.2).
    lam_var: weight of the variance term (the paper: 0.05).

  Returns:
    (B,) float32.

  References:
    Pan, Han, Shan, Chen, "Mean-Variance Loss for Deep Age Estimation from a Face",
    CVPR 2018.
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
  """OR-CNN: the sum over K-1 binary tasks of the cross-entropy to 1[y > l_k]. Decode: `decode_ordinal`.

  sum_k w_k BCE(sigmoid(z_k), 1[y > l_k]).

  Args:
    logits: (B, K-1) task scores z_k.
    ages: (B,) ages y.
    grid: (K,) label values.
    importance: optional (K-1,) task weights w_k (default 1).

  Returns:
    (B,) float32.

  References:
    Niu, Zhou, Wang, Gao, Hua, "Ordinal Regression with Multiple Output CNN for Age
    Estimation", CVPR 2016.
  """
  bce = _binary_ce(logits, ldl.ranking_targets(ages, grid))
  if importance is not None:
    bce = bce * _f32(importance)
  return jnp.sum(bce, axis=-1)


def coral(logits, ages, grid, importance=None) -> jax.Array:
  """CORAL: OR-CNN's task-weighted cross-entropy, on a rank-consistent head. Decode: `decode_ordinal`.

  What makes CORAL rank-consistent is the head (one shared weight vector and K-1 biases,
  `models.heads`); the loss equals `ranking_bce`.

  Args:
    logits: (B, K-1) task scores.
    ages: (B,) ages y.
    grid: (K,) label values.
    importance: optional (K-1,) task weights.

  Returns:
    (B,) float32.

  References:
    Cao, Mirjalili, Raschka, "Rank Consistent Ordinal Regression for Neural Networks
    with Application to Age Estimation", Pattern Recognit. Lett. 2020.
  """
  return ranking_bce(logits, ages, grid, importance)


def corn(logits, ages, grid) -> jax.Array:
  """CORN: conditional binary tasks. Decode: `decode_corn`.

  Task k predicts P(y > l_k | y > l_{k-1}) and is trained only on examples with
  y > l_{k-1} (task 0 on all): per example, the sum of its eligible tasks' BCE. The paper
  divides the batch total by the number of eligible (example, task) pairs; `batch_mean`
  divides by B instead, a per-batch constant factor.

  Args:
    logits: (B, K-1) task scores.
    ages: (B,) ages y.
    grid: (K,) label values.

  Returns:
    (B,) float32.

  References:
    Shi, Cao, Raschka, "Deep Neural Networks for Rank-Consistent Ordinal Regression
    Based On Conditional Probabilities", Pattern Anal. Appl. 2023 (arXiv 2021).
  """
  targets = ldl.ranking_targets(ages, grid)
  eligible = jnp.concatenate([jnp.ones_like(targets[..., :1]), targets[..., :-1]], axis=-1)
  return jnp.sum(eligible * _binary_ce(logits, targets), axis=-1)


# ----------------------------------------------------------------------------
# Regression heads.


def l1(pred, ages) -> jax.Array:
  """|y_hat - y| on a scalar prediction. Decode: the prediction.

  Args:
    pred: (B,) predicted ages.
    ages: (B,) ages y.

  Returns:
    (B,) float32.

  References:
    The L1 regression baseline of Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
    Learning", IJCAI 2018 (its Table 2).
  """
  return jnp.abs(_f32(pred) - _f32(ages))


def l2(pred, ages) -> jax.Array:
  """(y_hat - y)^2 / 2 on a scalar prediction. Decode: the prediction.

  Args:
    pred: (B,) predicted ages.
    ages: (B,) ages y.

  Returns:
    (B,) float32.

  References:
    The L2 regression baseline of Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
    Learning", IJCAI 2018 (its Table 2).
  """
  return 0.5 * (_f32(pred) - _f32(ages)) ** 2


def gaussian_nll(mu, log_var, ages) -> jax.Array:
  """MTMSA's "KL between a Dirac delta label and a Gaussian prediction". Decode: mu (std exp(a / 2)).

  For a prediction N(mu, sigma^2) with a = log sigma^2, the KL from a Dirac delta at y
  equals the negative log-likelihood up to a constant (the delta's infinite entropy):
  0.5 exp(-a) (y - mu)^2 + 0.5 a. `a` is clipped to `LOG_VAR_RANGE` so extreme outputs
  stay finite.

  Args:
    mu: (B,) predicted means.
    log_var: (B,) predicted log variances a.
    ages: (B,) ages y.

  Returns:
    (B,) float32.

  References:
    Shi et al., "Multi-task learning with multi-scale attention for age estimation",
    IET Signal Processing 2023 (abstract: the Dirac-Gaussian KL); Nix, Weigend, ICNN 1994
    (the Gaussian negative log-likelihood).
  """
  a = jnp.clip(_f32(log_var), *LOG_VAR_RANGE)
  return 0.5 * jnp.exp(-a) * (_f32(ages) - _f32(mu)) ** 2 + 0.5 * a


# ----------------------------------------------------------------------------
# Decoding rules.


def decode_ordinal(logits, grid) -> jax.Array:
  """The age of K-1 binary tasks (OR-CNN, CORAL): l_0 + step * #{k : sigmoid(z_k) > 0.5}.

  Args:
    logits: (..., K-1) task scores.
    grid: (K,) evenly spaced label values.

  Returns:
    (...,) float32 ages on the grid.

  References:
    Niu, Zhou, Wang, Gao, Hua, "Ordinal Regression with Multiple Output CNN for Age
    Estimation", CVPR 2016, Eq. 1; Cao, Mirjalili, Raschka, "Rank Consistent Ordinal Regression for Neural Networks
    with Application to Age Estimation", Pattern Recognit. Lett. 2020.
  """
  grid = _f32(grid)
  step = grid[1] - grid[0]
  return grid[0] + step * jnp.sum(_f32(logits) > 0.0, axis=-1)


def decode_corn(logits, grid) -> jax.Array:
  """The age of CORN tasks: P(y > l_k) = prod_{j <= k} sigmoid(z_j); l_0 + step * #{k : P > 0.5}.

  Args:
    logits: (..., K-1) conditional task scores.
    grid: (K,) evenly spaced label values.

  Returns:
    (...,) float32 ages on the grid.

  References:
    Shi, Cao, Raschka, "Deep Neural Networks for Rank-Consistent Ordinal Regression
    Based On Conditional Probabilities", Pattern Anal. Appl. 2023 (arXiv 2021).
  """
  grid = _f32(grid)
  step = grid[1] - grid[0]
  probs = jnp.cumprod(jax.nn.sigmoid(_f32(logits)), axis=-1)
  return grid[0] + step * jnp.sum(probs > 0.5, axis=-1)


def ordinal_to_distribution(exceed_probs) -> jax.Array:
  """A label distribution from P(y > l_k), k = 0..K-2: p_k = P(y > l_{k-1}) - P(y > l_k).

  Rank consistency is not guaranteed for OR-CNN, so differences are clipped at 0 and
  renormalised.

  Args:
    exceed_probs: (..., K-1) probabilities P(y > l_k).

  Returns:
    (..., K) float32 distributions.

  References:
    Gao, Zhou, Wu, Geng, "Age Estimation Using Expectation of Label Distribution
    Learning", IJCAI 2018, Sec. 3.2 (ranking as label distribution learning).
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

  total = sum_t w_t batch_mean(loss_t, mask_t).

  Args:
    losses: task name -> (B,) per-example losses.
    weights: task name -> weight (default 1 each).
    masks: task name -> (B,) bool, false where that task's label is missing (race -1, or
      a dataset without race). A task absent from `masks` counts every example.

  Returns:
    (total, {task: batch-mean loss}), float32 scalars.

  References:
    Hard parameter sharing, Caruana, Machine Learning 1997; MTMSA's age, gender and race
    heads (Shi et al., IET Signal Processing 2023).
  """
  weights = weights or {}
  masks = masks or {}
  parts = {name: batch_mean(v, masks.get(name)) for name, v in losses.items()}
  total = sum(weights.get(name, 1.0) * v for name, v in parts.items())
  return jnp.asarray(total, jnp.float32), parts
