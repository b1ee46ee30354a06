"""Networks: trunks + hard-shared heads, built by name.

    model = models.create("thin", age_head="distribution")
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    outputs = model.apply(variables, images, train=False)   # dict of head outputs

`variables` is a plain pytree {"params": ..., "batch_stats": ...}. Every trunk builds its
convolutions, batch norms and max-pools from an op set (`models.ops`): the plain Flax/XLA layers,
or on a single CPU device agejax's XLA:CPU layers, with the same variables.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax.models.attention import MultiScaleAttention
from agejax.models.face_resnet import FaceResNetTrunk
from agejax.models.heads import AGE_HEADS, Heads
from agejax.models.ops import PLAIN, Ops, select
from agejax.models.resnet import STAGE_SIZES, ResNetTrunk
from agejax.models.vgg import VGGTrunk


class AgeNet(nn.Module):
  """A trunk producing a feature vector and the heads reading it."""
  trunk: nn.Module
  heads: Heads

  def __call__(self, images, train: bool = False):
    return self.heads(self.trunk(images, train=train))


def _trunk(name: str, dtype, msa_stages, msa_rates, msa_reduction, norm, ops: Ops) -> nn.Module:
  if name == "mtmsa":
    name, msa_stages = "resnet34", tuple(msa_stages) or (3, 4)
  msa = dict(msa_stages=tuple(msa_stages), msa_rates=tuple(msa_rates), msa_reduction=msa_reduction, ops=ops)
  blocks = 4 if name in STAGE_SIZES else 5
  if any(not 1 <= s <= blocks for s in msa["msa_stages"]):
    raise ValueError(f"msa_stages {msa['msa_stages']}: the {name} trunk has "
                     + ("stages 1..4." if blocks == 4 else "levels 1..5." if name == "face_resnet"
                        else "conv blocks 1..5."))
  if name == "face_resnet":
    return FaceResNetTrunk(norm=norm or "affine", dtype=dtype, **msa)
  if name == "thin":
    return VGGTrunk(width=0.5, dtype=dtype, **msa)
  if name == "tiny":
    return VGGTrunk(width=0.25, dtype=dtype, **msa)
  if name == "vgg16":
    return VGGTrunk(width=1.0, batch_norm=False, fc_dims=(4096, 4096), dtype=dtype, **msa)
  if name in STAGE_SIZES:
    return ResNetTrunk(STAGE_SIZES[name], dtype=dtype, **msa)
  raise ValueError(f"Unknown model {name!r}; choose one of {MODEL_NAMES}.")


MODEL_NAMES = ("thin", "tiny", "vgg16", "resnet18", "resnet34", "mtmsa", "face_resnet")


def create(name: str, *, age_head: str = "distribution", num_labels: int = 101, age_center: float = 50.0,
           gender: bool = False, race: bool = False, dtype: Any = jnp.float32,
           msa_stages=(), msa_rates=(1, 2, 5), msa_reduction: int = 4, norm: str = "",
           ops: str | Ops = "auto") -> AgeNet:
  """Build a network by name. `dtype` is the compute dtype; parameters stay float32.

  "mtmsa" is ResNet-34 with MSA after stages 3 and 4 (unless `msa_stages` says
  otherwise); any trunk gets MSA with `msa_stages` (ResNet stages 1-4, VGG conv
  blocks 1-5, face ResNet levels 1-5). Multi-task heads are configuration (`gender`,
  `race`) for every trunk. "face_resnet" is dlib's face-recognition ResNet
  (models/face_resnet.py; pretrained weights from `agejax.pretrained`), its
  normalisation layers `norm` = "affine" (dlib's, the default) or "batch".
  `ops`: "auto" (the XLA:CPU layers on a single CPU device, the plain ones elsewhere: `resolve_ops`),
  "plain", "cpu" or an `Ops`.
  """
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)
  trunk = _trunk(name, dtype, msa_stages, msa_rates, msa_reduction, norm, resolve_ops(ops))
  return AgeNet(trunk, Heads(age_head, num_labels, age_center, gender, race))


def pixel_input(model: nn.Module) -> tuple[nn.Module, Callable]:
  """(network, prepare) with network.apply(v, prepare(x)) the function model.apply(v, normalize(x)) of
  uint8 / [0, 255] RGB x, for inference: where the trunk reads pixels itself (the face ResNet, which
  folds its whole input map into its stem's weights, exactly) a clone that does, prepare a cast;
  otherwise the model itself after `preprocessing.normalize`. Same variables either way."""
  from agejax import preprocessing
  if isinstance(model, AgeNet) and isinstance(model.trunk, FaceResNetTrunk):
    return model.clone(trunk=model.trunk.clone(pixels=True)), lambda x: jnp.asarray(x).astype(jnp.float32)
  return model, preprocessing.normalize


def resolve_ops(ops: str | Ops = "auto", devices=None) -> Ops:
  """An `Ops` as given, or the set `select` picks for `devices` (default: every device JAX sees)."""
  if isinstance(ops, Ops):
    return ops
  devices = jax.devices() if devices is None else list(devices)
  return select(ops, devices[0].platform, len(devices))


def count_params(params) -> int:
  """Number of parameters (BN scale/bias included; running statistics are not params)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def init(model: nn.Module, rng, image_size: int, batch: int = 1):
  """Initialise variables for (batch, image_size, image_size, 3) inputs, shapes only compiled once."""
  x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda r: model.init({"params": r, "dropout": r}, x, train=False))(rng)


__all__ = ["AgeNet", "Heads", "MultiScaleAttention", "Ops", "PLAIN", "AGE_HEADS", "MODEL_NAMES", "create",
           "count_params", "init", "resolve_ops", "select"]
