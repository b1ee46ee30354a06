"""Evaluate a trained model and write eval/<split>.json, a per-image CSV, plots and a report. The same as `agejax evaluate` (`agejax/tools/evaluate.py`): see `agejax evaluate --help`."""

from agejax.tools.evaluate import run

if __name__ == "__main__":
  run()
