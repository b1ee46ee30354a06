"""Multi-scale attention (MSA) built from alternating dilation rates.

MTMSA (Shi et al., IET Signal Processing 2023) publishes only its abstract: "a
multi-scale attention module built from alternating dilation rates" inside a
ResNet-34. The design below is agejax's, chosen so that it can be ablated:

  F (C channels)
   -> 1x1 conv to C/r, BN, ReLU                           (cheap bottleneck)
   -> stacked 3x3 convs, dilation rates (1, 2, 5), each BN + ReLU
      (hybrid dilated convolution, Wang et al. WACV 2018: rates without a common
      factor avoid the gridding holes of repeated equal dilation, and stacking
      grows the receptive field to 1 + 2 * (1 + 2 + 5) = 17 cells)
   -> concatenate the output of every rate (the "multi-scale" part: each rate
      sees a different context size), 1x1 conv to C, BN -> attention logits M
   -> F * (1 + sigmoid(M))                                (residual gating)

The residual gate F + F * sigmoid(M) keeps the identity path, so inserting the
module never blocks gradients and, at initialisation, only rescales features.
Rates, reduction and placement (after which ResNet stages) are configuration.
Layers come from `ops` (models/ops.py).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from agejax.models.ops import PLAIN, Ops, conv_init


class MultiScaleAttention(nn.Module):
  """Residual attention gate from stacked convolutions of alternating dilation."""
  rates: Sequence[int] = (1, 2, 5)
  reduction: int = 4
  ops: Ops = PLAIN
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    channels = x.shape[-1]
    hidden = max(channels // self.reduction, 8)
    conv = functools.partial(self.ops.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    bn = functools.partial(self.ops.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=self.dtype)
    h = nn.relu(bn()(conv(hidden, (1, 1), padding=0)(x)))
    scales = []
    for rate in self.rates:
      h = conv(hidden, (3, 3), padding=rate, kernel_dilation=rate)(h)
      h = nn.relu(bn()(h))
      scales.append(h)
    m = conv(channels, (1, 1), padding=0)(jnp.concatenate(scales, axis=-1))
    m = bn()(m)
    return x * (1.0 + nn.sigmoid(m))
