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
  s = {"mae": mae, "cs": {"5": 0.6}, "clean": {"mae": mae - 0.1}}
  if gender is not None:
    s["gender_accuracy"] = gender
  json.dump(s, open(os.path.join(d, "test.json"), "w"))


def test_experiment_table_aggregates_seeds(tmp_path):
  _fake_run(tmp_path, "dldl_v2", 0, 5.0)
  _fake_run(tmp_path, "dldl_v2", 1, 5.2)
  _fake_run(tmp_path, "multitask", 0, 6.0, gender=0.9)
  table, rows = experiments.build_table("utkface_cpu", str(tmp_path))
  assert [r["name"] for r in rows] == ["dldl_v2", "multitask"]
  assert "| DLDL-v2 (KL + L1 on the expectation) | 2 | 5.10 ± 0.14 | 0.600 ± 0.000 | 5.00 ± 0.14 |" in table
  assert "| 0.900 |" in table
  assert experiments.main(["utkface_cpu", "--workdir", str(tmp_path), "--table_only"]) == 0
  assert os.path.exists(tmp_path / "results.md")
