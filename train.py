"""Train an age estimator. The same as `agejax train` (`agejax/tools/train.py`): see `agejax train --help`."""

from agejax.tools.train import run

if __name__ == "__main__":
  run()
