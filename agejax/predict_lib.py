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
from agejax import ldl
from agejax.export import ExportedModel

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")
DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "face_resnet_mtmsa")


def expand_paths(paths: Iterable[str]) -> list[str]:
  """Files as given; folders walked (sorted) for image and video files."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      for root, _, files in sorted(os.walk(p)):
        out += [os.path.join(root, f) for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)]
    else:
      out.append(p)
  return out


def annotation_paths(inputs: Iterable[str], out_dir: str) -> dict[str, str]:
  """Where the annotated copy of each input image goes under out_dir.

  A folder's images keep their path relative to the folder, a named file its name. Never an
  input file (an input in the way gets `_annotated` before its extension) and never one
  path for two inputs (later ones get `_2`, `_3`, ...).
  """
  pairs = []
  for arg in inputs:
    if os.path.isdir(arg):
      pairs += [(f, os.path.relpath(f, arg)) for f in expand_paths([arg])]
    else:
      pairs.append((arg, os.path.basename(arg)))
  originals = {os.path.realpath(f) for f, _ in pairs}
  taken: set[str] = set()
  out = {}
  for f, rel in pairs:
    if f in out:
      continue
    stem, ext = os.path.splitext(os.path.join(out_dir, rel))
    if os.path.realpath(stem + ext) in originals:
      stem += "_annotated"
    target, n = stem + ext, 1
    while os.path.realpath(target) in originals or os.path.realpath(target) in taken:
      n += 1
      target = f"{stem}_{n}{ext}"
    taken.add(os.path.realpath(target))
    out[f] = target
  return out


MAX_HELD_PIXELS = 100_000_000  # photos kept (for --annotate) while their faces wait for a batch


def _resize(chip: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(chip).resize((size, size), Image.BILINEAR))


def predict_faces(model: ExportedModel, chips: list[np.ndarray], distributions: bool = False) -> list[dict]:
  """Predictions for aligned face chips, in one pass of the network (batched by the model).

  Each: age, std, interval90, and gender / race {label, prob} where the model has them;
  with `distributions`, also "probs" (the age distribution over `model.grid`, float32) and
  "gender_probs" / "race_probs" (every class).
  """
  if not chips:
    return []
  out = model.predict(np.stack([_resize(c, model.image_size) for c in chips]))
  low, high = (np.asarray(v) for v in ldl.central_interval(out["probs"], model.grid, 0.9))
  results = []
  for i in range(len(chips)):
    r = {"age": float(out["age"][i]), "std": float(out["std"][i]), "interval90": (float(low[i]), float(high[i]))}
    if "gender_probs" in out:
      g = out["gender_probs"][i]
      r["gender"] = {"label": model.meta["gender_names"][int(np.argmax(g))], "prob": float(np.max(g))}
    if "race_probs" in out:
      p = out["race_probs"][i]
      r["race"] = {"label": model.meta["race_names"][int(np.argmax(p))], "prob": float(np.max(p))}
    if distributions:
      r["probs"] = out["probs"][i]
      r.update({k: out[k][i] for k in ("gender_probs", "race_probs") if k in out})
    results.append(r)
  return results


def predict_files(model: ExportedModel, paths: list[str], aligned: bool = False,
                  aligner: faces_lib.FaceAligner | None = None, batch_size: int = 32,
                  distributions: bool = False, workers: int = 0, keep_photo: bool = True,
                  detections: Iterable[tuple[dict, list]] | None = None) -> Iterator[dict]:
  """One record per file, in order: {"file", "width", "height", "faces": [...][, "_rgb"]} or
  {"file", "error"}; faces as predict_faces(..., distributions) gives them, with "box" and
  "detection_score". "_rgb" is the decoded photo where `keep_photo` (pop it before writing the
  record out).

  Faces are found by `aligner` (default FaceAligner()), in `workers` processes where > 0
  (faces_lib.find_faces_in_files); the faces of consecutive files go through the network
  together, about `batch_size` at a time (sooner when the photos kept hold over MAX_HELD_PIXELS).
  `detections`: the (record, faces) of `paths` from a detection already under way (what
  faces_lib.find_faces_in_files returns, started before the model was loaded); `aligned`,
  `aligner`, `workers` and `keep_photo` are then that detection's and are not used here.
  """
  if detections is None:
    if not aligned and aligner is None:
      aligner = faces_lib.FaceAligner()
    detections = faces_lib.find_faces_in_files(paths, aligned, aligner, workers, keep_photo)
  pending: list[tuple[dict, list]] = []

  def flush():
    preds = iter(predict_faces(model, [f.chip for _, found in pending for f in found], distributions))
    for rec, found in pending:
      if "error" not in rec:
        rec["faces"] = [{"box": list(f.box), "detection_score": f.score, **next(preds)} for f in found]
      yield rec
    pending.clear()

  for rec, found in detections:
    pending.append((rec, found))
    held = sum(r["width"] * r["height"] for r, _ in pending if "_rgb" in r)
    if sum(len(f) for _, f in pending) >= batch_size or held > MAX_HELD_PIXELS:
      yield from flush()
  yield from flush()


CSV_HEADER = ["file", "status", "face", "left", "top", "right", "bottom", "age", "std", "low90", "high90",
              "gender", "gender_prob", "race", "race_prob", "message"]


def csv_rows(record: dict) -> list[list]:
  """CSV_HEADER rows for one predict_files record: one per face, or one saying "no face" / "error"."""
  if "error" in record:
    return [[record["file"], "error"] + [""] * (len(CSV_HEADER) - 3) + [record["error"]]]
  if not record["faces"]:
    return [[record["file"], "no face"] + [""] * (len(CSV_HEADER) - 2)]
  rows = []
  for i, f in enumerate(record["faces"]):
    g, r = f.get("gender", {}), f.get("race", {})
    rows.append([record["file"], "ok", i, *f["box"], f"{f['age']:.2f}", f"{f['std']:.2f}", *f["interval90"],
                 g.get("label", ""), f"{g['prob']:.3f}" if g else "", r.get("label", ""),
                 f"{r['prob']:.3f}" if r else "", ""])
  return rows


def describe_face(face: dict) -> str:
  """'age 25.9 +- 6.7 (90%: 16-37), gender female (92%), race White (97%)'."""
  extra = "".join(f", {k} {face[k]['label']} ({face[k]['prob']:.0%})" for k in ("gender", "race") if k in face)
  return (f"age {face['age']:.1f} +- {face['std']:.1f} "
          f"(90%: {face['interval90'][0]:g}-{face['interval90'][1]:g}){extra}")


def draw_faces(rgb: np.ndarray, faces: list[dict], numbers: bool = False) -> Image.Image:
  """The photo with a box and 'age +- std' (and gender's initial) over each face; with `numbers`,
  each label starts with the face's index ("0: 26 +- 7 F"), and a face with a "track" (videos)
  with its track ("#3 26 +- 7 F")."""
  img = Image.fromarray(rgb)
  draw = ImageDraw.Draw(img)
  width = max(2, img.width // 300)
  for i, f in enumerate(faces):
    l, t, r, b = f["box"]
    draw.rectangle([l, t, r, b], outline=(255, 64, 64), width=width)
    prefix = f"{i}: " if numbers else f"#{f['track']} " if "track" in f else ""
    label = prefix + f"{f['age']:.0f} +- {f['std']:.0f}"
    if "gender" in f:
      label += f" {f['gender']['label'][0].upper()}"
    tw = draw.textlength(label)
    draw.rectangle([l, max(t - 14, 0), l + tw + 6, max(t, 14)], fill=(255, 64, 64))
    draw.text((l + 3, max(t - 13, 1)), label, fill=(255, 255, 255))
  return img


def annotate(rgb: np.ndarray, faces: list[dict], out_path: str, overwrite: bool = False):
  """Write draw_faces(rgb, faces) to out_path; FileExistsError where out_path exists and overwrite
  is False."""
  if os.path.exists(out_path) and not overwrite:
    raise FileExistsError(f"{out_path} exists; not overwritten (pass --overwrite to replace it).")
  img = draw_faces(rgb, faces)
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  img.save(out_path)
