"""Build a dataset once: python -m agejax.data.build NAME --manual_dir DIR [--data_dir DIR].

    python -m agejax.data.build utkface --manual_dir ../shared/data/utkface
    python -m agejax.data.build adience --config fold0 --manual_dir ~/adience --skip_bad
    python -m agejax.data.build utkface --verify            # read and decode every stored record
    python -m agejax.data.build utkface --rebuild --manual_dir ../shared/data/utkface

Prints per-split counts, and with --skip_bad the skipped inputs and why. --verify reads every
record of every split of the built dataset and decodes its image, lists the damaged ones (split,
record, file name where readable) and exits 1 if there are any. --rebuild deletes the built
dataset first.
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
flags.DEFINE_bool("verify", False, "Read and decode every record of the built dataset; list the damaged ones.")
flags.DEFINE_bool("rebuild", False, "Delete the built dataset (this config's version folder) and build it again.")
flags.DEFINE_bool("skip_bad", False, "Skip bad images/rows (counted and listed) instead of stopping at the first.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"Name one dataset: {sorted(builders.BUILDERS)}")
  name = argv[1]
  try:
    if FLAGS.rebuild:
      import shutil
      old = builders.get_builder(name, FLAGS.config, FLAGS.data_dir)
      if os.path.isdir(os.fspath(old.data_dir)):
        shutil.rmtree(os.fspath(old.data_dir))
        print(f"Removed {old.data_dir}; building it again.", file=sys.stderr)
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
  if FLAGS.verify:
    damaged = verify(b)
    summary["damaged"] = len(damaged)
    for line in damaged[:100]:
      print(f"damaged: {line}", file=sys.stderr)
    if damaged:
      print(json.dumps(summary))
      print(f"error: {len(damaged)} damaged record(s) in {b.data_dir}; rebuild with: python -m agejax.data.build "
            f"{name}{' --config ' + FLAGS.config if FLAGS.config else ''} --rebuild --manual_dir DIR", file=sys.stderr)
      return 1
  print(json.dumps(summary))
  return 0


def verify(builder) -> list[str]:
  """Every record of every split read and its image decoded; a line for each that fails."""
  from agejax.data import pipeline
  from agejax.reporting import Progress
  bad = []
  splits = list(builder.info.splits)
  total = sum(builder.info.splits[s].num_examples for s in splits)
  bar = Progress(total, "verify", unit="record")
  for split in splits:
    source = builder.as_data_source(split)
    for i in range(len(source)):
      try:
        rec = pipeline.read_record(source, i)
      except pipeline.DamagedRecordError as e:
        bad.append(f"{split} record {i}: {e}")
        bar.update(1, images=1)
        continue
      try:
        pipeline.decode_face(rec["image"], 32)
      except Exception as e:  # PIL's many errors for damaged bytes
        bad.append(f"{split} record {i} ({rec['filename'].decode(errors='replace')}): the image does not decode "
                   f"({type(e).__name__}: {e})")
      bar.update(1, images=1)
  bar.close()
  return bad


if __name__ == "__main__":
  app.run(main)
