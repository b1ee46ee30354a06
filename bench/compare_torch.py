"""agejax vs the PyTorch reference, side by side in one run, same machine, same threads.

    python bench/compare_torch.py --torch_python /path/to/venv-with-torch/bin/python [--quick]
    python3 bench/compare_torch.py --torch_python python3 --gpu    # on a GPU: bf16, torch.compile

`--gpu` is the GPU table: batch 32 and 256 of the CPU table's training cases, plus
the 32-image forward at 224 px that DLDL-v2 reports (51.05 ms Thin, 24.26 ms Tiny, on an
M40), with bf16 on both sides (agejax `--dtype bfloat16`; PyTorch autocast, channels_last,
torch.compile). `bench/gpu_table.sh` runs it on a GPU machine.

For each case it runs `python -m agejax.bench` and `../shared/bench/torch_reference.py`
one after the other (never concurrently), `--rounds` times with the order alternating
(a shared VM drifts by 10-30% between minutes, so one pair can mislead), and prints one
JSON line per case: the median rates, the median of the per-round ratios jax/torch and
their range; then a markdown table. Both sides run with glibc's huge-page malloc tunable,
which agejax sets for itself (agejax/cpu/hugepages.py: +13-17% for either framework on this VM);
`--torch_default_malloc` leaves PyTorch's environment as it is. `--baseline DIR` adds a third
column, agejax's benchmark run from another checkout (DIR, e.g. a `git worktree` of an earlier
commit) in the same rounds: a change's effect on speed, measured side by side.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from agejax.cpu import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(ROOT, "..", "shared", "bench", "torch_reference.py")

CASES = [  # (model, size, batch, mode)
    ("tiny", 64, 64, "train"), ("tiny", 64, 64, "infer"),
    ("thin", 64, 32, "train"), ("thin", 224, 16, "train"), ("thin", 224, 32, "infer"),
    ("resnet34", 112, 32, "train"),
]
GPU_CASES = [(m, s, b, "train") for m, s in (("tiny", 64), ("thin", 64), ("thin", 224), ("resnet34", 112))
             for b in (32, 256)] + [("tiny", 224, 32, "infer"), ("thin", 224, 32, "infer")]


def parse_cases(only: str) -> list[tuple[str, int, int, str]]:
  cases = []
  for token in only.split(","):
    model, size, mode, *batch = token.split(":")
    default = next((c[2] for c in CASES if (c[0], c[1], c[3]) == (model, int(size), mode)), 32)
    cases.append((model, int(size), int(batch[0]) if batch else default, mode))
  return cases


def commands(case, a) -> tuple[list[str], list[str]]:
  """The agejax and PyTorch command lines for one (model, size, batch, mode) case."""
  model, size, batch, mode = case
  common = ["--model", model, "--size", str(size), "--batch", str(batch), "--mode", mode,
            "--steps", str(a.steps), "--repeats", str(a.repeats)]
  jax_cmd = [sys.executable, "-m", "agejax.bench", "--dtype", a.dtype] + common
  torch_cmd = [a.torch_python, a.torch_ref, "--threads", str(a.threads)] + common
  if a.device:
    torch_cmd += ["--device", a.device]
  if a.dtype == "bfloat16":
    torch_cmd.append("--bf16")
  if a.torch_compile:
    torch_cmd.append("--compile")
  return jax_cmd, torch_cmd


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--torch_python", required=True)
  ap.add_argument("--torch_ref", default=TORCH_REF, help="path of torch_reference.py")
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=3, help="jax/torch pairs per case, order alternating")
  ap.add_argument("--quick", action="store_true", help="only the 64-pixel cases")
  ap.add_argument("--only", default="",
                  help="comma-separated model:size:mode[:batch] cases, e.g. tiny:64:train or resnet34:64:train:32 "
                       "(any case, not only the default list; batch defaults to the list's or 32)")
  ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                  help="compute dtype of both (PyTorch: autocast); default float32, bfloat16 with --gpu")
  ap.add_argument("--device", default=None, help="PyTorch's device (default: its own, cuda when it sees one)")
  ap.add_argument("--torch_compile", action="store_true", help="torch.compile PyTorch's step (on with --gpu)")
  ap.add_argument("--torch_default_malloc", action="store_true",
                  help="run PyTorch without the huge-page malloc tunable agejax sets for itself (agejax/cpu/hugepages.py)")
  ap.add_argument("--baseline", default=None, help="another agejax checkout whose benchmark runs in the same rounds")
  ap.add_argument("--gpu", action="store_true", help="the GPU table: GPU_CASES, bfloat16, torch.compile")
  a = ap.parse_args(argv)
  a.dtype = a.dtype or ("bfloat16" if a.gpu else "float32")
  a.torch_compile = a.torch_compile or a.gpu
  if a.only:
    a.cases = parse_cases(a.only)
  else:
    a.cases = GPU_CASES if a.gpu else [c for c in CASES if not a.quick or c[1] == 64]
  return a


def _json_line(cmd, env=None, cwd=ROOT):
  if cwd != ROOT:  # another checkout: its agejax, not this one's
    env = {**(env or os.environ), "PYTHONPATH": cwd}
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=True, env=env).stdout
  return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def main(argv=None):
  a = parse_args(argv)
  # agejax.bench re-executes itself with glibc's huge-page tunable (agejax/cpu/hugepages.py); PyTorch gets the same
  # environment unless asked not to, so that the ratio compares the frameworks, not their malloc settings
  torch_env = None if a.torch_default_malloc or not hugepages.wanted() else hugepages.with_tunable()
  torch_malloc = "hugetlb" if hugepages.active(torch_env or os.environ) else "default"  # what it really gets
  rows = []
  for case in a.cases:
    model, size, batch, mode = case
    jax_cmd, torch_cmd = commands(case, a)
    run_torch = lambda: _json_line(torch_cmd, torch_env)
    run_baseline = lambda: _json_line(jax_cmd, cwd=os.path.abspath(a.baseline)) if a.baseline else None
    jr, tr, br = [], [], []
    for r in range(a.rounds):
      if r % 2 == 0:
        j, t, b = _json_line(jax_cmd), run_torch(), run_baseline()
      else:
        b, t, j = run_baseline(), run_torch(), _json_line(jax_cmd)
      jr.append(j["images_per_s"])
      tr.append(t["images_per_s"])
      if b:
        br.append(b["images_per_s"])
    ratios = [x / y for x, y in zip(jr, tr)]
    row = {"model": model, "size": size, "batch": batch, "mode": mode,
           "jax_images_per_s": round(statistics.median(jr), 2), "torch_images_per_s": round(statistics.median(tr), 2),
           "ratio_jax_over_torch": round(statistics.median(ratios), 3),
           "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3), "rounds": a.rounds,
           "jax_ms_per_batch": round(1000 * batch / statistics.median(jr), 2),
           "torch_ms_per_batch": round(1000 * batch / statistics.median(tr), 2),
           "gflops_per_image": j["gflops_per_image"], "params": j["params"], "jax": j["version"], "torch": t["version"],
           "dtype": a.dtype, "torch_compile": a.torch_compile, "jax_malloc": j.get("malloc"), "torch_malloc": torch_malloc,
           "device": j["device"], "threads": a.threads}
    if br:
      row.update({"baseline": a.baseline, "baseline_images_per_s": round(statistics.median(br), 2),
                  "ratio_jax_over_baseline": round(statistics.median([x / y for x, y in zip(jr, br)]), 3),
                  "baseline_ratio_range": [round(min(x / y for x, y in zip(jr, br)), 3),
                                           round(max(x / y for x, y in zip(jr, br)), 3)]})
    rows.append(row)
    print(json.dumps(row), flush=True)
  print("\n| model | input | batch | mode | agejax img/s | PyTorch img/s | agejax ms/batch | PyTorch ms/batch "
        "| ratio (median) | ratio range |\n|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['mode']} | {r['jax_images_per_s']} | "
          f"{r['torch_images_per_s']} | {r['jax_ms_per_batch']} | {r['torch_ms_per_batch']} | "
          f"{r['ratio_jax_over_torch']} | {r['ratio_min']}-{r['ratio_max']} |")
  if any("baseline" in r for r in rows):
    print("\n| model | input | batch | agejax img/s | baseline img/s | agejax / baseline (median) | range |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
      lo, hi = r["baseline_ratio_range"]
      print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['jax_images_per_s']} | {r['baseline_images_per_s']} | "
            f"{r['ratio_jax_over_baseline']} | {lo}-{hi} |")


if __name__ == "__main__":
  main()
