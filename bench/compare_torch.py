"""agejax vs the PyTorch reference, side by side in one run, same machine, same threads.

    python bench/compare_torch.py --torch_python /path/to/venv-with-torch/bin/python [--quick]

For each case it runs `python -m agejax.bench` and `../shared/bench/torch_reference.py`
one after the other (never concurrently) and prints one JSON line per case with
both rates and the ratio jax/torch, then a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(ROOT, "..", "shared", "bench", "torch_reference.py")

CASES = [  # (model, size, batch, mode)
    ("tiny", 64, 64, "train"), ("tiny", 64, 64, "infer"),
    ("thin", 64, 32, "train"), ("thin", 224, 16, "train"), ("thin", 224, 32, "infer"),
    ("resnet34", 112, 32, "train"),
]


def _json_line(cmd, env=None):
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout
  return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--torch_python", required=True)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="only the 64-pixel cases")
  a = ap.parse_args()
  cases = [c for c in CASES if not a.quick or c[1] == 64]
  rows = []
  for model, size, batch, mode in cases:
    common = ["--model", model, "--size", str(size), "--batch", str(batch), "--mode", mode,
              "--steps", str(a.steps), "--repeats", str(a.repeats)]
    j = _json_line([sys.executable, "-m", "agejax.bench"] + common)
    t = _json_line([a.torch_python, TORCH_REF, "--threads", str(a.threads)] + common)
    row = {"model": model, "size": size, "batch": batch, "mode": mode, "jax_images_per_s": j["images_per_s"],
           "torch_images_per_s": t["images_per_s"], "ratio_jax_over_torch": round(j["images_per_s"] / t["images_per_s"], 3),
           "gflops_per_image": j["gflops_per_image"], "params": j["params"], "jax": j["version"], "torch": t["version"],
           "threads": a.threads}
    rows.append(row)
    print(json.dumps(row), flush=True)
  print("\n| model | input | batch | mode | agejax img/s | PyTorch img/s | ratio |\n|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['mode']} | {r['jax_images_per_s']} | "
          f"{r['torch_images_per_s']} | {r['ratio_jax_over_torch']} |")


if __name__ == "__main__":
  main()
