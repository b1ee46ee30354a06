"""The age of every face in photos.

    agejax predict photo.jpg folder/                      # the bundled model (dlib's face ResNet, MTMSA's heads)
    agejax predict --workdir runs/utk_tiny photos/ --json # a model you trained (after export)
    agejax predict --aligned --csv chips/                 # images that already are face chips
    agejax predict photos/ --annotate annotated/          # draw boxes and ages
    agejax predict clip.mp4 --every 5 --annotate out/     # videos: one age per tracked person

Per face: box, predicted age, the distribution's std and 90% interval, and
gender / race with probabilities for multi-task models. Unreadable files are
reported and skipped; in --csv mode every file gets a row with its status
(ok, no face, error). Annotated copies never replace an input or an existing
file (unless --overwrite).

Videos (agejax[video]): faces every --every-th frame, tracked across frames, and each track's
distributions averaged (agejax.video); one line per track, --json gives tracks and every
sampled frame, --csv a table of its own after the photos' (one row per face per sampled
frame, with its track's age), --annotate an MP4 with each track's age.

Exit status: 0 every file answered, 1 some files failed, 2 nothing to do
(no images found, or the model could not be loaded).
"""

import csv
import json
import os
import sys

from absl import app, flags

from agejax import export, faces

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run with an export/ folder (python -m agejax.export ...).")
flags.DEFINE_string("model", None, "An exported model folder (default: the bundled model, dlib's face ResNet with MTMSA's heads).")
flags.DEFINE_enum("runtime", "auto", list(export.RUNTIMES), export.RUNTIME_HELP)
flags.DEFINE_bool("aligned", False, "Inputs are already face chips: skip detection.")
flags.DEFINE_bool("json", False, "Print one JSON line per file.")
flags.DEFINE_bool("csv", False, "Print CSV, one row per face.")
flags.DEFINE_string("annotate", None, "Write annotated copies of the photos into this folder (a folder's "
                    "images keep their relative paths).")
flags.DEFINE_bool("overwrite", False, "Let --annotate replace files that already exist (never an input).")
flags.DEFINE_enum("detector", "auto", list(faces.DETECTORS), faces.DETECTOR_HELP)
flags.DEFINE_integer("upsample", 1, "Double the photo this many times before HOG detects (finds smaller faces; "
                     "each step about 4x slower): hog, careful, auto's HOG, and the cnn detector.",
                     lower_bound=0, upper_bound=3)
flags.DEFINE_integer("workers", None, "Face-detection processes (default: one per core, at most 8, for 4 or "
                     "more photos; 0: detect in this process).", lower_bound=0)
flags.DEFINE_integer("every", 0, "Videos: look for faces in every Nth frame (0: about 5 frames a second).",
                     lower_bound=0)


def main(argv):
  paths = argv[1:]
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if not paths:
    raise app.UsageError("Name at least one photo, video or folder.")
  from agejax import export, predict_lib
  model_dir = FLAGS.model or (os.path.join(FLAGS.workdir, "export") if FLAGS.workdir else predict_lib.DEFAULT_MODEL)
  files = predict_lib.expand_paths(paths)
  from agejax import video
  photos = [f for f in files if not video.is_video(f)]
  videos = [f for f in files if video.is_video(f)]
  workers = _detection_workers(len(photos))
  load = lambda: export.load(model_dir, FLAGS.runtime, threads=1 if workers else None)  # noqa: E731
  finder = None
  try:
    try:  # one network thread where detection workers take the cores (docs/PERFORMANCE.md)
      if photos and os.path.exists(os.path.join(model_dir, "model.json")):
        try:  # the detection starts first: dlib and the detectors load while the network does
          finder = _start_detection(photos, workers, keep_photo=bool(FLAGS.annotate))
        except ImportError as e:  # dlib missing
          print(f"error: {e}", file=sys.stderr)
          return 2
        model, detections = _load_while_detecting(load, finder)
      else:  # nothing to detect, or no model there: its error before any detection
        model, detections = load(), None
    except (FileNotFoundError, export.ExportError, ImportError) as e:
      hint = (f" Export the run first: python -m agejax.export --config CONFIG --workdir {FLAGS.workdir}"
              if FLAGS.workdir and isinstance(e, FileNotFoundError) else "")
      print(f"error: {e}{hint}", file=sys.stderr)
      return 2
    if not files:
      print(f"error: no images or videos ({', '.join(predict_lib.IMAGE_EXTENSIONS + predict_lib.VIDEO_EXTENSIONS)}) "
            f"in {', '.join(paths)}.", file=sys.stderr)
      return 2
    targets = predict_lib.annotation_paths(paths, FLAGS.annotate) if FLAGS.annotate else {}
    errors = 0
    try:
      if photos:  # (a model loads only where model.json is, so photos have their detections here)
        errors += _photos(model, photos, targets, detections)
      if videos:
        errors += _videos(model, videos, targets)
    except ImportError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  finally:
    if isinstance(finder, faces.FaceFinder):
      finder.close()
  total = len(photos) + len(videos)
  if errors:
    print(f"{errors} of {total} files failed.", file=sys.stderr)
  return 1 if errors else 0


