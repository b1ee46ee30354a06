import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax.data import augment, pipeline
from tests import fakes


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return fakes.built_folder(tmp_path_factory.mktemp("folder"), n=24, with_split=False).as_data_source("train")


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_shapes_and_determinism(source):
  a = _take(pipeline.train_iterator(source, size=32, global_batch=8, seed=3, process_index=0, process_count=1), 5)
  b = _take(pipeline.train_iterator(source, size=32, global_batch=8, seed=3, process_index=0, process_count=1), 5)
  c = _take(pipeline.train_iterator(source, size=32, global_batch=8, seed=4, process_index=0, process_count=1), 5)
  assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.uint8
  assert all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  # One epoch (3 batches of 8 from 24) covers every record once; the next epoch is reshuffled.
  first = np.concatenate([x["index"] for x in a[:3]])
  assert sorted(first) == list(range(24))
  assert not np.array_equal(first, np.concatenate([x["index"] for x in a[3:5]] + [a[0]["index"][:8]])[:24])


def test_iterator_state_restores_exactly(source):
  it = pipeline.train_iterator(source, size=32, global_batch=8, seed=0, process_index=0, process_count=1)
  _take(it, 4)
  state = it.get_state()
  expected = _take(it, 3)
  it2 = pipeline.train_iterator(source, size=32, global_batch=8, seed=0, process_index=0, process_count=1)
  it2.set_state(state)
  for x, y in zip(expected, _take(it2, 3)):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_per_process_sharding_partitions_the_global_batch(source):
  whole = _take(pipeline.train_iterator(source, size=32, global_batch=8, seed=1, process_index=0, process_count=1), 3)
  p0 = _take(pipeline.train_iterator(source, size=32, global_batch=8, seed=1, process_index=0, process_count=2), 3)
  p1 = _take(pipeline.train_iterator(source, size=32, global_batch=8, seed=1, process_index=1, process_count=2), 3)
  for w, a, b in zip(whole, p0, p1):
    assert a["image"].shape[0] == 4
    assert sorted(np.concatenate([a["index"], b["index"]])) == sorted(w["index"])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_iterator(source, size=32, global_batch=7, seed=0, process_index=0, process_count=2)


def test_eval_batches_pad_and_match_across_processes(source):
  b0 = list(pipeline.eval_batches(source, size=32, global_batch=10, process_index=0, process_count=2))
  b1 = list(pipeline.eval_batches(source, size=32, global_batch=10, process_index=1, process_count=2))
  assert len(b0) == len(b1) == 3  # 12 records each, 5 per local batch
  idx = np.concatenate([b["index"][b["valid"] > 0] for b in b0 + b1])
  assert sorted(idx) == list(range(24))
  assert all(np.all(b["index"][b["valid"] == 0] == -1) for b in b0 + b1)


def test_decode_resizes_and_crops():
  data = fakes.jpeg_bytes(0, size=40)
  img = pipeline.decode_face(data, 24)
  assert img.shape == (24, 24, 3) and img.dtype == np.uint8


# ---------------------------------------------------------------- augmentation

IMGS = jnp.asarray(np.random.RandomState(0).randint(0, 255, (4, 16, 16, 3)).astype(np.uint8))
OFF = {"flip": 0.0, "grayscale": 0.0, "rescale": False, "rotate": 0.0, "color_jitter": 0.0}


def test_normalize_constants():
  x = jnp.full((1, 1, 1, 3), 255.0)
  np.testing.assert_allclose(augment.normalize(x)[0, 0, 0], (1 - np.array(augment.MEAN)) / np.array(augment.STD), rtol=1e-6)


def test_all_off_is_normalize_only():
  np.testing.assert_allclose(augment.augment(jax.random.PRNGKey(0), IMGS, OFF), augment.normalize(IMGS), rtol=1e-6)


