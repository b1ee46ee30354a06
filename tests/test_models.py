import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import ldl, models, objectives


def _init(model, size, batch=2):
  return models.init(model, jax.random.PRNGKey(0), size, batch)


@pytest.mark.parametrize("name,expected", [("thin", 3_708_229), ("tiny", 934_869)])
def test_dldl_v2_parameter_counts(name, expected):
  v = _init(models.create(name), 64)
  assert models.count_params(v["params"]) == expected


def test_vgg16_and_resnet34_counts():
  shapes = jax.eval_shape(lambda: models.create("vgg16").init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert models.count_params(shapes["params"]) == 134_674_341  # 138.36 M with 1000 classes
  v = jax.eval_shape(lambda: models.create("resnet34").init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert models.count_params(v["params"]["trunk"]) == 21_284_672


def test_hybrid_pooling_shapes_and_zero_bias():
  model = models.create("tiny")
  for size in (64, 224):
    v = _init(model, size)
    out = model.apply(v, jnp.ones((2, size, size, 3)), train=False)
    assert out["age_logits"].shape == (2, 101)
  assert float(jnp.abs(v["params"]["heads"]["age"]["bias"]).sum()) == 0.0
  # No conv bias in the DLDL-v2 trunks.
  assert all("bias" not in k for k in v["params"]["trunk"] if k.startswith("Conv"))


def test_batch_norm_train_updates_stats_and_eval_is_deterministic():
  model = models.create("tiny")
  v = _init(model, 32)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  out, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
  before = jax.tree_util.tree_leaves(v["batch_stats"])[0]
  after = jax.tree_util.tree_leaves(upd["batch_stats"])[0]
  assert not np.allclose(before, after)
  a = model.apply(v, x, train=False)["age_logits"]
  b = model.apply(v, x, train=False)["age_logits"]
  np.testing.assert_array_equal(a, b)


def test_deterministic_init():
  model = models.create("tiny")
  a, b = _init(model, 32), _init(model, 32)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_bf16_compute_fp32_params():
  model = models.create("tiny", dtype="bfloat16")
  v = _init(model, 32)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v["params"]))
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  out = model.apply(v, x, train=False)
  assert out["age_logits"].dtype == jnp.float32  # heads in fp32
  ref = np.asarray(models.create("tiny").apply(v, x, train=False)["age_logits"])
  got = np.asarray(out["age_logits"])
  # bfloat16 keeps 8 bits of mantissa: the logits agree to a few percent of their spread, which a
  # wrong or all-zero output does not (their spread is far from zero)
  spread = ref.max() - ref.min()
  assert spread > 1e-3
  assert np.abs(got - ref).max() < 0.05 * spread
  assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("head,keys,shape", [
    ("distribution", ["age_logits"], (2, 101)), ("ordinal", ["age_logits"], (2, 100)),
    ("coral", ["age_logits"], (2, 100)), ("gaussian", ["age_mu", "age_log_var"], (2,)),
    ("scalar", ["age_pred"], (2,))])
def test_heads(head, keys, shape):
  model = models.create("resnet18", age_head=head, gender=True, race=True)
  v = _init(model, 32)
  out = model.apply(v, jnp.ones((2, 32, 32, 3)), train=False)
  for k in keys:
    assert out[k].shape == shape
  assert out["gender_logits"].shape == (2, 2) and out["race_logits"].shape == (2, 5)


def test_coral_head_is_rank_consistent():
  model = models.create("tiny", age_head="coral")
  v = _init(model, 32)
  v = jax.tree_util.tree_map(lambda x: x, v)
  v["params"]["heads"]["age_biases"] = jnp.linspace(2, -2, 100)
  z = model.apply(v, jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3)), train=False)["age_logits"]
  assert np.all(np.diff(np.asarray(z), axis=-1) <= 1e-6)  # shared weight: monotone in k


def test_unknown_names_fail_clearly():
  with pytest.raises(ValueError, match="Unknown model 'thinn'"):
    models.create("thinn")
  with pytest.raises(ValueError, match="Unknown loss"):
    objectives.get("dldl3")


def _erf_area(model, size=64, thresh=0.01):
  v = _init(model, size, batch=1)
  v["params"] = jax.tree_util.tree_map(lambda x: x, v["params"])

  def center(x):  # the last feature map: the output of the trunk's last block or MSA module
    _, state = model.trunk.apply({"params": v["params"]["trunk"], "batch_stats": v["batch_stats"]["trunk"]},
                                 x, train=False, capture_intermediates=True)
    last = [k for k in state["intermediates"] if k.startswith(("BasicBlock_", "MultiScaleAttention_"))][-1]
    fmap = state["intermediates"][last]["__call__"][0]
    h, w = fmap.shape[1] // 2, fmap.shape[2] // 2
    return jnp.sum(fmap[0, h, w])

  x = jax.random.normal(jax.random.PRNGKey(0), (1, size, size, 3))
  g = jnp.abs(jax.grad(center)(x)).sum(-1)[0]
  return int(jnp.sum(g > thresh * g.max()))


def test_msa_enlarges_effective_receptive_field():
  # Gradient of the centre output of the last feature map w.r.t. the input: the
  # area where it exceeds 1% of its peak. MSA's dilated convolutions widen it.
  plain = _erf_area(models.create("resnet34"), size=96)
  msa = _erf_area(models.create("mtmsa"), size=96)
  assert msa > 1.3 * plain, (plain, msa)


