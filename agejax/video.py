"""The ages of the people in a video: faces every Nth frame, tracked across frames, one age a track.

    python predict.py clip.mp4                   # one line per track
    python predict.py clip.mp4 --json            # tracks and every sampled frame's faces
    python predict.py clip.mp4 --annotate out/   # out/clip.mp4 with boxes and each track's age

Frames are decoded by ffmpeg (`pip install 'agejax[video]'`: imageio-ffmpeg, whose wheel carries
ffmpeg), so any format it reads works. Faces found in the sampled frames are linked into tracks by
box overlap (`IoUTracker`), and each track's age distributions are averaged over its frames: one
person gets one steady age, with the std and 90% interval of the averaged distribution, and gender
and race from the averaged probabilities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Iterator

import numpy as np

from agejax import faces as faces_lib
from agejax import ldl, predict_lib

SAMPLES_PER_SECOND = 5.0   # the default sampling: about this many frames a second


class VideoError(ValueError):
  """A file that cannot be read as a video; the message names it."""


def is_video(path: str) -> bool:
  return path.lower().endswith(predict_lib.VIDEO_EXTENSIONS)


def _ffmpeg():
  try:
    import imageio_ffmpeg
  except ImportError as e:
    raise ImportError("Videos need ffmpeg: pip install 'agejax[video]' (imageio-ffmpeg).") from e
  return imageio_ffmpeg


def read_frames(path: str) -> tuple[dict, Iterator[np.ndarray]]:
  """({"fps", "size": (w, h), "frames": estimated count}, iterator of (h, w, 3) uint8 RGB frames)."""
  ffmpeg = _ffmpeg()
  if not os.path.isfile(path):
    raise VideoError(f"{path}: no such file.")
  try:
    gen = ffmpeg.read_frames(path, pix_fmt="rgb24")
    with _quiet_fork():
      meta = gen.__next__()
  except Exception as e:  # ffmpeg's messages for damaged or foreign files
    raise VideoError(f"{path}: not a readable video ({str(e).strip().splitlines()[-1] if str(e).strip() else e}).") from None
  w, h = meta["size"]
  fps = float(meta.get("fps") or 25.0)
  info = {"fps": fps, "size": (w, h), "frames": int(round(float(meta.get("duration") or 0) * fps))}

  def frames():
    try:
      for buf in gen:
        yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
    finally:
      gen.close()
  return info, frames()


@contextlib.contextmanager
def _quiet_fork():
  """Starting ffmpeg forks and execs at once, which is safe beside JAX's threads: JAX's warning
  about os.fork is silenced for it."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    yield


def iou(a, b) -> float:
  """Intersection over union of boxes (left, top, right, bottom)."""
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  if w <= 0 or h <= 0:
    return 0.0
  inter = w * h
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class IoUTracker:
  """Greedy box-overlap tracking: each detection joins the live track whose last box overlaps it
  most (IoU >= min_iou, each track at most once a frame), else starts a new track; a track not
  matched for more than max_missed sampled frames ends."""

  def __init__(self, min_iou: float = 0.3, max_missed: int = 5):
    self.min_iou, self.max_missed = min_iou, max_missed
    self._live: dict[int, tuple[tuple, int]] = {}  # track id -> (last box, sampled frames missed)
    self._next = 0

  def update(self, boxes: list[tuple]) -> list[int]:
    """The track id of each box of one sampled frame."""
    pairs = sorted(((iou(b, last), i, t) for i, b in enumerate(boxes) for t, (last, _) in self._live.items()),
                   reverse=True)
    ids: list[int | None] = [None] * len(boxes)
    used = set()
    for score, i, t in pairs:
      if score < self.min_iou:
        break
      if ids[i] is None and t not in used:
        ids[i] = t
        used.add(t)
    for i in range(len(boxes)):
      if ids[i] is None:
        ids[i] = self._next
        self._next += 1
    for t in list(self._live):
      if t not in ids:
        last, missed = self._live[t]
        if missed + 1 > self.max_missed:
          del self._live[t]
        else:
          self._live[t] = (last, missed + 1)
    for i, t in enumerate(ids):
      self._live[t] = (tuple(boxes[i]), 0)
    return ids


