"""Experiment suites: several train + evaluate runs under one protocol, and their results table.

    python -m agejax.experiments utkface_cpu --workdir runs/utk_cpu            # every run of the suite
    python -m agejax.experiments utkface_cpu --workdir runs/utk_cpu --only dldl_v2 --seeds 1
    python -m agejax.experiments utkface_cpu --workdir runs/utk_cpu --table_only
    python -m agejax.experiments utkface_cpu --workdir runs/utk_cpu --only dldl_v2 --seeds 2 --seed_start 1
    python -m agejax.experiments utkface_cpu --workdir runs/utk_cpu --jobs 2   # 2 runs side by side

Each run is `train.py` then `evaluate.py --split test` in its own sub-folder, so
an interrupted suite resumes where it stopped (finished runs are skipped,
half-finished ones resume from their checkpoint). The table (results.md and
results.json in --workdir, with figures results_*.png) is rebuilt from the runs' eval/*.json files, so
every figure in it was produced by a command.

utkface_cpu: TinyAgeNet at 64x64 on 2 CPU cores (the `cpu` schedule: 16 epochs,
about 45 min a run), horizontal flips as the only augmentation (the `dldl_v2_full_aug`
entry has DLDL-v2's), flip-averaged test predictions. Rows: the loss
family on the duplicate-safe split; multi-task (age + gender + race) with and
without MSA against age alone on the same TinyAgeNet trunk; the same three on a
ResNet-18 trunk (longer than an hour a run on 2 cores); the hour's budget spent on
80 px (`dldl_v2_80px`) or on 24 epochs (`dldl_v2_hour`, `dldl_v2_tuned_hour`, `multitask_tiny_hour`,
`multitask_tiny_tuned_hour`: test MAE 4.80; age alone 4.89 ± 0.04 over three seeds, docs/RESULTS.md); DLDL-v2 on the CORAL 2019 split;
TinyAgeNet learning a face model's distributions (`distill`; the teacher file is made first, by the
bundled model where it is missing: docs/RESULTS.md's run used the UTKFace-only face model).

cross_dataset: the bundled model's recipe (DLDL-v2's loss on MTMSA's design: `*_dldl`) trained on
UTKFace, on All-Age-Faces (`configs/aaf.py`) and on both mixed (`--config.dataset.mixture`); the
same with the Gaussian NLL (the recipe before), and on both with the photo degradations; each run is
scored on both test splits, and results.md gets the trained-on x tested-on table.

--jobs N splits this process's cores into N groups and trains N runs at once,
each pinned to its group, with its output in <run>/log.txt: for hosts with more
cores than one small run uses well. On a 2-core CPU it gains nothing (two
1-core TinyAgeNet runs trained 66 + 62 images/s against 128 for one run on both
cores; docs/RESULTS.md); it only runs two entries unattended side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's augmentation: flips only. At 64 px and a 16-epoch budget DLDL-v2's full augmentation
# underfits (docs/RESULTS.md: test MAE 6.11 at 10 epochs against 5.04 flip-only at 12).
_AUG = "flip_only"
# The hour's budget on 2 cores: 24 epochs instead of 16, the step schedule's decay still at 3/4.
_HOUR = "--config.num_epochs=24 --config.optimizer.decay_epochs=(18,)"

# A face model's distributions of the training split (made by `agejax.distill` with the bundled model
# when missing; docs/RESULTS.md's run used the UTKFace-only model: `--teacher` its export).
_TEACHER = "runs/teacher/utkface_face_resnet.npz"

# MTMSA's design on the face trunk (MSA after levels 3 and 4, gender and race heads, the Gaussian loss)
# with the trunk at 0.03x the heads' rate (`mtmsa_trunk003`): the bundled recipe before DLDL-v2's loss.
_MTMSA_003 = ("gaussian_nll,multitask --config.model.msa_stages=(3,4) "
              "--config.optimizer.trunk_lr_factor=0.03")

# The same with DLDL-v2's loss (KL to a Gaussian label + the L1 of the expectation) in place of the
# Gaussian NLL: the bundled model's recipe since 2026-12-06 (docs/RESULTS.md).
_BUNDLED = ("dldl_v2,multitask --config.model.msa_stages=(3,4) "
            "--config.optimizer.trunk_lr_factor=0.03")

# The mixture the cross-dataset suite trains on (and the bundled model's data).
_MIXTURE = "utkface:0.75,aaf:0.25"


def _trained_on_each(recipe: str, suffix: str, note: str) -> dict:
  """A face-trunk recipe trained on UTKFace, on All-Age-Faces and on the mixture: the
  cross-dataset suite's rows ("utkface<suffix>", "aaf<suffix>", "mixture<suffix>")."""
  return {f"utkface{suffix}": (f"configs/utkface.py:face_resnet,{recipe}", f"trained on UTKFace, {note}"),
          f"aaf{suffix}": (f"configs/aaf.py:face_resnet,{recipe}", f"trained on All-Age-Faces, {note}"),
          f"mixture{suffix}": (f"configs/utkface.py:face_resnet,{recipe} --config.dataset.mixture={_MIXTURE}",
                               f"trained on both (UTKFace 0.75, AAF 0.25), {note}")}


