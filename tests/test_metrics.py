import jax.numpy as jnp
import numpy as np

from agejax import metrics


def test_mae_cs_epsilon():
  pred = jnp.array([10.0, 20.0, 33.0, 50.0])
  true = jnp.array([12.0, 20.0, 30.0, 40.0])
  np.testing.assert_allclose(metrics.mae(pred, true), (2 + 0 + 3 + 10) / 4)
  np.testing.assert_allclose(metrics.cumulative_score(pred, true, 2), 0.5)
  np.testing.assert_allclose(metrics.cumulative_score(pred, true, jnp.arange(4)), [.25, .25, .5, .75])
  eps = metrics.epsilon_error(jnp.array([10.0, 12.0]), jnp.array([10.0, 10.0]), jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(eps, (0 + 1 - np.exp(-4 / 8)) / 2, rtol=1e-6)


def test_per_group():
  pred = jnp.array([1.0, 4.0, 25.0, 35.0, 90.0])
  true = jnp.array([2.0, 2.0, 20.0, 40.0, 80.0])
  out = metrics.per_group_errors(pred, true, edges=(0, 10, 30, 60))
  np.testing.assert_allclose(out["count"], [2, 1, 1, 1])
  np.testing.assert_allclose(out["mae"], [1.5, 5, 5, 10])
  np.testing.assert_allclose(out["bias"], [0.5, 5, -5, 10])
  empty = metrics.per_group_errors(pred, true, edges=(0, 10, 30, 60, 95))
  assert np.isnan(empty["mae"][-1])


def test_accuracy_ignores_missing():
  np.testing.assert_allclose(metrics.accuracy(jnp.array([0, 1, 1, 2]), jnp.array([0, 0, -1, 2])), 2 / 3)
  assert np.isnan(metrics.accuracy(jnp.array([0]), jnp.array([-1])))


def test_adience_groups_and_one_off():
  g = metrics.age_to_adience_group(jnp.array([1.0, 5.0, 14.0, 30.0, 45.0, 70.0]))
  np.testing.assert_array_equal(g, [0, 1, 3, 4, 5, 7])  # 14 is nearer (15, 20) than (8, 12)
  exact, one_off = metrics.exact_and_one_off(jnp.array([0, 1, 3, 5]), jnp.array([0, 2, 3, 7]))
  np.testing.assert_allclose([exact, one_off], [0.5, 0.75])


def test_interval_coverage():
  grid = jnp.arange(5.0)
  p = jnp.array([[0., .05, .9, .05, 0.]] * 4)
  true = jnp.array([2.0, 2.0, 1.0, 3.0])
  # The 90% set of (0, .05, .9, .05, 0) is {2}: 0.05 lies below it and 0.05 above, each within the
  # 0.05 tail. It covers 2, 2 and neither 1 (an off-by-one at the lower bound would) nor 3 (at the upper).
  np.testing.assert_allclose(metrics.interval_coverage(p, grid, true, 0.9), 0.5)
  np.testing.assert_allclose(metrics.interval_coverage(p, grid, true, 0.5), 0.5)
  # Lopsided: (0, 0, .5, .45, .05), CDF 0 0 .5 .95 1; the 90% set is {2, 3} (0.05 above 3 fits the tail).
  q = jnp.array([[0., 0., .5, .45, .05]] * 4)
  np.testing.assert_allclose(metrics.interval_coverage(q, grid, jnp.array([1.0, 2.0, 3.0, 4.0]), 0.9), 0.5)
  np.testing.assert_allclose(metrics.interval_coverage(q[:1], grid, jnp.array([3.0]), 0.9), 1.0)
