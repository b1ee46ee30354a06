"""agejax: facial age estimation by label distribution learning, in JAX and Flax."""

from agejax import xla_cpu

xla_cpu.apply_defaults()  # before anything creates a JAX backend

from agejax.ldl import (central_interval, cumulative, distribution_std, expectation,
                        expectation_from_logits, gaussian_label_distribution, label_grid,
                        nearest_label_index, quantile, ranking_targets)

__version__ = "0.1.0"

__all__ = ["central_interval", "cumulative", "distribution_std", "expectation", "expectation_from_logits",
           "gaussian_label_distribution", "label_grid", "nearest_label_index", "quantile", "ranking_targets"]
