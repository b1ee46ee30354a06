"""The test process gets the XLA:CPU flags the command-line tools set (`agejax.cli.start_process`)."""

from agejax import xla_cpu

xla_cpu.apply_defaults()  # before any test creates a JAX backend
