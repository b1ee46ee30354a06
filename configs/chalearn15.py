"""ChaLearn LAP 2015 (DLDL-v2 protocol: train on train, report on validation; paper MAE 3.135 Thin)."""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  c.dataset.name = "chalearn15"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.test_split = "validation"
  return default.apply_variants(c, arg)
