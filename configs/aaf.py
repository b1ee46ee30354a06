"""All-Age-Faces' released training half (research use; cite Cheng et al. 2019), aligned like UTKFace.

agejax's seeded 80/10/10 split of the provided photos (duplicate groups kept in one split):
train / validation (checkpoint selection) / test. The label grid is UTKFace's, 0..116, although
AAF's ages run 2-80: one grid lets a model trained here be scored on UTKFace and mixed with it.
Variants as in configs/utkface.py, e.g.
  python train.py --config configs/aaf.py:face_resnet,gaussian_nll --workdir runs/aaf_face

The folder holding AAF-train.tar.gz and labels.csv: `--config.dataset.manual_dir` (default
$AAF_DIR), else TFDS's manual directory. Needed only for the first build.
"""

import os

from configs import default


def get_config(arg=None):
  c = default.base_config()
  default.set_dataset(c, "aaf")
  c.dataset.config = ""
  c.dataset.manual_dir = os.environ.get("AAF_DIR", "")
  c.label_grid.stop = 116.0
  c.model.gender = c.model.race = False
  return default.apply_variants(c, arg)
