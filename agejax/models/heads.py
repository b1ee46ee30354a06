"""Hard-shared output heads: one trunk feature vector, one small layer per task.

Age heads (chosen by the loss, see `agejax.objectives`):
  distribution  K logits over the label grid (DLDL, DLDL-v2, DEX, mean-variance, SORD)
  ordinal       K-1 independent binary logits (OR-CNN, CORN)
  coral         K-1 logits sharing one weight vector, with K-1 biases (CORAL)
  gaussian      mu and log sigma^2 (MTMSA's Gaussian prediction)
  scalar        one number (L1 / L2 regression)
Gender (2 classes) and race (5 classes) heads are added when asked for.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

AGE_HEADS = ("distribution", "ordinal", "coral", "gaussian", "scalar")


class Heads(nn.Module):
  age_head: str = "distribution"
  num_labels: int = 101
  age_center: float = 50.0   # scalar / gaussian heads predict an offset from it
  gender: bool = False
  race: bool = False
  num_races: int = 5

  @nn.compact
  def __call__(self, feats) -> dict[str, Any]:
    feats = feats.astype(jnp.float32)
    dense = lambda n, name, **kw: nn.Dense(n, name=name, kernel_init=nn.initializers.normal(0.01),
                                           bias_init=nn.initializers.zeros, **kw)
    out = {}
    if self.age_head == "distribution":
      out["age_logits"] = dense(self.num_labels, "age")(feats)
    elif self.age_head == "ordinal":
      out["age_logits"] = dense(self.num_labels - 1, "age")(feats)
    elif self.age_head == "coral":
      shared = dense(1, "age", use_bias=False)(feats)
      biases = self.param("age_biases", nn.initializers.zeros, (self.num_labels - 1,))
      out["age_logits"] = shared + biases
    elif self.age_head == "gaussian":
      mu_logvar = dense(2, "age")(feats)
      out["age_mu"] = self.age_center + mu_logvar[:, 0]
      out["age_log_var"] = mu_logvar[:, 1] + 4.0  # start near sigma = e^2 ~ 7 years
    elif self.age_head == "scalar":
      out["age_pred"] = self.age_center + dense(1, "age")(feats)[:, 0]
    else:
      raise ValueError(f"Unknown age head {self.age_head!r}; choose one of {AGE_HEADS}.")
    if self.gender:
      out["gender_logits"] = dense(2, "gender")(feats)
    if self.race:
      out["race_logits"] = dense(self.num_races, "race")(feats)
    return out


def with_age_bias(params: dict, age_head: str, bias) -> dict:
  """`params` (an AgeNet's) with the age head's biases replaced by `bias` (K-1 values for the
  coral and ordinal heads); the rest is shared, not copied."""
  heads = dict(params["heads"])
  if age_head == "coral":
    heads["age_biases"] = jnp.asarray(bias, heads["age_biases"].dtype).reshape(heads["age_biases"].shape)
  elif age_head == "ordinal":
    age = dict(heads["age"])
    age["bias"] = jnp.asarray(bias, age["bias"].dtype).reshape(age["bias"].shape)
    heads["age"] = age
  else:
    raise ValueError(f"Setting the age biases is defined for the coral and ordinal heads, not {age_head!r}.")
  return {**params, "heads": heads}
