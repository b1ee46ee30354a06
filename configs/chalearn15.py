"""ChaLearn LAP 2015. DLDL-v2's protocol: train on train, report on validation (paper MAE 3.135, Thin).

Checkpoints are selected on `holdout`, 10% of the official train images held out of
training, so the reported validation figure is not selected on itself. `full_train`
trains on all of train (the paper's set) and evaluates the last checkpoint.
"""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  default.set_dataset(c, "chalearn15")
  return default.apply_variants(c, arg)
