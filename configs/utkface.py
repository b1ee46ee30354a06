"""UTKFace (non-commercial research only), agejax's duplicate-safe split.

Ages run to 116, so the label grid is 0..116. `coral2019` switches to the CORAL
paper's split (ages 21-60), with the grid 21..60.
  python train.py --config configs/utkface.py:tiny,cpu --workdir runs/utk_tiny

The folder holding UTKFace.tar.gz: `--config.dataset.manual_dir` (default $UTKFACE_DIR), else
TFDS's manual directory (<data_dir>/downloads/manual). Needed only for the first build.
"""

import os

from configs import default


def get_config(arg=None):
  c = default.base_config()
  default.set_dataset(c, "utkface")
  c.dataset.config = "default"
  c.dataset.manual_dir = os.environ.get("UTKFACE_DIR", "")
  c.label_grid.stop = 116.0
  tokens = [t for t in (arg or "").split(",") if t]
  if "coral2019" in tokens:
    tokens.remove("coral2019")
    c.dataset.config = "coral2019"
    c.label_grid.start, c.label_grid.stop = 21.0, 60.0
  c.model.gender = c.model.race = False
  return default.apply_variants(c, ",".join(tokens))
