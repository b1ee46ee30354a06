"""VGG-16 trunks: DLDL-v2's ThinAgeNet / TinyAgeNet and the full-width VGG-16 of DEX.

DLDL-v2 (Gao et al., IJCAI 2018, Sec. 4.1 and the official code): the 13 conv
layers of VGG-16 with channels halved (Thin) or quartered (Tiny), each conv
3x3/1 with no bias followed by BatchNorm and ReLU, max-pooling after convs 2, 4,
7, 10 and 13, then "hybrid pooling": the last max-pool followed by a 7x7 average
pool at 224 input, a global average at other sizes.

`msa_stages` inserts agejax's multi-scale attention (models/attention.py) after
the convolutions of the named blocks (1-based, before the block's max-pool), as
the ResNet trunk does after its stages, so MSA can be ablated on DLDL-v2's
small backbones too. Layers come from `ops` (models/ops.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from agejax.models.attention import MultiScaleAttention
from agejax.models.ops import PLAIN, Ops, conv_init

# Conv widths of VGG-16; "M" is a 2x2/2 max-pool.
VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGGTrunk(nn.Module):
  """VGG-16 feature extractor; returns a (B, D) feature vector.

  width: channel multiplier (1/2 Thin, 1/4 Tiny, 1 full).
  batch_norm: conv (no bias) -> BN -> ReLU; without it conv (bias) -> ReLU (original VGG).
  fc_dims: fully connected layers after flattening (VGG-16: (4096, 4096) on the
    7x7 map); empty means hybrid pooling (global average after the last max-pool).
  """
  width: float = 0.5
  batch_norm: bool = True
  fc_dims: Sequence[int] = ()
  dropout: float = 0.5
  plan: Sequence[Any] = VGG16_PLAN
  msa_stages: Sequence[int] = ()          # 1-based conv blocks followed by an MSA module
  msa_rates: Sequence[int] = (1, 2, 5)
  msa_reduction: int = 4
  ops: Ops = PLAIN
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    block = 1
    for item in self.plan:
      if item == "M":
        if block in self.msa_stages:
          x = MultiScaleAttention(self.msa_rates, self.msa_reduction, ops=self.ops, dtype=self.dtype)(x, train)
        x = self.ops.max_pool(x, (2, 2), (2, 2))
        block += 1
        continue
      x = self.ops.conv(int(item * self.width), (3, 3), padding=1, use_bias=not self.batch_norm,
                        kernel_init=conv_init, dtype=self.dtype)(x)
      if self.batch_norm:
        x = self.ops.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
      x = nn.relu(x)
    if not self.fc_dims:
      return jnp.mean(x, axis=(1, 2))  # hybrid pooling: max-pool above, then average
    x = x.reshape(x.shape[0], -1)
    for d in self.fc_dims:
      x = nn.relu(nn.Dense(d, dtype=self.dtype)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x
