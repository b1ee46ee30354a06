"""All-Age-Faces (Cheng, Li, Wang et al., Tsinghua Science and Technology 24(3), 2019), its released
training half, aligned the way UTKFace's chips were made so one network trains on both.

Manual directory:
  AAF-train.tar.gz   the release's `original images/NNNNNAYY.jpg` (about 300x340 px) and
                     `key points/NNNNNAYY.txt` (49 landmarks: the 68-point markup without the jaw
                     line and the inner mouth corners)
  labels.csv         file_name, age, gender (female/male), group_id, group_size, label_conflict
Research use; cite the paper above.

Alignment (`align`): dlib's HOG detector (upsampling once) and 5-point landmarks, then
`get_face_chip` at 200 px with `faces.CHIP_PADDING`, the route `predict.py` takes and the one that
reproduces UTKFace's framing. The detection kept is the one whose eyes lie on the dataset's own eye
landmarks (within a third of the eye distance); where none does, the dataset's landmarks are
mapped onto dlib's five points (eye corners 28, 25, 19, 22 and the nose's base 16) and go through
the same similarity transform. `builder.build_stats` counts each route.

Splits (`agejax/data/splits/aaf.csv.gz`, made by `make_split_table` from labels.csv): duplicate
groups shuffled with seed 0, then 80/10/10 of the photos to train / validation / test; a group
never straddles two splits. Labels: age, gender; race is unknown (-1, masked in training).
"""

from __future__ import annotations

import collections
import csv
import gzip
import importlib.resources
import io
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds

from agejax.data.builders.base import BadInputError, FaceBuilder, Record, read_csv_with_header

ARCHIVE = "AAF-train.tar.gz"
LABELS = "labels.csv"
PHOTOS, POINTS = "original images/", "key points/"
# The 49-point markup's indices of dlib's five: image-right eye outer, inner; image-left eye outer,
# inner; the nose's base (68-point 45, 42, 36, 39, 33).
DLIB_FIVE = (28, 25, 19, 22, 16)
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 0
CHIP_SIZE = 200
GENDERS = {"male": 0, "female": 1}


def make_split_table(rows: list[dict[str, str]], seed: int = SPLIT_SEED) -> dict[str, str]:
  """file_name -> train / validation / test: groups in a seeded random order, filled in that order
  to 80% and 90% of the photos. Deterministic for the same labels."""
  groups: dict[str, list[str]] = collections.defaultdict(list)
  for r in rows:
    groups[r["group_id"] or r["file_name"]].append(r["file_name"])
  order = sorted(groups)
  perm = np.random.default_rng(seed).permutation(len(order))
  total, done, table = len(rows), 0, {}
  bounds = np.cumsum(SPLIT_FRACTIONS) * total
  for i in perm:
    split = "train" if done < bounds[0] else "validation" if done < bounds[1] else "test"
    for name in groups[order[i]]:
      table[name] = split
    done += len(groups[order[i]])
  return table


def split_table() -> dict[str, str]:
  """The shipped file_name -> split assignment."""
  path = importlib.resources.files("agejax.data") / "splits" / "aaf.csv.gz"
  with gzip.open(path, "rt", newline="") as f:
    return {r["file_name"]: r["split"] for r in csv.DictReader(f)}


