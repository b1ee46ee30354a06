import pytest
import json
import os
import subprocess
import sys
import time

from agejax import bench, experiments
from agejax.cpu import native


def test_bench_reports_params_flops_and_rate():
  r = bench.run("tiny", 32, 4, "train", steps=1, repeats=1, dtype="float32")
  assert r["params"] == 934_869 and r["images_per_s"] > 0
  assert r["gflops_per_image"] and r["gflops_per_image"] > 0.01
  assert r["malloc"] in ("hugetlb", "default") and r["page_faults_per_step"] >= 0
  assert r["native_conv_floats"] == native.vector_floats() and r["ops"] == "cpu"
  assert bench.run("tiny", 32, 4, "train", steps=1, repeats=1, dtype="float32", ops="plain")["ops"] == "plain"
  i = bench.run("tiny", 32, 4, "infer", steps=1, repeats=1, dtype="float32")
  assert 0 < i["gflops_per_image"] < r["gflops_per_image"]  # inference is cheaper than a train step
  # TinyAgeNet's 13 convolutions at 32 px are 39.8 MFLOP an image forward counting the taps that read
  # padding; XLA's cost analysis of the plain layers (the native kernels' FLOPs it cannot see) counts
  # 32 MFLOP, without the border taps.
  convs = 2 * 9 * (32 ** 2 * (3 * 16 + 16 * 16) + 16 ** 2 * (16 * 32 + 32 * 32) + 8 ** 2 * (32 * 64 + 2 * 64 * 64)
                   + 4 ** 2 * (64 * 128 + 2 * 128 * 128) + 2 ** 2 * 3 * 128 * 128) / 1e9
  assert 0.75 * convs <= i["gflops_per_image"] < 1.2 * convs and r["gflops_per_image"] > 2.5 * convs


def test_bench_runs_the_network_once_per_timed_step(monkeypatch):
  """The rate is batch * steps / time, so each timed step must be exactly one call (the loop once ran
  inference twice a step and reported half the rate)."""
  calls = {"train": 0, "infer": 0}
  make_steps = bench.make_steps

  def counting(*args):
    state, data, train, infer = make_steps(*args)

    def count(name, f):
      def g(*a):
        calls[name] += 1
        return f(*a)
      g.lower = f.lower  # flops_of lowers the step without calling it
      return g
    return state, data, count("train", train), count("infer", infer)

  monkeypatch.setattr(bench, "make_steps", counting)
  for mode in ("train", "infer"):
    bench.run("tiny", 32, 2, mode, steps=3, repeats=2, dtype="float32")
    assert calls[mode] == 2 + 3 * 2  # two warm-up steps, then repeats x steps
  assert calls == {"train": 8, "infer": 8}


def _fake_run(workdir, name, seed, mae, gender=None):
  d = os.path.join(workdir, f"{name}_seed{seed}", "eval")
  os.makedirs(d)
  s = {"mae": mae, "cs": {"0": 0.0, "5": 0.6, "10": 0.9}, "clean": {"mae": mae - 0.1}}
  if gender is not None:
    s["gender_accuracy"] = gender
  json.dump(s, open(os.path.join(d, "test.json"), "w"))
  with open(os.path.join(workdir, f"{name}_seed{seed}", "metrics.jsonl"), "w") as f:
    for e, m in [(1.0, mae + 2), (2.0, mae + 1)]:
      f.write(json.dumps({"split": "train", "step": int(e * 10) - 5, "epoch": e - 0.5, "loss": 1.0}) + "\n")
      f.write(json.dumps({"split": "val", "step": int(e * 10), "mae": m}) + "\n")