def test_flip_and_grayscale_always():
  out = augment.augment(jax.random.PRNGKey(0), IMGS, {**OFF, "flip": 1.0})
  np.testing.assert_allclose(out, augment.normalize(IMGS[:, :, ::-1]), rtol=1e-6)
  g = augment.augment(jax.random.PRNGKey(0), IMGS, {**OFF, "grayscale": 1.0})
  raw = np.asarray(g) * np.array(augment.STD) + np.array(augment.MEAN)
  np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-5)


def test_full_augmentation_is_seeded_and_in_range():
  a = augment.augment(jax.random.PRNGKey(1), IMGS, augment.DEFAULTS, jnp.arange(4))
  b = augment.augment(jax.random.PRNGKey(1), IMGS, augment.DEFAULTS, jnp.arange(4))
  c = augment.augment(jax.random.PRNGKey(2), IMGS, augment.DEFAULTS, jnp.arange(4))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  raw = np.asarray(a) * np.array(augment.STD) + np.array(augment.MEAN)
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_augmentation_follows_example_ids_not_positions():
  ids = jnp.array([7, 3, 9, 1])
  a = augment.augment(jax.random.PRNGKey(0), IMGS, augment.DEFAULTS, ids)
  perm = jnp.array([2, 0, 3, 1])
  b = augment.augment(jax.random.PRNGKey(0), IMGS[perm], augment.DEFAULTS, ids[perm])
  np.testing.assert_allclose(a[perm], b, atol=1e-5)


def test_rotation_keeps_the_centre_and_rescale_blurs():
  img = jnp.zeros((1, 17, 17, 3)).at[:, 8, 8].set(255.0)
  rot = augment.augment(jax.random.PRNGKey(0), img, {**OFF, "rotate": 15.0})
  raw = np.asarray(rot) * np.array(augment.STD) + np.array(augment.MEAN)
  assert np.unravel_index(np.argmax(raw[0, ..., 0]), (17, 17)) == (8, 8)
  smooth = jnp.asarray(np.random.RandomState(1).rand(1, 32, 32, 3) * 255)
  res = augment.augment(jax.random.PRNGKey(3), smooth, {**OFF, "rescale": True})
  assert float(jnp.std(res)) < float(jnp.std(augment.normalize(smooth)))


def test_translate_shifts_by_whole_pixels_within_the_bound():
  img = jnp.zeros((1, 32, 32, 3)).at[:, 16, 16].set(255.0)
  seen = set()
  for seed in range(40):
    out = augment.augment(jax.random.PRNGKey(seed), img, {**OFF, "translate": 1 / 16})   # up to 2 px
    raw = np.asarray(out[0, ..., 0]) * augment.STD[0] + augment.MEAN[0]
    y, x = np.unravel_index(np.argmax(raw), raw.shape)
    assert abs(raw[y, x] - 1.0) < 1e-5 and np.sum(raw > 0.5) == 1   # moved, not resampled
    seen.add((int(y) - 16, int(x) - 16))
  assert max(max(abs(a), abs(b)) for a, b in seen) == 2 and len(seen) > 10
  flat = jnp.full((4, 32, 32, 3), 100.0)   # edges replicate: a flat image stays flat (zero padding would not)
  out = augment.augment(jax.random.PRNGKey(0), flat, {**OFF, "translate": 1 / 16})
  np.testing.assert_allclose(out, augment.normalize(flat), rtol=1e-6)


def test_preview_contact_sheet_cli(tmp_path):
  import os, subprocess, sys
  from PIL import Image
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fakes.folder(str(tmp_path / "m"), n=16, with_split=False)
  out = tmp_path / "sheet.png"
  p = subprocess.run([sys.executable, "-m", "agejax.data.preview", "--config", "configs/default.py:smoke",
                      "--config.dataset.name=folder", f"--config.dataset.manual_dir={tmp_path / 'm'}",
                      f"--config.dataset.data_dir={tmp_path / 'd'}", "--rows", "2", "--cols", "4", "--out", str(out)],
                     cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "wrote" in p.stdout and "8 augmented samples" in p.stdout
  w, h = Image.open(out).size
  assert w > 400 and h > 200
