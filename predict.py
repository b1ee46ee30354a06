"""The age of every face in photos. The same as `agejax predict` (`agejax/tools/predict.py`): see `agejax predict --help`."""

from absl import flags

from agejax.tools import predict as tool
from agejax.tools.predict import run

flags.adopt_module_key_flags(tool)  # --help lists the tool's flags

if __name__ == "__main__":
  run()
