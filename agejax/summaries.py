"""Metric summaries of one split's gathered predictions: pure numpy, no training code.

`summarize` turns `Trainer.predict_split`'s arrays into every metric the dataset supports
(MAE, CS, bias, interval coverage, per age group / gender / race, clean subset, Adience groups);
`scalars` picks the numbers logged at every validation; `jsonable` makes a summary JSON-safe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agejax import metrics
from agejax.data import labels


def jsonable(x):
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray) or hasattr(x, "tolist"):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def _age_metrics(pred, true, probs, grid, std=None) -> dict[str, Any]:
  out = {"n": int(len(true)), "mae": float(metrics.mae(pred, true)),
         "cs": {k: float(v) for k, v in zip(range(0, 11), np.asarray(metrics.cumulative_score(pred, true, np.arange(11))))},
         "bias": float(np.mean(pred - true))}
  if probs is not None:
    out["coverage50"] = float(metrics.interval_coverage(probs, grid, true, 0.5))
    out["coverage90"] = float(metrics.interval_coverage(probs, grid, true, 0.9))
  if std is not None:
    out["mean_predicted_std"] = float(np.mean(std))
  return out


def summarize(preds: dict[str, np.ndarray], grid) -> dict[str, Any]:
  """All metrics for one split's gathered predictions (see Trainer.predict_split).

  The ChaLearn epsilon-error is averaged over the rows that have a sigma (> 0; 0 means the
  dataset gives none), `epsilon_error_n` of them; it is absent where no row has one.
  """
  grid = np.asarray(grid)
  pred, true = preds["pred_age"], preds["age"]
  s = _age_metrics(pred, true, preds.get("pred_probs"), grid, preds.get("pred_std"))
  sigma = preds.get("sigma")
  if sigma is not None and np.any(sigma > 0):
    has = sigma > 0
    s["epsilon_error"] = float(metrics.epsilon_error(pred[has], true[has], sigma[has]))
    s["epsilon_error_n"] = int(np.sum(has))
  groups = metrics.per_group_errors(pred, true)
  s["per_group"] = {"edges": list(metrics.DEFAULT_AGE_GROUPS), **{k: np.asarray(v).tolist() for k, v in groups.items()}}
  if "label_conflict" in preds and np.any(preds["label_conflict"] > 0):
    clean = preds["label_conflict"] == 0
    s["clean"] = _age_metrics(pred[clean], true[clean], preds["pred_probs"][clean] if "pred_probs" in preds else None,
                              grid)
  for task, names in (("gender", labels.GENDER_NAMES), ("race", labels.RACE_NAMES)):
    if task in preds and np.any(preds[task] >= 0):
      s[f"per_{task}"] = per_attribute(pred, true, preds[task], names)
    if f"pred_{task}_probs" in preds and np.any(preds[task] >= 0):
      s[f"{task}_accuracy"] = float(metrics.accuracy(np.argmax(preds[f"pred_{task}_probs"], -1), preds[task]))
  if "age_group" in preds and np.all(preds["age_group"] >= 0):
    exact, one_off = metrics.exact_and_one_off(metrics.age_to_adience_group(pred), preds["age_group"])
    s["adience_exact"], s["adience_one_off"] = float(exact), float(one_off)
  return s


def per_attribute(pred, true, labels, names) -> dict[str, dict[str, float]]:
  """Age MAE, bias and count per value of a labelled attribute (gender, race); -1 labels are left out."""
  out = {}
  for k, name in enumerate(names):
    m = labels == k
    if np.any(m):
      out[name] = {"n": int(np.sum(m)), "mae": float(metrics.mae(pred[m], true[m])),
                   "bias": float(np.mean(pred[m] - true[m]))}
  return out


def scalars(summary: dict[str, Any]) -> dict[str, float]:
  """The flat numbers worth logging every evaluation."""
  out = {k: v for k, v in summary.items() if isinstance(v, float)}
  out["cs5"] = summary["cs"][5]
  if "clean" in summary:
    out["clean_mae"] = summary["clean"]["mae"]
  return out
