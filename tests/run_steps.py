"""Helper for the sharding tests: train N steps in this process and save the params.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/run_steps.py DATA_DIR OUT.npz 4 \
        [--coordinator localhost:PORT --num_processes 2 --process_id 0]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("data_dir")
  p.add_argument("out")
  p.add_argument("steps", type=int)
  p.add_argument("--coordinator")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  a = p.parse_args()
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if a.coordinator:
    jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
  import numpy as np
  from configs import default
  from agejax import train_lib
  c = default.get_config("smoke")
  c.dataset.name, c.dataset.data_dir = "folder", a.data_dir
  c.num_train_steps = a.steps
  trainer = train_lib.Trainer(c)
  state = trainer.init_state()
  it = trainer.train_iterator()
  for _ in range(a.steps):
    state, _ = trainer.train_step(state, trainer.global_batch(next(it)))
  leaves = jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})
  if jax.process_index() == 0:
    np.savez(a.out, **{jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in leaves})
  print(f"devices={jax.device_count()} processes={jax.process_count()}")


if __name__ == "__main__":
  main()
