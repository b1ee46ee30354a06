"""End-to-end tests of train.py / evaluate.py and of the sharded, multi-host, resumable trainer.

Each runs real processes on a tiny generated dataset; they take tens of seconds each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tests import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def env(devices=1, **extra):
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = ROOT
  e.update(extra)
  return e


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("engine")
  fakes.built_folder(d, n=48, size=48)
  return str(d / "data")


def run(args, devices=1, check=True, **kw):
  p = subprocess.run([sys.executable] + args, cwd=ROOT, env=env(devices), capture_output=True, text=True,
                     timeout=600, **kw)
  if check and p.returncode != 0:
    raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
  return p


def smoke_args(workdir, data_dir, *extra):
  return ["train.py", "--config", "configs/default.py:smoke", "--workdir", str(workdir),
          "--config.dataset.name=folder", f"--config.dataset.data_dir={data_dir}", *extra]


def load_params(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def restore_params(workdir):
  """Params of the latest checkpoint, read back with orbax as numpy arrays (no config, and whatever
  devices or processes wrote it)."""
  import jax
  import orbax.checkpoint as ocp
  root = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(root) if d.isdigit())
  path = os.path.join(root, str(step), "state")
  ckpt = ocp.PyTreeCheckpointer()
  meta = ckpt.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  restored = ckpt.restore(path, restore_args=jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                jax.tree_util.tree_leaves_with_path(restored["params"])}


def test_smoke_train_then_evaluate_through_the_clis(tmp_path, data_dir):
  wd = tmp_path / "run"
  p = run(smoke_args(wd, data_dir))
  assert "final validation MAE" in p.stdout
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4, 6]
  assert all(np.isfinite(r["loss"]) and r["images_per_sec"] >= 0 for r in train)
  assert any(r["split"] == "val" for r in rows)
  assert os.listdir(wd / "tensorboard")
  p = run(["evaluate.py", "--config", "configs/default.py:smoke", "--workdir", str(wd), "--split", "test",
           "--config.dataset.name=folder", f"--config.dataset.data_dir={data_dir}", "--flip_tta"])
  brief = json.loads(p.stdout.strip().splitlines()[-1])
  assert brief["split"] == "test" and brief["n"] == 6 and brief["mae"] > 0
  summary = json.load(open(wd / "eval" / "test.json"))
  assert set(summary["cs"]) == {str(k) for k in range(11)} and summary["flip_tta"] is True
  assert summary["epsilon_error_n"] == 6  # every test row of the generated data has a sigma
  # The training split mixes rows with a sigma (even rows, 2.5) and without (odd, 0): the
  # epsilon-error averages the first kind only.
  run(["evaluate.py", "--config", "configs/default.py:smoke", "--workdir", str(wd), "--split", "train",
       "--config.dataset.name=folder", f"--config.dataset.data_dir={data_dir}"])
  train_summary = json.load(open(wd / "eval" / "train.json"))
  sigma = {}
  for line in open(os.path.join(os.path.dirname(data_dir), "manual", "labels.csv")).read().splitlines()[1:]:
    path, _, s, *_ = line.split(",")
    sigma[os.path.basename(path)] = float(s)
  errs = []
  for row in __import__("csv").DictReader(open(wd / "eval" / "train_predictions.csv")):
    s = sigma[os.path.basename(row["file"])]
    if s > 0:
      errs.append(1 - np.exp(-(float(row["predicted_age"]) - float(row["true_age"])) ** 2 / (2 * s * s)))
  assert 0 < len(errs) == train_summary["epsilon_error_n"] < train_summary["n"]
  np.testing.assert_allclose(train_summary["epsilon_error"], np.mean(errs), atol=2e-3)  # the CSV rounds to 0.01
  lines = open(wd / "eval" / "test_predictions.csv").read().splitlines()
  assert lines[0].startswith("file,true_age,predicted_age,predicted_std,top1") and len(lines) == 7
  for fig in ("pred_vs_true", "per_group", "cs_curve", "examples"):
    assert os.path.getsize(wd / "eval" / f"test_{fig}.png") > 1000
  assert "MAE" in open(wd / "eval" / "test.md").read()
  # Exporting needs the checkpoint, not the dataset: point the config at an empty data folder.
  run(["-m", "agejax.export", "--config", "configs/default.py:smoke", "--workdir", str(wd),
       "--config.dataset.name=folder", f"--config.dataset.data_dir={tmp_path / 'no_data'}",
       "--out", str(wd / "export")])
  assert not os.path.exists(tmp_path / "no_data")
  from agejax import export
  model = export.load(str(wd / "export"))
  assert model.meta["step"] == 6 and model.meta["dataset"] == "folder"
  out = model.predict(np.zeros((3, 32, 32, 3), np.uint8))
  assert out["age"].shape == (3,) and np.all(np.isfinite(out["age"]))
  np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)


def test_four_devices_match_one_device(tmp_path, data_dir):
  run(["tests/run_steps.py", data_dir, str(tmp_path / "one.npz"), "1"], devices=1)
  p = run(["tests/run_steps.py", data_dir, str(tmp_path / "four.npz"), "1"], devices=4)
  assert "devices=4" in p.stdout
  assert_same_step(load_params(tmp_path / "one.npz"), load_params(tmp_path / "four.npz"))


def assert_same_step(a, b, lr=1e-3):
  """One Adam step on 1 vs N devices: the global batch statistics agree to float precision, and
  the update (+-lr per weight on the first step) agrees but where float reordering flips the sign
  of a near-zero gradient (then by 2 lr). Over more steps Adam spreads those flips through the
  whole net (seen on an AVX-512 CPU), so one step is what can be compared exactly. A per-device
  statistic or gradient would break the first check or flip a large share of the signs."""
  assert a.keys() == b.keys()
  flipped = total = 0
  for k in a:
    if k.startswith("['batch_stats']"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    else:
      d = np.abs(a[k] - b[k])
      assert d.max() <= 2 * lr * 1.01, k
      flipped += int(np.sum(d > 1e-5))
      total += d.size
  assert flipped <= 0.005 * total, (flipped, total)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, data_dir):
  run(["tests/run_steps.py", data_dir, str(tmp_path / "single.npz"), "1"], devices=4)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "tests/run_steps.py", data_dir, str(tmp_path / "multi.npz"), "1",
                             "--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)],
                            cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-4000:]
    assert "devices=4 processes=2" in o
  assert_same_step(load_params(tmp_path / "single.npz"), load_params(tmp_path / "multi.npz"))


def _train_steps(workdir):
  """The train rows' steps in metrics.jsonl so far ([] before it exists; a line being written is left out)."""
  path = workdir / "metrics.jsonl"
  rows = []
  for line in (open(path).read().splitlines() if path.exists() else []):
    try:
      rows.append(json.loads(line))
    except ValueError:
      pass
  return [r["step"] for r in rows if r["split"] == "train"]


