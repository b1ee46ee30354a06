"""The native 3x3 convolution (agejax/cpu/native): same numbers as XLA's, taken only where it applies."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax.cpu import native
from agejax.cpu import conv
from agejax.cpu.native import conv3x3 as nc
from agejax.cpu.native import strided as ns

pytestmark = pytest.mark.cpu_lowering
WIDTH = native.vector_floats()
needs_native = pytest.mark.skipif(WIDTH is None, reason="no C++ compiler: XLA's convolution is used")


def _xla(x, w):
  return conv.xla_conv(x, w, 1, 1, 1)


def _value_and_grads(f, x, w, g):
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(g))


@needs_native
@pytest.mark.parametrize("n,h,w,c,o", [
    (1, 1, 1, 16, 16),     # one pixel: every tap but the centre reads padding
    (1, 9, 31, 16, 32),    # one image: split into row bands over the threads; 31 = uneven tiles
    (5, 7, 6, 3, 16),      # RGB input: input channels not a whole vector (input gradient is XLA's)
    (3, 12, 12, 32, 48),   # 3 vectors of output channels
    (6, 5, 8, 64, 64),     # small maps: the kernel gradient sums groups of images
    (2, 4, 45, 24, 16),    # input channels not a compile-time size, wide rows
])
def test_forward_and_gradients_match_xla(n, h, w, c, o):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(n * 1000 + h * 10 + c), 3)
  x = jax.random.normal(kx, (n, h, w, c))
  k = jax.random.normal(kw, (3, 3, c, o)) / np.sqrt(9 * c)
  g = jax.random.normal(kg, (n, h, w, o))
  got = jax.jit(lambda x, k, g: _value_and_grads(nc.conv3x3, x, k, g))(x, k, g)
  want = jax.jit(lambda x, k, g: _value_and_grads(_xla, x, k, g))(x, k, g)
  for name, a, b in zip(("y", "dx", "dkernel"), got, want):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@needs_native
def test_input_gradient_is_native_only_where_input_channels_fill_vectors():
  """A 16k-channel input gets its gradient from the native forward; an RGB one from XLA."""
  def hlo(c):
    x, k = jnp.ones((2, 8, 8, c)), jnp.ones((3, 3, c, WIDTH))
    return jax.jit(jax.grad(lambda x, k: jnp.sum(nc.conv3x3(x, k) ** 2), argnums=(0, 1))).lower(x, k).as_text()
  wide, rgb = hlo(WIDTH), hlo(3)
  assert wide.count("agejax_conv3x3_forward") == 2 and "convolution" not in wide
  assert rgb.count("agejax_conv3x3_forward") == 1 and "stablehlo.convolution" in rgb
  assert wide.count("agejax_conv3x3_kernel_grad") == rgb.count("agejax_conv3x3_kernel_grad") == 1


@needs_native
def test_conv2d_takes_the_native_kernel_only_where_it_applies():
  f32 = jnp.float32
  assert nc.supported((8, 32, 32, 16), (3, 3, 16, 32), 1, 1, 1, f32)
  assert nc.supported((8, 32, 32, 3), (3, 3, 3, 32), 1, 1, 1, f32)
  assert nc.supported((8, 16, 16, 128), (3, 3, 128, 128), 1, 1, 1, f32)
  assert not nc.supported((8, 16, 16, 128), (3, 3, 128, 256), 1, 1, 1, f32)  # measured slower than XLA
  assert not nc.supported((8, 32, 32, 16), (3, 3, 16, 32), 1, 1, 1, jnp.bfloat16)
  assert not nc.supported((8, 32, 32, 16), (3, 3, 16, 32), 2, 1, 1, f32)
  assert not nc.supported((8, 32, 32, 16), (3, 3, 16, 32), 1, 2, 2, f32)
  assert not nc.supported((8, 32, 32, 16), (7, 7, 16, 32), 1, 3, 1, f32)
  assert not nc.supported((8, 32, 32, 16), (3, 3, 16, WIDTH + 4), 1, 1, 1, f32)
  x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 32))
  assert "agejax_conv3x3_forward" in jax.jit(lambda x, k: conv.conv2d(x, k, 1, 1)).lower(x, k).as_text()
  assert "agejax_conv3x3" not in jax.jit(lambda x, k: conv.conv2d(x, k, 2, 1)).lower(x, k).as_text()


@needs_native
@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (7, 7, 3, 64), (1, 1, 40, 24), (3, 3, 17, 5)])
def test_flip_swap_is_the_flipped_channel_swapped_kernel(shape):
  """Any kernel size, channel counts off the 16x16 tiles included; bitwise a copy."""
  w = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape)
  got = jax.jit(nc.flip_swap)(w)
  np.testing.assert_array_equal(got, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))


@needs_native
@pytest.mark.parametrize("k,stride,pad,dilation,c,o", [
    (3, 1, 1, 1, 32, 48), (3, 2, 1, 1, 16, 32), (7, 2, 3, 1, 3, 16), (1, 2, 0, 1, 24, 40), (3, 1, 2, 2, 16, 16)])
def test_xla_input_gradient_convolves_with_the_native_swapped_kernel(k, stride, pad, dilation, c, o):
  """Same input gradient as JAX's for strided, dilated, 7x7 and 1x1 convolutions, and in the
  compiled step XLA convolves with flip_swap's output as it is: no transpose or reverse of the kernel."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 11, c))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c, o))
  g = jax.random.normal(jax.random.PRNGKey(2), conv.xla_conv(x, w, stride, pad, dilation).shape)
  want = jax.vjp(lambda x: conv.xla_conv(x, w, stride, pad, dilation), x)[1](g)[0]
  f = jax.jit(lambda x, w, g: conv.xla_input_grad(x, w, g, stride, pad, dilation))
  np.testing.assert_allclose(f(x, w, g), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  ops = [ln.split("=", 1)[1].split("(")[0] for ln in f.lower(x, w, g).compile().as_text().splitlines()
         if ln.startswith("  ") and " = " in ln and "metadata" in ln]
  assert not any(op.endswith((" transpose", " reverse", " copy")) for op in ops), ops


@needs_native
def test_conv2d_gives_xla_run_layers_the_native_swapped_kernel():
  """A 256-channel layer stays on XLA's convolution; its input gradient's kernel comes from flip_swap."""
  x, k = jnp.ones((2, 4, 4, 256)), jnp.ones((3, 3, 256, 256))
  step = jax.jit(jax.grad(lambda x, k: jnp.sum(conv.conv2d(x, k, 1, 1) ** 2), argnums=(0, 1)))
  text = step.lower(x, k).as_text()
  assert "agejax_flip_swap" in text and "agejax_conv3x3" not in text
  with native.disabled():
    assert "agejax" not in jax.jit(jax.grad(lambda x, k: jnp.sum(conv.conv2d(x, k, 1, 1) ** 2))).lower(x, k).as_text()


@needs_native
@pytest.mark.parametrize("n,size,c,o,k,stride,pad", [
    (3, 30, 3, 64, 7, 2, 3),    # ResNet's stem (at 30 px; 112 px is 56x56 outputs)
    (2, 17, 3, 32, 5, 1, 2),    # stride 1, a 5x5 kernel, an odd size
    (2, 15, 4, 16, 3, 2, 1),    # 3x3 stride 2 over 4 channels
    (1, 11, 1, 48, 7, 3, 0),    # one channel, stride 3, no padding: 2x2 outputs, 3 output vectors
])
def test_strided_convolution_and_gradients_match_xla(n, size, c, o, k, stride, pad):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(size * 10 + k), 3)
  x = jax.random.normal(kx, (n, size, size, c))
  w = jax.random.normal(kw, (k, k, c, o)) / np.sqrt(k * k * c)
  out = conv.xla_conv(x, w, stride, pad).shape
  g = jax.random.normal(kg, out)
  got = jax.jit(lambda x, w, g: _value_and_grads(lambda x, w: ns.conv_strided(x, w, stride, pad), x, w, g))(x, w, g)
  want = jax.jit(lambda x, w, g: _value_and_grads(lambda x, w: conv.xla_conv(x, w, stride, pad), x, w, g))(x, w, g)
  for name, a, b in zip(("y", "dx", "dkernel"), got, want):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=name)


