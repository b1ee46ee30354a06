"""The age of every face in photos.

    python predict.py photo.jpg folder/                      # the bundled UTKFace TinyAgeNet
    python predict.py --workdir runs/utk_tiny photos/ --json # a model you trained (after export)
    python predict.py --aligned --csv chips/                 # images that already are face chips
    python predict.py photos/ --annotate annotated/          # draw boxes and ages

Per face: box, predicted age, the distribution's std and 90% interval, and
gender / race with probabilities for multi-task models. Unreadable files are
reported and skipped; in --csv mode every file gets a row with its status
(ok, no face, error). Annotated copies never replace an input or an existing
file (unless --overwrite).

Exit status: 0 every file answered, 1 some files failed, 2 nothing to do
(no images found, or the model could not be loaded).
"""

import csv
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run with an export/ folder (python -m agejax.export ...).")
flags.DEFINE_string("model", None, "An exported model folder (default: the bundled UTKFace TinyAgeNet).")
flags.DEFINE_bool("aligned", False, "Inputs are already face chips: skip detection.")
flags.DEFINE_bool("json", False, "Print one JSON line per file.")
flags.DEFINE_bool("csv", False, "Print CSV, one row per face.")
flags.DEFINE_string("annotate", None, "Write annotated copies of the photos into this folder (a folder's "
                    "images keep their relative paths).")
flags.DEFINE_bool("overwrite", False, "Let --annotate replace files that already exist (never an input).")

CSV_HEADER = ["file", "status", "face", "left", "top", "right", "bottom", "age", "std", "low90", "high90",
              "gender", "gender_prob", "race", "race_prob", "message"]


def main(argv):
  paths = argv[1:]
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if not paths:
    raise app.UsageError("Name at least one photo or folder.")
  from tqdm import tqdm

  from agejax import export, predict_lib
  model_dir = FLAGS.model or (os.path.join(FLAGS.workdir, "export") if FLAGS.workdir else predict_lib.DEFAULT_MODEL)
  try:
    model = export.load(model_dir)
  except (FileNotFoundError, export.ExportError) as e:
    hint = (f" Export the run first: python -m agejax.export --config CONFIG --workdir {FLAGS.workdir}"
            if FLAGS.workdir and isinstance(e, FileNotFoundError) else "")
    print(f"error: {e}{hint}", file=sys.stderr)
    return 2
  files = predict_lib.expand_paths(paths)
  if not files:
    print(f"error: no images ({', '.join(predict_lib.IMAGE_EXTENSIONS)}) in {', '.join(paths)}.", file=sys.stderr)
    return 2
  targets = predict_lib.annotation_paths(paths, FLAGS.annotate) if FLAGS.annotate else {}
  try:
    records = predict_lib.predict_files(model, files, aligned=FLAGS.aligned)
    writer = None
    if FLAGS.csv:
      writer = csv.writer(sys.stdout)
      writer.writerow(CSV_HEADER)
    errors = 0
    for rec in tqdm(records, total=len(files), unit="file", disable=len(files) < 5, file=sys.stderr):
      rgb = rec.pop("_rgb", None)
      if "error" not in rec and FLAGS.annotate:
        try:
          predict_lib.annotate(rgb, rec["faces"], targets[rec["file"]], overwrite=FLAGS.overwrite)
        except (FileExistsError, OSError) as e:
          rec["error"] = str(e)
      if "error" in rec:
        errors += 1
        print(f"error: {rec['error']}", file=sys.stderr)
        if FLAGS.json:
          print(json.dumps(rec))
        elif writer:
          writer.writerow([rec["file"], "error"] + [""] * (len(CSV_HEADER) - 3) + [rec["error"]])
        continue
      if FLAGS.json:
        print(json.dumps(rec))
      elif writer:
        if not rec["faces"]:
          writer.writerow([rec["file"], "no face"] + [""] * (len(CSV_HEADER) - 2))
        for i, f in enumerate(rec["faces"]):
          g, r = f.get("gender", {}), f.get("race", {})
          writer.writerow([rec["file"], "ok", i, *f["box"], f"{f['age']:.2f}", f"{f['std']:.2f}", *f["interval90"],
                           g.get("label", ""), f"{g['prob']:.3f}" if g else "", r.get("label", ""),
                           f"{r['prob']:.3f}" if r else "", ""])
      else:
        if not rec["faces"]:
          print(f"{rec['file']}: no face found")
        for i, f in enumerate(rec["faces"]):
          extra = "".join(f", {k} {f[k]['label']} ({f[k]['prob']:.0%})" for k in ("gender", "race") if k in f)
          print(f"{rec['file']} face {i} box {tuple(f['box'])}: age {f['age']:.1f} +- {f['std']:.1f} "
                f"(90%: {f['interval90'][0]:g}-{f['interval90'][1]:g}){extra}")
  except ImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if errors:
    print(f"{errors} of {len(files)} files failed.", file=sys.stderr)
  return 1 if errors else 0


if __name__ == "__main__":
  from agejax import cli
  cli.start_process()  # XLA flags and huge pages, before JAX loads
  app.run(main)
