"""All-Age-Faces, dataset mixtures, photo degradations and calibration."""

import csv
import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_AAF = os.path.join(ROOT, "..", "shared", "data", "aaf")
HAS_DLIB = importlib.util.find_spec("dlib") is not None
needs_dlib = pytest.mark.skipif(not HAS_DLIB, reason="needs dlib (pip install 'agejax[faces]')")


# ---- All-Age-Faces -------------------------------------------------------------------------------

def test_aaf_split_table_keeps_groups_together_and_is_80_10_10():
  from agejax.data.builders import aaf
  rows = [{"file_name": f"{i:05d}A{20 + i % 50:02d}.jpg", "group_id": f"g{i // 3}" if i < 60 else ""}
          for i in range(1000)]
  table = aaf.make_split_table(rows)
  assert table == aaf.make_split_table(rows)  # deterministic
  by_group = {}
  for r in rows:
    by_group.setdefault(r["group_id"] or r["file_name"], set()).add(table[r["file_name"]])
  assert all(len(s) == 1 for s in by_group.values())
  counts = {s: list(table.values()).count(s) for s in ("train", "validation", "test")}
  assert abs(counts["train"] - 800) <= 3 and abs(counts["validation"] - 100) <= 3 and abs(counts["test"] - 100) <= 3


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_AAF, "labels.csv")), reason="needs ../shared/data/aaf")
def test_shipped_aaf_split_table_is_the_one_made_from_the_labels():
  from agejax.data.builders import aaf
  with open(os.path.join(SHARED_AAF, "labels.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  table = aaf.split_table()
  assert table == aaf.make_split_table(rows)
  groups = {}
  for r in rows:
    groups.setdefault(r["group_id"], set()).add(table[r["file_name"]])
  assert all(len(s) == 1 for s in groups.values())


@needs_dlib
def test_aaf_builder_on_a_generated_release(tmp_path):
  from agejax import faces
  from agejax.data import builders
  from agejax.data.builders import aaf
  names = fakes.aaf_names({"train": 5, "validation": 2, "test": 2})
  fakes.aaf_archive(tmp_path / "m", names)
  b = builders.ensure_built("aaf", None, str(tmp_path / "data"), str(tmp_path / "m"))
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 5, "validation": 2, "test": 2}
  # noise photos: no face detected, so every photo went through the dataset's landmarks
  assert b.build_stats == {"aligned_by_detector": 0, "aligned_by_landmarks": 9, "not_aligned": 0}
  with open(os.path.join(os.fspath(b.data_dir), "build_stats.json")) as f:
    assert json.load(f) == b.build_stats
  src = b.as_data_source("train")
  rec = {src[i]["filename"].decode(): src[i] for i in range(len(src))}
  name = names[1]
  r = rec[name]
  assert (r["age"], r["gender"], r["race"]) == (float(name[6:8]), 1, -1)  # < 07381: female; race unknown
  assert r["label_conflict"] == (1 if names.index(name) % 7 == 0 else 0)
  chip = np.asarray(Image.open(io.BytesIO(r["image"])))
  assert chip.shape == (200, 200, 3)
  # the same chip as the similarity transform of the dataset's five points gives
  photo = np.asarray(Image.open(io.BytesIO(fakes.jpeg_bytes(1, size=300))).convert("RGB"))
  want = faces.chip_from_points(photo, fakes.aaf_points(1)[list(aaf.DLIB_FIVE)])
  assert np.abs(chip.astype(int) - want.astype(int)).mean() < 2.0  # JPEG's loss only


@needs_dlib
def test_aaf_photo_without_landmarks_file_is_reported(tmp_path):
  from agejax.data import builders
  names = fakes.aaf_names({"train": 3, "validation": 1, "test": 1})
  fakes.aaf_archive(tmp_path / "m", names, drop_points=(names[0],))
  with pytest.raises(builders.BadInputError, match=rf"{names[0][:-4]}\.txt is missing"):
    builders.ensure_built("aaf", None, str(tmp_path / "data"), str(tmp_path / "m"))


@needs_dlib
def test_landmark_chips_put_the_eyes_where_utkface_chips_have_them():
  """A frontal face drawn by its five points: the chip's eye centres land at UTKFace's (59, 61) and
  (137, 61) within a few pixels (faces.CHIP_PADDING's calibration)."""
  from agejax import faces
  photo = np.zeros((340, 300, 3), np.uint8)
  pts = fakes.aaf_points()
  five = pts[[28, 25, 19, 22, 16]]
  chip_of = lambda p: faces.chip_from_points(photo, p)
  assert chip_of(five).shape == (200, 200, 3)
  # Mark the eye centres, then find them in the chip.
  marked = photo.copy()
  for (x, y) in (five[0:2].mean(0), five[2:4].mean(0)):
    marked[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3] = 255
  chip = faces.chip_from_points(marked, five)
  ys, xs = np.nonzero(chip[..., 0] > 128)
  left, right = xs < 100, xs >= 100
  assert abs(xs[left].mean() - 59) < 6 and abs(xs[right].mean() - 137) < 6
  assert abs(ys.mean() - 61) < 8
  with pytest.raises(ValueError, match="five"):
    faces.chip_from_points(photo, five[:4])


@needs_dlib
@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_AAF, "AAF-train.tar.gz")), reason="needs ../shared/data/aaf")
def test_real_aaf_photos_align_by_detector_like_by_landmarks():
  """On real AAF photos the detector's route is taken, and the landmarks' route frames the face
  the same way (eye distance within 5%), so photos that fall back look like the others."""
  import tarfile
  from agejax import faces
  from agejax.data.builders import aaf
  got = []
  with tarfile.open(os.path.join(SHARED_AAF, "AAF-train.tar.gz")) as tar:
    for m in tar:
      if m.name.startswith("original images/") and len(got) < 3:
        name = m.name.split("/")[-1]
        jpeg = tar.extractfile(m).read()
        pts = aaf.parse_points(tar.extractfile(f"key points/{name[:-4]}.txt").read().decode(), name)
        got.append((jpeg, pts))
  aligner = faces.FaceAligner(detector="hog")
  for jpeg, pts in got:
    chip, route = aaf.align(jpeg, pts)
    assert route == "detector"
    photo = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    by_points = faces.chip_from_points(photo, pts[list(aaf.DLIB_FIVE)])
    eyes = []
    for c in (np.asarray(Image.open(io.BytesIO(chip))), by_points):
      rect = aligner.hog(c, 1)[0]
      p = faces.five_points(aligner.predictor(c, rect))
      eyes.append(np.linalg.norm(p[0:2].mean(0) - p[2:4].mean(0)))
    assert abs(eyes[0] - eyes[1]) / eyes[0] < 0.05
    assert abs(eyes[0] - 78.2) < 8  # UTKFace's chips: 78.2 px between the eyes