# name -> (config argument, description)
SUITES = {
    "utkface_cpu": {
        "dldl_v2": (f"configs/utkface.py:tiny,cpu,dldl_v2,{_AUG}", "DLDL-v2 (KL + L1 on the expectation)"),
        "dldl_v2_full_aug": ("configs/utkface.py:tiny,cpu,dldl_v2", "DLDL-v2, DLDL-v2's full augmentation"),
        "dldl_v2_tuned": ("configs/utkface.py:tiny,cpu,dldl_v2,tuned",
                          "DLDL-v2, agejax's recipe (cosine, AdamW, flips + shifts)"),
        "dldl_v2_80px": (f"configs/utkface.py:tiny,cpu,dldl_v2,{_AUG} --config.image_size=80",
                         "DLDL-v2 at 80x80 (1.56x the FLOPs: the hour's budget)"),
        "dldl_v2_hour": (f"configs/utkface.py:tiny,cpu,dldl_v2,{_AUG} {_HOUR}",
                         "DLDL-v2, 24 epochs (the hour's budget on 2 cores)"),
        "dldl_v2_tuned_hour": ("configs/utkface.py:tiny,cpu,dldl_v2,tuned --config.num_epochs=24",
                               "DLDL-v2, `tuned` recipe, 24 epochs: age alone, the hour's multi-task run's recipe"),
        "dldl": (f"configs/utkface.py:tiny,cpu,dldl,{_AUG}", "DLDL (KL only)"),
        "dex": (f"configs/utkface.py:tiny,cpu,dex,{_AUG}", "DEX (cross-entropy, expectation)"),
        "mean_variance": (f"configs/utkface.py:tiny,cpu,mean_variance,{_AUG}", "Mean-variance"),
        "coral": (f"configs/utkface.py:tiny,cpu,coral,{_AUG}", "CORAL"),
        "coral_prior": (f"configs/utkface.py:tiny,cpu,coral,{_AUG} --config.model.age_bias_init=prior",
                        "CORAL, biases initialised at the training labels' logit P(y > l_k)"),
        "l1": (f"configs/utkface.py:tiny,cpu,l1,{_AUG}", "L1 regression"),
        "gaussian_nll": (f"configs/utkface.py:tiny,cpu,gaussian_nll,{_AUG}", "Gaussian NLL (MTMSA's Dirac-Gaussian KL)"),
        "multitask_tiny": (f"configs/utkface.py:tiny,cpu,dldl_v2,multitask,{_AUG}",
                           "DLDL-v2, age + gender + race heads (same TinyAgeNet trunk)"),
        "multitask_tiny_hour": (f"configs/utkface.py:tiny,cpu,dldl_v2,multitask,{_AUG} {_HOUR}",
                                "DLDL-v2, age + gender + race, 24 epochs (the hour's budget on 2 cores)"),
        "multitask_tiny_tuned_hour": ("configs/utkface.py:tiny,cpu,dldl_v2,multitask,tuned --config.num_epochs=24",
                                      "DLDL-v2, age + gender + race, `tuned` recipe (cosine, AdamW, flips + shifts), 24 epochs"),
        "multitask_msa_tiny": (f"configs/utkface.py:tiny,cpu,dldl_v2,multitask,{_AUG} --config.model.msa_stages=(4,5)",
                               "DLDL-v2, age + gender + race, MSA after TinyAgeNet blocks 4 and 5"),
        "resnet18_age": (f"configs/utkface.py:resnet18,cpu,dldl_v2,{_AUG}", "ResNet-18, age alone"),
        "multitask": (f"configs/utkface.py:resnet18,cpu,multitask,{_AUG}", "ResNet-18, age + gender + race"),
        "multitask_msa": (f"configs/utkface.py:resnet18,cpu,multitask,{_AUG} --config.model.msa_stages=(3,4)",
                          "ResNet-18 + MSA, age + gender + race"),
        "coral2019_dldl_v2": (f"configs/utkface.py:coral2019,tiny,cpu,dldl_v2,{_AUG}",
                              "DLDL-v2, CORAL 2019 split (21-60)"),
        "distill": (f"configs/utkface.py:tiny,cpu,distill,{_AUG} --config.loss.teacher={_TEACHER}",
                         "DLDL-v2 with a face model's distributions as labels (distillation)"),
    },
    # dlib's face-pretrained ResNet fine-tuned at 150 px (`face_resnet` variant, ~50 min a run on 2 cores),
    # beside the same network and schedule from random initialisation (`scratch`).
    "utkface_face": {
        "dldl_v2": ("configs/utkface.py:face_resnet,dldl_v2", "DLDL-v2, face-pretrained trunk"),
        "dldl_v2_scratch": ("configs/utkface.py:scratch,dldl_v2", "DLDL-v2, same network from random init"),
        "multitask": ("configs/utkface.py:face_resnet,dldl_v2,multitask",
                      "DLDL-v2 + gender and race heads, face-pretrained trunk"),
        "dldl_v2_bn": ("configs/utkface.py:face_resnet_bn,dldl_v2",
                       "DLDL-v2, face-pretrained, affine layers turned into batch norm"),
        "dex": ("configs/utkface.py:face_resnet,dex", "DEX, face-pretrained trunk"),
        "gaussian_nll": ("configs/utkface.py:face_resnet,gaussian_nll", "Gaussian NLL, face-pretrained trunk"),
        "mtmsa": ("configs/utkface.py:face_resnet,gaussian_nll,multitask --config.model.msa_stages=(3,4)",
                  "MTMSA: MSA after levels 3 and 4, gender and race heads, Gaussian loss"),
        "mtmsa_trunk003": (f"configs/utkface.py:face_resnet,{_MTMSA_003}",
                           "MTMSA with the trunk at 0.03x the heads' learning rate (0.1x in `mtmsa`)"),
        "mtmsa_trunk003_bn": (f"configs/utkface.py:face_resnet_bn,{_MTMSA_003}",
                              "`mtmsa_trunk003` with the affine layers turned into batch norm"),
        "mtmsa_no_msa": ("configs/utkface.py:face_resnet,gaussian_nll,multitask",
                         "MTMSA without MSA: gender and race heads, Gaussian loss"),
        "coral2019_dldl_v2": ("configs/utkface.py:coral2019,face_resnet,dldl_v2",
                              "DLDL-v2, face-pretrained, CORAL 2019 split (21-60)"),
        "coral2019_mtmsa_trunk003": (f"configs/utkface.py:coral2019,face_resnet,{_MTMSA_003}",
                                     "`mtmsa_trunk003` on the CORAL 2019 split (21-60)"),
    },
    # The bundled model's recipe (`*_dldl`; the Gaussian NLL's before it) trained on UTKFace, on
    # All-Age-Faces and on both; every run is also scored on each dataset of CROSS_DATASETS (the
    # cross-dataset table, `cross_table`).
    "cross_dataset": {
        **_trained_on_each(_BUNDLED, "_dldl", "the bundled recipe"),
        **_trained_on_each(_MTMSA_003, "", "Gaussian NLL"),
        "mixture_degrade": (f"configs/utkface.py:face_resnet,degrade,{_MTMSA_003} "
                            f"--config.dataset.mixture={_MIXTURE}",
                            "trained on both, with the photo degradations (`degrade`), Gaussian NLL"),
    },
}

