"""The age of every face in photos. The same as `agejax predict` (`agejax/tools/predict.py`): see `agejax predict --help`."""

from agejax.tools.predict import run

if __name__ == "__main__":
  run()