# ---- mixtures ------------------------------------------------------------------------------------

def test_mixture_spec_parsing_and_sources():
  import ml_collections
  from agejax.data import mixture
  assert mixture.parse("utkface:0.75, aaf:0.25") == [("utkface", "", 0.75), ("aaf", "", 0.25)]
  assert mixture.parse("utkface/coral2019:1") == [("utkface", "coral2019", 1.0)]
  for bad, msg in (("utkface", "NAME"), ("utkface:x", "not a number"), ("utkface:0", "positive"),
                   ("nope:1", "unknown dataset"), ("aaf:1,aaf:2", "twice"), ("", "names no dataset")):
    with pytest.raises(ValueError, match=msg):
      mixture.parse(bad)
  d = ml_collections.ConfigDict(dict(name="utkface", config="default", train_split="train", eval_split="validation",
                                     test_split="test", manual_dir="/utk", mixture="utkface:3,aaf:1"))
  s = mixture.sources(d)
  assert [(x.name, x.weight, x.manual_dir) for x in s] == [("utkface", 0.75, "/utk"), ("aaf", 0.25, "")]
  assert [x.label for x in s] == ["utkface", "aaf"]
  d.eval_split = ""  # full_train: nobody selects checkpoints
  assert [x.eval_split for x in mixture.sources(d)] == ["", ""]
  d.mixture = ""
  assert [(x.name, x.weight) for x in mixture.sources(d)] == [("utkface", 1.0)]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixture")
  fakes.built_folder(root, n=48, size=48)
  fakes.built_utkface(root, {"train": 24, "val": 8, "test": 8})
  return str(root / "data")