@dataclasses.dataclass
class _Track:
  frames: list[int] = dataclasses.field(default_factory=list)
  probs: list[np.ndarray] = dataclasses.field(default_factory=list)
  ages: list[float] = dataclasses.field(default_factory=list)
  gender: list[np.ndarray] = dataclasses.field(default_factory=list)
  race: list[np.ndarray] = dataclasses.field(default_factory=list)


def _summary(model, probs: np.ndarray, names_key: str) -> dict:
  names = model.meta[names_key]
  k = int(np.argmax(probs))
  return {"label": names[k], "prob": float(probs[k]), "probs": {n: round(float(p), 4) for n, p in zip(names, probs)}}


def analyse(model, path: str, every: int = 0, aligner: faces_lib.FaceAligner | None = None,
            batch_size: int = 32, progress: bool = False) -> dict:
  """Faces of every `every`-th frame (0: about SAMPLES_PER_SECOND a second), tracked, each track's
  distributions averaged.

  Returns {"file", "fps", "width", "height", "frames", "every", "tracks": [...], "frame_faces": [...]}:
  a track is {"track", "first_frame", "last_frame", "first_time", "last_time", "frames_seen",
  "age" (the mean of its frames' ages, each the network's expectation), "std", "interval90"[, "gender",
  "race"]} from the averaged (calibrated) distribution; frame_faces
  has {"frame", "time", "faces": [{"track", "box", "age", "std", "interval90", ...}]} for every
  sampled frame, each face as the network saw it in that frame.
  """
  info, frames = read_frames(path)
  fps = info["fps"]
  every = every or max(1, int(round(fps / SAMPLES_PER_SECOND)))
  aligner = aligner or faces_lib.FaceAligner()
  tracker = IoUTracker()
  tracks: dict[int, _Track] = {}
  frame_faces: list[dict] = []
  pending: list[tuple[dict, list]] = []  # (frame record, found faces) awaiting the network

  def flush():
    preds = iter(predict_lib.predict_faces(model, [f.chip for _, found in pending for f in found],
                                           distributions=True))
    for rec, found in pending:
      for f, track_id in zip(found, rec.pop("_tracks")):
        p = next(preds)
        t = tracks.setdefault(track_id, _Track())
        t.frames.append(rec["frame"])
        t.probs.append(p.pop("probs"))
        t.ages.append(float(p["age"]))
        if "gender_probs" in p:
          t.gender.append(p.pop("gender_probs"))
        if "race_probs" in p:
          t.race.append(p.pop("race_probs"))
        rec["faces"].append({"track": track_id, "box": list(f.box), "detection_score": f.score, **p})
    pending.clear()

  from tqdm import tqdm
  count = 0
  for i, rgb in enumerate(tqdm(frames, total=info["frames"] or None, unit="frame", disable=not progress,
                               desc=os.path.basename(path))):
    count = i + 1
    if i % every:
      continue
    found = aligner(rgb)
    rec = {"frame": i, "time": round(i / fps, 3), "faces": [], "_tracks": tracker.update([f.box for f in found])}
    frame_faces.append(rec)
    pending.append((rec, found))
    if sum(len(f) for _, f in pending) >= batch_size:
      flush()
  flush()
  if count == 0:
    raise VideoError(f"{path}: no frames could be decoded.")

  out_tracks = []
  for track_id in sorted(tracks):
    t = tracks[track_id]
    mean = np.mean(t.probs, axis=0)
    low, high = (float(v) for v in ldl.central_interval(mean, model.grid, 0.9))
    rec = {"track": track_id, "first_frame": t.frames[0], "last_frame": t.frames[-1],
           "first_time": round(t.frames[0] / fps, 3), "last_time": round(t.frames[-1] / fps, 3),
           "frames_seen": len(t.frames), "age": float(np.mean(t.ages)),
           "std": float(ldl.distribution_std(mean, model.grid)), "interval90": (low, high)}
    for key, values, names in (("gender", t.gender, "gender_names"), ("race", t.race, "race_names")):
      if values:
        rec[key] = _summary(model, np.mean(values, axis=0), names)
    out_tracks.append(rec)
  return {"file": path, "fps": fps, "width": info["size"][0], "height": info["size"][1], "frames": count,
          "every": every, "tracks": out_tracks, "frame_faces": frame_faces}