def write_split_table(labels_csv: str, out: str) -> None:
  with open(labels_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  table = make_split_table(rows)
  with gzip.open(out, "wt", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file_name", "split"])
    for name in sorted(table):
      w.writerow([name, table[name]])


def read_archive(archive: str, names: set[str] | None = None) -> tuple[dict[str, bytes], dict[str, str]]:
  """({photo name: JPEG bytes}, {photo name without .jpg: key-points text}) of the release's
  archive, of the photos in `names` only where given (reading stops once all of them are in)."""
  photos, points = {}, {}
  stems = None if names is None else {n[:-4] for n in names}
  with tarfile.open(archive, "r:gz") as tar:
    for m in tar:
      if not m.isfile():
        continue
      if m.name.startswith(PHOTOS) and (names is None or m.name[len(PHOTOS):] in names):
        photos[m.name[len(PHOTOS):]] = tar.extractfile(m).read()
      elif m.name.startswith(POINTS) and (stems is None or m.name[len(POINTS):-4] in stems):
        points[m.name[len(POINTS):-4]] = tar.extractfile(m).read().decode("utf-8", "replace")
      if names is not None and len(photos) == len(points) == len(names):
        break
  return photos, points


def parse_points(text: str, where: str) -> np.ndarray:
  """(49, 2) landmarks from a key-points file; BadInputError otherwise."""
  try:
    pts = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2)
  except ValueError as e:
    raise BadInputError(f"{where}: cannot parse landmarks ({e}).") from None
  if pts.shape != (49, 2) or not np.all(np.isfinite(pts)):
    raise BadInputError(f"{where}: expected 49 lines of 'x y', got an array of shape {pts.shape}.")
  return pts


_aligner = None


def align(jpeg: bytes, points: np.ndarray) -> tuple[bytes, str]:
  """(JPEG of the 200 px chip, route): route "detector" or "landmarks" (see the module docstring)."""
  global _aligner
  from PIL import Image

  from agejax import faces
  from agejax.data.images import to_rgb8
  if _aligner is None:
    _aligner = faces.FaceAligner(chip_size=CHIP_SIZE, detector="hog")
  with Image.open(io.BytesIO(jpeg)) as img:
    rgb = to_rgb8(img)
  ref = points[list(DLIB_FIVE)]
  ref_eyes = np.array([ref[0:2].mean(0), ref[2:4].mean(0)])
  tolerance = np.linalg.norm(ref_eyes[0] - ref_eyes[1]) / 3
  best, best_dist = None, np.inf
  for rect, _ in _aligner.detect(rgb):
    shape = _aligner.predictor(rgb, rect)
    p = faces.five_points(shape)
    eyes = np.array([p[0:2].mean(0), p[2:4].mean(0)])
    dist = float(np.linalg.norm(eyes - ref_eyes, axis=1).max())
    if dist < best_dist:
      best, best_dist = p, dist
  route = "detector" if best is not None and best_dist <= tolerance else "landmarks"
  chip = faces.chip_from_points(rgb, best if route == "detector" else ref, size=CHIP_SIZE)
  out = io.BytesIO()
  Image.fromarray(chip).save(out, format="JPEG", quality=95)
  return out.getvalue(), route


def _align_item(item):
  name, jpeg, text = item
  where = f"{ARCHIVE}:{PHOTOS}{name}"
  try:
    chip, route = align(jpeg, parse_points(text, f"{ARCHIVE}:{POINTS}{name[:-4]}.txt"))
  except BadInputError as e:
    return name, e, None
  except Exception as e:  # PIL's many errors for a damaged photo
    return name, BadInputError(f"{where}: not a readable image ({type(e).__name__}: {e})."), None
  return name, chip, route


class Aaf(FaceBuilder, skip_registration=True):
  """All-Age-Faces' training half (mostly Asian, ages 2-80), aligned like UTKFace's chips (research use)."""
  VERSION = tfds.core.Version("1.0.0")
  REQUIRED_FILES = (ARCHIVE, LABELS)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Put {ARCHIVE} (the release's training half: 'original images/' and 'key points/') "
                                  f"and its {LABELS} into the manual directory.")
  WORKERS = 2

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._chips: dict[str, bytes | BadInputError] | None = None
    self.build_stats: dict[str, int] = {}

  def _split_records(self, manual_dir):
    header, rows = read_csv_with_header(os.fspath(manual_dir / LABELS))
    missing = {"file_name", "age", "gender"} - set(header)
    if missing:
      raise BadInputError(f"{LABELS}:1: missing columns {sorted(missing)} (header {header!r}).")
    labels = [(line, dict(zip(header, row))) for line, row in rows]
    table = split_table()
    archive = os.fspath(manual_dir / ARCHIVE)
    return {s: self._records(archive, labels, table, s) for s in ("train", "validation", "test")}

  def _aligned(self, archive: str) -> dict[str, bytes | BadInputError]:
    """Every photo's chip (or its error), aligned once for all splits, in `WORKERS` processes."""
    if self._chips is not None:
      return self._chips
    photos, points = read_archive(archive)
    items = [(n, photos[n], points[n[:-4]]) for n in sorted(photos) if n[:-4] in points]
    chips: dict[str, bytes | BadInputError] = {
        n: BadInputError(f"{ARCHIVE}: {POINTS}{n[:-4]}.txt is missing.") for n in photos if n[:-4] not in points}
    routes = collections.Counter()
    from agejax.reporting import Progress
    bar = Progress(len(items), "align AAF", unit="photo")
    if self.WORKERS > 1 and len(items) > 64:
      import multiprocessing
      with multiprocessing.get_context("spawn").Pool(self.WORKERS) as pool:
        results = pool.imap(_align_item, items, chunksize=16)
        for name, chip, route in results:
          chips[name] = chip
          routes[route or "failed"] += 1
          bar.update(1, images=1)
    else:
      for item in items:
        name, chip, route = _align_item(item)
        chips[name] = chip
        routes[route or "failed"] += 1
        bar.update(1, images=1)
    bar.close()
    self.build_stats = {"aligned_by_detector": routes["detector"], "aligned_by_landmarks": routes["landmarks"],
                        "not_aligned": routes["failed"] + len(photos) - len(items)}
    self._chips = chips
    return chips

  def _records(self, archive, labels, table, split):
    chips = self._aligned(archive)
    for line, row in labels:
      where = f"{LABELS}:{line}"
      name = row.get("file_name", "")
      if name not in table:
        if split == "train":  # report once, not once per split
          yield BadInputError(f"{where}: {name!r} is not in agejax's AAF split table (is this the release's "
                              "training half?).")
        continue
      if table[name] != split:
        continue
      gender = GENDERS.get(row["gender"].strip().lower())
      try:
        age = float(row["age"])
      except ValueError:
        yield BadInputError(f"{where}: cannot parse the age from {row['age']!r}.")
        continue
      if gender is None:
        yield BadInputError(f"{where}: gender {row['gender']!r} is not female or male.")
        continue
      chip = chips.get(name, BadInputError(f"{where}: {PHOTOS}{name} is not in {ARCHIVE}."))
      if isinstance(chip, BadInputError):
        yield BadInputError(f"{where}: {chip}")
        continue
      yield Record(key=name, where=f"{where} ({PHOTOS}{name})", load=lambda c=chip: c, age=age, gender=gender,
                   race=-1, label_conflict=int(row.get("label_conflict") or 0))
