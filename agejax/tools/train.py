"""Train an age estimator.

    agejax train --config configs/utkface.py:tiny,cpu --workdir runs/utk_tiny
    agejax train --config configs/chalearn16.py --workdir runs/cl16 --config.batch_size=64

Running the same command again resumes from the latest checkpoint in --workdir.
On SIGTERM or Ctrl-C it saves a checkpoint of the step it reached and exits with
128 + the signal's number (143, 130); the same command resumes from there.
"""

import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with :variants.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from agejax import cli
  cli.setup_jax(FLAGS.config)
  from agejax import checkpoints, train_lib, workdir
  from agejax.data.builders import BadInputError, DatasetNotFoundError
  try:
    summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train_lib.Preempted as e:
    print(str(e), file=sys.stderr)
    return 128 + (e.signum or 15)
  except (DatasetNotFoundError, BadInputError, ValueError, train_lib.NonFiniteLossError, checkpoints.CheckpointWriteError,
          workdir.WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if "mae" in summary:
    print(f"final validation MAE {summary['mae']:.3f}")
  else:
    print("trained without a validation split (config.dataset.eval_split is empty): evaluate.py scores the last "
          "checkpoint")
  return 0


def run():
  """The command line: `agejax train`, `python train.py` and `python -m agejax.tools.train`."""
  from agejax import cli
  cli.run_tool(main)


if __name__ == "__main__":
  run()
