"""The native strided convolution over few input channels (kernels.cc) as a differentiable JAX function.

What it is for: a stem, such as ResNet's 7x7 stride-2 convolution over RGB, a poor shape for
Eigen's im2col + GEMM (a 147-deep contraction into 64 outputs). The native kernels take kernel
columns and channels together (K*C contiguous values a kernel row), so their register tiles
fill as on a wide layer. The input gradient is XLA's (with the kernel from `flip_swap`); on a
first layer it is unused and XLA drops it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from agejax.cpu import native
from agejax.cpu.native.conv3x3 import xla_input_grad

MAX_INPUT_CHANNELS = 4  # RGB(A) stems: the shapes measured (docs/CPU.md)


def _out(size: int, k: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - k) // stride + 1


def _forward(x, kernel, stride, pad):
  native.require()
  k = kernel.shape[0]
  shape = (x.shape[0], _out(x.shape[1], k, stride, pad), _out(x.shape[2], k, stride, pad), kernel.shape[-1])
  return jax.ffi.ffi_call("agejax_strided_forward", jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(x, kernel, stride=np.int64(stride), pad=np.int64(pad))


def _kernel_grad(x, g, k, stride, pad):
  native.require()
  out = jax.ShapeDtypeStruct((k, k, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("agejax_strided_kernel_grad", out, vmap_method="sequential")(
      x, g, stride=np.int64(stride), pad=np.int64(pad))


def supported(x_shape, kernel_shape, stride: int, pad: int, dilation: int, dtype) -> bool:
  """True where `conv_strided` applies (`native.usable`): a square kernel of at least 5x5 or a
  stride of 2 or more, no dilation, at most 4 input channels, output channels a multiple of the
  vector width. (3x3 stride-1 layers have `conv3x3`.)"""
  return (len(x_shape) == 4 and kernel_shape[0] == kernel_shape[1] and dilation == 1
          and x_shape[-1] <= MAX_INPUT_CHANNELS and (kernel_shape[0] >= 5 or stride > 1) and pad < kernel_shape[0]
          and min(x_shape[1:3]) + 2 * pad >= kernel_shape[0] and native.usable(dtype)
          and kernel_shape[-1] % native.vector_floats() == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_strided(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """NHWC x HWIO KxK convolution with stride and symmetric padding, float32, computed natively."""
  return _forward(x, kernel, stride, pad)


def _fwd(x, kernel, stride, pad):
  return _forward(x, kernel, stride, pad), (x, kernel)


def _bwd(stride, pad, residuals, g):
  x, kernel = residuals
  return xla_input_grad(x, kernel, g, stride, pad, 1), _kernel_grad(x, g, kernel.shape[0], stride, pad)


conv_strided.defvjp(_fwd, _bwd)
