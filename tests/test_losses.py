
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from agejax import ldl, losses

GRID = ldl.label_grid()
K = 101
AGES = jnp.array([3.0, 25.0, 61.5, 99.0])


def _logits(seed=0, b=4, k=K, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), (b, k))


# name -> (fn(logits, ages) -> per-example, number of outputs)
LOSSES = {
    "dldl": (lambda z, a: losses.dldl(z, a, 2.0, GRID), K),
    "dldl_v2": (lambda z, a: losses.dldl_v2(z, a, 2.0, GRID), K),
    "dldl_v2_mean": (lambda z, a: losses.dldl_v2(z, a, 2.0, GRID, kl_reduction="mean"), K),
    "dex": (lambda z, a: losses.dex(z, a, GRID), K),
    "distillation": (lambda z, a: losses.distillation(
        z, ldl.gaussian_label_distribution(a + 4.0, 3.0, GRID), a, 2.0, GRID, teacher_weight=0.8), K),
    "mean_variance": (lambda z, a: losses.mean_variance(z, a, GRID), K),
    "sord": (lambda z, a: losses.sord(z, a, GRID), K),
    "ranking_bce": (lambda z, a: losses.ranking_bce(z, a, GRID), K - 1),
    "coral": (lambda z, a: losses.coral(z, a, GRID), K - 1),
    "corn": (lambda z, a: losses.corn(z, a, GRID), K - 1),
    "l1": (lambda z, a: losses.l1(z[:, 0], a), 1),
    "l2": (lambda z, a: losses.l2(z[:, 0], a), 1),
    "gaussian_nll": (lambda z, a: losses.gaussian_nll(z[:, 0], z[:, 1], a), 2),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("scale", [1.0, 1e4, -1e4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finite_values_and_gradients(name, scale, dtype):
  fn, k = LOSSES[name]
  z = _logits(1, k=k, scale=scale).astype(dtype)
  value, grad = jax.value_and_grad(lambda z: losses.batch_mean(fn(z, AGES)))(z)
  assert value.dtype == jnp.float32
  assert np.isfinite(float(value)), name
  assert np.all(np.isfinite(np.asarray(grad, np.float32))), name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_per_example_shape_and_jit(name):
  fn, k = LOSSES[name]
  z = _logits(2, k=k)
  out = jax.jit(fn)(z, AGES)
  assert out.shape == (4,)
  np.testing.assert_allclose(out, fn(z, AGES), rtol=1e-5)


def test_kl_hand_computed_and_optax():
  t = jnp.array([[0.5, 0.5, 0.0]])
  z = jnp.log(jnp.array([[0.25, 0.25, 0.5]]))
  np.testing.assert_allclose(losses.kl_divergence(z, t), [np.log(2.0)], rtol=1e-6)
  logp = jax.nn.log_softmax(_logits(3))
  target = jax.nn.softmax(_logits(4))
  np.testing.assert_allclose(losses.kl_divergence(logp, target), optax.losses.kl_divergence(logp, target), rtol=1e-5)


def test_cross_entropy_matches_optax():
  z = _logits(5, k=5)
  labels = jnp.array([0, 4, 2, 1])
  np.testing.assert_allclose(losses.softmax_cross_entropy(z, labels),
                             optax.softmax_cross_entropy_with_integer_labels(z, labels), rtol=1e-6)
  assert float(losses.softmax_cross_entropy(z, jnp.array([-1, 0, 0, 0]))[0]) == 0.0


def test_binary_tasks_match_optax():
  z = _logits(6, k=K - 1)
  t = ldl.ranking_targets(AGES, GRID)
  np.testing.assert_allclose(losses.ranking_bce(z, AGES, GRID),
                             optax.sigmoid_binary_cross_entropy(z, t).sum(-1), rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 10.0))
def test_kl_nonnegative_and_zero_at_target(seed, sigma):
  z = _logits(seed, b=3)
  ages = jnp.array([1.0, 40.0, 88.0])
  target = ldl.gaussian_label_distribution(ages, sigma, GRID)
  assert np.all(np.asarray(losses.kl_divergence(z, target)) >= -1e-5)
  np.testing.assert_allclose(losses.kl_divergence(jnp.log(target + 1e-30), target), 0.0, atol=1e-4)


def test_dldl_v2_hand_computed():
  grid = jnp.array([0., 1., 2.])
  z = jnp.zeros((1, 3))  # uniform: expectation 1
  ages = jnp.array([2.0])
  p = ldl.gaussian_label_distribution(ages, 1.0, grid)[0]
  kl = float(jnp.sum(p * jnp.log(p / (1 / 3))))
  np.testing.assert_allclose(losses.dldl_v2(z, ages, 1.0, grid, lam=0.5), [kl + 0.5 * 1.0], rtol=1e-5)
  np.testing.assert_allclose(losses.dldl_v2(z, ages, 1.0, grid, lam=0.5, kl_reduction="mean"), [kl / 3 + 0.5], rtol=1e-5)
  with pytest.raises(ValueError, match="kl_reduction"):
    losses.dldl_v2(z, ages, 1.0, grid, kl_reduction="batch")


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_dldl_v2_logit_gradient_formula(lam):
  """d loss / d z_k = (p_hat - p) + lam sign(y_hat - y) p_hat (l - y_hat) (DLDL-v2 eq. 9-10)."""
  z = _logits(7)
  sig = jnp.array([1.0, 2.0, 3.0, 2.5])
  g = jax.grad(lambda z: jnp.sum(losses.dldl_v2(z, AGES, sig, GRID, lam=lam)))(z)
  p_hat = jax.nn.softmax(z)
  p = ldl.gaussian_label_distribution(AGES, sig, GRID)
  y_hat = ldl.expectation(p_hat, GRID)
  expected = (p_hat - p) + lam * jnp.sign(y_hat - AGES)[:, None] * p_hat * (GRID - y_hat[:, None])
  np.testing.assert_allclose(g, expected, atol=2e-6)


def test_dex_and_mean_variance_hand():
  grid = jnp.array([0., 1., 2.])
  z = jnp.zeros((1, 3))
  np.testing.assert_allclose(losses.dex(z, jnp.array([1.2]), grid), [np.log(3)], rtol=1e-6)
  # uniform: m = 1, variance = 2/3; y = 2.
  expected = np.log(3) + 0.2 * 0.5 * 1.0 + 0.05 * (2 / 3)
  np.testing.assert_allclose(losses.mean_variance(z, jnp.array([2.0]), grid), [expected], rtol=1e-5)


def test_corn_hand():
  grid = jnp.array([0., 1., 2., 3.])
  z = jnp.zeros((1, 3))  # every task BCE = log 2
  # y = 1: targets [1, 0, 0]; eligible tasks: task 0 (always) and task 1 (y > l_0).
  np.testing.assert_allclose(losses.corn(z, jnp.array([1.0]), grid), [2 * np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(losses.corn(z, jnp.array([3.0]), grid), [3 * np.log(2)], rtol=1e-6)


def test_sord_zero_at_its_target():
  d2 = (GRID - 30.0) ** 2
  logits = -1.0 * d2[None]
  np.testing.assert_allclose(losses.sord(logits, jnp.array([30.0]), GRID), [0.0], atol=1e-5)


def test_regression_and_nll_hand():
  np.testing.assert_allclose(losses.l1(jnp.array([3.0]), jnp.array([5.0])), [2.0])
  np.testing.assert_allclose(losses.l2(jnp.array([3.0]), jnp.array([5.0])), [2.0])
  np.testing.assert_allclose(losses.gaussian_nll(jnp.array([3.0]), jnp.array([np.log(4.0)]), jnp.array([5.0])),
                             [0.5 * 4 / 4 + 0.5 * np.log(4.0)], rtol=1e-6)
  # Optimal log-variance equals log of the squared error.
  g = jax.grad(lambda a: losses.gaussian_nll(3.0, a, 5.0))(jnp.log(4.0))
  np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_decoders():
  grid = jnp.arange(5.0)
  np.testing.assert_allclose(losses.decode_ordinal(jnp.array([[5., 5., -5., -5.]]), grid), [2.0])
  np.testing.assert_allclose(losses.decode_corn(jnp.array([[5., 5., 5., -5.]]), grid), [3.0])
  dist = losses.ordinal_to_distribution(jnp.array([[1.0, 0.8, 0.3, 0.0]]))
  np.testing.assert_allclose(dist, [[0.0, 0.2, 0.5, 0.3, 0.0]], atol=1e-6)


def test_batch_mean_and_multitask_masks():
  v = jnp.array([1.0, 2.0, 3.0, 4.0])
  assert float(losses.batch_mean(v)) == 2.5
  assert float(losses.batch_mean(v, jnp.array([1, 0, 1, 0]))) == 2.0
  assert float(losses.batch_mean(v, jnp.zeros(4))) == 0.0
  race = jnp.array([0, -1, 2, -1])
  race_loss = losses.softmax_cross_entropy(jnp.zeros((4, 5)), race)
  total, parts = losses.multitask({"age": v, "race": race_loss}, weights={"race": 0.5},
                                  masks={"race": race >= 0})
  np.testing.assert_allclose(parts["race"], np.log(5), rtol=1e-6)
  np.testing.assert_allclose(total, 2.5 + 0.5 * np.log(5), rtol=1e-6)
  # All race labels missing: the race term adds nothing and its gradient is zero.
  g = jax.grad(lambda z: losses.multitask({"race": losses.softmax_cross_entropy(z, -jnp.ones(4, jnp.int32))},
                                          masks={"race": jnp.zeros(4, bool)})[0])(jnp.ones((4, 5)))
  assert float(jnp.abs(g).sum()) == 0.0