@needs_native
def test_conv2d_takes_the_strided_kernel_for_stems_only():
  f32 = jnp.float32
  assert ns.supported((8, 112, 112, 3), (7, 7, 3, 64), 2, 3, 1, f32)         # ResNet's stem
  assert not ns.supported((8, 56, 56, 16), (3, 3, 16, 64), 2, 1, 1, f32)     # a wide layer
  assert not ns.supported((8, 112, 112, 3), (3, 3, 3, 64), 1, 1, 1, f32)     # 3x3 stride 1: conv3x3's
  assert not ns.supported((8, 112, 112, 3), (7, 7, 3, 64), 2, 3, 2, f32)     # dilated
  assert not ns.supported((8, 112, 112, 3), (7, 7, 3, 64), 2, 3, 1, jnp.bfloat16)
  assert not ns.supported((8, 112, 112, 3), (7, 7, 3, WIDTH + 4), 2, 3, 1, f32)
  x, k = jnp.ones((2, 32, 32, 3)), jnp.ones((7, 7, 3, 64))
  step = jax.jit(jax.grad(lambda k: jnp.sum(conv.conv2d(x, k, 2, 3) ** 2))).lower(k).as_text()
  assert "agejax_strided_forward" in step and "agejax_strided_kernel_grad" in step and "convolution" not in step
  with native.disabled():
    assert "agejax" not in jax.jit(lambda x, k: conv.conv2d(x, k, 2, 3)).lower(x, k).as_text()


