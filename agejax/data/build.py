"""Build a dataset once: python -m agejax.data.build NAME --manual_dir DIR [--data_dir DIR].

    python -m agejax.data.build utkface --manual_dir ../shared/data/utkface
    python -m agejax.data.build adience --config fold0 --manual_dir ~/adience --skip_bad

Prints per-split counts, and with --skip_bad the skipped inputs and why.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from agejax.data import builders

FLAGS = flags.FLAGS
flags.DEFINE_string("manual_dir", None, "Folder holding the downloaded files (see each builder's docstring).")
flags.DEFINE_string("data_dir", None, "Where built datasets live (default $AGEJAX_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("config", None, "Builder config, e.g. coral2019 (UTKFace) or fold0 (Adience).")
flags.DEFINE_bool("skip_bad", False, "Skip bad images/rows (counted and listed) instead of stopping at the first.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"Name one dataset: {sorted(builders.BUILDERS)}")
  name = argv[1]
  try:
    b = builders.ensure_built(name, FLAGS.config, FLAGS.data_dir, FLAGS.manual_dir,
                              on_error="skip" if FLAGS.skip_bad else "raise")
  except (builders.DatasetNotFoundError, builders.BadInputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = {"dataset": name, "config": b.builder_config.name if b.builder_config else None,
             "path": str(b.data_dir), "splits": {k: v.num_examples for k, v in b.info.splits.items()},
             "skipped": len(b.skipped)}
  stats_file = os.path.join(os.fspath(b.data_dir), "build_stats.json")
  if os.path.exists(stats_file):
    with open(stats_file) as f:
      summary["build_stats"] = json.load(f)
  for reason in b.skipped[:50]:
    print(f"skipped: {reason}", file=sys.stderr)
  if len(b.skipped) > 50:
    print(f"... and {len(b.skipped) - 50} more skipped", file=sys.stderr)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  app.run(main)