def test_mixture_iterator_draws_by_weight_and_resumes_exactly(two_datasets):
  from agejax.data import builders, pipeline
  a = builders.get_builder("folder", None, two_datasets).as_data_source("train")
  b = builders.get_builder("utkface", "default", two_datasets).as_data_source("train")
  make = lambda: pipeline.train_iterator([a, b], size=32, global_batch=8, seed=3, weights=[0.75, 0.25],
                                         process_index=0, process_count=1)
  it = make()
  batches = [next(it) for _ in range(20)]
  src = np.concatenate([x["source"] for x in batches])
  assert abs(np.mean(src == 1) - 0.25) < 0.02
  # indices are offset by the first source's size, so they are unique over the mixture
  idx = np.concatenate([x["index"] for x in batches])
  assert np.all(idx[src == 0] < len(a)) and np.all((idx[src == 1] >= len(a)) & (idx[src == 1] < len(a) + len(b)))
  ages_b = {float(b[i]["age"]) for i in range(len(b))}
  assert set(np.concatenate([x["age"] for x in batches])[src == 1].tolist()) <= ages_b
  # every source cycles through all its records (its own epochs)
  assert set(idx[src == 1].tolist()) == set(range(len(a), len(a) + len(b)))
  # the iterator's state restores the exact continuation
  it2 = make()
  for _ in range(7):
    next(it2)
  state = it2.get_state()
  it3 = make()
  it3.set_state(state)
  for want in batches[7:12]:
    got = next(it3)
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["image"], want["image"])


def _smoke_mixture_config(data_dir, **extra):
  from configs import default
  c = default.apply_variants(default.base_config(), "smoke")
  c.dataset.name, c.dataset.data_dir = "folder", data_dir
  c.dataset.mixture = "folder:0.5,utkface:0.5"
  c.label_grid.stop = 116.0
  for k, v in extra.items():
    c[k] = v
  return c


def test_mixture_validation_reports_each_source_and_selects_on_all(two_datasets):
  from agejax import summaries, train_lib
  c = _smoke_mixture_config(two_datasets)
  c.eval_limit = -1
  trainer = train_lib.Trainer(c)
  assert [s.label for s in trainer.sources] == ["folder", "utkface"]
  assert trainer.steps_per_epoch == (len(trainer.train_sources[0]) + len(trainer.train_sources[1])) // c.batch_size
  state = trainer.init_state()
  pooled, per = trainer.validate_sources(state)
  assert set(per) == {"folder", "utkface"}
  a = trainer.predict_split(state, "validation", source=0)
  b = trainer.predict_split(state, "validation", source=1)
  assert per["folder"]["n"] == len(a["age"]) and per["utkface"]["n"] == len(b["age"]) == 8
  assert pooled["n"] == len(a["age"]) + len(b["age"])
  np.testing.assert_allclose(pooled["mae"], np.mean(np.abs(np.concatenate([a["pred_age"] - a["age"],
                                                                             b["pred_age"] - b["age"]]))), rtol=1e-5)
  np.testing.assert_allclose(per["utkface"]["mae"], summaries.summarize(b, trainer.grid)["mae"], rtol=1e-6)


def test_mixture_refuses_a_teacher():
  from agejax.data import pipeline
  with pytest.raises(ValueError, match="mixture"):
    pipeline.train_iterator([[1] * 8, [2] * 8], size=8, global_batch=4, seed=0, weights=[1, 1],
                            per_record={"t": np.zeros(8)}, process_index=0, process_count=1)


# ---- metrics over mixed data ---------------------------------------------------------------------

