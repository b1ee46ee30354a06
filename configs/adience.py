"""Adience, 5-fold subject-exclusive CV: `:fold2` picks the test fold. Reports exact / 1-off accuracy.

Checkpoints are selected on `holdout`, 10% of the training folds' users, never on the
test fold. `full_train` trains on all four training folds and evaluates the last checkpoint.
"""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  default.set_dataset(c, "adience")
  c.dataset.config = "fold0"
  c.dataset.on_error = "skip"   # rows with no age label are part of the release
  tokens = []
  for t in (arg or "").split(","):
    if t.startswith("fold"):
      c.dataset.config = t
    elif t:
      tokens.append(t)
  return default.apply_variants(c, ",".join(tokens))
