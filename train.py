"""Train an age estimator. The same as `agejax train` (`agejax/tools/train.py`): see `agejax train --help`."""

from absl import flags

from agejax.tools import train as tool
from agejax.tools.train import run

flags.adopt_module_key_flags(tool)  # --help lists the tool's flags

if __name__ == "__main__":
  run()