@needs_native
def test_vmap_runs_image_sets_one_after_another():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 6, 6, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 16))
  got = jax.vmap(nc.conv3x3, in_axes=(0, None))(x, k)
  np.testing.assert_allclose(got, jax.vmap(_xla, in_axes=(0, None))(x, k), rtol=1e-5, atol=1e-4)


def test_only_x86_64_cpus_with_avx2_get_the_kernels():
  assert native.cpu_support("x86_64", "flags\t: fpu sse2 avx avx2 fma\n") is None
  assert native.cpu_support("x86_64", "flags\t: fpu sse2 avx\n") == "this CPU has no AVX2"
  assert "x86-64" in native.cpu_support("aarch64", "")
  assert native.cpu_support("AMD64", "flags : avx2 avx512f") is None


def test_turned_off_or_unbuildable_falls_back_to_xla(monkeypatch, tmp_path, caplog):
  """AGEJAX_NATIVE=0, or a compiler that fails, leave XLA's convolution, with one warning for the failure."""
  x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
  monkeypatch.setenv("AGEJAX_NATIVE", "0")
  assert native.vector_floats() is None and not nc.supported(x.shape, k.shape, 1, 1, 1, jnp.float32)
  assert "agejax" not in jax.jit(jax.grad(lambda x, k: jnp.sum(conv.conv2d(x, k, 1, 1)))).lower(x, k).as_text()
  monkeypatch.delenv("AGEJAX_NATIVE")
  saved = dict(native._state)
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  monkeypatch.setenv("AGEJAX_CACHE_DIR", str(tmp_path))
  try:
    native._state.clear()
    with caplog.at_level(logging.WARNING):
      assert native.vector_floats() is None and native.vector_floats() is None
    found = [r.getMessage() for r in caplog.records if "native convolution unavailable" in r.getMessage()]
    assert len(found) == 1 and "\n" not in found[0] and "false failed" in found[0]  # one line, naming it
    native._state.clear()
    said = []
    assert native.prepare(announce=said.append) is None  # before any trace: announced, then the fallback
    assert len(said) == 1 and "building the native CPU convolution kernels" in said[0]
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind
  finally:
    native._state.clear()
    native._state.update(saved)


def test_cached_library_is_keyed_by_source_compiler_and_cpu(monkeypatch, tmp_path):
  monkeypatch.setenv("AGEJAX_CACHE_DIR", str(tmp_path))
  a, b = native.library_path("g++"), native.library_path("clang++")
  assert a.parent == tmp_path and a != b and a == native.library_path("g++")
  monkeypatch.setattr(native, "_cpu_signature", lambda: "another cpu")
  assert native.library_path("g++") != a


@needs_native
def test_kernel_gradients_are_bitwise_reproducible():
  """Threads may run the units in any order; the partial sums are fixed, so resumed training is exact."""
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 16, 16, 32))
  g = jax.random.normal(jax.random.PRNGKey(1), (12, 16, 16, 32))
  f = jax.jit(nc._kernel_grad)
  first = np.asarray(f(x, g))
  assert all(np.array_equal(first, np.asarray(f(x, g))) for _ in range(10))
  x = jax.random.normal(jax.random.PRNGKey(2), (12, 30, 30, 3))
  g = jax.random.normal(jax.random.PRNGKey(3), (12, 15, 15, 32))
  f = jax.jit(lambda x, g: ns._kernel_grad(x, g, 7, 2, 3))
  first = np.asarray(f(x, g))
  assert all(np.array_equal(first, np.asarray(f(x, g))) for _ in range(10))


@needs_native
def test_disabled_traces_are_portable():
  """Inside `native.disabled()` no custom call is emitted."""
  x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
  with native.disabled():
    assert "agejax_conv3x3" not in jax.jit(lambda x, k: conv.conv2d(x, k, 1, 1)).lower(x, k).as_text()
  assert "agejax_conv3x3" in jax.jit(lambda x, k: conv.conv2d(x, k, 1, 1) + 0).lower(x, k).as_text()
