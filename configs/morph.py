"""MORPH II, DLDL-v2's random 80/20 split (paper MAE 1.969 Thin). Metadata CSV gives gender and race too."""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  c.dataset.name = "morph"
  c.dataset.eval_split = "test"
  c.dataset.test_split = "test"
  return default.apply_variants(c, arg)
