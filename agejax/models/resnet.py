"""ResNet-18/34 trunks (He et al., CVPR 2016), optionally with multi-scale attention.

Torchvision's layout (7x7/2 stem, 3x3/2 max-pool, BasicBlocks, 1x1 projection
shortcuts), so the ResNet-34 trunk has exactly its 21,284,672 parameters.
MTMSA inserts `MultiScaleAttention` after the stages named in `msa_stages`.
Layers come from `ops` (models/ops.py).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from agejax.models.attention import MultiScaleAttention
from agejax.models.ops import PLAIN, Ops, conv_init

STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def _layers(ops: Ops, train: bool, dtype):
  conv = functools.partial(ops.conv, use_bias=False, kernel_init=conv_init, dtype=dtype)
  norm = functools.partial(ops.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  return conv, norm


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  ops: Ops = PLAIN
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _layers(self.ops, train, self.dtype)
    y = nn.relu(norm()(conv(self.features, (3, 3), self.strides, padding=1)(x)))
    # Zero-init the last BN scale: each block starts as identity (Goyal et al. 2017).
    y = norm(scale_init=nn.initializers.zeros)(conv(self.features, (3, 3), padding=1)(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = norm()(conv(self.features, (1, 1), self.strides, padding=0)(x))
    return nn.relu(x + y)


class ResNetTrunk(nn.Module):
  """ResNet feature extractor returning globally pooled (B, 512) features."""
  stage_sizes: Sequence[int] = STAGE_SIZES["resnet34"]
  msa_stages: Sequence[int] = ()          # 1-based stage indices followed by an MSA module
  msa_rates: Sequence[int] = (1, 2, 5)
  msa_reduction: int = 4
  ops: Ops = PLAIN
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _layers(self.ops, train, self.dtype)
    x = x.astype(self.dtype)
    x = nn.relu(norm()(conv(64, (7, 7), 2, padding=3)(x)))
    x = self.ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = BasicBlock(64 * 2 ** i, strides=2 if (i > 0 and j == 0) else 1, ops=self.ops, dtype=self.dtype)(x, train)
      if i + 1 in self.msa_stages:
        x = MultiScaleAttention(self.msa_rates, self.msa_reduction, ops=self.ops, dtype=self.dtype)(x, train)
    return jnp.mean(x, axis=(1, 2))
