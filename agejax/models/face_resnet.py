"""dlib's face-recognition ResNet (King, dlib 19.3, 2017) as a Flax trunk.

The network of dlib's `dnn_face_recognition_ex.cpp` ("anet_type"): ResNet-34's plan at
half width, a 7x7/2 stem, 3x3/2 max-pool, four levels of residual blocks (3 x 32,
4 x 64, 3 x 128, 3 x 256 channels, counting each level's down block) and a last
down block of 256, global average, then a 128-d `fc_no_bias` (the face descriptor).
Its weights (public domain) come from `agejax.pretrained`. What reproduces dlib:

- dlib pads a convolution or pool only when its stride is 1 (by half the kernel), so
  the stem, the strided block convolutions and every pool are VALID: 150 px input ->
  72 -> 35 (max-pool) -> 35 -> 17 -> 8 -> 4 -> 2.
- Every convolution has a bias. Each block is conv3x3(stride s) -> affine -> relu -> conv3x3 -> affine, added to the
  shortcut, then relu. A down block's shortcut is a 2x2/2 average pool of its input;
  dlib's `add_prev` sums tensors of different shapes by padding both with zeros at the
  end of each axis (channels 32 -> 64, and 3x3 + 4x4 -> 4x4 in the third down block).
- `affine` is a per-channel scale and shift (dlib's inference form of batch norm).
  `norm="batch"` puts batch normalisation there instead, for fine-tuning; `Affine`
  and `BatchNorm` share the `scale`/`bias` names.
- Input: dlib feeds (pixel - (122.782, 117.001, 104.298)) / 256. The trunk takes
  agejax's normalised input (`agejax.preprocessing.normalize`) and maps it to dlib's
  exactly (both are per-channel affine maps of the pixels), so it drops into every
  training and export path unchanged; `pixels=True` takes [0, 255] RGB instead. At inference the
  map is folded into the stem's weights (`fold_input_affine`: the stem has no padding, so exact).

Convolutions, batch norm and the max-pool come from `ops` (models/ops.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from agejax import preprocessing
from agejax.models.attention import MultiScaleAttention
from agejax.models.ops import PLAIN, Ops, conv_init

DLIB_MEAN = (122.782, 117.001, 104.298)
# Blocks per level from the input side: (channels, blocks, first block is a down block).
LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
DESCRIPTOR_SIZE = 128
INPUT_SIZE = 150


class Affine(nn.Module):
  """y = x * scale + bias per channel (dlib's affine_ layer)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return x * scale.astype(x.dtype) + bias.astype(x.dtype)


def add_padded(a, b):
  """dlib's add_prev: a + b over the larger extent of each axis, each zero-padded at the end."""
  shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))
  pad = lambda t: jnp.pad(t, [(0, s - n) for n, s in zip(t.shape, shape)]) if t.shape != shape else t
  return pad(a) + pad(b)


def avg_pool_2x2(x):
  """2x2/2 average pool, VALID (an odd last row or column is dropped), on NHWC."""
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def dlib_input_affine(pixels: bool) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset), float32 per channel: dlib's input (pixel - DLIB_MEAN) / 256 is x * scale + offset
  for agejax-normalised x (pixel = (x * STD + MEAN) * 255) or, with pixels=True, [0, 255] RGB."""
  std, mean, dlib_mean = (np.asarray(v, np.float64) for v in (preprocessing.STD, preprocessing.MEAN, DLIB_MEAN))
  if pixels:
    scale, offset = np.full(3, 1 / 256.0), -dlib_mean / 256.0
  else:
    scale, offset = std * 255.0 / 256.0, (mean * 255.0 - dlib_mean) / 256.0
  return scale.astype(np.float32), offset.astype(np.float32)


def dlib_input(x, pixels: bool):
  """agejax-normalised (or, with pixels=True, [0, 255]) RGB -> dlib's (pixel - mean) / 256."""
  if not pixels:
    x = (x * jnp.array(preprocessing.STD) + jnp.array(preprocessing.MEAN)) * 255.0
  return (x - jnp.array(DLIB_MEAN)) / 256.0