def _start(args):
  """A training in the background, its stderr kept."""
  return subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError("timed out")


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, data_dir):
  extra = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=4", "--config.eval_every_epochs=100",
           "--config.log_every_steps=1"]
  run(smoke_args(tmp_path / "straight", data_dir, *extra))
  wd = tmp_path / "killed"
  p = _start(smoke_args(wd, data_dir, *extra))
  ckpt = wd / "checkpoints"
  # Kill once step 4 is committed and training is past step 5 (mid-way, possibly mid-save of step 8).
  _wait_for(lambda: ckpt.exists() and "4" in os.listdir(ckpt) and max(_train_steps(wd), default=0) >= 6)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  run(smoke_args(wd, data_dir, *extra))
  s1, a = restore_params(str(tmp_path / "straight"))
  s2, b = restore_params(str(wd))
  assert s1 == s2 == 12
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_config_typo_fails_before_computing(tmp_path, data_dir):
  p = run(smoke_args(tmp_path / "x", data_dir, "--config.batch_sise=4"), check=False)
  assert p.returncode != 0 and "batch_sise" in p.stderr
  p = run(smoke_args(tmp_path / "x", data_dir, "--config.batch_size=four"), check=False)
  assert p.returncode != 0 and "batch_size" in p.stderr
  p = run(smoke_args(tmp_path / "x", data_dir, "--config.loss.name=dldl3"), check=False)
  assert p.returncode == 1 and "Unknown loss 'dldl3'" in p.stderr
  assert not (tmp_path / "x" / "checkpoints").exists()


def test_missing_dataset_names_the_place(tmp_path):
  p = run(["train.py", "--config", "configs/default.py:smoke", "--workdir", str(tmp_path / "w"),
           f"--config.dataset.data_dir={tmp_path / 'nodata'}", f"--config.dataset.manual_dir={tmp_path / 'nofiles'}"],
          check=False)
  assert p.returncode == 1
  assert "UTKFace.tar.gz" in p.stderr and str(tmp_path / "nofiles") in p.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  wd = tmp_path / "nan"
  p = run(smoke_args(wd, data_dir, "--config.num_train_steps=10", "--config.checkpoint_every_steps=3",
                     "--config.debug_nan_step=4", "--config.eval_every_epochs=100"), check=False)
  assert p.returncode == 1
  assert "loss became nan at step 5" in p.stderr.lower() and "last good checkpoint is step 3" in p.stderr
  step, params = restore_params(str(wd))
  assert step == 3 and all(np.all(np.isfinite(v)) for v in params.values())


