"""MORPH II. DLDL-v2's protocol: a random 80/20 split (paper MAE 1.969, Thin); the metadata CSV gives
gender and race too.

Checkpoints are selected on `holdout`, 10% of the training subjects (no person in it
trains), never on the reported test split. `full_train` trains on every training subject
and evaluates the last checkpoint.
"""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  default.set_dataset(c, "morph")
  return default.apply_variants(c, arg)
