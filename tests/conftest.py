"""The test process gets the XLA:CPU flags the command-line tools set (`agejax.cli.start_process`), and
one JAX persistent compilation cache that it and the tests' subprocesses share for the run.

The cache: many tests compile the same small networks' steps, in process and in the train.py,
evaluate.py and predict.py subprocesses they start; compiling is most of their time on a CPU. The
cache is a fresh folder removed when the run ends, so no test sees another run's programs; its key
holds XLA_FLAGS and the devices, so tests with other flags or device counts compile their own.
A JAX_COMPILATION_CACHE_DIR of the user's is used instead; JAX_ENABLE_COMPILATION_CACHE=false turns
it off.
"""

import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before JAX is imported: it reads these once
  _CACHE = tempfile.mkdtemp(prefix="agejax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
  _CACHE = None

from agejax.cpu import xla_flags as xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # before any test creates a JAX backend


def pytest_sessionfinish(session, exitstatus):
  if _CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)


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
