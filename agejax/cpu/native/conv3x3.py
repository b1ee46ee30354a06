"""The native 3x3 SAME convolution (kernels.cc) as a differentiable JAX function.

Forward and kernel gradient are the FFI kernels; the input gradient is the forward
applied to the output gradient with the kernel flipped and its channel axes
swapped (`flip_swap`: a SAME 3x3 convolution's transpose), so it too runs natively where the
input channels fill whole vectors, and is XLA's otherwise (a first RGB layer,
whose input gradient is unused and removed by XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agejax.cpu import native


MAX_CHANNEL_PRODUCT = 128 * 128  # input x output channels where the native kernel is faster


def _forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  native.require()
  out = jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call("agejax_conv3x3_forward", out, vmap_method="sequential")(x, kernel)


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  native.require()
  out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("agejax_conv3x3_kernel_grad", out, vmap_method="sequential")(x, g)


def flip_swap(kernel: jax.Array) -> jax.Array:
  """kernel[::-1, ::-1].swapaxes(2, 3) for a (KH, KW, C, O) float32 kernel: the kernel a convolution's
  input gradient convolves with, written by 32x32 tiles."""
  native.require()
  kh, kw, c, o = kernel.shape
  out = jax.ShapeDtypeStruct((kh, kw, o, c), jnp.float32)
  return jax.ffi.ffi_call("agejax_flip_swap", out, vmap_method="sequential")(kernel)


def supported(x_shape, kernel_shape, stride: int, pad: int, dilation: int, dtype) -> bool:
  """True where `conv3x3` applies (`native.usable`): 3x3 SAME stride 1, output channels a multiple
  of the vector width.

  At most 128 x 128 channels: the kernel streams a 3x3xCx64 kernel block from L2 per row
  tile, which pays below that size and not above (docs/CPU.md).
  """
  return (len(x_shape) == 4 and tuple(kernel_shape[:2]) == (3, 3) and (stride, pad, dilation) == (1, 1, 1)
          and x_shape[-1] * kernel_shape[-1] <= MAX_CHANNEL_PRODUCT and native.usable(dtype)
          and kernel_shape[-1] % native.vector_floats() == 0)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """NHWC x HWIO 3x3 convolution, stride 1, padding 1, float32, computed by the native kernels."""
  return _forward(x, kernel)


def _fwd(x, kernel):
  return _forward(x, kernel), (x, kernel)


def _bwd(residuals, g):
  x, kernel = residuals
  if x.shape[-1] % native.require() == 0:
    dx = _forward(g, flip_swap(kernel))
  else:
    dx = xla_input_grad(x, kernel, g, 1, 1, 1)
  return dx, _kernel_grad(x, g)


conv3x3.defvjp(_fwd, _bwd)


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, pad: int = 0, dilation: int = 1) -> jax.Array:
  """XLA's NHWC x HWIO convolution with symmetric padding."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(pad, pad), (pad, pad)], rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def xla_input_grad(x, kernel, g, stride, pad, dilation):
  """The input gradient of `xla_conv` at x for output gradient g: JAX's transposed convolution.

  XLA:CPU convolves it with the kernel flipped and its channel axes swapped, a transpose it
  runs as a strided loop. Where the native kernels are built, `flip_swap` writes that kernel
  instead, and the convolution is stated on it (in HWOI order, flipped back, which XLA cancels
  against JAX's flip), so XLA finds it already in the layout it needs.
  """
  if native.usable(jnp.result_type(x, kernel)):
    swapped = flip_swap(kernel)
    conv = lambda x: jax.lax.conv_general_dilated(
        x, jnp.flip(swapped, (0, 1)), (stride, stride), [(pad, pad), (pad, pad)],
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWOI", "NHWC"))
  else:
    conv = lambda x: xla_conv(x, kernel, stride, pad, dilation)
  return jax.vjp(conv, x)[1](g)[0]
