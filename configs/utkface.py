"""UTKFace (non-commercial research only), agejax's duplicate-safe split.

Ages run to 116, so the label grid is 0..116. `coral2019` switches to the CORAL
paper's split (ages 21-60), with the grid 21..60.
  python train.py --config configs/utkface.py:tiny,cpu --workdir runs/utk_tiny
"""

import os

from configs import default

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "utkface")


def get_config(arg=None):
  c = default.base_config()
  c.dataset.name = "utkface"
  c.dataset.config = "default"
  c.dataset.manual_dir = os.path.normpath(SHARED)
  c.label_grid.stop = 116.0
  tokens = [t for t in (arg or "").split(",") if t]
  if "coral2019" in tokens:
    tokens.remove("coral2019")
    c.dataset.config = "coral2019"
    c.label_grid.start, c.label_grid.stop = 21.0, 60.0
  c.model.gender = c.model.race = False
  return default.apply_variants(c, ",".join(tokens))
