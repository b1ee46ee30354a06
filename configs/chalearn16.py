"""ChaLearn LAP 2016 (DLDL-v2 protocol: train on train+validation, report on test; paper MAE 3.452 Thin)."""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  c.dataset.name = "chalearn16"
  c.dataset.train_split = "train+validation"
  c.dataset.eval_split = "test"
  c.dataset.test_split = "test"
  return default.apply_variants(c, arg)
