"""Distillation: the loss, the teacher file and its checks, the pipeline joining each record to its
teacher row, and a teacher made by `python -m agejax.distill` from an exported model, then learnt by
train.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import export, ldl, losses, objectives, train_lib
from agejax.data import augment, pipeline, teacher
from configs import default
from tests import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = ldl.label_grid(0.0, 100.0)
AGES = jnp.array([3.0, 25.0, 61.5, 99.0])


def _teacher_probs(ages, shift=5.0, sigma=3.0):
  return np.asarray(ldl.gaussian_label_distribution(jnp.asarray(ages) + shift, sigma, GRID))


def test_distillation_loss_is_kl_to_the_teacher_plus_the_expectation_term():
  z = jax.random.normal(jax.random.PRNGKey(0), (4, len(GRID)))
  t = _teacher_probs(AGES)
  got = losses.distillation(z, t, AGES, 2.0, GRID, lam=0.5)
  p = jax.nn.softmax(z)
  kl = np.sum(t * (np.log(np.maximum(t, 1e-30)) - np.log(p)), -1)
  np.testing.assert_allclose(got, kl + 0.5 * np.abs(np.asarray(ldl.expectation(p, GRID)) - AGES), rtol=1e-5)
  # teacher_weight 0 is DLDL-v2; in between, the label is the mixture.
  np.testing.assert_allclose(losses.distillation(z, t, AGES, 2.0, GRID, teacher_weight=0.0),
                             losses.dldl_v2(z, AGES, 2.0, GRID), rtol=1e-5)
  mix = 0.3 * t + 0.7 * np.asarray(ldl.gaussian_label_distribution(AGES, 2.0, GRID))
  np.testing.assert_allclose(losses.distillation(z, t, AGES, 2.0, GRID, lam=0.0, teacher_weight=0.3),
                             losses.kl_divergence(z, mix), rtol=1e-5)
  # Predicting the teacher exactly leaves only the expectation term's gradient, which the
  # teacher's shift (+5 years) makes nonzero: the true age still pulls.
  zt = jnp.log(jnp.asarray(t) + 1e-30)
  g_kl = jax.grad(lambda z: losses.distillation(z, t, AGES, 2.0, GRID, lam=0.0).sum())(zt)
  assert float(jnp.max(jnp.abs(g_kl))) < 1e-5
  g = jax.grad(lambda z: losses.distillation(z, t, AGES, 2.0, GRID, lam=1.0).sum())(zt)
  assert float(jnp.max(jnp.abs(g))) > 1e-2


def test_teacher_file_round_trip_and_clear_refusals(tmp_path):
  ages = np.array([3.0, 25.0, 61.5, 99.0, 40.0], np.float32)
  probs = _teacher_probs(ages)
  path = str(tmp_path / "t.npz")
  names = [f"{i}.jpg" for i in range(5)]
  ident = {"dataset": "folder", "config": "", "split": "train"}
  teacher.save(path, probs, ages, GRID, ident, filenames=names)
  assert not os.path.exists(path + ".tmp.npz")
  np.testing.assert_array_equal(teacher.load(path, GRID, ages, filenames=names, identity=ident), probs)
  # two records of equal age swapped: the ages agree, the file names do not
  same = np.array([30.0, 30.0, 61.5, 99.0, 40.0], np.float32)
  teacher.save(path, probs, same, GRID, ident, filenames=names)
  with pytest.raises(ValueError, match=r"file names differ .* at 2 of 5 records \(first: record 0, '0.jpg' against '1.jpg'\)"):
    teacher.load(path, GRID, same, filenames=[names[1], names[0], *names[2:]])
  with pytest.raises(ValueError, match="made for split 'train', the student trains on 'validation'"):
    teacher.load(path, GRID, same, filenames=names, identity={**ident, "split": "validation"})
  with pytest.raises(ValueError, match="made for dataset 'folder', the student trains on 'utkface'"):
    teacher.load(path, GRID, same, filenames=names, identity={**ident, "dataset": "utkface"})
  teacher.save(path, probs, ages, GRID, ident, filenames=names)
  with pytest.raises(FileNotFoundError, match="python -m agejax.distill"):
    teacher.load(str(tmp_path / "none.npz"), GRID, ages)
  with pytest.raises(ValueError, match=r"label grid \(101 ages, 0..100\) is not the student's \(40 ages, 21..60\)"):
    teacher.load(path, ldl.label_grid(21.0, 60.0), ages)
  with pytest.raises(ValueError, match="5 distributions for the training split's 6 records"):
    teacher.load(path, GRID, np.append(ages, 1.0))
  with pytest.raises(ValueError, match=r"ages differ .* at 2 of 5 records \(first: record 0, 3 against 25\)"):
    teacher.load(path, GRID, ages[[1, 0, 2, 3, 4]])
  bad = str(tmp_path / "bad.npz")
  teacher.save(bad, probs * 2, ages, GRID, {})
  with pytest.raises(ValueError, match="summing to 1"):
    teacher.load(bad, GRID, ages)
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a teacher file"):
    teacher.load(str(tmp_path / "junk.npz"), GRID, ages)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("distill")
  fakes.built_folder(d, n=32, size=48)
  return str(d / "data")


def _config(data_dir, *variants):
  c = default.get_config(",".join(("smoke",) + variants))
  c.dataset.name, c.dataset.data_dir = "folder", data_dir
  return c


def test_each_record_brings_its_teacher_row_through_shuffling_and_resumption(data_dir):
  source = train_lib.Trainer(_config(data_dir)).train_source
  table = np.random.RandomState(0).rand(len(source), 7).astype(np.float32)
  it = pipeline.train_iterator(source, size=32, global_batch=8, seed=3, per_record={"t": table})
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  for b in first + after:
    np.testing.assert_array_equal(b["t"], table[b["index"]])
  assert len({tuple(b["index"]) for b in first}) == 3  # shuffled batches, not one repeated
  again = pipeline.train_iterator(source, size=32, global_batch=8, seed=3, per_record={"t": table})
  again.set_state(state)
  for a, b in zip(after, [next(again) for _ in range(2)]):
    np.testing.assert_array_equal(a["t"], b["t"])
  with pytest.raises(ValueError, match="has 5 rows for a split of"):
    pipeline.train_iterator(source, size=32, global_batch=8, seed=3, per_record={"t": table[:5]})


def test_config_refuses_a_distill_run_without_teacher_and_a_teacher_without_distill(data_dir, tmp_path):
  with pytest.raises(ValueError, match="the distill loss learns a teacher's distributions"):
    train_lib.validate(_config(data_dir, "distill"))
  c = _config(data_dir)
  c.loss.teacher = "t.npz"
  with pytest.raises(ValueError, match="does not read it"):
    train_lib.validate(c)
  c = _config(data_dir, "distill")
  c.loss.teacher, c.loss.teacher_weight = "t.npz", 1.5
  with pytest.raises(ValueError, match=r"teacher_weight=1.5 is not in \[0, 1\]"):
    train_lib.validate(c)


def _run(args, check=True):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable] + args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
  assert not check or p.returncode == 0, f"{args}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
  return p


@pytest.mark.slow
def test_teacher_from_an_exported_model_then_a_student_learns_it(data_dir, tmp_path):
  # A smoke-trained teacher, exported.
  trainer, _, model_dir = fakes.smoke_exported(_config(data_dir), str(tmp_path / "teacher"))
  out = str(tmp_path / "teacher.npz")
  data_flags = ["--config.dataset.name=folder", f"--config.dataset.data_dir={data_dir}"]
  p = _run(["-m", "agejax.distill", "--config", "configs/default.py:smoke,distill", *data_flags,
            "--teacher", model_dir, "--out", out])
  summary = json.loads(p.stdout.strip().splitlines()[-1])
  refused = _run(["-m", "agejax.distill", "--config", "configs/default.py:smoke,distill", *data_flags,
                  "--config.label_grid.stop=60", "--teacher", model_dir, "--out", str(tmp_path / "grid.npz")],
                 check=False)
  assert refused.returncode != 0 and not os.path.exists(tmp_path / "grid.npz")
  assert "the teacher's label grid (101 ages, 0..100) is not the config's (61 ages, 0..60)" in refused.stderr
  source = trainer.train_source
  assert summary["records"] == len(source) and summary["split"] == "train" and summary["images_per_sec"] > 0
  # The file holds the export's flip-averaged predictions of each clean training image, in record order.
  ages = pipeline.label_array(source, "age")
  probs = teacher.load(out, np.asarray(trainer.grid), ages, filenames=pipeline.label_array(source, "filename"),
                       identity={"dataset": "folder", "config": "", "split": "train"})
  images = np.stack([pipeline.decode_face(source[i]["image"], 32) for i in range(len(source))])
  want = export.load(model_dir).predict(images)
  np.testing.assert_allclose(probs, want["probs"], atol=1e-6)
  np.testing.assert_allclose(summary["teacher_mae"], np.mean(np.abs(want["age"] - ages)), rtol=1e-4)

  # The student's training loss on its first batch is the distillation loss against those rows.
  sc = _config(data_dir, "distill")
  sc.loss.teacher = out
  student = train_lib.Trainer(sc)
  s0 = student.init_state()
  batch = next(student.train_iterator())
  np.testing.assert_array_equal(batch["teacher_probs"], probs[batch["index"]])
  _, metrics = student.train_step(s0, student.global_batch(batch))
  s0 = student.init_state()  # the step donated the state
  aug_rng, drop_rng = jax.random.split(jax.random.fold_in(s0.rng, 0))
  images = augment.augment(aug_rng, jnp.asarray(batch["image"]), dict(sc.augment), jnp.asarray(batch["index"]))
  outputs = student.model.apply({"params": s0.params, "batch_stats": s0.batch_stats}, images, train=True,
                                mutable=["batch_stats"], rngs={"dropout": drop_rng})[0]
  want_loss = losses.distillation(outputs["age_logits"], batch["teacher_probs"], batch["age"], 2.0,
                                  student.grid).mean()
  np.testing.assert_allclose(float(metrics["loss_age"]), float(want_loss), rtol=1e-4)
  assert objectives.get("distill").age_head == "distribution"

  # train.py runs the distill config end to end; the trainer refuses a teacher file made for other records.
  wd = tmp_path / "student"
  _run(["train.py", "--config", "configs/default.py:smoke,distill", "--workdir", str(wd), *data_flags,
        f"--config.loss.teacher={out}"])
  assert os.path.exists(wd / "metrics.jsonl")
  other = str(tmp_path / "other.npz")
  names = pipeline.label_array(source, "filename")
  teacher.save(other, probs[::-1], ages[::-1], np.asarray(trainer.grid),
               {"dataset": "folder", "config": "", "split": "train"}, filenames=names[::-1])
  sc.loss.teacher = other
  with pytest.raises(ValueError, match="made for another split or order"):
    train_lib.Trainer(sc)