def test_experiment_table_aggregates_seeds(tmp_path):
  _fake_run(tmp_path, "dldl_v2", 0, 5.0)
  _fake_run(tmp_path, "dldl_v2", 1, 5.2)
  _fake_run(tmp_path, "multitask", 0, 6.0, gender=0.9)
  json.dump({"total_seconds": 600, "cores": [1]}, open(tmp_path / "multitask_seed0" / "timing.json", "w"))
  table, rows = experiments.build_table("utkface_cpu", str(tmp_path))
  assert [r["name"] for r in rows] == ["dldl_v2", "multitask"]
  assert "| DLDL-v2 (KL + L1 on the expectation) | 2 | 5.10 ± 0.14 | 0.600 ± 0.000 | 5.00 ± 0.14 |" in table
  assert "| 0.900 | - | 10 | 1 |" in table
  assert table.splitlines()[4].endswith("| - | - | - | - |")  # dldl_v2: no gender, race or timing.json
  assert experiments._val_curve(str(tmp_path / "dldl_v2_seed1")) == ([1.0, 2.0], [7.2, 6.2])
  assert experiments.main(["utkface_cpu", "--workdir", str(tmp_path), "--table_only"]) == 0
  md = (tmp_path / "results.md").read_text()
  for fig in ("results_mae.png", "results_cs.png", "results_val_mae.png"):
    assert (tmp_path / fig).stat().st_size > 5000 and f"]({fig})" in md
  assert json.loads((tmp_path / "results.json").read_text())[0]["cs_curves"][1] == {"0": 0.0, "5": 0.6, "10": 0.9}


def test_run_one_writes_output_to_its_log_and_timing(monkeypatch, tmp_path):
  calls = []

  def fake_run(cmd, cwd, check, stdout=None, stderr=None):
    calls.append(cmd[1])
    stdout.write(f"output of {cmd[1]}\n")
    if cmd[1] == "evaluate.py":
      os.makedirs(tmp_path / "r" / "eval")
      json.dump({"mae": 4.5}, open(tmp_path / "r" / "eval" / "test.json", "w"))

  monkeypatch.setattr(experiments.subprocess, "run", fake_run)
  s = experiments.run_one("configs/utkface.py:tiny --config.x=1", str(tmp_path / "r"), 2, log_path=str(tmp_path / "r" / "log.txt"))
  assert s == {"mae": 4.5} and calls == ["train.py", "evaluate.py"]
  assert (tmp_path / "r" / "log.txt").read_text() == "output of train.py\noutput of evaluate.py\n"
  timing = json.loads((tmp_path / "r" / "timing.json").read_text())
  assert timing["train_seconds"] <= timing["total_seconds"] and timing["cores"] == sorted(os.sched_getaffinity(0))
  assert experiments.run_one("unused", str(tmp_path / "r"), 2) == {"mae": 4.5} and len(calls) == 2  # finished: skipped


def test_core_groups_split_evenly_and_refuse_impossible_jobs():
  assert experiments.core_groups({3, 1, 0, 2, 4}, 2) == [[0, 1, 2], [3, 4]]
  assert experiments.core_groups([5, 7], 1) == [[5, 7]]
  for jobs in (0, 3):
    with pytest.raises(ValueError, match="1 to 2 jobs"):
      experiments.core_groups([0, 1], jobs)


_PINNABLE = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


@pytest.mark.skipif(not _PINNABLE, reason="needs Linux and 2 cores")
def test_side_by_side_runs_are_pinned_to_their_cores(monkeypatch, tmp_path):
  """Every task runs once; the processes a run starts see only their worker's core; the caller stays unpinned."""
  before = os.sched_getaffinity(0)
  cores = sorted(before)[:2]
  seen = []

  def fake_run_one(config_arg, wd, seed, log_path=None, datasets=()):
    out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                         capture_output=True, text=True, check=True).stdout
    seen.append((os.path.basename(wd), tuple(json.loads(out)), log_path))
    time.sleep(0.3)  # both workers get tasks
    return {"mae": 5.0}

  monkeypatch.setattr(experiments, "run_one", fake_run_one)
  tasks = [(f"r{i}", "cfg", str(tmp_path / f"r{i}_seed0"), 0) for i in range(4)]
  assert experiments.run_side_by_side(tasks, [[cores[0]], [cores[1]]]) == []
  assert sorted(s[0] for s in seen) == [f"r{i}_seed0" for i in range(4)]
  assert {s[1] for s in seen} == {(cores[0],), (cores[1],)}
  assert all(s[2] == str(tmp_path / s[0] / "log.txt") for s in seen)
  assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(not _PINNABLE, reason="needs Linux and 2 cores")