def test_prior_bias_init_starts_coral_at_the_training_median(data_dir):
  from configs import default
  from agejax import ldl, objectives, train_lib
  from agejax.data import augment, pipeline
  c = default.get_config("smoke,coral")
  c.dataset.name, c.dataset.data_dir = "folder", data_dir
  zeros = train_lib.Trainer(c).init_state()
  assert np.all(np.asarray(zeros.params["heads"]["age_biases"]) == 0)  # the authors' init stays the default
  c.model.age_bias_init = "prior"
  trainer = train_lib.Trainer(c)
  state = trainer.init_state()
  ages = pipeline.label_array(trainer.train_source, "age")
  biases = np.asarray(state.params["heads"]["age_biases"])
  np.testing.assert_allclose(biases, np.asarray(ldl.ranking_prior_logits(ages, trainer.grid)), rtol=1e-6)
  assert not np.allclose(biases, 0)
  # A restore template does not read the labels: its values are overwritten by the checkpoint.
  assert np.all(np.asarray(trainer.init_state(fresh=False).params["heads"]["age_biases"]) == 0)
  # The first predictions sit near the training median; with zero biases, all K-1 tasks share one
  # logit, so every image starts at one end of the grid.
  batch = next(pipeline.eval_batches(trainer.train_source, size=c.image_size, global_batch=8))
  def first_ages(s):
    out = trainer.model.apply({"params": s.params, "batch_stats": s.batch_stats},
                              augment.normalize(batch["image"]), train=False)
    return np.asarray(objectives.predict(trainer.objective, out, trainer.grid)["age"])
  assert np.all(np.abs(first_ages(state) - np.median(ages)) <= 2), (first_ages(state), np.median(ages))
  assert set(first_ages(zeros).tolist()) <= {0.0, 100.0}
  c.loss.name = "dldl_v2"
  with pytest.raises(ValueError, match="age_bias_init=prior"):
    train_lib.validate(c)


def test_sigterm_saves_the_step_it_reached_and_resume_is_bitwise_identical(tmp_path, data_dir):
  extra = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=100", "--config.eval_every_epochs=100",
           "--config.log_every_steps=1"]
  run(smoke_args(tmp_path / "straight", data_dir, *extra))
  wd = tmp_path / "term"
  p = _start(smoke_args(wd, data_dir, *extra))
  _wait_for(lambda: max(_train_steps(wd), default=0) >= 5)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 143, err[-3000:]
  stopped = int(err.split("Stopped by SIGTERM at step ")[1].split(";")[0])
  assert 5 <= stopped < 12 and "Traceback" not in err
  assert sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()) == [stopped]
  p2 = run(smoke_args(wd, data_dir, *extra))
  assert f"Resumed from step {stopped}" in p2.stderr
  s1, a = restore_params(str(tmp_path / "straight"))
  s2, b = restore_params(str(wd))
  assert s1 == s2 == 12
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _train_steps(wd) == list(range(1, 13))  # each step once


def _start_two(args, port):
  """train.py in two processes of one jax.distributed job (one CPU device each)."""
  procs = []
  for i in range(2):
    e = env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, *args, "--config.distributed=True"], cwd=ROOT, env=e,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  return procs


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_bitwise(tmp_path, data_dir):
  # 40 steps: enough that the signal lands mid-run on a fast idle machine too
  extra = ["--config.num_train_steps=40", "--config.checkpoint_every_steps=100", "--config.eval_every_epochs=100",
           "--config.log_every_steps=1"]
  straight = _start_two(smoke_args(tmp_path / "straight", data_dir, *extra), _free_port())
  for p in straight:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  wd = tmp_path / "term"
  procs = _start_two(smoke_args(wd, data_dir, *extra), _free_port())
  _wait_for(lambda: max(_train_steps(wd), default=0) >= 4)
  procs[1].send_signal(signal.SIGTERM)  # the second host is preempted
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for e in errs]
  steps = {int(e.split("at step ")[1].split(";")[0]) for e in errs}
  assert len(steps) == 1 and 4 <= steps.pop() < 40
  resumed = _start_two(smoke_args(wd, data_dir, *extra), _free_port())
  for p in resumed:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  s1, a = restore_params(str(tmp_path / "straight"))
  s2, b = restore_params(str(wd))
  assert s1 == s2 == 40
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def mixture_data_dir(data_dir):
  """data_dir with a fake UTKFace beside the folder dataset."""
  fakes.built_utkface(os.path.dirname(data_dir), {"train": 24, "val": 8, "test": 8})
  return data_dir


