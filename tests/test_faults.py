"""Nothing lost: a changed config, a checkpoint of another model, a full disk and a damaged
dataset record each stop with one clear line, leaving the run's files as they were."""

import errno
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def run(args, check=True):
  p = subprocess.run([sys.executable] + args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stderr[-4000:]}")
  return p


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("faults")
  fakes.built_folder(d, n=24, size=40)
  return str(d / "data")


def smoke(workdir, data_dir, *extra):
  return ["train.py", "--config", "configs/default.py:smoke", "--workdir", str(workdir), "--config.dataset.name=folder",
          f"--config.dataset.data_dir={data_dir}", "--config.eval_every_epochs=100", *extra]


def _tree(folder):
  return sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**"), recursive=True))


def test_a_changed_config_is_refused_before_anything_is_written(tmp_path, data_dir):
  wd = tmp_path / "run"
  run(smoke(wd, data_dir))
  final = (wd / "final_validation.json").read_text()
  again = run(smoke(wd, data_dir))  # a finished run run again: its result stands
  assert (wd / "final_validation.json").read_text() == final and "final validation MAE" in again.stdout
  before = _tree(wd)
  config = (wd / "config.json").read_text()
  metrics = (wd / "metrics.jsonl").read_text()
  p = run(smoke(wd, data_dir, "--config.model.gender=True", "--config.log_every_steps=1"), check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "model.gender=True (recorded False)" in err[0] and "log_every_steps" not in err[0]
  assert _tree(wd) == before and not (wd / "damaged_checkpoints").exists()
  assert (wd / "config.json").read_text() == config and (wd / "metrics.jsonl").read_text() == metrics
  # evaluate.py still scores the run it trained
  run(["evaluate.py", "--config", "configs/default.py:smoke", "--workdir", str(wd), "--config.dataset.name=folder",
       f"--config.dataset.data_dir={data_dir}"])


def test_a_checkpoint_of_another_model_is_a_mismatch_not_damage(tmp_path, data_dir):
  wd = tmp_path / "run"
  run(smoke(wd, data_dir))
  os.remove(wd / "config.json")  # nothing records what the run was
  before = sorted(os.listdir(wd / "checkpoints"))
  p = run(smoke(wd, data_dir, "--config.model.gender=True"), check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "was trained with another model than this config describes" in p.stderr
  assert "not in it" in p.stderr  # the gender head's variables
  assert not (wd / "damaged_checkpoints").exists() and sorted(os.listdir(wd / "checkpoints")) == before


def test_a_full_disk_during_a_checkpoint_leaves_no_half_checkpoint_and_the_rerun_resumes(tmp_path, data_dir, monkeypatch):
  import orbax.checkpoint as ocp
  from configs import default
  from agejax import checkpoints, train_lib
  c = default.get_config("smoke")
  c.dataset.name, c.dataset.data_dir = "folder", data_dir
  c.checkpoint_every_steps, c.eval_every_epochs = 2, 100.0
  wd = str(tmp_path / "run")
  real_save = ocp.CheckpointManager.save

  def save(self, step, *a, **kw):
    if step == 4 and self.directory.name == "checkpoints":
      os.makedirs(os.path.join(str(self.directory), "4.orbax-checkpoint-tmp-1"))  # what orbax writes first
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *a, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(checkpoints.CheckpointWriteError, match=r"Cannot write a checkpoint in .*run: the disk is full"):
    train_lib.train_and_evaluate(c, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  train_lib.train_and_evaluate(c, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints")))[-1] == "6"
  steps = [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl")) if '"train"' in l]
  assert steps == [2, 4, 6]


def _damage(data_dir, split="train"):
  path = glob.glob(os.path.join(data_dir, "folder", "*", f"*-{split}.array_record*"))[0]
  data = bytearray(open(path, "rb").read())
  for i in range(2000, 2400):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))
  return path


def test_a_damaged_record_is_one_error_line_and_verify_finds_it(tmp_path):
  fakes.built_folder(tmp_path, n=48, size=48)
  data_dir = str(tmp_path / "data")
  path = _damage(data_dir)
  p = run(smoke(tmp_path / "run", data_dir, "--config.num_train_steps=12"), check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "folder train" in err[0] and os.path.dirname(path) in err[0] and "--verify" in err[0]
  v = run(["-m", "agejax.data.build", "folder", "--data_dir", data_dir, "--verify"], check=False)
  assert v.returncode == 1
  damaged = [line for line in v.stderr.splitlines() if line.startswith("damaged: ")]
  assert damaged and all(line.startswith("damaged: train record ") for line in damaged)
  assert json.loads(v.stdout.strip().splitlines()[-1])["damaged"] == len(damaged)
  fakes.folder(str(tmp_path / "manual"), n=48, size=48)
  r = run(["-m", "agejax.data.build", "folder", "--data_dir", data_dir, "--manual_dir", str(tmp_path / "manual"),
           "--rebuild", "--verify"])
  assert json.loads(r.stdout.strip().splitlines()[-1])["damaged"] == 0