def test_objective_predictions_consistent():
  grid = ldl.label_grid()
  # two equal peaks at 30 and 40 and nothing elsewhere: age 35, std 5, half the mass on each
  z = jnp.where((jnp.arange(101) == 30) | (jnp.arange(101) == 40), 0.0, -1e4)[None]
  pred = objectives.predict(objectives.get("dldl_v2"), {"age_logits": z}, grid)
  np.testing.assert_allclose(pred["age"], [35.0], rtol=1e-6)
  np.testing.assert_allclose(pred["std"], [5.0], rtol=1e-5)
  np.testing.assert_allclose(pred["probs"][0, [30, 40]], [0.5, 0.5], rtol=1e-6)
  g = objectives.predict(objectives.get("gaussian_nll"), {"age_mu": jnp.array([30.]), "age_log_var": jnp.log(jnp.array([9.]))}, grid)
  np.testing.assert_allclose(g["std"], [3.0], rtol=1e-5)
  o = objectives.predict(objectives.get("coral"), {"age_logits": jnp.where(jnp.arange(100) < 40, 5.0, -5.0)[None]}, grid)
  np.testing.assert_allclose(o["age"], [40.0])
  np.testing.assert_allclose(grid[jnp.argmax(o["probs"][0])], 40.0)


def test_msa_on_vgg_trunks_sits_before_the_named_blocks_pool():
  """`msa_stages` is honoured by every trunk (it was silently ignored by VGG ones), and checked."""
  from agejax.models.attention import MultiScaleAttention
  plain = _init(models.create("tiny"), 32)["params"]
  v = _init(models.create("tiny", msa_stages=(4, 5)), 32)
  assert sorted(k for k in v["params"]["trunk"] if k.startswith("MultiScaleAttention")) == [
      "MultiScaleAttention_0", "MultiScaleAttention_1"]
  assert models.count_params(v["params"]) > models.count_params(plain)
  # Block 5 of TinyAgeNet has 128 channels: its MSA gates a 128-channel map (before the pool).
  assert v["params"]["trunk"]["MultiScaleAttention_1"]["Conv_0"]["kernel"].shape == (1, 1, 128, 32)
  one = models.create("tiny", msa_stages=(5,))
  v1 = _init(one, 32)
  seen = []
  orig = MultiScaleAttention.__call__

  def spy(self, x, train=False):
    seen.append(x.shape)
    return orig(self, x, train)
  MultiScaleAttention.__call__ = spy
  try:
    one.apply(v1, jnp.zeros((1, 32, 32, 3)))
  finally:
    MultiScaleAttention.__call__ = orig
  assert seen == [(1, 2, 2, 128)]   # 32 px: block 5 runs at 2x2, before the last 2x2 pool
  with pytest.raises(ValueError, match="conv blocks 1..5"):
    models.create("tiny", msa_stages=(6,))
  with pytest.raises(ValueError, match="stages 1..4"):
    models.create("resnet18", msa_stages=(5,))


def test_face_resnet_stem_folds_the_input_normalisation_exactly():
  """The stem convolves the raw input with the normalisation folded into its weights: the same
  features as the unfolded stem on dlib's input, from normalised and from [0, 255] input alike,
  with the stored kernel and bias unchanged (Conv_0/kernel, Conv_0/bias)."""
  from agejax import preprocessing
  from agejax.models import face_resnet
  rng = np.random.RandomState(0)
  pixels = rng.randint(0, 256, (2, 112, 112, 3)).astype(np.float32)
  trunk = face_resnet.FaceResNetTrunk(pixels=True)
  variables = trunk.init(jax.random.PRNGKey(0), pixels)
  stem = variables["params"]["Conv_0"]
  assert stem["kernel"].shape == (7, 7, 3, 32) and stem["bias"].shape == (32,)
  stem = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in stem.items()}  # not the init's values
  variables = {**variables, "params": {**variables["params"], "Conv_0": stem}}
  dlib = (pixels - np.asarray(face_resnet.DLIB_MEAN, np.float32)) / 256.0
  want = jax.lax.conv_general_dilated(dlib, stem["kernel"], (2, 2), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + stem["bias"]
  got = {}
  for name, model, x in (("pixels", trunk, pixels),
                         ("normalised", face_resnet.FaceResNetTrunk(), preprocessing.normalize(pixels))):
    _, inter = model.apply(variables, x, capture_intermediates=lambda m, _: m.name == "Conv_0")
    (out,) = jax.tree_util.tree_leaves(inter["intermediates"]["Conv_0"])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4, err_msg=name)
    got[name] = model.apply(variables, x)
  assert np.all(np.isfinite(got["pixels"]))
  np.testing.assert_allclose(got["pixels"], got["normalised"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["face_resnet", "tiny"])
def test_pixel_input_is_the_model_after_normalize(name):
  """models.pixel_input: the same ages and distributions from uint8 faces, with the same variables;
  the face ResNet's reads the pixels itself (no normalisation in front of it)."""
  from agejax import preprocessing
  model = models.create(name, age_head="gaussian", gender=True, ops="plain")
  faces = np.random.RandomState(1).randint(0, 256, (3, 112, 112, 3)).astype(np.uint8)  # the face ResNet needs >= 103
  variables = model.init(jax.random.PRNGKey(2), preprocessing.normalize(faces), train=False)
  leaves, tree = jax.tree_util.tree_flatten(variables)  # heads start at zero: move every weight
  rng = np.random.RandomState(3)
  variables = tree.unflatten([v + rng.normal(0, 0.05, v.shape).astype(np.float32) for v in leaves])
  net, prepare = models.pixel_input(model)
  assert (prepare is preprocessing.normalize) == (name != "face_resnet")
  want = model.apply(variables, preprocessing.normalize(faces), train=False)
  got = net.apply(variables, prepare(faces), train=False)
  for k in want:
    assert np.all(np.isfinite(want[k])), k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)