def test_side_by_side_stops_starting_runs_after_a_failure(monkeypatch, tmp_path, capsys):
  started = []

  def fake_run_one(config_arg, wd, seed, log_path=None, datasets=()):
    started.append(os.path.basename(wd))
    if wd.endswith("bad_seed0"):
      raise subprocess.CalledProcessError(3, ["train.py"])
    time.sleep(0.5)
    return {"mae": 5.0}

  monkeypatch.setattr(experiments, "run_one", fake_run_one)
  tasks = [(n, "cfg", str(tmp_path / f"{n}_seed0"), 0) for n in ("bad", "ok", "later1", "later2")]
  failures = experiments.run_side_by_side(tasks, [[sorted(os.sched_getaffinity(0))[0]]] * 2)
  assert failures == [f"run bad (seed 0) failed with exit code 3; see {tmp_path / 'bad_seed0' / 'log.txt'}"]
  assert started[0] == "bad_seed0" and set(started) <= {"bad_seed0", "ok_seed0"}  # nothing starts after it
  with pytest.raises(SystemExit):
    experiments.main(["utkface_cpu", "--workdir", str(tmp_path), "--jobs", str(len(os.sched_getaffinity(0)) + 1)])
  assert "--jobs" in capsys.readouterr().err


def test_xla_cpu_defaults_respect_the_user():
  from agejax.cpu import xla_flags as xla_cpu
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  assert xla_cpu.apply_defaults(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=1", *xla_cpu.DEFAULT_FLAGS]
  assert not xla_cpu.apply_defaults(env)  # idempotent
  for several in ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, {"JAX_NUM_CPU_DEVICES": "2"}):
    assert not xla_cpu.apply_defaults(several) and xla_cpu.YNN_FLAG not in several.get("XLA_FLAGS", "")
  assert xla_cpu.host_devices({}) == 1 and xla_cpu.host_devices({"JAX_NUM_CPU_DEVICES": "x"}) == 1
  mine = {"XLA_FLAGS": f"{xla_cpu.YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
  assert not xla_cpu.apply_defaults(mine) and xla_cpu.YNN_FLAG + "=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" == mine["XLA_FLAGS"]
  off = {"AGEJAX_XLA_DEFAULTS": "0"}
  assert not xla_cpu.apply_defaults(off) and "XLA_FLAGS" not in off
  empty = {}
  assert xla_cpu.apply_defaults(empty) and empty["XLA_FLAGS"] == " ".join(xla_cpu.DEFAULT_FLAGS)


def test_xla_cpu_defaults_are_live_in_this_process():
  """conftest set the flag before JAX made its CPU client, as the command-line tools do."""
  import os
  from agejax.cpu import xla_flags as xla_cpu
  assert xla_cpu.YNN_FLAG in os.environ.get("XLA_FLAGS", "")


def test_importing_agejax_changes_no_global_state():
  import subprocess
  import sys
  code = """
import json, os, sys
before = dict(os.environ)
import jax
config_before = {k: getattr(jax.config, k) for k in ("jax_platforms", "jax_enable_x64", "jax_cpu_collectives_implementation")}
import agejax, agejax.ldl, agejax.losses, agejax.metrics, agejax.models, agejax.train_lib, agejax.export, agejax.pretrained, agejax.cpu
config_after = {k: getattr(jax.config, k) for k in config_before}
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"env": changed, "config": config_before == config_after, "backends": jax._src.xla_bridge._backends == {}}))
"""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  p = subprocess.run([sys.executable, "-c", code], cwd=experiments.ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  out = __import__("json").loads(p.stdout.strip().splitlines()[-1])
  assert out == {"env": [], "config": True, "backends": True}


def test_run_one_makes_a_missing_teacher_file_first(monkeypatch, tmp_path):
  calls = []

  def fake_run(cmd, cwd, check, stdout=None, stderr=None):
    calls.append(cmd[1:])
    if cmd[1] == "evaluate.py":
      os.makedirs(tmp_path / "r" / "eval")
      json.dump({"mae": 4.5}, open(tmp_path / "r" / "eval" / "test.json", "w"))

  monkeypatch.setattr(experiments.subprocess, "run", fake_run)
  teacher = str(tmp_path / "t.npz")
  arg = f"configs/utkface.py:tiny,distill --config.loss.teacher={teacher} --config.dataset.manual_dir=/m"
  experiments.run_one(arg, str(tmp_path / "r"), 0)
  assert calls[0] == ["-m", "agejax.distill", "--config", "configs/utkface.py:tiny,distill",
                      "--config.dataset.manual_dir=/m", "--out", teacher]
  assert [c[0] for c in calls[1:]] == ["train.py", "evaluate.py"]
  open(teacher, "w").close()
  calls.clear()
  os.remove(tmp_path / "r" / "eval" / "test.json")
  os.rmdir(tmp_path / "r" / "eval")
  experiments.run_one(arg, str(tmp_path / "r"), 0)
  assert [c[0] for c in calls] == ["train.py", "evaluate.py"]  # an existing teacher file is used as it is


def test_suite_entries_configure_what_their_names_say():
  """Variant order matters (`cpu` sets the model): each entry must train what its row claims."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("utk_cfg", os.path.join(experiments.ROOT, "configs", "utkface.py"))
  cfg_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_module)
  for name, (arg, _) in experiments.SUITES["utkface_cpu"].items():
    c = cfg_module.get_config(arg.split(" ")[0].split(":", 1)[1])
    assert (c.image_size, c.num_epochs) == (64, 16), name
    assert ("--config.image_size=80" in arg) == name.endswith("_80px"), name
    assert ("--config.num_epochs=24" in arg) == name.endswith("_hour"), name
    expected_model = "resnet18" if name.startswith("resnet18") or name in ("multitask", "multitask_msa") else "tiny"
    heads = name.startswith("multitask")
    assert (c.model.name, c.model.gender, c.model.race) == (expected_model, heads, heads), name
    assert (len(c.model.msa_stages) > 0 or "--config.model.msa_stages" in arg) == ("_msa" in name), name
    if not heads and expected_model == "tiny":
      assert c.loss.name == name.replace("coral2019_", "").replace("_full_aug", "").replace("_tuned", "").replace("_80px", "").replace("_prior", "").replace("_hour", ""), name
    else:
      assert c.loss.name == "dldl_v2", name
    assert (c.dataset.config == "coral2019") == name.startswith("coral2019"), name
    assert (c.augment.rotate > 0) == name.endswith("full_aug"), name
    assert (c.optimizer.schedule == "cosine" and c.augment.translate > 0) == ("_tuned" in name), name


def test_config_variant_order_does_not_matter():
  from configs import default
  for a, b in [("resnet18,cpu", "cpu,resnet18"), ("two_stage,cpu,dex", "cpu,dex,two_stage"),
               ("resnet18,smoke,multitask", "smoke,multitask,resnet18")]:
    assert default.get_config(a).to_dict() == default.get_config(b).to_dict(), (a, b)
  assert default.get_config("resnet18,cpu").model.name == "resnet18"
  assert default.get_config("two_stage,cpu").loss.stage1_epochs == 8


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
  from configs import default
  from agejax import train_lib
  c = default.get_config("cpu,tuned")
  c.num_epochs = 4
  c.optimizer.final_fraction = 0.1
  _, lr = train_lib.make_optimizer(c, steps_per_epoch=200)   # 800 steps, 300 of warmup
  assert float(lr(0)) == 0.0 and abs(float(lr(150)) - 5e-4) < 1e-9 and abs(float(lr(300)) - 1e-3) < 1e-9
  assert abs(float(lr(550)) - 1e-3 * (0.1 + 0.9 * 0.5)) < 1e-8       # half-way down the cosine
  assert abs(float(lr(800)) - 1e-4) < 1e-9
  steps = [float(lr(s)) for s in range(300, 801, 50)]
  assert all(a >= b for a, b in zip(steps, steps[1:]))
  c.optimizer.schedule = "linear"
  with pytest.raises(ValueError, match="cosine"):
    train_lib.make_optimizer(c, steps_per_epoch=200)


def _compare_torch():
  import importlib.util
  spec = importlib.util.spec_from_file_location("compare_torch", os.path.join(experiments.ROOT, "bench", "compare_torch.py"))
  ct = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ct)
  return ct


def test_compare_torch_parses_cases_beyond_its_default_list():
  assert _compare_torch().parse_cases("tiny:64:train,resnet34:64:train:16,thin:96:infer") == [
      ("tiny", 64, 64, "train"), ("resnet34", 64, 16, "train"), ("thin", 96, 32, "infer")]


def test_compare_torch_gpu_preset_runs_both_sides_in_bf16_with_torch_compile():
  """--gpu is the GPU table's set: batch 32 and 256 of the training cases plus the paper's 32-image forward."""
  ct = _compare_torch()
  a = ct.parse_args(["--torch_python", "py", "--gpu", "--torch_ref", "ref.py"])
  assert {(m, s) for m, s, _, mode in a.cases if mode == "train"} == {("tiny", 64), ("thin", 64), ("thin", 224), ("resnet34", 112)}
  assert {b for *_, b, mode in a.cases if mode == "train"} == {32, 256}
  assert ("thin", 224, 32, "infer") in a.cases and ("tiny", 224, 32, "infer") in a.cases
  jax_cmd, torch_cmd = ct.commands(("thin", 224, 256, "train"), a)
  assert jax_cmd[jax_cmd.index("--dtype") + 1] == "bfloat16" and jax_cmd[jax_cmd.index("--batch") + 1] == "256"
  assert torch_cmd[:2] == ["py", "ref.py"] and "--bf16" in torch_cmd and "--compile" in torch_cmd
  cpu = ct.parse_args(["--torch_python", "py", "--quick"])
  jax_cmd, torch_cmd = ct.commands(cpu.cases[0], cpu)
  assert cpu.dtype == "float32" and all(c[1] == 64 for c in cpu.cases)
  assert "--bf16" not in torch_cmd and "--compile" not in torch_cmd and "--device" not in torch_cmd


def test_seed_start_adds_seeds_to_an_entry(monkeypatch, tmp_path):
  """`--seeds 2 --seed_start 1` runs seeds 1 and 2 of the chosen entry only; the table then counts all three."""
  _fake_run(tmp_path, "dldl_v2", 0, 5.0)
  ran = []

  def fake_run_one(config_arg, wd, seed, log_path=None, datasets=()):
    ran.append((os.path.basename(wd), seed, config_arg.split(" ")[-1]))
    _fake_run(tmp_path, "dldl_v2", seed, 5.0 + seed / 10)
    return {"mae": 5.0}

  monkeypatch.setattr(experiments, "run_one", fake_run_one)
  args = ["utkface_cpu", "--workdir", str(tmp_path), "--only", "dldl_v2", "--seeds", "2", "--seed_start", "1"]
  assert experiments.main(args) == 0
  assert [(n, s) for n, s, _ in ran] == [("dldl_v2_seed1", 1), ("dldl_v2_seed2", 2)]
  assert "| DLDL-v2 (KL + L1 on the expectation) | 3 | 5.10 ± 0.10 |" in (tmp_path / "results.md").read_text()


def test_bench_predict_mode_counts_the_faces_detection_finds():
  """Whole photos (one astronaut each, shifted, mirrored, brightened): the count is what the
  detector found in them, so a detector that misses or doubles faces changes it."""
  pytest.importorskip("skimage")
  pytest.importorskip("dlib")
  from agejax import bench
  r = bench.predict_rate(None, aligned=False, count=4, detector="hog")
  assert (r["photos"], r["faces"], r["aligned"], r["detector"]) == (4, 4, False, "hog")
  assert r["faces_per_s"] == pytest.approx(r["photos_per_s"], rel=0.02)


def test_bench_predict_on_scans_counts_the_placed_faces_it_finds(tmp_path):
  """Album scans of UTKFace test chips (here the astronaut's chip twice and a blank one): the faces
  placed, those the pipeline found at their places, and recall = found / placed."""
  pytest.importorskip("skimage")
  pytest.importorskip("dlib")
  import io
  import tarfile

  from PIL import Image
  from skimage import data

  import numpy as np

  from agejax import bench, faces
  chip = faces.FaceAligner()(data.astronaut())[0].chip
  names = [f"{30 + i}_1_0_2017010{i}.jpg.chip.jpg" for i in range(3)]
  blank = np.full_like(chip, 128)  # the second chip holds no face: the faces pasted from it are not found
  with tarfile.open(tmp_path / "UTKFace.tar.gz", "w:gz") as tar:
    for i, name in enumerate(names):
      buf = io.BytesIO()
      Image.fromarray(blank if i == 1 else chip[:, ::-1] if i else chip).save(buf, format="JPEG", quality=95)
      info = tarfile.TarInfo(f"UTKFace/{name}")
      info.size = len(buf.getvalue())
      tar.addfile(info, io.BytesIO(buf.getvalue()))
  (tmp_path / "labels.csv").write_text("filename,split\n" + "".join(f"{n},test\n" for n in names))
  r = bench.predict_rate(None, aligned=False, count=3, photo_set="scans", utkface=str(tmp_path / "UTKFace.tar.gz"))
  placed = sum(len(p.faces) for p in bench.scan_photos(str(tmp_path / "UTKFace.tar.gz"), 3))
  blanks = sum(1 for j in range(placed) if j % 3 == 1)  # hard_photos pastes the chips in turn
  assert r["photos_set"] == "scans" and r["photos"] == 3 and r["faces_placed"] == placed >= 3 and blanks >= 1
  assert r["faces_found"] == r["faces"] == placed - blanks and r["recall"] == round((placed - blanks) / placed, 3)


def test_face_suite_entries_configure_what_their_names_say():
  import importlib.util
  spec = importlib.util.spec_from_file_location("utk_cfg2", os.path.join(experiments.ROOT, "configs", "utkface.py"))
  cfg_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_module)
  for name, (arg, _) in experiments.SUITES["utkface_face"].items():
    config_arg, *overrides = arg.split(" ")
    c = cfg_module.get_config(config_arg.split(":", 1)[1])
    assert (c.dataset.config == "coral2019") == name.startswith("coral2019_"), name
    name = name.removeprefix("coral2019_")
    assert c.model.name == "face_resnet" and c.image_size == 150, name
    assert (c.model.pretrained == "") == name.endswith("_scratch"), name
    assert (c.model.norm == "batch") == (name.endswith("_scratch") or name.endswith("_bn")), name
    assert (c.model.gender and c.model.race) == (name.startswith("mtmsa") or name == "multitask"), name
    assert any("msa_stages" in o for o in overrides) == (name.startswith("mtmsa") and name != "mtmsa_no_msa"), name
    assert any("trunk_lr_factor=0.03" in o for o in overrides) == ("_trunk003" in name), name
    expected_loss = "gaussian_nll" if name.startswith(("mtmsa", "gaussian")) else "dex" if name == "dex" else "dldl_v2"
    assert c.loss.name == expected_loss, name


@pytest.mark.parametrize("tool,flag", [("train.py", "--workdir"), ("evaluate.py", "--dataset"),
                                       ("predict.py", "--runtime")])
def test_the_wrappers_help_lists_their_tools_flags(tool, flag):
  p = subprocess.run([sys.executable, tool, "--help"], cwd=experiments.ROOT, capture_output=True, text=True,
                     timeout=120)
  out = p.stdout + p.stderr  # absl's --help exits with 1
  assert "Traceback" not in out and flag in out and (tool == "predict.py" or "--config" in out)


def test_agejax_command_names_its_subcommands_and_refuses_others():
  from agejax import __main__ as command
  assert command.main([]) == 2 and command.main(["--help"]) == 0
  assert command.main(["nope"]) == 2
  assert set(command.COMMANDS) >= {"train", "evaluate", "predict", "export", "build", "demo", "bench"}


def test_ensemble_compares_each_model_with_the_mean_of_their_ages(tmp_path, capsys):
  from agejax import ensemble
  header = "file,true_age,predicted_age,predicted_std\n"
  (tmp_path / "a.csv").write_text(header + "x.jpg,10,12,1\ny.jpg,20,18,1\nz.jpg,30,30,1\n")
  (tmp_path / "b.csv").write_text(header + "x.jpg,10,8,1\ny.jpg,20,22,1\nz.jpg,30,33,1\n")
  assert ensemble.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r["faces"] == 3 and r["mae"] == [pytest.approx(4 / 3, abs=1e-4), pytest.approx(7 / 3, abs=1e-4)]
  assert r["mae_of_mean"] == pytest.approx((0 + 0 + 1.5) / 3, abs=1e-4)  # opposite errors cancel
  assert r["mae_mean_of_models"] == pytest.approx(11 / 6, abs=1e-4)
  assert r["error_correlation"][0][1] == pytest.approx(-0.756, abs=1e-3)  # errors (2, -2, 0) and (-2, 2, 3)
  (tmp_path / "c.csv").write_text(header + "y.jpg,20,18,1\nx.jpg,10,12,1\nz.jpg,30,30,1\n")
  assert ensemble.main([str(tmp_path / "a.csv"), str(tmp_path / "c.csv")]) == 1
  assert "other faces (or another order)" in capsys.readouterr().err
  (tmp_path / "d.csv").write_text(header + "x.jpg,11,12,1\ny.jpg,20,18,1\nz.jpg,30,30,1\n")  # another true age
  assert ensemble.main([str(tmp_path / "a.csv"), str(tmp_path / "d.csv")]) == 1
  capsys.readouterr()
  (tmp_path / "e.csv").write_text(header + "x.jpg,10,11,1\ny.jpg,20,21,1\nz.jpg,30,31,1\n")  # errors all +1
  assert ensemble.main([str(tmp_path / "a.csv"), str(tmp_path / "e.csv")]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["error_correlation"][0][1] is None and "Warning" not in captured.err


def test_bench_refuses_flags_of_another_mode(capsys):
  from agejax import bench
  for argv in (["--mode", "predict", "--photos", "scans", "--aligned"], ["--mode", "predict", "--cnn_runtime", "dlib"],
               ["--mode", "detect", "--photos", "astronaut"]):
    with pytest.raises(SystemExit):
      bench.main(argv)
  err = capsys.readouterr().err
  assert "drop --aligned" in err and "--cnn_runtime is detect mode's" in err and "predict mode's" in err


def _compare_peer():
  import importlib.util
  spec = importlib.util.spec_from_file_location("compare_peer", os.path.join(experiments.ROOT, "bench", "compare_peer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_compare_peer_reads_a_commands_faces_and_scores_them(tmp_path):
  """Each command's JSON lines become faces per file; a face counts once, other boxes are false."""
  import json
  cp = _compare_peer()
  a, b, c = str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "c.jpg")
  lines = [{"file": a, "faces": [{"box": [10, 10, 70, 70], "age": 30.0}]},
           {"file": b, "faces": [{"box": [500, 500, 560, 560], "age": 70.0}, {"box": [210, 10, 270, 70], "age": 50.0},
                                 {"box": [215, 15, 265, 65]}]},
           {"file": c, "faces": [{"box": [10, 10, 70, 70]}]}]
  code = "import json\n" + "\n".join(f"print(json.dumps(json.loads({json.dumps(x)!r})))" for x in lines) + "\nprint('noise')"
  seconds, found, ages = cp.run_command([sys.executable, "-c", code])
  assert found == {os.path.realpath(a): [(10, 10, 70, 70)],
                   os.path.realpath(b): [(500, 500, 560, 560), (210, 10, 270, 70), (215, 15, 265, 65)],
                   os.path.realpath(c): [(10, 10, 70, 70)]}
  assert ages == {os.path.realpath(a): [30.0], os.path.realpath(b): [70.0, 50.0, None], os.path.realpath(c): [None]}
  del found[os.path.realpath(c)], ages[os.path.realpath(c)]
  truth = {os.path.realpath(a): [(0, 0, 100, 100)], os.path.realpath(b): [(200, 0, 300, 100), (600, 0, 700, 100)]}
  r = cp.score("peer", 2.0, found, truth, 2)
  # a: found; b: the first face found once (the second box on it is false), the second face missed
  assert (r["faces_placed"], r["faces_found"], r["false_detections"], r["recall"]) == (3, 2, 2, 0.667)
  assert r["photos_per_s"] == 1.0 and r["faces"] == 4 and "age_mae" not in r
  true_ages = {a: [26], b: [56, 8]}  # keyed as given: the scores' keys are real paths
  r = cp.score("peer", 2.0, found, truth, 2, ages, true_ages)
  # the ages of the faces found, by the box that found each (not the false ones' 70): 30 - 26, 50 - 56
  assert (r["aged_faces"], r["age_mae"], r["age_bias"]) == (2, 5.0, -1.0)
  ages[os.path.realpath(a)] = [None]  # a face found without an age is left out
  r = cp.score("peer", 2.0, found, truth, 2, ages, true_ages)
  assert (r["aged_faces"], r["age_mae"], r["age_bias"]) == (1, 6.0, -6.0)
  with pytest.raises(SystemExit, match="failed"):
    cp.run_command([sys.executable, "-c", "raise SystemExit(3)"])


def test_cross_dataset_entries_train_their_recipe_on_the_data_their_names_say():
  import importlib.util
  modules = {}
  for dataset in ("utkface", "aaf"):
    spec = importlib.util.spec_from_file_location(f"{dataset}_cfg3", os.path.join(experiments.ROOT, "configs",
                                                                                  f"{dataset}.py"))
    modules[dataset] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[dataset])
  suite = experiments.SUITES["cross_dataset"]
  assert {"utkface_dldl", "aaf_dldl", "mixture_dldl", "utkface", "aaf", "mixture", "mixture_degrade"} <= set(suite)
  for name, (arg, _) in suite.items():
    config_file, *overrides = arg.split(" ")
    path, variants = config_file.split(":", 1)
    c = modules[os.path.basename(path).removesuffix(".py")].get_config(variants)
    source = "aaf" if name.startswith("aaf") else "utkface"
    assert c.dataset.name == source, name
    assert any(o == "--config.dataset.mixture=utkface:0.75,aaf:0.25" for o in overrides) == name.startswith("mixture")
    assert c.loss.name == ("dldl_v2" if name.endswith("_dldl") else "gaussian_nll"), name
    assert c.model.name == "face_resnet" and c.model.gender and c.model.race, name
    assert "--config.model.msa_stages=(3,4)" in overrides and "--config.optimizer.trunk_lr_factor=0.03" in overrides
    assert (c.augment.blur > 0) == name.endswith("_degrade"), name
