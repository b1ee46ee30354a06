import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agejax import ldl

GRID = ldl.label_grid()


def test_label_grid():
  assert GRID.shape == (101,)
  assert float(GRID[0]) == 0 and float(GRID[-1]) == 100
  np.testing.assert_allclose(ldl.label_grid(21, 60, 1), np.arange(21, 61))
  np.testing.assert_allclose(ldl.label_grid(0, 1, 0.25), [0, .25, .5, .75, 1])
  with pytest.raises(ValueError, match="step"):
    ldl.label_grid(0, 10, 0)


def test_gaussian_hand_computed():
  grid = jnp.array([0., 1., 2.])
  p = ldl.gaussian_label_distribution(jnp.array([1.0]), 1.0, grid)[0]
  e = np.exp(-0.5)
  np.testing.assert_allclose(p, [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)], rtol=1e-6)


def test_gaussian_per_sample_sigma_and_normalised():
  ages = jnp.array([10.0, 50.5, 99.0])
  sigmas = jnp.array([1.0, 3.0, 7.5])
  p = ldl.gaussian_label_distribution(ages, sigmas, GRID)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  # Wider sigma, wider distribution.
  std = ldl.distribution_std(p, GRID)
  assert std[0] < std[1] < std[2]
  np.testing.assert_allclose(std[0], 1.0, rtol=1e-3)


@pytest.mark.parametrize("age,expected_idx", [(30.0, 30), (30.3, 30), (30.7, 31)])
def test_sigma_zero_is_one_hot_of_nearest(age, expected_idx):
  p = ldl.gaussian_label_distribution(jnp.array([age]), 0.0, GRID)[0]
  assert np.all(np.isfinite(p))
  np.testing.assert_allclose(p, np.eye(101)[expected_idx], atol=1e-6)


def test_half_way_age_splits_mass():
  p = ldl.gaussian_label_distribution(jnp.array([30.5]), 0.0, GRID)[0]
  np.testing.assert_allclose(p[30], 0.5, atol=1e-6)
  np.testing.assert_allclose(p[31], 0.5, atol=1e-6)


def test_ages_outside_grid_pile_at_the_edge():
  p = ldl.gaussian_label_distribution(jnp.array([-500.0, 400.0, 101.0]), 2.0, GRID)
  assert np.all(np.isfinite(p))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(p[0, 0], 1.0, atol=1e-6)
  np.testing.assert_allclose(p[1, -1], 1.0, atol=1e-6)
  assert p[2, -1] > p[2, -2] > p[2, -3]  # truncated Gaussian, mode at the edge


def test_bf16_input():
  p = ldl.gaussian_label_distribution(jnp.array([25.0], jnp.bfloat16), jnp.bfloat16(2.0), GRID)
  assert p.dtype == jnp.float32 and np.all(np.isfinite(p))
  np.testing.assert_allclose(ldl.expectation(p, GRID), 25.0, atol=1e-3)


def test_gradient_wrt_age_is_finite_for_tiny_sigma():
  grad = lambda sigma, age: float(jax.grad(
      lambda a: ldl.expectation(ldl.gaussian_label_distribution(a, sigma, GRID), GRID))(age))
  # sigma -> 0 is a one-hot of the nearest label: the expectation does not move (0, not NaN)
  assert grad(1e-8, 30.2) == 0.0
  # away from the grid's ends a sigma-2 label moves its expectation one-for-one with the age
  np.testing.assert_allclose(grad(2.0, 30.2), 1.0, atol=1e-4)
  # a narrow label between two grid points: the expectation moves faster than the age, still finite
  g = grad(0.3, 30.5)
  assert np.isfinite(g) and 2.0 < g < 4.0


def test_ranking_is_learning_label_distribution():
  """1 - CDF of the Gaussian LD tends to the ranking targets as sigma -> 0 (DLDL-v2, Sec. 3)."""
  ages = jnp.array([0.0, 17.0, 42.0, 100.0])
  targets = ldl.ranking_targets(ages, GRID)
  errs = []
  for sigma in [4.0, 1.0, 0.3, 0.05]:
    p = ldl.gaussian_label_distribution(ages, sigma, GRID)
    errs.append(float(jnp.max(jnp.abs((1 - ldl.cumulative(p))[..., :-1] - targets))))
  assert errs == sorted(errs, reverse=True)
  assert errs[-1] < 1e-6


def test_ranking_targets_hand():
  t = ldl.ranking_targets(jnp.array([2.0]), jnp.array([0., 1., 2., 3.]))
  np.testing.assert_array_equal(t, [[1, 1, 0]])


def test_expectation_and_from_logits():
  grid = jnp.array([10., 20., 30.])
  np.testing.assert_allclose(ldl.expectation(jnp.array([.2, .3, .5]), grid), 23.0, rtol=1e-6)
  logits = jnp.log(jnp.array([.2, .3, .5]))
  np.testing.assert_allclose(ldl.expectation_from_logits(logits, grid), 23.0, rtol=1e-6)


