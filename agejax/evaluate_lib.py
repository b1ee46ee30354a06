"""Evaluation: checkpoint loading, per-image CSV, plots and a markdown report.

`evaluate` loads a checkpoint, predicts a split, summarises it (`agejax.summaries`) and writes
  eval/<split>.json, eval/<split>_predictions.csv, eval/<split>_*.png, eval/<split>.md
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

import numpy as np

from agejax import train_lib, workdir as workdir_lib
from agejax.data import mixture
from agejax.summaries import jsonable, summarize


def write_predictions_csv(path: str, preds: dict[str, np.ndarray], filenames: list[str], grid):
  grid = np.asarray(grid)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    header = ["file", "true_age", "predicted_age", "predicted_std", "top1", "p1", "top2", "p2", "top3", "p3"]
    extra = [t for t in ("gender", "race") if f"pred_{t}_probs" in preds]
    header += [f"{t}_{c}" for t in extra for c in ("true", "pred", "prob")]
    w.writerow(header)
    probs = preds["pred_probs"]
    top = np.argsort(-probs, axis=-1)[:, :3]
    for i, name in enumerate(filenames):
      row = [name, f"{preds['age'][i]:.2f}", f"{preds['pred_age'][i]:.2f}", f"{preds['pred_std'][i]:.2f}"]
      for j in top[i]:
        row += [f"{grid[j]:g}", f"{probs[i, j]:.4f}"]
      for t in extra:
        p = preds[f"pred_{t}_probs"][i]
        row += [int(preds[t][i]), int(np.argmax(p)), f"{np.max(p):.4f}"]
      w.writerow(row)


def plot_report(prefix: str, preds: dict[str, np.ndarray], summary: dict[str, Any], grid) -> list[str]:
  """Write the evaluation figures; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  grid = np.asarray(grid)
  paths = []
  pred, true = preds["pred_age"], preds["age"]

  fig, ax = plt.subplots(figsize=(5, 5))
  ax.scatter(true, pred, s=4, alpha=0.35)
  lim = [grid.min(), grid.max()]
  ax.plot(lim, lim, "k--", lw=1)
  ax.set_xlabel("true age")
  ax.set_ylabel("predicted age")
  ax.set_title(f"MAE {summary['mae']:.2f} (n={summary['n']})")
  paths.append(save_figure(fig, f"{prefix}_pred_vs_true.png"))

  g = summary["per_group"]
  edges = g["edges"]
  labels = [f"{edges[i]}-{edges[i + 1] - 1}" for i in range(len(edges) - 1)] + [f"{edges[-1]}+"]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  mae = np.nan_to_num(np.asarray(g["mae"], float))
  bias = np.nan_to_num(np.asarray(g["bias"], float))
  x = np.arange(len(labels))
  ax.bar(x - 0.2, mae, 0.4, label="MAE")
  ax.bar(x + 0.2, bias, 0.4, label="bias (pred - true)")
  for xi, c in zip(x, g["count"]):
    ax.text(xi, 0, f"n={int(c)}", ha="center", va="bottom", fontsize=7, rotation=90)
  ax.axhline(0, color="k", lw=0.5)
  ax.set_xticks(x, labels, rotation=45)
  ax.set_xlabel("true age group")
  ax.legend()
  paths.append(save_figure(fig, f"{prefix}_per_group.png"))

  fig, ax = plt.subplots(figsize=(5, 3.5))
  ks = sorted(int(k) for k in summary["cs"])
  ax.plot(ks, [summary["cs"][k] for k in ks], "o-")
  ax.set_xlabel("error threshold k (years)")
  ax.set_ylabel("CS@k")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  paths.append(save_figure(fig, f"{prefix}_cs_curve.png"))

  return paths