# The suites whose runs are scored on several datasets' test splits: suite -> dataset names.
CROSS_DATASETS = {"cross_dataset": ("utkface", "aaf")}


def run_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(workdir, f"{name}_seed{seed}")


def run_one(config_arg: str, wd: str, seed: int, log_path: str | None = None, datasets: tuple[str, ...] = ()) -> dict:
  """Train (resuming) and evaluate one run; returns its test summary. With log_path the
  commands' output is appended there instead of the console (for runs side by side). Each of
  `datasets` whose eval/<name>_test.json is missing is scored too (evaluate.py --dataset)."""
  summary_path = os.path.join(wd, "eval", "test.json")
  if os.path.exists(summary_path):
    cross_evaluate(config_arg, wd, seed, datasets, log_path)
    return json.load(open(summary_path))
  config, *overrides = config_arg.split(" ")
  common = ["--config", config, "--workdir", wd, f"--config.seed={seed}", *overrides]
  log = None
  if log_path:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a")
  try:
    teacher = [o.split("=", 1)[1] for o in overrides if o.startswith("--config.loss.teacher=")]
    if teacher and not os.path.exists(os.path.join(ROOT, teacher[0])):  # distillation: the teacher first
      data = [o for o in overrides if o.startswith("--config.dataset.")]
      subprocess.run([sys.executable, "-m", "agejax.distill", "--config", config, *data, "--out", teacher[0]],
                     cwd=ROOT, check=True, stdout=log, stderr=log)
    t0 = time.time()
    subprocess.run([sys.executable, "train.py", *common], cwd=ROOT, check=True, stdout=log, stderr=log)
    train_s = time.time() - t0
    subprocess.run([sys.executable, "evaluate.py", *common, "--split", "test"], cwd=ROOT, check=True,
                   stdout=log, stderr=log)
  finally:
    if log:
      log.close()
  s = json.load(open(summary_path))
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  with open(os.path.join(wd, "timing.json"), "w") as f:
    json.dump({"train_seconds": train_s, "total_seconds": time.time() - t0, "cores": cores}, f)
  cross_evaluate(config_arg, wd, seed, datasets, log_path)
  return s


