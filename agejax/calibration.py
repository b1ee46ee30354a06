"""Calibrating how sure a model says it is: one temperature on its age distribution.

A model's 90% interval (`ldl.central_interval` of its distribution) should hold the true age
90% of the time. `apply_temperature(probs, T)` returns p^(1/T), renormalised: T > 1 widens every
distribution (for a Gaussian it multiplies sigma by sqrt(T)), T < 1 narrows it; the ranking of
the labels, and so the mode, is unchanged. `fit_temperature` picks the smallest T whose 90%
intervals cover at least 90% of held-out ages (validation splits, never a test split) and,
optionally, at least a floor of each of further held-out sets (the same validation faces degraded:
blurred, shrunk, darkened), as
temperature scaling does for classifiers (Guo et al., "On Calibration of Modern Neural Networks",
ICML 2017), here on the interval's coverage, the property the intervals promise.

Numpy for the temperature; the interval and its coverage are `ldl.central_interval` and
`metrics.interval_coverage`, the definitions evaluation uses. No Flax.
"""

from __future__ import annotations

import numpy as np

# The temperatures tried: 0.25 .. 16 on a log scale (coverage is monotone in T).
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(16.0), 241))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
  """p^(1/T) renormalised over the last axis; T = 1 returns the input unchanged (as float32)."""
  probs = np.asarray(probs, np.float64)
  if temperature == 1.0:
    return probs.astype(np.float32)
  if not (temperature > 0 and np.isfinite(temperature)):
    raise ValueError(f"temperature must be a positive number, got {temperature}.")
  logp = np.log(np.clip(probs, 1e-30, None)) / temperature
  logp -= logp.max(-1, keepdims=True)
  p = np.exp(logp)
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def coverage(probs, grid, ages, mass: float = 0.9) -> float:
  """The share of `ages` inside their distribution's central `mass` interval (`metrics.interval_coverage`)."""
  from agejax import metrics  # JAX: fitting only; predict's `apply_temperature` needs numpy alone
  return float(metrics.interval_coverage(np.asarray(probs, np.float32), np.asarray(grid, np.float32),
                                         np.asarray(ages, np.float32), mass))


def fit_temperature(probs: np.ndarray, grid: np.ndarray, ages: np.ndarray, mass: float = 0.9,
                    also: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, floor: float | None = None) -> dict:
  """The smallest temperature of TEMPERATURES whose `mass` intervals cover at least `mass` of
  `ages` and, with `also` ({name: (probs, ages)}, e.g. the same faces degraded) and `floor`, at
  least `floor` of each of those; with the coverage before and after: {"temperature",
  "coverage_before", "coverage_after", "n", "mass"[, "floor", "also": {name: [before, after]}]}.
  Where even the largest does not reach it, the largest."""
  if len(ages) == 0:
    raise ValueError("fit_temperature needs at least one held-out age.")
  if (also is None) != (floor is None):
    raise ValueError("fit_temperature: `also` and `floor` go together.")
  also = also or {}

  def met(t):
    if coverage(apply_temperature(probs, t), grid, ages, mass) < mass:
      return False
    return all(coverage(apply_temperature(p, t), grid, a, mass) >= floor for p, a in also.values())

  chosen = next((t for t in TEMPERATURES if met(t)), TEMPERATURES[-1])
  out = {"temperature": float(chosen), "coverage_before": coverage(probs, grid, ages, mass),
         "coverage_after": coverage(apply_temperature(probs, chosen), grid, ages, mass), "n": int(len(ages)),
         "mass": mass}
  if also:
    out["floor"] = floor
    out["also"] = {k: [coverage(p, grid, a, mass), coverage(apply_temperature(p, chosen), grid, a, mass)]
                   for k, (p, a) in also.items()}
  return out