def test_quantile_and_interval():
  grid = jnp.arange(5.0)
  p = jnp.array([.1, .2, .4, .2, .1])
  assert float(ldl.quantile(p, grid, 0.5)) == 2.0
  # CDF .1 .3 .7 .9 1. 80%: label 0 (0.1) fits in the lower tail of 0.1, label 4 in the upper: {1, 2, 3}.
  lo, hi = ldl.central_interval(p, grid, 0.8)
  assert (float(lo), float(hi)) == (1.0, 3.0)
  # 50%: tails of 0.25; {1, 2} would leave 0.3 above, {2, 3} 0.3 below: {1, 2, 3}.
  lo, hi = ldl.central_interval(p, grid, 0.5)
  assert (float(lo), float(hi)) == (1.0, 3.0)
  # 20%: tails of 0.4; 0.3 fits below label 2 and 0.3 above it: {2}.
  lo, hi = ldl.central_interval(p, grid, 0.2)
  assert (float(lo), float(hi)) == (2.0, 2.0)


def test_jit_and_vmap():
  f = jax.jit(jax.vmap(lambda a, s: ldl.gaussian_label_distribution(a, s, GRID)))
  p = f(jnp.array([1., 2.]), jnp.array([1., 2.]))
  np.testing.assert_allclose(p, ldl.gaussian_label_distribution(jnp.array([1., 2.]), jnp.array([1., 2.]), GRID), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.floats(-20, 130), st.floats(0, 20))
def test_property_distribution_valid(age, sigma):
  p = ldl.gaussian_label_distribution(jnp.array([age]), sigma, GRID)
  assert np.all(np.isfinite(p)) and np.all(p >= 0)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
  if 0 <= age <= 100 and sigma < 5:
    assert abs(float(ldl.expectation(p, GRID)[0]) - age) < 0.6 + (0 if 3 * sigma < min(age, 100 - age) else sigma)


def test_ranking_prior_logits_are_the_label_survival_function():
  grid = ldl.label_grid(0, 10, 1)
  ages = jnp.array([2.0, 3.0, 3.0, 7.0, 9.0])
  z = ldl.ranking_prior_logits(ages, grid, pseudo_count=0.5)
  exceed = np.array([(np.asarray(ages) > l).sum() for l in range(10)])
  np.testing.assert_allclose(jax.nn.sigmoid(z), (exceed + 0.5) / (5 + 1.0), rtol=1e-5)
  assert np.all(np.diff(np.asarray(z)) <= 0)  # P(y > l_k) never grows with k
  # Decoding the prior itself gives the median age (3): #{k : P(y > l_k) > 1/2}.
  assert int(np.sum(np.asarray(z) > 0)) == 3


def test_readouts_of_numpy_inputs_are_numpy_and_equal_to_jaxs():
  """A deployed model reads its ages in numpy: the same numbers as under JAX, numpy arrays out."""
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.full(117, 0.3), size=64).astype(np.float32)
  probs[:8] = np.asarray(ldl.gaussian_label_distribution(rng.uniform(0, 116, 8), 2.0, jnp.arange(117.0)))
  grid = np.arange(117, dtype=np.float32)
  for name, fn in [("cumulative", lambda p, g: ldl.cumulative(p)),
                   ("expectation", ldl.expectation), ("std", ldl.distribution_std),
                   ("quantile", lambda p, g: ldl.quantile(p, g, 0.3)),
                   ("low", lambda p, g: ldl.central_interval(p, g, 0.9)[0]),
                   ("high", lambda p, g: ldl.central_interval(p, g, 0.9)[1])]:
    got, want = fn(probs, grid), fn(jnp.asarray(probs), jnp.asarray(grid))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and not isinstance(want, np.ndarray), name
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-4, err_msg=name)


def test_numpy_readouts_import_no_jax():
  import subprocess
  import sys
  code = ("import sys, numpy as np; from agejax import ldl; p = np.full((2, 5), 0.2, np.float32); "
          "g = np.arange(5.0, dtype=np.float32); lo, hi = ldl.central_interval(p, g); "
          "print(lo.tolist(), hi.tolist(), round(float(ldl.distribution_std(p, g)[0]), 4), 'jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
  assert out == ["[0.0,", "0.0]", "[4.0,", "4.0]", "1.4142", "False"]


def test_quantile_takes_one_level_per_distribution_and_1d_inputs_give_arrays():
  grid = np.arange(3, dtype=np.float32)
  probs = np.eye(3, dtype=np.float32)[[0, 1, 2]] * 0.8 + 0.2 / 3  # modes at 0, 1, 2
  for p, g in ((probs, grid), (jnp.asarray(probs), jnp.asarray(grid))):
    np.testing.assert_array_equal(np.asarray(ldl.quantile(p, g, np.array([0.5, 0.5, 0.5]))), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(ldl.quantile(p, g, np.array([0.05, 0.5, 0.99]))), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(ldl.quantile(p, g, 0.99)), [2, 2, 2])
  one = probs[1]
  for fn in (lambda: ldl.expectation(one, grid), lambda: ldl.distribution_std(one, grid),
             lambda: ldl.quantile(one, grid, 0.5), lambda: ldl.central_interval(one, grid)[0]):
    out = fn()
    assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == np.float32
