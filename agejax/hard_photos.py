"""Photos where face detectors fail, made from real faces, and the recall of a detector on them.

    python -m agejax.bench --mode detect --utkface ../shared/data/utkface/UTKFace.tar.gz

Each photo holds several UTKFace chips (real faces; the archive's first chips, feathered into
a smooth background, never overlapping) at a known place, then one condition:
  clean       colour, faces 100-150 px
  small       colour, faces 36-60 px (group photos, crowds)
  old_print   faces 60-110 px; gray, sepia, blurred, faded, grain, JPEG at quality 35
  scan        faces 50-90 px; gray, shrunk and enlarged again (a low-resolution scan), JPEG 50
and (`make_scans`, from UTKFace's test chips) a family album's scans: gray_scan and sepia_scan,
1-3 faces of 60-160 px in photos of 320-640 px, faded, slightly blurred, grain, JPEG 60-85; and
(`aaf_photos`) real photos: All-Age-Faces' test split, one labelled face each.
A face counts as found when a detection's centre lies in its chip and the detection's width is
0.25-1.2 of the chip's; each face is found at most once, other detections are false positives.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
import time
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

CONDITIONS = {"clean": (100, 150), "small": (36, 60), "old_print": (60, 110), "scan": (50, 90)}
# Family-album scans (`make_scans`): 1-3 faces of 60-160 px in a 320-640 px photo, gray or sepia.
SCAN_CONDITIONS = ("gray_scan", "sepia_scan")
SCAN_FACES = (60, 160)


@dataclasses.dataclass
class Photo:
  condition: str
  rgb: np.ndarray
  faces: list[tuple[int, int, int, int]]  # where each face is: its pasted chip, or (AAF) its landmarks' square
  ages: list[int] | None = None            # each face's true age, where known (`make_scans` given ages)


def utkface_chips(archive: str, count: int, names: set[str] | None = None) -> list[np.ndarray]:
  """The first `count` chips of a UTKFace archive (of those whose file name is in `names`, where
  given) as (200, 200, 3) uint8."""
  return [chip for _, chip in _named_chips(archive, count, names)]


def utkface_labelled_chips(archive: str, count: int,
                           names: set[str] | None = None) -> tuple[list[np.ndarray], list[int]]:
  """`utkface_chips` and each chip's age (the number its file name starts with, UTKFace's label;
  ValueError for a name without one)."""
  chips, ages = [], []
  for name, chip in _named_chips(archive, count, names):
    age = name.split("_", 1)[0]
    if not age.isdigit():
      raise ValueError(f"{archive}: {name} does not start with an age (UTKFace's age_gender_race_date.jpg)")
    chips.append(chip)
    ages.append(int(age))
  return chips, ages


def _named_chips(archive: str, count: int, names: set[str] | None) -> list[tuple[str, np.ndarray]]:
  """(file name, chip) of the first `count` JPEG files of the archive (of those in `names`)."""
  out = []
  with tarfile.open(archive) as tar:
    for m in tar:
      if len(out) >= count:
        break
      name = m.name.rsplit("/", 1)[-1]
      if m.isfile() and name.lower().endswith(".jpg") and (names is None or name in names):
        out.append((name, np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))))
  return out


def utkface_test_names(labels_csv: str) -> set[str]:
  """The file names of the duplicate-safe test split in UTKFace's labels.csv."""
  import csv
  with open(labels_csv, newline="") as f:
    return {row["filename"] for row in csv.DictReader(f) if row["split"] == "test"}


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
  low = rng.uniform(60, 200, size=(3, 4, 3)).astype(np.uint8)  # a smooth, low-frequency wash of colour
  bg = Image.fromarray(low).resize((w, h), Image.BICUBIC)
  noise = rng.normal(0, 6, size=(h, w, 1))
  return Image.fromarray(np.clip(np.asarray(bg, np.float32) + noise, 0, 255).astype(np.uint8))


def _feather(side: int) -> Image.Image:
  mask = Image.new("L", (side, side), 0)
  from PIL import ImageDraw
  ImageDraw.Draw(mask).ellipse([side * 0.04, side * 0.02, side * 0.96, side * 0.98], fill=255)
  return mask.filter(ImageFilter.GaussianBlur(side * 0.04))


