"""agejax.cpu's layers against the plain ones they replace: the same values and gradients, the
formulation each picks, and what XLA:CPU is made to do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (2, 7, 9, 5)])
@pytest.mark.parametrize("pool", ["2x2", "3x3_s2"])
def test_max_pools_match_flax(shape, pool):
  import flax.linen as nn
  from agejax.cpu import pooling
  x = jax.random.normal(jax.random.PRNGKey(0), shape)  # continuous: no tied maxima
  if pool == "2x2":
    mine, ref = pooling.max_pool_2x2, lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  else:
    mine, ref = pooling.max_pool_3x3_s2, lambda x: nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(mine(x), ref(x))
  g = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
  np.testing.assert_allclose(g(mine), g(ref), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax(dtype):
  """Same variables, outputs, running statistics and gradients as nn.BatchNorm."""
  import flax.linen as nn
  from agejax.cpu.batch_norm import BatchNorm
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 6)) * 3 + 1
  results = []
  for cls in (nn.BatchNorm, BatchNorm):
    m = cls(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
    v = m.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), v["params"])

    def f(p, x, m=m, v=v):
      return m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
    y, upd = f(params, x)
    grads = jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x)[0].astype(jnp.float32))), argnums=(0, 1))(params, x)
    y_eval = m.clone(use_running_average=True).apply({"params": params, **upd}, x)
    results.append((jax.tree.map(jnp.shape, v), y, upd, grads, y_eval))
  (shapes_a, *a), (shapes_b, *b) = results
  assert shapes_a == shapes_b
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol * 10)


def test_channel_sum_is_at_least_as_precise_as_a_reduction():
  from agejax.cpu.batch_norm import channel_sum
  for shape in [(64, 32, 32, 16), (8, 6, 6, 64), (3, 5, 7, 3)]:
    x = np.random.RandomState(0).randn(*shape).astype(np.float32) * 2 + 1
    exact = x.reshape(-1, shape[-1]).astype(np.float64).sum(0)
    err = lambda y, exact=exact: np.max(np.abs(np.asarray(y, np.float64) - exact)) / np.abs(exact).max()
    assert err(channel_sum(x)) <= max(err(jnp.sum(x, axis=(0, 1, 2))), 2e-7)
  # bfloat16 activations are summed in float32: only their own rounding is lost, not the sum's.
  xb = jnp.asarray(np.random.RandomState(1).randn(16, 16, 16, 8) + 1, jnp.bfloat16)
  exact = np.asarray(xb, np.float64).reshape(-1, 8).sum(0)
  assert channel_sum(xb).dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(channel_sum(xb), np.float64), exact, rtol=1e-6)


def test_batch_norm_gradient_through_returned_statistics():
  """normalize's hand-written VJP, including cotangents on the batch mean and variance."""
  from agejax.cpu.batch_norm import normalize

  def reference(x, scale, bias):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 5)) * 2 + 3
  scale, bias = jnp.linspace(0.5, 1.5, 5), jnp.linspace(-1, 1, 5)

  def loss(f):
    def inner(x, scale, bias):
      y, mean, var = f(x, scale, bias)
      return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 2) + jnp.sum(jnp.sqrt(var))
    return inner
  mine = jax.grad(loss(lambda x, s, b: normalize(x, s, b, jnp.float32(1e-5))), argnums=(0, 1, 2))(x, scale, bias)
  ref = jax.grad(loss(reference), argnums=(0, 1, 2))(x, scale, bias)
  for u, w in zip(mine, ref):
    np.testing.assert_allclose(u, w, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("hw,k,stride,pad,dilation", [
    ((2, 2), 3, 1, 1, 1), ((4, 4), 3, 2, 1, 1), ((4, 4), 3, 1, 5, 5), ((2, 3), 3, 1, 2, 2),
    ((5, 5), 3, 2, 1, 1), ((8, 8), 3, 1, 1, 1), ((3, 3), 1, 1, 0, 1), ((7, 6), 7, 2, 3, 1)])
def test_conv2d_matches_xla_convolution(hw, k, stride, pad, dilation):
  """Both formulations give XLA's convolution and its gradients, whichever `conv2d` picks."""
  from agejax.cpu import conv
  x = jax.random.normal(jax.random.PRNGKey(0), (3, *hw, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, 5, 4))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                                  rhs_dilation=(dilation, dilation),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda f: jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
  want = loss(ref)
  for f in (conv.conv2d_taps, conv.conv2d):
    got = loss(lambda x, w, f=f: f(x, w, stride, pad, dilation))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cpu_lowering
@pytest.mark.parametrize("c_in,k,stride,pad", [(3, 3, 1, 1), (5, 3, 1, 1), (3, 7, 2, 3), (16, 3, 2, 1)])
def test_grouped_kernel_gradient_matches_xla_convolution(c_in, k, stride, pad):
  """Summing the kernel gradient over 8-image groups (and pairing 3-channel columns) changes only rounding."""
  from agejax.cpu import conv
  x = jax.random.normal(jax.random.PRNGKey(0), (24, 9, 10, c_in))  # even width: the 3x3 RGB case is paired too
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c_in, 4))
  assert conv.pairs_columns(c_in, 10, (k, k), stride, pad, 1) == ((c_in, k, stride) == (3, 3, 1))
  assert conv.group_kernel_grad(24, c_in) and not conv.group_kernel_grad(20, c_in)
  assert not conv.group_kernel_grad(8, c_in) and not conv.group_kernel_grad(24, 32)
  for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
    xd, wd = x.astype(dtype), w.astype(dtype)
    loss = lambda f: jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, pad, 1).astype(jnp.float32))), argnums=(0, 1)))(xd, wd)
    got, want = loss(conv.xla_conv_cpu), loss(conv.xla_conv)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.dtype == b.dtype
      scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
      np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol * scale)
  # The kernel gradient really is three group convolutions (beside the forward one; dx is not asked for).
  hlo = jax.jit(jax.grad(lambda w: jnp.sum(conv.conv2d(x, w, stride, pad) ** 2))).lower(w).as_text()
  assert hlo.count("stablehlo.convolution") == 1 + 3