def plot_examples(path: str, preds: dict[str, np.ndarray], images: list[np.ndarray], grid) -> str:
  """A grid of faces with their predicted distributions and the true age (red)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  grid = np.asarray(grid)
  pred, true = preds["pred_age"], preds["age"]
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.4), squeeze=False)
  for i, img in enumerate(images):
    axes[0, i].imshow(img)
    axes[0, i].axis("off")
    axes[0, i].set_title(f"true {true[i]:.0f} / pred {pred[i]:.1f}", fontsize=8)
    axes[1, i].plot(grid, preds["pred_probs"][i])
    axes[1, i].axvline(true[i], color="r", lw=1)
    axes[1, i].set_yticks([])
    axes[1, i].set_xlabel("age", fontsize=8)
  return save_figure(fig, path)


def save_figure(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path


def markdown_report(split: str, summary: dict[str, Any], figures: list[str], csv_name: str, title: str) -> str:
  lines = [f"# {title}: {split}", "",
           f"- images: {summary['n']}", f"- MAE: **{summary['mae']:.3f}**  (bias {summary['bias']:+.3f})",
           f"- CS@5: {summary['cs'][5]:.3f}; CS@1..10: " + ", ".join(f"{summary['cs'][k]:.3f}" for k in range(1, 11))]
  if "clean" in summary:
    lines.append(f"- clean subset (label_conflict == 0, n={summary['clean']['n']}): MAE {summary['clean']['mae']:.3f}, "
                 f"CS@5 {summary['clean']['cs'][5]:.3f}")
  for k, name in (("epsilon_error", "epsilon-error"), ("gender_accuracy", "gender accuracy"),
                  ("race_accuracy", "race accuracy"), ("adience_exact", "Adience exact"),
                  ("adience_one_off", "Adience 1-off"), ("coverage90", "90% interval coverage"),
                  ("coverage50", "50% interval coverage")):
    if k in summary:
      lines.append(f"- {name}: {summary[k]:.3f}")
  g = summary["per_group"]
  lines += ["", "| true age | n | MAE | bias |", "|---|---|---|---|"]
  edges = g["edges"]
  for i in range(len(edges)):
    label = f"{edges[i]}-{edges[i + 1] - 1}" if i + 1 < len(edges) else f"{edges[i]}+"
    mae = "-" if g["mae"][i] is None or not np.isfinite(g["mae"][i]) else f"{g['mae'][i]:.2f}"
    bias = "-" if g["bias"][i] is None or not np.isfinite(g["bias"][i]) else f"{g['bias'][i]:+.2f}"
    lines.append(f"| {label} | {int(g['count'][i])} | {mae} | {bias} |")
  for task in ("gender", "race"):
    if f"per_{task}" in summary:
      lines += ["", f"| {task} | n | MAE | bias |", "|---|---|---|---|"]
      lines += [f"| {name} | {v['n']} | {v['mae']:.2f} | {v['bias']:+.2f} |" for name, v in summary[f"per_{task}"].items()]
  lines += ["", f"Per-image predictions: [{csv_name}]({csv_name})", ""]
  lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures]
  return "\n".join(lines) + "\n"


def evaluate(config, workdir: str, split: str | None = None, checkpoint: str = "best",
             flip_tta: bool | None = None, num_examples: int = 8, dataset: str | None = None) -> dict[str, Any]:
  """Evaluate a trained model and write the report files under workdir/eval.

  `split` defaults to each dataset's test split. A mixture is evaluated on every source
  (eval/<dataset>_<split>.*) and pooled: eval/<split>.json is the pooled summary with `per_dataset`,
  eval/<split>_by_dataset.md the table. `dataset` ("aaf", "utkface/coral2019") evaluates on that dataset instead of the
  config's (cross-dataset: its protocol's test split on the same label grid).
  """
  import jax

  config = config.copy_and_resolve_references()  # the caller's config stays as it was
  with config.unlocked():
    if flip_tta is not None:
      config.flip_tta = flip_tta
    if dataset:
      mixture.parse(f"{dataset}:1")  # a clear error for an unknown name
      config.dataset.mixture = f"{dataset}:1"
  trainer = train_lib.Trainer(config, workdir, training=False)
  state = load_checkpoint(trainer, workdir, checkpoint)
  out_dir = os.path.join(workdir, "eval")
  named = trainer.is_mixture
  per_dataset, preds_all = {}, []
  for k, spec in enumerate(trainer.sources):
    s_split = split or spec.test_split
    preds = trainer.predict_split(state, s_split, progress=True, source=k)
    preds_all.append(preds)
    summary = summarize(preds, trainer.grid)
    summary.update({"split": s_split, "checkpoint": checkpoint, "step": int(jax.device_get(state.step)),
                    "flip_tta": bool(config.flip_tta), "model": config.model.name, "loss": config.loss.name,
                    "dataset": spec.name, "dataset_config": spec.config})
    per_dataset[spec.label] = summary
    if jax.process_index() == 0:
      prefix = (f"{spec.label.replace('/', '_')}_" if named else "") + s_split.replace("+", "_")
      write_report(out_dir, prefix, trainer, k, s_split, preds, summary, config, num_examples)
  if len(per_dataset) == 1:
    return next(iter(per_dataset.values()))
  pooled = summarize({key: np.concatenate([p[key] for p in preds_all]) for key in preds_all[0]}, trainer.grid)
  pooled.update({"split": split or "test", "checkpoint": checkpoint, "step": int(jax.device_get(state.step)),
                 "flip_tta": bool(config.flip_tta), "model": config.model.name, "loss": config.loss.name,
                 "dataset": "+".join(per_dataset), "per_dataset": per_dataset})
  if jax.process_index() == 0:
    name = (split or "test").replace("+", "_")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:  # the pooled summary with per_dataset
      json.dump(jsonable(pooled), f, indent=2)
    with open(os.path.join(out_dir, f"{name}_by_dataset.md"), "w") as f:
      f.write(dataset_table(pooled))
  return pooled


def dataset_table(pooled: dict[str, Any]) -> str:
  """Markdown: one row per dataset of a mixture's evaluation, and the pooled row."""
  lines = ["| dataset | split | n | MAE | bias | CS@5 | 90% coverage | clean MAE |", "|---|---|---|---|---|---|---|---|"]
  rows = list(pooled["per_dataset"].items()) + [("all, pooled", pooled)]
  for label, s in rows:
    clean = f"{s['clean']['mae']:.2f}" if "clean" in s else "-"
    cov = f"{s['coverage90']:.1%}" if "coverage90" in s else "-"
    lines.append(f"| {label} | {s['split']} | {s['n']} | {s['mae']:.2f} | {s['bias']:+.2f} | {s['cs'][5]:.1%} | "
                 f"{cov} | {clean} |")
  return "\n".join(lines) + "\n"