def _degrade(img: Image.Image, condition: str, rng: np.random.Generator) -> Image.Image:
  if condition in ("clean", "small"):
    return img
  gray = ImageOps.grayscale(img)
  if condition == "old_print":
    gray = gray.filter(ImageFilter.GaussianBlur(1.6))
    a = np.asarray(gray, np.float32) / 255 * 0.6 + 0.25                      # faded
    a = a + rng.normal(0, 0.04, size=a.shape)                                 # grain
    sepia = np.stack([a * 1.07, a * 0.92, a * 0.72], -1)
    out = Image.fromarray(np.clip(sepia * 255, 0, 255).astype(np.uint8))
    quality = 35
  else:  # scan
    w, h = gray.size
    out = gray.resize((w // 3, h // 3), Image.BILINEAR).resize((w, h), Image.BILINEAR).convert("RGB")
    quality = 50
  buf = io.BytesIO()
  out.save(buf, format="JPEG", quality=quality)
  return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _place_faces(rng: np.random.Generator, canvas: Image.Image, chips: list[np.ndarray], k: int, want: int,
                 faces: tuple[int, int], tries: int) -> tuple[list[tuple[int, int, int, int]], int]:
  """Paste up to `want` chips (from chips[k] on, in turn) onto `canvas`, feathered, without overlap,
  their faces `faces` px wide, in at most `tries` draws; (boxes of the pasted chips, the next k)."""
  w, h = canvas.size
  boxes: list[tuple[int, int, int, int]] = []
  for _ in range(tries):
    if len(boxes) == want:
      break
    side = int(rng.integers(faces[0], faces[1] + 1) / 0.6)  # the face fills about 60% of a UTKFace chip
    if side >= min(w, h):
      continue
    x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
    box = (x, y, x + side, y + side)
    if any(not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]) for b in boxes):
      continue
    canvas.paste(Image.fromarray(chips[k % len(chips)]).resize((side, side), Image.BILINEAR), (x, y), _feather(side))
    k += 1
    boxes.append(box)
  return boxes, k


def make_photos(chips: list[np.ndarray], photos_per_condition: int = 6, faces_per_photo: int = 5,
                size: tuple[int, int] = (640, 480), seed: int = 0,
                conditions: Iterable[str] = tuple(CONDITIONS)) -> list[Photo]:
  """photos_per_condition photos of each condition, the chips used in turn."""
  rng = np.random.default_rng(seed)
  w, h = size
  out, k = [], 0
  for condition in conditions:
    lo, hi = CONDITIONS[condition]
    for _ in range(photos_per_condition):
      canvas = _background(rng, w, h)
      boxes, k = _place_faces(rng, canvas, chips, k, faces_per_photo, (lo, hi), faces_per_photo * 20)
      out.append(Photo(condition, np.asarray(_degrade(canvas, condition, rng)), boxes))
  return out


def make_scans(chips: list[np.ndarray], count: int, seed: int = 0, ages: list[int] | None = None) -> list[Photo]:
  """`count` monochrome photos like a family album's scans: 1-3 faces of SCAN_FACES px (the chips
  used in turn) in a 320-640 px photo (landscape or portrait), faded, gray or sepia (alternately),
  slightly blurred, with grain, saved as JPEG at quality 60-85. `ages`: the chips' ages, then each
  photo's `ages` (in the order of its `faces`)."""
  if ages is not None and len(ages) != len(chips):
    raise ValueError(f"{len(ages)} ages for {len(chips)} chips")
  rng = np.random.default_rng(seed)
  out, k = [], 0
  for n in range(count):
    long_side = int(rng.integers(320, 641))
    w, h = (long_side, long_side * 3 // 4) if rng.random() < 0.5 else (long_side * 3 // 4, long_side)
    canvas = _background(rng, w, h)
    first = k
    boxes, k = _place_faces(rng, canvas, chips, k, int(rng.integers(1, 4)), SCAN_FACES, 60)
    face_ages = None if ages is None else [ages[j % len(ages)] for j in range(first, k)]
    condition = SCAN_CONDITIONS[n % 2]
    gray = ImageOps.grayscale(canvas).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0))))
    a = np.asarray(gray, np.float32) / 255 * rng.uniform(0.7, 0.9) + rng.uniform(0.05, 0.15)  # faded
    a = a + rng.normal(0, 0.02, size=a.shape)                                                  # grain
    tint = (1.0, 1.0, 1.0) if condition == "gray_scan" else (1.07, 0.92, 0.72)
    img = Image.fromarray(np.clip(np.stack([a * t for t in tint], -1) * 255, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(60, 86)))
    out.append(Photo(condition, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), boxes, face_ages))
  return out


