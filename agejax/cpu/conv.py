"""2-D convolution for XLA:CPU: `Conv` is `nn.Conv` with the convolution computed by `conv2d`.

`conv2d(x, kernel, stride, pad, dilation)` is `lax.conv_general_dilated` on NHWC x HWIO with
symmetric padding, computed by whichever formulation XLA:CPU runs fastest for its shape:

- `conv2d_taps`: a sum of one matmul per kernel tap that sees the image (2x2 outputs, dilated
  kernels mostly over padding);
- the native kernels (`agejax.cpu.native`): 3x3 SAME layers of <= 128x128 channels, strided stems;
- `xla_conv_cpu`: XLA's convolution with a paired-column forward for RGB first layers and the
  kernel gradient of <= 16-channel layers summed over groups of 8 images (one device only);
- XLA's convolution, its input kept stored for the kernel gradient (`stored_input`).

All give the same numbers up to float rounding (tests). Why each exists and what it bought, with
the machines and dates: docs/CPU.md.
"""

from __future__ import annotations

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax.cpu import native
from agejax.cpu.native import conv3x3 as native_conv3x3
from agejax.cpu.native import strided as native_strided
from agejax.cpu.native.conv3x3 import xla_conv, xla_input_grad  # noqa: F401 (part of this module's API)
from agejax.cpu.stored import stored, stored_input


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
  """3x3 SAME convolution over <= 4 channels (even width), computed on pairs of adjacent columns.

  Zero-padded to 4 channels and by one pixel, the input (N, H+2, W+2, 4) is read as
  (N, H+2, W/2+1, 8): each position holds two adjacent columns, a free reshape. A 3x2
  kernel over those 8 channels with 2*O outputs (the 3x3 kernel placed once per output
  column of the pair) gives two output columns per position, which reshape back to
  (N, H, W, O) for free: a 48-deep contraction into 2*O outputs instead of 27 into O.
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
  for i in range(0, x.shape[0], GROUP):  # unrolled: inside a scan XLA:CPU ran it far slower (docs/CPU.md)
    part = jax.vjp(lambda k: xla_conv(x[i:i + GROUP], k, stride, pad, dilation), kernel)[1](g[i:i + GROUP])[0]
    dk = dk + part.astype(jnp.float32)
  return dx, dk.astype(kernel.dtype)


xla_conv_cpu.defvjp(_cpu_fwd, _cpu_bwd)


def group_kernel_grad(batch: int, in_features: int) -> bool:
  """True where the grouped kernel gradient is used: XLA:CPU, one device, whole groups, <= 16 input channels.

  One device only: groups of consecutive images would cut across the shards of a batch
  sharded over several.
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


def _pair(v) -> int | None:
  """The one value of an int or a pair of equal ints (nn.Conv's strides, dilation); None otherwise."""
  if v is None:
    return 1
  if isinstance(v, int):
    return v
  v = tuple(v)
  return v[0] if len(v) == 2 and v[0] == v[1] and isinstance(v[0], int) else None


def _symmetric_padding(padding, kernel: int, stride: int, dilation: int) -> int | None:
  """nn.Conv's `padding` as one symmetric amount for both axes, or None where it is not one."""
  if isinstance(padding, str):
    if padding == "VALID":
      return 0
    if padding == "SAME" and stride == 1 and kernel % 2 == 1:
      return dilation * (kernel - 1) // 2
    return None
  if isinstance(padding, int):
    return padding
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if len(pads) == 2 and all(len(p) == 2 and p[0] == p[1] == pads[0][0] for p in pads):
    return int(pads[0][0])
  return None


class Conv(nn.Conv):
  """`nn.Conv` (same fields, variables and initialisers) computed by `conv2d` on 4-D inputs with a
  square kernel, equal strides and dilations and symmetric padding; other uses are `nn.Conv`'s."""

  @nn.compact
  def __call__(self, inputs):
    ks = tuple(self.kernel_size)
    stride, dilation = _pair(self.strides), _pair(self.kernel_dilation)
    pad = (_symmetric_padding(self.padding, ks[0], stride, dilation)
           if len(ks) == 2 and ks[0] == ks[1] and stride and dilation else None)
    if (pad is None or inputs.ndim != 4 or self.feature_group_count != 1 or self.mask is not None
        or _pair(self.input_dilation) != 1 or self.precision is not None):
      return super().__call__(inputs)
    kernel = self.param("kernel", self.kernel_init, (*ks, inputs.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, stride, pad, dilation)
    return y if bias is None else y + bias
