"""ChaLearn LAP 2016. DLDL-v2's protocol: train on train+validation, report on test (paper MAE 3.452, Thin).

Checkpoints are selected on `holdout`, 10% of the official train images held out of
training. `full_train` trains on all of train+validation (the paper's set) and
evaluates the last checkpoint.
"""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  default.set_dataset(c, "chalearn16")
  return default.apply_variants(c, arg)
