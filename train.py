"""Train an age estimator.

    python train.py --config configs/utkface.py:tiny,cpu --workdir runs/utk_tiny
    python train.py --config configs/chalearn16.py --workdir runs/cl16 --config.batch_size=64

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with :variants.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from agejax import cli
  cli.setup_jax(FLAGS.config)
  from agejax import train_lib
  from agejax.data.builders import BadInputError, DatasetNotFoundError
  try:
    summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (DatasetNotFoundError, BadInputError, ValueError, train_lib.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"final validation MAE {summary.get('mae', float('nan')):.3f}")
  return 0


if __name__ == "__main__":
  from agejax import hugepages
  hugepages.reexec_with_hugepages()  # once, before JAX loads
  app.run(main)