def test_epsilon_error_averages_only_rows_with_a_sigma():
  from agejax import summaries
  grid = np.arange(0.0, 11.0)
  p = np.full((4, 11), 1 / 11, np.float32)
  preds = {"pred_age": np.array([5.0, 6.0, 1.0, 9.0]), "age": np.array([5.0, 4.0, 8.0, 2.0]),
           "sigma": np.array([2.0, 2.0, 0.0, 0.0]), "pred_probs": p}
  s = summaries.summarize(preds, grid)
  want = np.mean([0.0, 1 - np.exp(-(2.0 ** 2) / (2 * 2.0 ** 2))])  # 0 and 1 - e^-0.5
  np.testing.assert_allclose(s["epsilon_error"], want, rtol=1e-5)
  assert s["epsilon_error_n"] == 2
  preds["sigma"] = np.zeros(4)
  assert "epsilon_error" not in summaries.summarize(preds, grid)


# ---- degradations --------------------------------------------------------------------------------

def _faces(n=3, size=64):
  rng = np.random.RandomState(0)
  base = rng.randint(0, 255, (n, 8, 8, 3)).astype(np.uint8)
  return np.stack([np.asarray(Image.fromarray(b).resize((size, size), Image.NEAREST)) for b in base])


def _high_freq(x):
  x = np.asarray(x, np.float32)  # gradient energy (blur keeps the total variation of a step edge, not this)
  return float(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2))


def test_each_degradation_does_what_its_name_says():
  from agejax.data import degrade
  x = _faces()
  key = jax.random.PRNGKey(0)
  out = {n: np.asarray(degrade.apply(n, key, x)) for n in degrade.DEGRADATIONS}
  for n, y in out.items():
    assert y.dtype == np.uint8 and y.shape == x.shape, n
    np.testing.assert_array_equal(y, np.asarray(degrade.apply(n, key, x)), err_msg=n)  # deterministic per key
    assert not np.array_equal(y, x), n
  g = out["grayscale"].astype(int)
  assert np.all(g[..., 0] == g[..., 1]) and np.all(g[..., 1] == g[..., 2])
  s = out["sepia"].reshape(-1, 3).mean(0)
  assert s[0] > s[1] > s[2]  # brown
  for n in ("blur", "low_resolution"):
    assert _high_freq(out[n]) < 0.6 * _high_freq(x), n
  assert out["dark"].mean() < 0.6 * x.mean()
  # JPEG: close to the photo, blocky: the 8x8 block edges carry more of the change than the insides
  d = np.abs(out["jpeg"].astype(float) - x)
  assert 1.0 < d.mean() < 40.0
  # scan: grain added (independent of the photo), contrast lowered
  assert out["scan"].astype(float).std() < x.astype(float).std() * 1.2
  assert np.abs(out["scan"].astype(float) - x).mean() > 5.0
  with pytest.raises(ValueError, match="unknown degradation"):
    degrade.apply("fog", key, x)


def test_degradations_in_training_follow_their_probabilities():
  from agejax.data import augment
  x = jnp.asarray(_faces(n=64, size=32))
  cfg = {"flip": 0.0, "grayscale": 0.0, "rescale": False, "rotate": 0.0, "color_jitter": 0.0}
  plain = np.asarray(augment.augment(jax.random.PRNGKey(0), x, cfg))
  np.testing.assert_array_equal(plain, np.asarray(augment.normalize(x.astype(jnp.float32))))
  # all fields at 0: the same program as before the degradations existed
  zero = {**cfg, **{k: 0.0 for k in ("sepia", "blur", "low_resolution", "dark", "jpeg", "scan")}}
  np.testing.assert_array_equal(np.asarray(augment.augment(jax.random.PRNGKey(0), x, zero)), plain)
  half = np.asarray(augment.augment(jax.random.PRNGKey(0), x, {**cfg, "dark": 0.5}))
  changed = np.any(half != plain, axis=(1, 2, 3))
  assert 0.25 < changed.mean() < 0.75
  assert np.all(half[changed].mean() < plain[changed].mean())  # the changed ones are darker