def cross_evaluate(config_arg: str, wd: str, seed: int, datasets: tuple[str, ...], log_path: str | None = None):
  """evaluate.py --dataset NAME for each of `datasets` without eval/<NAME>_test.json in the run."""
  config, *overrides = config_arg.split(" ")
  for name in datasets:
    if os.path.exists(os.path.join(wd, "eval", f"{name}_test.json")):
      continue
    log = open(log_path, "a") if log_path else None
    try:
      subprocess.run([sys.executable, "evaluate.py", "--config", config, "--workdir", wd, f"--config.seed={seed}",
                      *overrides, "--dataset", name], cwd=ROOT, check=True, stdout=log, stderr=log)
    finally:
      if log:
        log.close()


def cross_table(suite: str, workdir: str) -> tuple[str, list[dict]]:
  """Markdown: each entry (trained on) against each dataset of CROSS_DATASETS[suite] (tested on),
  MAE (mean ± sd over seeds), bias, CS@5 and 90% coverage, from the runs' eval/<dataset>_test.json."""
  datasets = CROSS_DATASETS[suite]
  rows = []
  for name, (_, desc) in SUITES[suite].items():
    for d in datasets:
      runs = []
      for entry in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
        path = os.path.join(workdir, entry, "eval", f"{d}_test.json")
        if entry.startswith(f"{name}_seed") and os.path.exists(path):
          runs.append(json.load(open(path)))
      if runs:
        rows.append({"name": name, "description": desc, "tested_on": d, "seeds": len(runs),
                     "mae": [r["mae"] for r in runs], "bias": [r["bias"] for r in runs],
                     "cs5": [r["cs"]["5"] for r in runs], "coverage90": [r.get("coverage90") for r in runs],
                     "clean_mae": [r.get("clean", {}).get("mae") for r in runs]})
  lines = [f"# {suite}: trained on (rows) and tested on (columns)", "",
           "| trained on | tested on | seeds | MAE | bias | CS@5 | 90% coverage | clean MAE |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['description']} | {r['tested_on']} test | {r['seeds']} | {_fmt(r['mae'])} | "
                 f"{_fmt(r['bias'])} | {_fmt(r['cs5'], 3)} | {_fmt(r['coverage90'], 3)} | {_fmt(r['clean_mae'])} |")
  return "\n".join(lines) + "\n", rows


def core_groups(cores, jobs: int) -> list[list[int]]:
  """Splits `cores` into `jobs` contiguous groups as even as possible (the first ones get the rest)."""
  cores = sorted(cores)
  if not 1 <= jobs <= len(cores):
    raise ValueError(f"--jobs {jobs}: this process may use {len(cores)} core(s), so 1 to {len(cores)} jobs")
  size, rest = divmod(len(cores), jobs)
  groups, i = [], 0
  for j in range(jobs):
    n = size + (j < rest)
    groups.append(cores[i:i + n])
    i += n
  return groups