def test_mixture_killed_and_resumed_is_bitwise_identical(tmp_path, mixture_data_dir):
  """A two-dataset mixture stopped by SIGKILL after a checkpoint resumes every source's position."""
  extra = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=4", "--config.eval_every_epochs=100",
           "--config.log_every_steps=1", "--config.dataset.mixture=folder:0.6,utkface:0.4",
           "--config.label_grid.stop=116"]
  run(smoke_args(tmp_path / "straight", mixture_data_dir, *extra))
  wd = tmp_path / "killed"
  p = _start(smoke_args(wd, mixture_data_dir, *extra))
  ckpt = wd / "checkpoints"
  _wait_for(lambda: ckpt.exists() and "4" in os.listdir(ckpt) and max(_train_steps(wd), default=0) >= 6)
  p.send_signal(signal.SIGKILL)
  p.wait()
  p2 = run(smoke_args(wd, mixture_data_dir, *extra))
  assert "Resumed from step" in p2.stderr
  s1, a = restore_params(str(tmp_path / "straight"))
  s2, b = restore_params(str(wd))
  assert s1 == s2 == 12
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigkill_after_a_checkpoint_leaves_each_metrics_step_once(tmp_path, data_dir):
  extra = ["--config.num_train_steps=10", "--config.checkpoint_every_steps=3", "--config.eval_every_epochs=100",
           "--config.log_every_steps=1"]
  wd = tmp_path / "killed"
  p = subprocess.Popen([sys.executable] + smoke_args(wd, data_dir, *extra), cwd=ROOT, env=env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: (wd / "checkpoints" / "3").exists() and max(_train_steps(wd) or [0]) >= 5)
  p.kill()
  p.wait()
  p2 = run(smoke_args(wd, data_dir, *extra))
  assert "dropped" in p2.stderr and _train_steps(wd) == list(range(1, 11))


def test_damaged_newest_checkpoint_is_moved_aside_and_an_older_one_resumes(tmp_path, data_dir):
  extra = ["--config.checkpoint_every_steps=3", "--config.eval_every_epochs=100", "--config.keep_checkpoints=5"]
  wd = tmp_path / "damaged"
  run(smoke_args(wd, data_dir, "--config.num_train_steps=6", *extra))
  import shutil
  shutil.rmtree(wd / "checkpoints" / "6" / "data")  # the data iterator's file is gone
  p = run(smoke_args(wd, data_dir, "--config.num_train_steps=9", *extra))
  assert "Checkpoint 6 does not restore" in p.stderr and "Resumed from step 3" in p.stderr
  assert (wd / "damaged_checkpoints" / "6" / "state").is_dir()  # kept, not deleted
  step, params = restore_params(str(wd))
  assert step == 9 and all(np.all(np.isfinite(v)) for v in params.values())


def test_a_workdir_in_use_or_unusable_is_refused_in_one_line(tmp_path, data_dir):
  wd = tmp_path / "busy"
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom agejax import workdir\n"
                             f"workdir.prepare({str(wd)!r})\nwith workdir.lock({str(wd)!r}):\n"
                             "  print('held', flush=True)\n  time.sleep(600)"],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  p = run(smoke_args(wd, data_dir), check=False)
  assert p.returncode == 1 and "is in use by another training (pid" in p.stderr and "Traceback" not in p.stderr
  assert not (wd / "checkpoints").exists()
  holder.kill()  # a killed holder leaves no stale lock
  holder.wait()
  run(smoke_args(wd, data_dir))
  (tmp_path / "a_file").write_text("x")
  for bad, message in ((tmp_path / "a_file", "is a file, not a folder"), (tmp_path / "a_file" / "sub", "cannot be written")):
    p = run(smoke_args(bad, data_dir), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and lines[-1].startswith("error: ") and message in lines[-1], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_evaluate_refuses_clearly_without_touching_the_workdir(tmp_path, data_dir):
  args = lambda wd, *extra: ["evaluate.py", "--config", "configs/default.py:smoke", "--workdir", str(wd),
                             "--config.dataset.name=folder", f"--config.dataset.data_dir={data_dir}", *extra]
  p = run(args(tmp_path / "nothing"), check=False)
  assert p.returncode == 1 and "No checkpoint in" in p.stderr and not (tmp_path / "nothing").exists()
  wd = tmp_path / "run"
  run(smoke_args(wd, data_dir))
  p = run(args(wd, "--config.model.name=resnet18"), check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "model.name='resnet18' (trained with 'tiny')" in p.stderr.strip().splitlines()[-1]
  os.remove(wd / "config.json")  # a run without its record: the restore's error is named too
  p = run(args(wd, "--config.model.name=resnet18"), check=False)
  assert p.returncode == 1 and "does not fit the config's model (model resnet18" in p.stderr
  assert "Traceback" not in p.stderr
