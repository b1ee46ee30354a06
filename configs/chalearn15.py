"""ChaLearn LAP 2015. DLDL-v2's protocol: train on train, report on validation (paper MAE 3.135, Thin).

Checkpoints are selected on `holdout`, 10% of the official train images held out of
training, so the reported validation figure is not selected on itself. `full_train`
trains on all of train (the paper's set) and evaluates the last checkpoint.
"""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  c.dataset.name = "chalearn15"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "holdout"
  c.dataset.test_split = "validation"
  return default.apply_variants(c, arg)
