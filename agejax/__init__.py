"""agejax: facial age estimation by label distribution learning, in JAX and Flax."""

import importlib

__version__ = "0.1.0"

__all__ = ["central_interval", "cumulative", "distribution_std", "expectation", "expectation_from_logits",
           "gaussian_label_distribution", "label_grid", "nearest_label_index", "quantile", "ranking_targets"]


def __getattr__(name):
  """The label-distribution helpers of `agejax.ldl`, imported on first use: `import agejax` changes no global
  state and loads no JAX (the command-line entry points set XLA flags and re-execute first, `cli.start_process`)."""
  if name in __all__:
    return getattr(importlib.import_module("agejax.ldl"), name)
  raise AttributeError(f"module 'agejax' has no attribute {name!r}")
