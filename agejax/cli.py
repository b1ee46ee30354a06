"""Process setup shared by the command-line tools.

Library imports change nothing global; the entry points (train.py, evaluate.py,
predict.py, python -m agejax.bench / agejax.experiments) call `start_process()`
first, then `setup_jax()`.
"""

from __future__ import annotations

import os


def start_process() -> None:
  """Before JAX loads: agejax's XLA:CPU flags and huge-page re-execution (`agejax.cpu.start_process`).
  Standard library only."""
  from agejax import cpu
  cpu.start_process()


def setup_jax(config=None):
  """Multi-host initialisation and CPU collectives, before any JAX computation, then the native
  CPU kernels' build where they apply (`agejax.cpu.prepare`).

  With `config.distributed` (or AGEJAX_DISTRIBUTED=1), `jax.distributed.initialize()`
  reads the coordinator address, process count and id from the environment
  (TPU pods and SLURM/Open MPI fill them in; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
  """
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  distributed = bool(config is not None and config.get("distributed")) or os.environ.get("AGEJAX_DISTRIBUTED") == "1"
  if distributed:
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
      kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                    num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
  # After distributed initialisation (the first backend query creates the backends): the native
  # kernels are built now, not inside a trace.
  import sys

  from agejax import cpu
  cpu.prepare(announce=lambda line: print(line, file=sys.stderr, flush=True))


def config_path_importable(argv: list[str] | None = None) -> None:
  """Put the folder above a `--config DIR/configs/NAME.py` on sys.path, so the config file's
  `from configs import default` works whatever the working directory (e.g. `agejax train` run
  from elsewhere against a checkout's configs/)."""
  import sys
  argv = sys.argv if argv is None else argv
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
    if value:
      path = os.path.abspath(value.split(":", 1)[0])
      root = os.path.dirname(os.path.dirname(path))
      if os.path.isdir(os.path.join(root, "configs")) and root not in sys.path:
        sys.path.insert(0, root)


def run_tool(main) -> None:
  """A command-line tool's process: XLA flags and huge pages before JAX loads (`start_process`), its
  --config file's folder importable, then absl's app.run(main)."""
  start_process()
  config_path_importable()
  from absl import app
  app.run(main)
