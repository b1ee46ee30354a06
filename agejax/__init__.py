"""agejax: facial age estimation by label distribution learning, in JAX and Flax."""

import importlib

from agejax import xla_cpu

xla_cpu.apply_defaults()  # before anything creates a JAX backend

__version__ = "0.1.0"

__all__ = ["central_interval", "cumulative", "distribution_std", "expectation", "expectation_from_logits",
           "gaussian_label_distribution", "label_grid", "nearest_label_index", "quantile", "ranking_targets"]


def __getattr__(name):
  """The label-distribution helpers of `agejax.ldl`, imported on first use so that `import agejax.hugepages`
  by the command-line entry points does not import JAX before they re-execute (see hugepages.py)."""
  if name in __all__:
    return getattr(importlib.import_module("agejax.ldl"), name)
  raise AttributeError(f"module 'agejax' has no attribute {name!r}")
