"""Evaluate a trained model and write eval/<split>.json, a per-image CSV, plots and a report. The same as `agejax evaluate` (`agejax/tools/evaluate.py`): see `agejax evaluate --help`."""

from absl import flags

from agejax.tools import evaluate as tool
from agejax.tools.evaluate import run

flags.adopt_module_key_flags(tool)  # --help lists the tool's flags

if __name__ == "__main__":
  run()