def aaf_photos(archive: str, count: int) -> list[Photo]:
  """The first `count` photos (by name) of All-Age-Faces' test split (`agejax.data.builders.aaf`'s
  split table) in `archive` (AAF-train.tar.gz): real photos, about 300x340 px, each with its one
  labelled face, placed by the dataset's 49 landmarks (a square 1.6 times their width about their
  centre, the size a UTKFace chip gives a face that fills 60% of it). Condition "aaf". A photo
  without its landmarks is left out; ValueError where none is left."""
  from agejax.data.builders import aaf
  test = sorted(n for n, split in aaf.split_table().items() if split == "test")[:count]
  photos, points = aaf.read_archive(archive, set(test))
  out = []
  for name in test:
    if name in photos and name[:-4] in points:
      pts = aaf.parse_points(points[name[:-4]], f"{aaf.POINTS}{name[:-4]}.txt")
      (left, top), (right, bottom) = pts.min(axis=0), pts.max(axis=0)
      cx, cy, half = (left + right) / 2, (top + bottom) / 2, 0.8 * (right - left)
      rgb = np.asarray(Image.open(io.BytesIO(photos[name])).convert("RGB"))
      out.append(Photo("aaf", rgb, [(round(cx - half), round(cy - half), round(cx + half), round(cy + half))]))
  if not out:
    raise ValueError(f"{archive}: no photo of All-Age-Faces' test split with its landmarks (the release's "
                     f"'{aaf.PHOTOS}' and '{aaf.POINTS}' folders)")
  return out


def match(faces: list[tuple], detections: list[tuple]) -> tuple[int, int]:
  """(faces found, false positives) for boxes (left, top, right, bottom)."""
  found = len(match_pairs(faces, detections))
  return found, len(detections) - found


def match_pairs(faces: list[tuple], detections: list[tuple]) -> list[tuple[int, int]]:
  """(face index, detection index) of each face found: a detection, in order, finds the first face
  not yet found whose box holds its centre and is 1/1.2-4 times as wide as it (a detection's width
  0.25-1.2 of the face's); each face is found at most once."""
  pairs, used = [], set()
  for j, det in enumerate(detections):
    cx, cy, dw = (det[0] + det[2]) / 2, (det[1] + det[3]) / 2, det[2] - det[0]
    hit = next((i for i, f in enumerate(faces) if i not in used and f[0] <= cx <= f[2] and f[1] <= cy <= f[3]
                and 0.25 <= dw / (f[2] - f[0]) <= 1.2), None)
    if hit is not None:
      used.add(hit)
      pairs.append((hit, j))
  return pairs


def recall(detect: Callable[[np.ndarray], list[tuple]], photos: list[Photo]) -> dict:
  """Per condition and overall: recall, false positives a photo, photos/s of `detect`
  (rgb -> boxes)."""
  rows: dict[str, list] = {}
  for p in photos:
    t = time.perf_counter()
    boxes = detect(p.rgb)
    dt = time.perf_counter() - t
    found, false = match(p.faces, boxes)
    rows.setdefault(p.condition, []).append((found, len(p.faces), false, dt))
  rows["all"] = [r for v in list(rows.values()) for r in v]

  def summary(v):
    found, total, false, secs = (sum(x[i] for x in v) for i in range(4))
    return {"recall": round(found / max(total, 1), 3), "faces": total,
            "false_per_photo": round(false / len(v), 2), "photos_per_s": round(len(v) / secs, 2)}
  return {k: summary(v) for k, v in rows.items()}