def test_degrade_variant_sets_every_degradation():
  from configs import default
  c = default.apply_variants(default.base_config(), "degrade")
  assert all(c.augment[k] == default.DEGRADE_P for k in ("sepia", "blur", "low_resolution", "dark", "jpeg", "scan"))
  assert c.augment.grayscale >= default.DEGRADE_P


# ---- calibration ---------------------------------------------------------------------------------

def test_temperature_widens_a_gaussian_by_its_square_root():
  from agejax import calibration, ldl
  grid = np.arange(0.0, 101.0)
  p = np.asarray(ldl.gaussian_label_distribution(jnp.array([50.0]), 3.0, jnp.asarray(grid)))
  np.testing.assert_array_equal(calibration.apply_temperature(p, 1.0), p.astype(np.float32))
  np.testing.assert_allclose(ldl.distribution_std(calibration.apply_temperature(p, 4.0), grid), [6.0], rtol=1e-3)
  np.testing.assert_allclose(ldl.distribution_std(calibration.apply_temperature(p, 0.25), grid), [1.5], rtol=1e-2)
  with pytest.raises(ValueError):
    calibration.apply_temperature(p, 0.0)


def test_fit_temperature_finds_the_smallest_that_covers():
  from agejax import calibration, ldl
  rng = np.random.RandomState(0)
  grid = np.arange(0.0, 101.0)
  ages = rng.uniform(20, 80, 2000)
  centres = ages + rng.normal(0, 6.0, 2000)  # errors of sd 6 ...
  p = np.asarray(ldl.gaussian_label_distribution(jnp.asarray(centres), 2.0, jnp.asarray(grid)))  # ... claimed sd 2
  fit = calibration.fit_temperature(p, grid, ages)
  assert fit["coverage_before"] < 0.6
  assert fit["coverage_after"] >= 0.9
  t = fit["temperature"]
  assert 6 < t < 14  # about (6 / 2)^2 = 9 on a discrete grid
  smaller = calibration.TEMPERATURES[np.searchsorted(calibration.TEMPERATURES, t) - 1]
  assert calibration.coverage(calibration.apply_temperature(p, smaller), grid, ages) < 0.9


def calibration_max_temperature() -> float:
  from agejax import calibration
  return float(calibration.TEMPERATURES[-1])


def test_fit_temperature_holds_every_further_set_to_the_floor():
  """Clean faces with honest spreads and a degraded set whose errors are twice as large: the clean
  target alone leaves the degraded set short; with a floor, the temperature widens until it holds."""
  from agejax import calibration, ldl
  rng = np.random.RandomState(1)
  grid = np.arange(0.0, 101.0)
  ages = rng.uniform(20, 80, 2000)
  dist = lambda sd: np.asarray(ldl.gaussian_label_distribution(jnp.asarray(ages + rng.normal(0, sd, 2000)), 3.0,
                                                               jnp.asarray(grid)))
  clean, blur = dist(3.0), dist(6.0)  # claimed sd 3 both
  alone = calibration.fit_temperature(clean, grid, ages)
  assert calibration.coverage(calibration.apply_temperature(blur, alone["temperature"]), grid, ages) < 0.85
  fit = calibration.fit_temperature(clean, grid, ages, also={"blur": (blur, ages)}, floor=0.85)
  assert fit["temperature"] > alone["temperature"] and fit["floor"] == 0.85
  assert fit["also"]["blur"][1] >= 0.85 > fit["also"]["blur"][0] and fit["coverage_after"] >= 0.9
  smaller = calibration.TEMPERATURES[np.searchsorted(calibration.TEMPERATURES, fit["temperature"]) - 1]
  assert calibration.coverage(calibration.apply_temperature(blur, smaller), grid, ages) < 0.85
  with pytest.raises(ValueError, match="go together"):
    calibration.fit_temperature(clean, grid, ages, floor=0.85)


# ---- evaluation, export and the robustness table over a mixture ---------------------------------

def run_tool(args, data_dir, **env_extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env_extra)
  p = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  return p