def write_report(out_dir, prefix, trainer, k, split, preds, summary, config, num_examples):
  """eval/<prefix>.json, _predictions.csv, the figures and <prefix>.md for one dataset's split."""
  from agejax.data.pipeline import decode_face
  os.makedirs(out_dir, exist_ok=True)
  source = trainer.data_source(split, k)
  filenames = [source[int(i)]["filename"].decode() for i in preds["index"]]
  write_predictions_csv(os.path.join(out_dir, f"{prefix}_predictions.csv"), preds, filenames, trainer.grid)
  rng = np.random.RandomState(0)
  pick = rng.choice(len(filenames), size=min(num_examples, len(filenames)), replace=False)
  examples = [decode_face(source[int(preds["index"][i])]["image"], 128) for i in pick]
  sub = {key: v[pick] for key, v in preds.items()}
  figs = plot_report(os.path.join(out_dir, prefix), preds, summary, trainer.grid)
  figs.append(plot_examples(os.path.join(out_dir, f"{prefix}_examples.png"), sub, examples, trainer.grid))
  with open(os.path.join(out_dir, f"{prefix}.json"), "w") as f:
    json.dump(jsonable(summary), f, indent=2)
  title = f"{summary['dataset']} {config.model.name} {config.loss.name}"
  with open(os.path.join(out_dir, f"{prefix}.md"), "w") as f:
    f.write(markdown_report(split, summary, figs, f"{prefix}_predictions.csv", title))


def config_summary(config) -> str:
  return (f"model {config.model.name}, loss {config.loss.name}, gender {config.model.gender}, race "
          f"{config.model.race}, msa_stages {tuple(config.model.msa_stages)}")


def load_checkpoint(trainer, workdir: str, which: str):
  """The train state from `best`, `last` or a step number; a clear error when absent (creating
  nothing in workdir) or when the config's model is not the one the run trained."""
  root = os.path.abspath(workdir)
  if not any(os.path.isdir(os.path.join(root, d)) and os.listdir(os.path.join(root, d)) for d in ("checkpoints", "best")):
    raise FileNotFoundError(f"No checkpoint in {workdir}: train first (python train.py --workdir {workdir} ...).")
  workdir_lib.check_config(workdir, trainer.config)
  last_mgr, best_mgr = train_lib.checkpoint_managers(workdir, trainer.config)
  try:
    if which == "best":
      mgr, step = best_mgr, best_mgr.best_step()
      if step is None:
        mgr, step = last_mgr, last_mgr.latest_step()
        if step is not None:
          why = ("the config has no validation split (full_train)" if not trainer.config.dataset.eval_split
                 else "no validation was run")
          print(f"No checkpoint was selected by validation ({why}): evaluating the last one, step {step}.",
                file=sys.stderr)
    elif which == "last":
      mgr, step = last_mgr, last_mgr.latest_step()
    else:
      mgr, step = last_mgr, int(which)
      if step not in last_mgr.all_steps():
        raise FileNotFoundError(f"No checkpoint at step {step} in {workdir}/checkpoints; have {last_mgr.all_steps()}.")
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}: train first (python train.py --workdir {workdir} ...).")
    try:
      return train_lib.restore_state(mgr, step, trainer.init_state(fresh=False))
    except Exception as e:  # orbax reports a model mismatch as a tensor-shape error deep in its event loop
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise ValueError(f"Checkpoint {step} in {workdir} does not fit the config's model "
                       f"({config_summary(trainer.config)}): {first}") from None
  finally:
    last_mgr.close()
    best_mgr.close()