def run_side_by_side(tasks: list[tuple[str, str, str, int]], groups: list[list[int]],
                     datasets: tuple[str, ...] = ()) -> list[str]:
  """Runs (name, config_arg, run_dir, seed) tasks, one worker thread per core group.

  Each worker pins its own thread to its group (Linux's sched_setaffinity with pid 0 acts
  on the calling thread) and the processes it starts inherit that mask, so XLA in each run
  sizes its thread pool to its group. After a failure no new run starts; returns the failures.
  """
  pending, failures, lock = list(tasks), [], threading.Lock()

  def worker(group):
    os.sched_setaffinity(0, group)
    while True:
      with lock:
        if not pending or failures:
          return
        name, config_arg, wd, seed = pending.pop(0)
      log = os.path.join(wd, "log.txt")
      print(f"[cores {','.join(map(str, group))}] {name} seed {seed}: started, log {log}", flush=True)
      try:
        s = run_one(config_arg, wd, seed, log_path=log, datasets=datasets)
        print(f"[cores {','.join(map(str, group))}] {name} seed {seed}: test MAE {s['mae']:.2f}", flush=True)
      except subprocess.CalledProcessError as e:
        with lock:
          failures.append(f"run {name} (seed {seed}) failed with exit code {e.returncode}; see {log}")

  # daemon: Ctrl-C (which the runs receive too) ends the suite instead of waiting on workers
  threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in groups]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return failures


