"""Evaluate a trained model and write eval/<split>.json, a per-image CSV, plots and a report.

    agejax evaluate --config configs/utkface.py:tiny,cpu --workdir runs/utk_tiny --split test --flip_tta
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config the model was trained with.", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_string("split", None, "Split to evaluate (default: the config's test split).")
flags.DEFINE_string("checkpoint", "best", "best | last | a step number.")
flags.DEFINE_string("dataset", None, "Evaluate on this dataset instead of the config's (e.g. aaf, utkface): its "
                    "protocol's test split, the same label grid (cross-dataset results).")
flags.DEFINE_bool("flip_tta", None, "Average predictions over the image and its mirror (default: config.flip_tta).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from agejax import cli
  cli.setup_jax(FLAGS.config)
  from agejax import evaluate_lib
  from agejax.data.builders import BadInputError, DatasetNotFoundError
  try:
    s = evaluate_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.split, FLAGS.checkpoint, FLAGS.flip_tta,
                                  dataset=FLAGS.dataset)
  except (DatasetNotFoundError, BadInputError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  keys = ("dataset", "split", "step", "n", "mae", "bias", "epsilon_error", "gender_accuracy", "race_accuracy",
          "adience_exact", "adience_one_off", "coverage90")
  brief = {k: s[k] for k in keys if k in s}
  brief["cs5"] = s["cs"][5]
  if "clean" in s:
    brief["clean_mae"] = s["clean"]["mae"]
  if "per_dataset" in s:
    brief["per_dataset"] = {name: {"mae": d["mae"], "bias": d["bias"], "n": d["n"]} for name, d in s["per_dataset"].items()}
  print(json.dumps(brief))
  return 0


def run():
  """The command line: `agejax evaluate`, `python evaluate.py` and `python -m agejax.tools.evaluate`."""
  from agejax import cli
  cli.run_tool(main)


if __name__ == "__main__":
  run()