CSV_HEADER = ["file", "frame", "time", "track", "left", "top", "right", "bottom", "frame_age", "frame_std",
              "track_age", "track_std", "track_low90", "track_high90", "track_gender", "track_gender_prob",
              "track_race", "track_race_prob"]


def csv_rows(result: dict) -> list[list]:
  """CSV_HEADER rows: one per face per sampled frame, with its track's averaged answer beside it."""
  by_id = {t["track"]: t for t in result["tracks"]}
  rows = []
  for fr in result["frame_faces"]:
    for f in fr["faces"]:
      t = by_id[f["track"]]
      g, r = t.get("gender", {}), t.get("race", {})
      rows.append([result["file"], fr["frame"], fr["time"], f["track"], *f["box"], f"{f['age']:.2f}",
                   f"{f['std']:.2f}", f"{t['age']:.2f}", f"{t['std']:.2f}", *t["interval90"],
                   g.get("label", ""), f"{g['prob']:.3f}" if g else "", r.get("label", ""),
                   f"{r['prob']:.3f}" if r else ""])
  return rows


def describe_track(track: dict) -> str:
  """'track 0 (frames 0-118, 0.0-3.9 s, seen in 24): age 25.9 +- 6.7 (90%: 16-37), gender ...'."""
  return (f"track {track['track']} (frames {track['first_frame']}-{track['last_frame']}, "
          f"{track['first_time']:.1f}-{track['last_time']:.1f} s, seen in {track['frames_seen']}): "
          + predict_lib.describe_face(track))


def annotate(result: dict, out_path: str, overwrite: bool = False):
  """Write the video again with every tracked face boxed and labelled with its track's age.

  Between sampled frames a track's last box is held. FileExistsError where out_path exists and
  overwrite is False; the output is H.264 MP4 at the input's frame rate.
  """
  if os.path.exists(out_path) and not overwrite:
    raise FileExistsError(f"{out_path} exists; not overwritten (pass --overwrite to replace it).")
  if os.path.realpath(out_path) == os.path.realpath(result["file"]):
    raise FileExistsError(f"{out_path} is the input video; choose another folder.")
  ffmpeg = _ffmpeg()
  by_id = {t["track"]: t for t in result["tracks"]}
  sampled = {fr["frame"]: fr["faces"] for fr in result["frame_faces"]}
  info, frames = read_frames(result["file"])
  w, h = (v - v % 2 for v in info["size"])  # yuv420p needs even sides: an odd last row/column is dropped
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  writer = ffmpeg.write_frames(out_path, (w, h), fps=info["fps"], codec="libx264", pix_fmt_in="rgb24",
                               pix_fmt_out="yuv420p", macro_block_size=2, quality=7,
                               output_params=["-loglevel", "error"])
  with _quiet_fork():
    writer.send(None)
  shown: list[dict] = []
  try:
    for i, rgb in enumerate(frames):
      if i in sampled:
        shown = [{**by_id[f["track"]], "box": f["box"]} for f in sampled[i]]
      writer.send(np.ascontiguousarray(np.asarray(predict_lib.draw_faces(rgb, shown))[:h, :w]))
  finally:
    writer.close()