def _videos(model, paths, targets) -> int:
  """Each video's tracks, as --json / --csv / text say; the number that failed."""
  from agejax import video
  aligner = _aligner()
  writer = None
  if FLAGS.csv:
    writer = csv.writer(sys.stdout)
    writer.writerow(video.CSV_HEADER)
  errors = 0
  for path in paths:
    try:
      result = video.analyse(model, path, every=FLAGS.every, aligner=aligner, progress=True)
      if FLAGS.annotate:
        video.annotate(result, os.path.splitext(targets[path])[0] + ".mp4", overwrite=FLAGS.overwrite)
    except (video.VideoError, FileExistsError, OSError) as e:
      errors += 1
      print(f"error: {e}", file=sys.stderr)
      if FLAGS.json:
        print(json.dumps({"file": path, "error": str(e)}))
      continue
    if FLAGS.json:
      print(json.dumps(result))
    elif writer:
      writer.writerows(video.csv_rows(result))
    else:
      if not result["tracks"]:
        print(f"{path}: no face found in {len(result['frame_faces'])} sampled frames")
      for t in result["tracks"]:
        print(f"{path} {video.describe_track(t)}")
  return errors


def _detection_workers(photos: int) -> int:
  """Face-detection processes for `photos` photos: --workers, else one per core (at most 8) for 4
  photos or more (measured: docs/PERFORMANCE.md); none for --aligned chips."""
  if FLAGS.aligned:
    return 0
  if FLAGS.workers is not None:
    return FLAGS.workers
  return min(8, os.cpu_count() or 1) if photos >= 4 else 0


def _aligner():
  """The face finder --detector and --upsample ask for (ImportError where dlib is missing)."""
  return faces.FaceAligner(detector=FLAGS.detector, upsample=FLAGS.upsample)


def _start_detection(photos: list[str], workers: int, keep_photo: bool):
  """faces.find_faces_in_files for `photos`: with workers, a faces.FaceFinder whose processes
  start now; else (or for --aligned chips) a generator that detects as it is asked.
  ImportError where dlib is missing."""
  return faces.find_faces_in_files(photos, FLAGS.aligned, None if FLAGS.aligned else _aligner(), workers,
                                   keep_photo)


def _load_while_detecting(load, detections):
  """(load(), `detections` from their start). The model loads in a thread while this one takes the
  first photo's faces (without workers, dlib and the detectors load and run here meanwhile).
  load's exceptions are raised here once the first photo is done (main checks for model.json
  first, so only a damaged model waits for it); an exception of the first photo's detection is
  raised where the detections are read, never taken for the model's."""
  import itertools
  from concurrent.futures import ThreadPoolExecutor
  rest = iter(detections)
  with ThreadPoolExecutor(1) as pool:
    loading = pool.submit(load)
    try:
      first, failed = list(itertools.islice(rest, 1)), None
    except Exception as e:  # noqa: BLE001 (raised again below, where the records are read)
      first, failed = [], e
    model = loading.result()
  if failed is not None:
    def reraise():
      raise failed
      yield
    return model, reraise()
  return model, itertools.chain(first, rest)


def _photos(model, files, targets, detections) -> int:
  """Each photo's faces, as --json / --csv / text say; the number of files that failed.
  `detections`: the (record, faces) of `files` (_load_while_detecting's)."""
  from tqdm import tqdm

  from agejax import predict_lib
  records = predict_lib.predict_files(model, files, detections=detections)
  writer = None
  if FLAGS.csv:
    writer = csv.writer(sys.stdout)
    writer.writerow(predict_lib.CSV_HEADER)
  errors = 0
  for rec in tqdm(records, total=len(files), unit="file", disable=len(files) < 2, file=sys.stderr):
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
      writer.writerows(predict_lib.csv_rows(rec))
    elif "error" not in rec:
      if not rec["faces"]:
        print(f"{rec['file']}: no face found")
      for i, f in enumerate(rec["faces"]):
        print(f"{rec['file']} face {i} box {tuple(f['box'])}: {predict_lib.describe_face(f)}")
  return errors


def run():
  """The command line: `agejax predict`, `python predict.py` and `python -m agejax.tools.predict`."""
  from agejax import cli
  cli.run_tool(main)


if __name__ == "__main__":
  run()