@pytest.mark.slow
def test_mixture_train_evaluate_export_calibrate_and_robustness(tmp_path, two_datasets):
  wd = tmp_path / "run"
  common = ["--config", "configs/default.py:smoke", "--workdir", str(wd), "--config.dataset.name=folder",
            f"--config.dataset.data_dir={two_datasets}", "--config.dataset.mixture=folder:0.5,utkface:0.5",
            "--config.label_grid.stop=116"]
  run_tool(["train.py", *common], two_datasets)
  val = [json.loads(line) for line in open(wd / "metrics.jsonl") if '"val"' in line]
  assert "folder/mae" in val[-1] and "utkface/mae" in val[-1]
  out = json.loads(run_tool(["evaluate.py", *common], two_datasets).stdout.strip().splitlines()[-1])
  assert set(out["per_dataset"]) == {"folder", "utkface"}
  pooled = json.load(open(wd / "eval" / "test.json"))
  per = {d: json.load(open(wd / "eval" / f"{d}_test.json")) for d in ("folder", "utkface")}
  assert pooled["n"] == per["folder"]["n"] + per["utkface"]["n"]
  np.testing.assert_allclose(pooled["mae"] * pooled["n"],
                             per["folder"]["mae"] * per["folder"]["n"] + per["utkface"]["mae"] * per["utkface"]["n"],
                             rtol=1e-4)
  table = open(wd / "eval" / "test_by_dataset.md").read()
  assert f"| utkface | test | 8 | {per['utkface']['mae']:.2f} |" in table and "all, pooled" in table
  # cross-dataset: a model scored on one dataset only
  run_tool(["evaluate.py", *common, "--dataset", "utkface"], two_datasets)
  # export with calibration fitted on both validation splits
  exp = json.loads(run_tool(["-m", "agejax.export", *common[:2], *common[4:], "--workdir", str(wd), "--calibrate",
                             "--calibrate_degradations=blur,dark", "--coverage_floor=0.8"],
                            two_datasets).stdout.strip().splitlines()[-1])
  meta = json.load(open(os.path.join(exp["exported"], "model.json")))
  cal = meta["calibration"]
  assert cal["fitted_on"][0].startswith("folder validation") and cal["fitted_on"][1].startswith("utkface validation")
  assert set(cal["also"]) == {f"{d} {c}" for d in ("folder", "utkface") for c in ("clean", "blur", "dark")}
  assert cal["floor"] == 0.8
  top = cal["temperature"] == calibration_max_temperature()
  assert top or (all(after >= 0.8 for _, after in cal["also"].values()) and cal["coverage_after"] >= 0.9)
  assert meta["mixture"] == "folder:0.5,utkface:0.5"
  from agejax import calibration, export
  model = export.load(exp["exported"])
  faces = _faces(n=4, size=model.image_size)
  raw = model.predict(faces, calibrated=False)
  cal_out = model.predict(faces)
  np.testing.assert_array_equal(raw["age"], cal_out["age"])
  np.testing.assert_allclose(cal_out["probs"], calibration.apply_temperature(raw["probs"], cal["temperature"]),
                             atol=1e-6)
  # the robustness table: every (dataset, degradation) cell; clean MAE equals evaluate's on the same split
  run_tool(["-m", "agejax.robustness", "--model", exp["exported"], "--datasets", "utkface",
            "--degradations", "clean,jpeg,sepia", "--data_dir", two_datasets, "--out", str(tmp_path / "rob")],
           two_datasets)
  rob = json.load(open(tmp_path / "rob" / "robustness.json"))
  assert [(c["dataset"], c["degradation"]) for c in rob["cells"]] == [("utkface", d) for d in ("clean", "jpeg", "sepia")]
  clean = rob["cells"][0]
  assert clean["n"] == 8 and "coverage90_calibrated" in clean
  np.testing.assert_allclose(clean["mae"], json.load(open(wd / "eval" / "utkface_test.json"))["mae"], atol=0.02)
  md = open(tmp_path / "rob" / "robustness.md").read()
  rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "MAE" not in line]
  assert rows == ["| clean", "| jpeg", "| sepia"] and f"| clean | {clean['mae']:.2f} |" in md
