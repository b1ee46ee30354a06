"""The test process gets the XLA:CPU flags the command-line tools set (`agejax.cli.start_process`)."""

from agejax.cpu import xla_flags as xla_cpu

xla_cpu.apply_defaults()  # before any test creates a JAX backend


def pytest_collection_modifyitems(config, items):
  """Tests marked cpu_lowering run only where JAX's default backend is the CPU."""
  marked = [item for item in items if item.get_closest_marker("cpu_lowering")]
  if not marked:
    return
  import jax
  import pytest
  if jax.default_backend() != "cpu":
    skip = pytest.mark.skip(reason=f"checks XLA:CPU lowering; the backend is {jax.default_backend()}")
    for item in marked:
      item.add_marker(skip)