@pytest.mark.cpu_lowering
@pytest.mark.parametrize("c_in,width", [(1, 6), (3, 10), (4, 8)])
def test_paired_columns_forward_matches_xla_convolution(c_in, width):
  """The first layer's forward on pairs of adjacent columns is the same convolution; odd widths keep XLA's."""
  from agejax.cpu import conv
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 7, width, c_in))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c_in, 6))
  assert conv.pairs_columns(c_in, width, (3, 3), 1, 1, 1)
  assert not conv.pairs_columns(c_in, width + 1, (3, 3), 1, 1, 1)
  assert not conv.pairs_columns(8, width, (3, 3), 1, 1, 1)
  assert not conv.pairs_columns(c_in, width, (3, 3), 2, 1, 1)
  assert not conv.pairs_columns(c_in, width, (7, 7), 1, 3, 1)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    xd, wd = x.astype(dtype), w.astype(dtype)
    got, want = conv.conv_paired_columns(xd, wd), conv.xla_conv(xd, wd, 1, 1, 1)
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol * scale)
  # conv2d takes it (batch 5 is not grouped): the padded 7+2 rows, read as column pairs;
  # its gradients are XLA's.
  hlo = jax.jit(lambda x, w: conv.conv2d(x, w, 1, 1)).lower(x, w).as_text()
  assert f"tensor<5x9x{width // 2 + 1}x8xf32>" in hlo
  loss = lambda f: jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
  got, want = loss(lambda x, w: conv.conv2d(x, w, 1, 1)), loss(lambda x, w: conv.xla_conv(x, w, 1, 1))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_stored_input_is_an_exact_identity_that_divides_only_under_differentiation():
  """The kernel-gradient helper changes no number: forward bitwise x, gradient the identity."""
  from agejax.cpu.stored import stored, stored_input
  # Denormals left out: XLA:CPU flushes them to zero in every arithmetic op (max(x, 0) too), so no
  # activation it computed holds one.
  x = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(0), (1000,)) * 1e3,
                       jnp.array([0.0, -0.0, 1.2e-38, -3e38, 3e38, 7.0])])
  y, vjp = jax.vjp(stored_input, x)
  np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(x).view(np.uint32))
  for dtype, bits in ((jnp.float32, np.uint32), (jnp.bfloat16, np.uint16)):
    xd = x.astype(dtype)
    np.testing.assert_array_equal(np.asarray(jax.jit(stored)(xd)).view(bits), np.asarray(xd).view(bits))
  g = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  np.testing.assert_array_equal(vjp(g)[0], g)
  assert " div " not in str(jax.make_jaxpr(lambda x: stored_input(x) * 2)(x))   # inference: free
  assert " div " in str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(stored_input(x) ** 2)))(x))


