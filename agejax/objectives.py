"""Objectives: which head a loss needs, how its loss reads a batch, how an age is decoded.

The trainer and evaluator are generic; the config names the loss (scenic's
model-with-loss idea), and this module is the one place that knows the pairing.
Batches are dicts with "age" (B,), "sigma" (B,), and optionally "gender" and
"race" (B,) ints with -1 where unknown, and (`distill`) "teacher_probs" (B, K).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from agejax import ldl, losses


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  age_head: str
  per_example: Callable  # (outputs, batch, grid, hp) -> (B,)


# The label spread where neither the data nor the config gives one (DLDL-v2's sigma = 2 years);
# configs/default.py's `loss.sigma` starts from it.
DEFAULT_SIGMA = 2.0


def _sigma(batch, hp):
  """Per-image sigma from the data where it exists (ChaLearn), else the config's."""
  s = batch.get("sigma")
  default = hp.get("sigma", DEFAULT_SIGMA)
  if s is None:
    return jnp.full_like(batch["age"], default, dtype=jnp.float32)
  # Datasets without a per-image sigma store 0: use the default there.
  return jnp.where(s > 0, jnp.maximum(s, hp.get("min_sigma", 0.0)), default)


def _given(hp: Mapping, *names: str) -> dict:
  """The hyper-parameters of `names` that `hp` sets; the others keep the loss function's own
  default (its signature in `agejax.losses` is the one place each default lives)."""
  return {n: hp[n] for n in names if n in hp}


OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("dldl_v2", "distribution", lambda o, b, g, hp: losses.dldl_v2(
        o["age_logits"], b["age"], _sigma(b, hp), g, **_given(hp, "lam", "kl_reduction"))),
    Objective("distill", "distribution", lambda o, b, g, hp: losses.distillation(
        o["age_logits"], b["teacher_probs"], b["age"], _sigma(b, hp), g, **_given(hp, "lam", "teacher_weight"))),
    Objective("dldl", "distribution", lambda o, b, g, hp: losses.dldl(o["age_logits"], b["age"], _sigma(b, hp), g)),
    Objective("dex", "distribution", lambda o, b, g, hp: losses.dex(o["age_logits"], b["age"], g)),
    Objective("mean_variance", "distribution", lambda o, b, g, hp: losses.mean_variance(
        o["age_logits"], b["age"], g, **_given(hp, "lam_mean", "lam_var"))),
    Objective("sord", "distribution", lambda o, b, g, hp: losses.sord(o["age_logits"], b["age"], g,
                                                                      **_given(hp, "alpha"))),
    Objective("ranking_bce", "ordinal", lambda o, b, g, hp: losses.ranking_bce(o["age_logits"], b["age"], g)),
    Objective("coral", "coral", lambda o, b, g, hp: losses.coral(o["age_logits"], b["age"], g)),
    Objective("corn", "ordinal", lambda o, b, g, hp: losses.corn(o["age_logits"], b["age"], g)),
    Objective("l1", "scalar", lambda o, b, g, hp: losses.l1(o["age_pred"], b["age"])),
    Objective("l2", "scalar", lambda o, b, g, hp: losses.l2(o["age_pred"], b["age"])),
    Objective("gaussian_nll", "gaussian", lambda o, b, g, hp: losses.gaussian_nll(o["age_mu"], o["age_log_var"], b["age"])),
]}


# Losses whose K-1 age biases model P(y > l_k) directly, so the label prior is their natural start
# (`model.age_bias_init=prior`; CORN's tasks are conditional, so its prior would differ).
PRIOR_BIAS_LOSSES = ("coral", "ranking_bce")


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]


def total_loss(objective: Objective, outputs, batch, grid, hp: Mapping, weights: Mapping[str, float]):
  """Batch loss of all heads present in `outputs`: (total, {task: loss})."""
  per = {"age": objective.per_example(outputs, batch, grid, hp)}
  masks = {}
  for task in ("gender", "race"):
    if f"{task}_logits" in outputs and task in batch:
      per[task] = losses.softmax_cross_entropy(outputs[f"{task}_logits"], batch[task])
      masks[task] = batch[task] >= 0
  return losses.multitask(per, weights, masks)


def predict(objective: Objective, outputs, grid) -> dict[str, jax.Array]:
  """Decoded predictions: age, std, the (B, K) distribution over the grid, and class probabilities."""
  head = objective.age_head
  if head == "distribution":
    probs = jax.nn.softmax(outputs["age_logits"].astype(jnp.float32), -1)
    age = ldl.expectation(probs, grid)
  elif head in ("ordinal", "coral"):
    z = outputs["age_logits"].astype(jnp.float32)
    exceed = jnp.cumprod(jax.nn.sigmoid(z), -1) if objective.name == "corn" else jax.nn.sigmoid(z)
    probs = losses.ordinal_to_distribution(exceed)
    age = (losses.decode_corn if objective.name == "corn" else losses.decode_ordinal)(z, grid)
  elif head == "gaussian":
    age = outputs["age_mu"].astype(jnp.float32)
    std = jnp.exp(0.5 * jnp.clip(outputs["age_log_var"].astype(jnp.float32), *losses.LOG_VAR_RANGE))
    probs = ldl.gaussian_label_distribution(age, std, grid)
  else:  # scalar: no uncertainty; a one-hot of the nearest label stands in for the distribution
    age = outputs["age_pred"].astype(jnp.float32)
    probs = ldl.gaussian_label_distribution(age, 0.0, grid)
  out = {"age": age, "probs": probs, "std": ldl.distribution_std(probs, grid)}
  if head == "gaussian":
    out["std"] = std
  for task in ("gender", "race"):
    if f"{task}_logits" in outputs:
      out[f"{task}_probs"] = jax.nn.softmax(outputs[f"{task}_logits"].astype(jnp.float32), -1)
  return out


def predict_images(objective: Objective, apply: Callable, images, grid, flip: bool = True) -> dict[str, jax.Array]:
  """`predict` of apply(images) for (B, H, W, C) images (whatever `apply` takes), averaged with the mirrored
  images' where `flip`: the distributions and class probabilities averaged, the age the mean of
  both ages, the std the averaged distribution's (a Gaussian head's: the mean of both stds).

  The one prediction rule of evaluation (`train_lib.eval_step`), exported models and so `predict`.
  """
  pred = predict(objective, apply(images), grid)
  if not flip:
    return pred
  mirrored = predict(objective, apply(images[:, :, ::-1]), grid)
  out = {k: (pred[k] + mirrored[k]) / 2 for k in pred}
  if objective.age_head != "gaussian":
    out["std"] = ldl.distribution_std(out["probs"], grid)
  return out
