"""The age of every face in photos: files and folders in, one record per face out.

Works from an exported model (`agejax.export`), so it needs no training code or
config. Bad files are reported per file and the run goes on.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from agejax import faces as faces_lib
from agejax.export import ExportedModel

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "utkface_tiny")


def expand_paths(paths: Iterable[str]) -> list[str]:
  """Files as given; folders walked (sorted) for image files."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      for root, _, files in sorted(os.walk(p)):
        out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
      out.append(p)
  return out


def _resize(chip: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(chip).resize((size, size), Image.BILINEAR))


def _interval(probs: np.ndarray, grid: np.ndarray, mass: float = 0.9) -> tuple[float, float]:
  cdf = np.cumsum(probs)
  tail = (1 - mass) / 2
  lo = grid[min(int(np.sum(cdf < tail - 1e-6)), len(grid) - 1)]
  hi = grid[min(int(np.sum(cdf < 1 - tail - 1e-6)), len(grid) - 1)]
  return float(lo), float(hi)


def predict_faces(model: ExportedModel, chips: list[np.ndarray]) -> list[dict]:
  """Predictions for aligned face chips."""
  if not chips:
    return []
  out = model.predict(np.stack([_resize(c, model.image_size) for c in chips]))
  results = []
  for i in range(len(chips)):
    r = {"age": float(out["age"][i]), "std": float(out["std"][i]),
         "interval90": _interval(out["probs"][i], model.grid)}
    if "gender_probs" in out:
      g = out["gender_probs"][i]
      r["gender"] = {"label": model.meta["gender_names"][int(np.argmax(g))], "prob": float(np.max(g))}
    if "race_probs" in out:
      p = out["race_probs"][i]
      r["race"] = {"label": model.meta["race_names"][int(np.argmax(p))], "prob": float(np.max(p))}
    results.append(r)
  return results


def predict_files(model: ExportedModel, paths: list[str], aligned: bool = False,
                  aligner: faces_lib.FaceAligner | None = None) -> Iterator[dict]:
  """One record per file: {"file", "faces": [...]} or {"file", "error"}."""
  if not aligned and aligner is None:
    aligner = faces_lib.FaceAligner()
  for path in paths:
    try:
      rgb = faces_lib.read_photo(path)
    except faces_lib.PhotoError as e:
      yield {"file": path, "error": str(e)}
      continue
    found = [faces_lib.whole_image_face(rgb)] if aligned else aligner(rgb)
    preds = predict_faces(model, [f.chip for f in found])
    yield {"file": path, "width": rgb.shape[1], "height": rgb.shape[0],
           "faces": [{"box": list(f.box), "detection_score": f.score, **p} for f, p in zip(found, preds)],
           "_rgb": rgb}


def annotate(rgb: np.ndarray, faces: list[dict], out_path: str):
  """Write the photo with a box and 'age +- std' over each face."""
  img = Image.fromarray(rgb)
  draw = ImageDraw.Draw(img)
  width = max(2, img.width // 300)
  for f in faces:
    l, t, r, b = f["box"]
    draw.rectangle([l, t, r, b], outline=(255, 64, 64), width=width)
    label = f"{f['age']:.0f} +- {f['std']:.0f}"
    if "gender" in f:
      label += f" {f['gender']['label'][0].upper()}"
    tw = draw.textlength(label)
    draw.rectangle([l, max(t - 14, 0), l + tw + 6, max(t, 14)], fill=(255, 64, 64))
    draw.text((l + 3, max(t - 13, 1)), label, fill=(255, 255, 255))
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  img.save(out_path)
