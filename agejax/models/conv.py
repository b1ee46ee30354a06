"""2-D convolution that sidesteps XLA:CPU's slow path on tiny feature maps.

XLA:CPU's convolution (Eigen) is pathological when the output map is 2x2 or
when most taps of a dilated kernel fall into the padding: on a 2-core EPYC a
3x3 512->512 convolution on a 2x2 map (ResNet stage 4 at 64 px input) took
841 ms for forward + both gradients at batch 32, against 24 ms as a sum of
per-tap matmuls (docs/RESULTS.md). So `conv2d` computes those cases as a sum
over the taps that can see the image (taps that only see zero padding add
nothing and are skipped), and leaves every other shape to XLA, which is faster
there. Both give the same numbers up to float rounding (tested).

On one CPU device, a float32 3x3 stride-1 SAME convolution of at most 128x128 channels
(whose output channels fill AVX-512/AVX2 vectors) runs on agejax's native direct
convolution (`agejax/native`, compiled on first use): 1.1-4x faster than Eigen there,
kernel gradients most of all; a strided stem over <= 4 channels (ResNet's 7x7/2) on its
strided kernel (forward 1.6x, kernel gradient 3x). Other layers keep XLA's convolution,
with the input gradient's kernel written by `native.flip_swap` (`xla_input_grad`).
Everything below is what the other shapes, or machines without a C++ compiler, get.

`stored_input` (models/stored.py) keeps XLA:CPU from recomputing a convolution's input inside its
kernel gradient's transpose (+5% for the TinyAgeNet training step).

On one CPU device, a convolution over at most 16 input channels has its kernel
gradient summed over groups of 8 images (`xla_conv_cpu`). XLA
computes a kernel gradient as a convolution whose contracted dimension is the
batch, moved minor by two transposes of the whole input and output gradient; in
groups of 8 those transposes stay in cache and Eigen's contraction runs on 8-float
(one AVX register) rows: 18 against 24 ms for TinyAgeNet's second layer at batch
64, 74 against 194 ms at batch 256. Unrolled: inside a `scan` XLA:CPU ran the same
convolutions 30x slower. Wider layers gained nothing, so they keep XLA's gradient.
On the CPU, a 3x3 first layer (<= 4 channels) runs its forward on pairs of adjacent
columns (`conv_paired_columns`): about twice as fast.

`Conv` is a drop-in for `nn.Conv` as agejax uses it: same variable names
("kernel" HWIO, optional "bias"), shapes, initialisers and dtype handling, so
parameter counts and checkpoints do not change.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax import native
from agejax.models.stored import stored, stored_input
from agejax.native import conv3x3 as native_conv3x3
from agejax.native.conv3x3 import xla_conv, xla_input_grad  # noqa: F401 (part of this module's API)
from agejax.native import strided as native_strided

# He-normal over fan-out, as DLDL-v2's official code (kaiming_normal_, mode="fan_out").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _out_size(n: int, k: int, stride: int, pad: int, dilation: int) -> int:
  return (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def _live_offsets(n: int, k: int, stride: int, pad: int, dilation: int) -> list[int]:
  """Kernel offsets along one axis whose window positions touch the image (not only padding)."""
  out = _out_size(n, k, stride, pad, dilation)
  return [i for i in range(k)
          if any(pad <= i * dilation + stride * r < pad + n for r in range(out))]


def use_taps(in_hw: tuple[int, int], kernel_hw: tuple[int, int], stride: int, pad: int,
             dilation: int) -> bool:
  """True where the per-tap sum beats XLA:CPU: a <= 2x2 output, or under half the taps live."""
  (h, w), (kh, kw) = in_hw, kernel_hw
  if kh * kw == 1:
    return False
  out_pixels = _out_size(h, kh, stride, pad, dilation) * _out_size(w, kw, stride, pad, dilation)
  live = (len(_live_offsets(h, kh, stride, pad, dilation))
          * len(_live_offsets(w, kw, stride, pad, dilation)))
  return out_pixels <= 4 or 2 * live < kh * kw


def conv2d_taps(x: jax.Array, kernel: jax.Array, stride: int = 1, pad: int = 0,
                dilation: int = 1) -> jax.Array:
  """NHWC x HWIO convolution as a sum of one matmul per live tap."""
  b, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  ho, wo = _out_size(h, kh, stride, pad, dilation), _out_size(w, kw, stride, pad, dilation)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in _live_offsets(h, kh, stride, pad, dilation):
    for j in _live_offsets(w, kw, stride, pad, dilation):
      r, s = i * dilation, j * dilation
      patch = jax.lax.slice(xp, (0, r, s, 0), (b, r + stride * (ho - 1) + 1, s + stride * (wo - 1) + 1, c),
                            (1, stride, stride, 1))
      term = jnp.einsum("bhwc,co->bhwo", patch, kernel[i, j])
      out = term if out is None else out + term
  return out


GROUP = 8  # images per kernel-gradient group: one AVX register of float32


def pairs_columns(in_features: int, width: int, kernel_hw: tuple[int, int], stride: int, pad: int,
                  dilation: int) -> bool:
  """True where `conv_paired_columns` computes the forward: XLA:CPU, 3x3 SAME over <= 4 channels, even width."""
  return (jax.default_backend() == "cpu" and in_features <= 4 and width % 2 == 0
          and tuple(kernel_hw) == (3, 3) and (stride, pad, dilation) == (1, 1, 1))


def conv_paired_columns(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 SAME convolution over <= 4 channels, computed on pairs of adjacent columns.

  A first layer (RGB) gives Eigen a 27-deep contraction and O outputs, which it runs
  at a third of its speed on wider layers. Zero-padded to 4 channels and by one pixel,
  the input (N, H+2, W+2, 4) is read as (N, H+2, W/2+1, 8): each position holds two
  adjacent columns, a free reshape. A 3x2 kernel over those 8 channels with 2*O outputs
  (the 3x3 kernel placed once per output column of the pair) gives two output columns
  per position, which reshape back to (N, H, W, O) for free. Eigen then contracts 48
  deep into 2*O outputs: TinyAgeNet's first layer (64 px, batch 64) took 4.2 instead
  of 8.0 ms, ThinAgeNet's 5.4 instead of 6.8 at 64 px and 28 instead of 43 at 224 px.
  Forward only: its kernel gradient was slower (7.3 against 5.1 ms).
  """
  n, h, w, c = x.shape
  o = kernel.shape[-1]
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 4 - c))).reshape(n, h + 2, w // 2 + 1, 8)
  kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 4 - c), (0, 0)))
  left = jnp.pad(kernel, ((0, 0), (0, 1), (0, 0), (0, 0)))   # output column 2j reads padded 2j..2j+2
  right = jnp.pad(kernel, ((0, 0), (1, 0), (0, 0), (0, 0)))  # output column 2j+1 reads 2j+1..2j+3
  paired = jnp.stack([left, right], axis=-2).reshape(3, 2, 8, 2 * o)
  y = jax.lax.conv_general_dilated(x, paired, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(n, h, w, o)


def xla_conv_forward(x, kernel, stride, pad, dilation):
  """`xla_conv`, or `conv_paired_columns` where that is faster (`pairs_columns`)."""
  if pairs_columns(x.shape[-1], x.shape[2], kernel.shape[:2], stride, pad, dilation):
    return conv_paired_columns(x, kernel)
  return xla_conv(x, kernel, stride, pad, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def xla_conv_cpu(x, kernel, stride, pad, dilation):
  """`xla_conv` with XLA:CPU's faster forward and, where `group_kernel_grad`, kernel gradients in groups.

  The kernel gradient, where grouped, is a sum over groups of GROUP images accumulated
  in float32; elsewhere it and the input gradient are XLA's.
  """
  return xla_conv_forward(x, kernel, stride, pad, dilation)


def _cpu_fwd(x, kernel, stride, pad, dilation):
  x = stored(x)  # read from memory by the forward and every gradient, not recomputed in each
  return xla_conv_forward(x, kernel, stride, pad, dilation), (x, kernel)


def _cpu_bwd(stride, pad, dilation, residuals, g):
  x, kernel = residuals
  dx = xla_input_grad(x, kernel, g, stride, pad, dilation)
  if not group_kernel_grad(x.shape[0], x.shape[-1]):
    return dx, jax.vjp(lambda k: xla_conv(x, k, stride, pad, dilation), kernel)[1](g)[0]
  dk = jnp.zeros(kernel.shape, jnp.float32)
  for i in range(0, x.shape[0], GROUP):  # unrolled on purpose (see the module docstring)
    part = jax.vjp(lambda k: xla_conv(x[i:i + GROUP], k, stride, pad, dilation), kernel)[1](g[i:i + GROUP])[0]
    dk = dk + part.astype(jnp.float32)
  return dx, dk.astype(kernel.dtype)


xla_conv_cpu.defvjp(_cpu_fwd, _cpu_bwd)


def group_kernel_grad(batch: int, in_features: int) -> bool:
  """True where the grouped kernel gradient is used: XLA:CPU, one device, whole groups, <= 16 input channels.

  Measured per layer (docs/RESULTS.md): TinyAgeNet's three layers with 3-16 input channels
  got 23-24% faster kernel gradients, ThinAgeNet's 3-channel first layer stayed within 3%,
  and layers with 32 or more channels gained nothing. One device only: groups of
  consecutive images would cut across the shards of a batch sharded over several.
  """
  return (jax.default_backend() == "cpu" and jax.device_count() == 1
          and batch % GROUP == 0 and batch > GROUP and in_features <= 16)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, pad: int = 0, dilation: int = 1) -> jax.Array:
  """NHWC x HWIO convolution, symmetric padding; picks the faster formulation by shape."""
  if use_taps(x.shape[1:3], kernel.shape[:2], stride, pad, dilation):
    return conv2d_taps(x, kernel, stride, pad, dilation)
  if native_conv3x3.supported(x.shape, kernel.shape, stride, pad, dilation, jnp.result_type(x, kernel)):
    return native_conv3x3.conv3x3(x, kernel)
  if native_strided.supported(x.shape, kernel.shape, stride, pad, dilation, jnp.result_type(x, kernel)):
    return native_strided.conv_strided(x, kernel, stride, pad)
  if (group_kernel_grad(x.shape[0], x.shape[-1])
      or pairs_columns(x.shape[-1], x.shape[2], kernel.shape[:2], stride, pad, dilation)
      or native.usable(jnp.result_type(x, kernel))):
    return xla_conv_cpu(x, kernel, stride, pad, dilation)
  x = stored_input(x)  # an XLA:CPU fusion workaround; a no-op on other backends
  return xla_conv(x, kernel, stride, pad, dilation)


class Conv(nn.Module):
  """`nn.Conv(features, (k, k), stride, padding=pad, kernel_dilation=dilation)` computed by `conv2d`."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = False
  kernel_init: Callable = conv_init
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, self.strides, self.padding, self.dilation)
    return y if bias is None else y + bias