@pytest.mark.cpu_lowering
def test_batch_norm_backward_stores_its_cotangents_on_cpu():
  """g and dx are each divided once (kept stored for their several consumers); the forward is not."""
  from agejax.cpu.batch_norm import normalize
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 5))
  f = lambda x: jnp.sum(jnp.sin(normalize(x, jnp.ones(5), jnp.zeros(5), jnp.float32(1e-5))[0]))
  full_divides = lambda jaxpr: str(jaxpr).count("f32[4,3,3,5] = div ")
  assert full_divides(jax.make_jaxpr(f)(x)) == 0
  assert full_divides(jax.make_jaxpr(jax.grad(f))(x)) == 2


def test_conv2d_takes_the_tap_sum_only_where_it_was_measured_faster():
  from agejax.cpu.conv import use_taps
  assert use_taps((2, 2), (3, 3), 1, 1, 1)        # ResNet stage 4 at 64 px: 841 -> 24 ms
  assert use_taps((4, 4), (3, 3), 2, 1, 1)        # its strided entry conv: 108 -> 12 ms
  assert use_taps((4, 4), (3, 3), 1, 5, 5)        # MSA rate 5 on a 4x4 map: one live tap
  assert not use_taps((4, 4), (3, 3), 1, 1, 1)    # XLA as fast or faster from 4x4 outputs up
  assert not use_taps((4, 4), (3, 3), 1, 2, 2)
  assert not use_taps((64, 64), (3, 3), 1, 1, 1)
  assert not use_taps((2, 2), (1, 1), 1, 0, 1)    # 1x1: a matmul either way


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_module_is_a_drop_in_for_flax_conv(dtype):
  """Same variable tree, initial values and outputs as nn.Conv, so checkpoints carry over."""
  import flax.linen as nn
  from agejax.cpu.conv import Conv
  from agejax.models.ops import conv_init
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 2, 6))
  mine = Conv(8, (3, 3), padding=1, kernel_init=conv_init, dtype=dtype)
  ref = nn.Conv(8, (3, 3), padding=1, kernel_init=conv_init, dtype=dtype)
  v_mine, v_ref = mine.init(jax.random.PRNGKey(3), x), ref.init(jax.random.PRNGKey(3), x)
  assert jax.tree.map(jnp.shape, v_mine) == jax.tree.map(jnp.shape, v_ref)
  jax.tree.map(np.testing.assert_array_equal, v_mine, v_ref)
  v_ref = {"params": {**v_ref["params"], "bias": jnp.linspace(-1, 1, 8)}}
  y_mine, y_ref = mine.apply(v_ref, x), ref.apply(v_ref, x)
  assert y_mine.dtype == y_ref.dtype == dtype
  np.testing.assert_allclose(np.float32(y_mine), np.float32(y_ref), rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5,
                             atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)


def test_batch_norm_sums_ask_for_full_float32_products_on_every_backend():
  """DEFAULT precision is TF32 on recent NVIDIA GPUs and bf16 passes on TPU: the statistics' dots say HIGHEST."""
  from agejax.cpu import batch_norm
  text = jax.jit(batch_norm.channel_sum).lower(jnp.ones((8, 4, 4, 16))).as_text()
  dots = [l for l in text.splitlines() if "dot_general" in l]
  assert dots and all("HIGHEST" in l for l in dots)