def fold_input_affine(scale, offset) -> Callable:
  """`nn.map_variables`' trans_in_fn for a convolution without padding: convolving x * scale + offset
  (per input channel) equals convolving x with kernel * scale and bias + sum(kernel * offset). The
  stored variables stay the unfolded ones (a checkpoint loads either way); gradients flow through."""
  def fold(variables):
    p = variables["params"]
    kernel = p["kernel"]
    return {**variables, "params": {**p, "kernel": kernel * scale[:, None],
                                    "bias": p["bias"] + jnp.sum(kernel * offset[:, None], axis=(0, 1, 2))}}
  return fold


class FaceBlock(nn.Module):
  """dlib's ares / ares_down: relu(block(x) + shortcut(x))."""
  features: int
  down: bool = False
  norm: str = "affine"
  ops: Ops = PLAIN
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: _norm(self.norm, self.ops, train, self.dtype)
    conv = functools.partial(self.ops.conv, use_bias=True, kernel_init=conv_init, dtype=self.dtype)
    stride = 2 if self.down else 1
    y = conv(self.features, (3, 3), stride, padding=1 if stride == 1 else 0)(x)
    y = nn.relu(norm()(y))
    y = norm()(conv(self.features, (3, 3), padding=1)(y))
    shortcut = avg_pool_2x2(x) if self.down else x
    return nn.relu(add_padded(y, shortcut))


def _norm(kind: str, ops: Ops, train: bool, dtype) -> nn.Module:
  if kind == "affine":
    return Affine()
  if kind == "batch":
    return ops.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  raise ValueError(f"norm {kind!r}: choose 'affine' (dlib's) or 'batch'.")


class FaceResNetTrunk(nn.Module):
  """dlib's face ResNet up to the global average: (B, H, W, 3) -> (B, 256) features.

  msa_stages: 1-based levels (1-5, from the input side) followed by agejax's
  multi-scale attention, as in the ResNet trunks.
  """
  norm: str = "affine"
  pixels: bool = False
  msa_stages: Sequence[int] = ()
  msa_rates: Sequence[int] = (1, 2, 5)
  msa_reduction: int = 4
  ops: Ops = PLAIN
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    # Inference folds dlib's input map into the stem (VALID, so exact): no pass over the pixels, which
    # an exported ONNX graph would run op by op over the whole batch. Training maps the input first:
    # the stem's gradients are then computed on dlib's centred input, as accurate as before.
    if train or self.is_initializing():
      x, stem = dlib_input(x.astype(jnp.float32), self.pixels), self.ops.conv
    else:
      stem = nn.map_variables(self.ops.conv, "params", trans_in_fn=fold_input_affine(*dlib_input_affine(self.pixels)))
    x = stem(32, (7, 7), 2, padding=0, use_bias=True, kernel_init=conv_init, dtype=self.dtype, name="Conv_0")(
        x.astype(self.dtype))
    x = nn.relu(_norm(self.norm, self.ops, train, self.dtype)(x))
    x = self.ops.max_pool(x, (3, 3), (2, 2))
    for level, (features, blocks, down) in enumerate(LEVELS, start=1):
      for j in range(blocks):
        x = FaceBlock(features, down=down and j == 0, norm=self.norm, ops=self.ops, dtype=self.dtype)(x, train)
      if level in self.msa_stages:
        x = MultiScaleAttention(self.msa_rates, self.msa_reduction, ops=self.ops, dtype=self.dtype)(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class FaceDescriptor(nn.Module):
  """The whole dlib network: uint8 or [0, 255] (B, 150, 150, 3) chips -> (B, 128) descriptors."""
  ops: Ops = PLAIN

  @nn.compact
  def __call__(self, chips):
    feats = FaceResNetTrunk(pixels=True, ops=self.ops, name="trunk")(chips.astype(jnp.float32))
    return nn.Dense(DESCRIPTOR_SIZE, use_bias=False, name="fc")(feats)