def _fmt(values, digits=2):
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def build_table(suite: str, workdir: str) -> tuple[str, list[dict]]:
  rows = []
  for name, (config_arg, desc) in SUITES[suite].items():
    runs, dirs = [], []
    for entry in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
      if entry.startswith(f"{name}_seed") and os.path.exists(os.path.join(workdir, entry, "eval", "test.json")):
        s = json.load(open(os.path.join(workdir, entry, "eval", "test.json")))
        t = os.path.join(workdir, entry, "timing.json")
        timing = json.load(open(t)) if os.path.exists(t) else {}
        s["minutes"] = timing["total_seconds"] / 60 if "total_seconds" in timing else None
        s["cores"] = len(timing["cores"]) if timing.get("cores") else None
        runs.append(s)
        dirs.append(os.path.join(workdir, entry))
    if not runs:
      continue
    rows.append({
        "name": name, "description": desc, "command_config": config_arg, "seeds": len(runs),
        "mae": [r["mae"] for r in runs], "cs5": [r["cs"]["5"] for r in runs],
        "cs_curves": [{int(k): v for k, v in r["cs"].items()} for r in runs],
        "run_dirs": dirs,
        "clean_mae": [r.get("clean", {}).get("mae") for r in runs],
        "gender_accuracy": [r.get("gender_accuracy") for r in runs],
        "race_accuracy": [r.get("race_accuracy") for r in runs],
        "minutes": [r["minutes"] for r in runs], "cores": [r["cores"] for r in runs]})
  lines = [f"# {suite}: test results", "",
           "| run | seeds | test MAE | CS@5 | clean MAE | gender acc | race acc | minutes/run | cores/run |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cores = sorted({c for c in r["cores"] if c})
    lines.append(f"| {r['description']} | {r['seeds']} | {_fmt(r['mae'])} | {_fmt(r['cs5'], 3)} | "
                 f"{_fmt(r['clean_mae'])} | {_fmt(r['gender_accuracy'], 3)} | {_fmt(r['race_accuracy'], 3)} | "
                 f"{_fmt(r['minutes'], 0)} | {', '.join(map(str, cores)) or '-'} |")
  return "\n".join(lines) + "\n", rows


def _val_curve(run_dir: str) -> tuple[list[float], list[float]]:
  """(epoch, validation MAE) pairs from a run's metrics.jsonl; validation rows carry only
  their step, so the epoch comes from the train rows' step/epoch ratio."""
  path = os.path.join(run_dir, "metrics.jsonl")
  rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  ratios = [r["step"] / r["epoch"] for r in rows if r.get("split") == "train" and r.get("epoch") and "step" in r]
  if not ratios:
    return [], []
  val = [r for r in rows if r.get("split") == "val" and "mae" in r and "step" in r]
  return [r["step"] / ratios[-1] for r in val], [r["mae"] for r in val]


def plot_suite(workdir: str, rows: list[dict]) -> list[str]:
  """The figures a reader looks at before the table: MAE per run (seeds as dots),
  CS@k curves, and validation MAE over training. Returns the files written."""
  if not rows:
    return []
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from agejax.evaluate_lib import save_figure
  written = []
  names = [r["description"] for r in rows]
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
  y = list(range(len(rows)))[::-1]
  means = [statistics.mean(r["mae"]) for r in rows]
  errs = [statistics.stdev(r["mae"]) if len(r["mae"]) > 1 else 0.0 for r in rows]
  ax.barh(y, means, xerr=errs, color="#8fb3d9", capsize=3)
  for yi, r in zip(y, rows):
    ax.plot(r["mae"], [yi] * len(r["mae"]), "k.", ms=5)
    ax.text(statistics.mean(r["mae"]), yi, f" {statistics.mean(r['mae']):.2f}", va="center", fontsize=8)
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xlabel("test MAE (years; bar = mean over seeds, dots = seeds)")
  ax.set_xlim(0, max(max(r["mae"]) for r in rows) * 1.15)
  written.append(save_figure(fig, os.path.join(workdir, "results_mae.png")))

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for r in rows:
    ks = sorted(set().union(*r["cs_curves"]))
    ax.plot(ks, [statistics.mean(c.get(k, float("nan")) for c in r["cs_curves"]) for k in ks], marker=".",
            label=r["description"])
  ax.set_xlabel("error tolerance k (years)")
  ax.set_ylabel("CS@k: share of test faces within k years")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  written.append(save_figure(fig, os.path.join(workdir, "results_cs.png")))

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for r in rows:
    epochs, maes = _val_curve(r["run_dirs"][0])
    if epochs:
      ax.plot(epochs, maes, marker=".", label=r["description"])
  ax.set_xlabel("epoch")
  ax.set_ylabel("validation MAE (first seed)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  written.append(save_figure(fig, os.path.join(workdir, "results_val_mae.png")))
  return written


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("suite", choices=sorted(SUITES))
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seeds", type=int, default=3, help="runs per entry, seeds seed_start .. seed_start + seeds - 1")
  ap.add_argument("--seed_start", type=int, default=0, help="first seed (adds seeds to an entry run before)")
  ap.add_argument("--only", nargs="*", help="run only these entries of the suite")
  ap.add_argument("--table_only", action="store_true")
  ap.add_argument("--manual_dir", help="folder with the dataset's files (default: the config's)")
  ap.add_argument("--jobs", type=int, default=1,
                  help="runs trained at once, each pinned to its share of the cores (Linux); output in <run>/log.txt")
  a = ap.parse_args(argv)
  entries = SUITES[a.suite]
  unknown = set(a.only or []) - set(entries)
  if unknown:
    ap.error(f"unknown entries {sorted(unknown)}; the suite has {sorted(entries)}")
  if a.jobs != 1:
    if not hasattr(os, "sched_setaffinity"):
      ap.error("--jobs other than 1 pins runs to cores, which needs Linux's sched_setaffinity")
    try:
      groups = core_groups(os.sched_getaffinity(0), a.jobs)
    except ValueError as e:
      ap.error(str(e))
  if not a.table_only:
    tasks = []
    for seed in range(a.seed_start, a.seed_start + a.seeds):
      for name, (config_arg, _) in entries.items():
        if a.only and name not in a.only:
          continue
        if a.manual_dir:
          config_arg += f" --config.dataset.manual_dir={os.path.abspath(a.manual_dir)}"
        tasks.append((name, config_arg, run_dir(a.workdir, name, seed), seed))
    if a.jobs == 1:
      for name, config_arg, wd, seed in tasks:
        try:
          run_one(config_arg, wd, seed, datasets=CROSS_DATASETS.get(a.suite, ()))
        except subprocess.CalledProcessError as e:
          print(f"error: run {name} (seed {seed}) failed with exit code {e.returncode}; see the message above.",
                file=sys.stderr)
          return 1
    else:
      failures = run_side_by_side(tasks, groups, CROSS_DATASETS.get(a.suite, ()))
      for f in failures:
        print(f"error: {f}", file=sys.stderr)
      if failures:
        return 1
  table, rows = build_table(a.suite, a.workdir)
  os.makedirs(a.workdir, exist_ok=True)
  figures = plot_suite(a.workdir, rows)
  table += "".join(f"\n![{os.path.basename(f)}]({os.path.basename(f)})\n" for f in figures)
  if a.suite in CROSS_DATASETS:
    cross, cross_rows = cross_table(a.suite, a.workdir)
    table += "\n" + cross
    json.dump(cross_rows, open(os.path.join(a.workdir, "cross_results.json"), "w"), indent=2)
  open(os.path.join(a.workdir, "results.md"), "w").write(table)
  json.dump(rows, open(os.path.join(a.workdir, "results.json"), "w"), indent=2)
  print(table)
  return 0


if __name__ == "__main__":
  from agejax import cli
  cli.start_process()  # once; its train.py runs inherit the settings
  sys.exit(main())
