import pytest
import json
import os

from agejax import bench, experiments


def test_bench_reports_params_flops_and_rate():
  r = bench.run("tiny", 32, 4, "train", steps=1, repeats=1, dtype="float32")
  assert r["params"] == 934_869 and r["images_per_s"] > 0
  assert r["gflops_per_image"] and r["gflops_per_image"] > 0.01
  i = bench.run("tiny", 32, 4, "infer", steps=1, repeats=1, dtype="float32")
  assert 0 < i["gflops_per_image"] < r["gflops_per_image"]  # inference is cheaper than a train step


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
  table, rows = experiments.build_table("utkface_cpu", str(tmp_path))
  assert [r["name"] for r in rows] == ["dldl_v2", "multitask"]
  assert "| DLDL-v2 (KL + L1 on the expectation) | 2 | 5.10 ± 0.14 | 0.600 ± 0.000 | 5.00 ± 0.14 |" in table
  assert "| 0.900 |" in table
  assert experiments._val_curve(str(tmp_path / "dldl_v2_seed1")) == ([1.0, 2.0], [7.2, 6.2])
  assert experiments.main(["utkface_cpu", "--workdir", str(tmp_path), "--table_only"]) == 0
  md = (tmp_path / "results.md").read_text()
  for fig in ("results_mae.png", "results_cs.png", "results_val_mae.png"):
    assert (tmp_path / fig).stat().st_size > 5000 and f"]({fig})" in md
  assert json.loads((tmp_path / "results.json").read_text())[0]["cs_curves"][1] == {"0": 0.0, "5": 0.6, "10": 0.9}


def test_xla_cpu_defaults_respect_the_user():
  from agejax import xla_cpu
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_cpu.apply_defaults(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", *xla_cpu.DEFAULT_FLAGS]
  assert not xla_cpu.apply_defaults(env)  # idempotent
  mine = {"XLA_FLAGS": f"{xla_cpu.YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
  assert not xla_cpu.apply_defaults(mine) and xla_cpu.YNN_FLAG + "=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" == mine["XLA_FLAGS"]
  off = {"AGEJAX_XLA_DEFAULTS": "0"}
  assert not xla_cpu.apply_defaults(off) and "XLA_FLAGS" not in off
  empty = {}
  assert xla_cpu.apply_defaults(empty) and empty["XLA_FLAGS"] == " ".join(xla_cpu.DEFAULT_FLAGS)


def test_xla_cpu_defaults_are_live_in_this_process():
  """agejax's import set the flag before JAX made its CPU client (tests import agejax first)."""
  import os
  from agejax import xla_cpu
  assert xla_cpu.YNN_FLAG in os.environ.get("XLA_FLAGS", "")


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
    expected_model = "resnet18" if name.startswith("resnet18") or name in ("multitask", "multitask_msa") else "tiny"
    heads = name.startswith("multitask")
    assert (c.model.name, c.model.gender, c.model.race) == (expected_model, heads, heads), name
    assert (len(c.model.msa_stages) > 0 or "--config.model.msa_stages" in arg) == ("_msa" in name), name
    if not heads and expected_model == "tiny":
      assert c.loss.name == name.replace("coral2019_", "").replace("_full_aug", "").replace("_tuned", "").replace("_80px", ""), name
    else:
      assert c.loss.name == "dldl_v2", name
    assert (c.dataset.config == "coral2019") == name.startswith("coral2019"), name
    assert (c.augment.rotate > 0) == name.endswith("full_aug"), name
    assert (c.optimizer.schedule == "cosine" and c.augment.translate > 0) == name.endswith("_tuned"), name


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


def test_compare_torch_parses_cases_beyond_its_default_list():
  import importlib.util
  spec = importlib.util.spec_from_file_location("compare_torch", os.path.join(experiments.ROOT, "bench", "compare_torch.py"))
  ct = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ct)
  assert ct.parse_cases("tiny:64:train,resnet34:64:train:16,thin:96:infer") == [
      ("tiny", 64, 64, "train"), ("resnet34", 64, 16, "train"), ("thin", 96, 32, "infer")]
