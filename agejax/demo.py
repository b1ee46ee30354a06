"""A local web page for the age of the faces in photos.

    python -m agejax.demo                       # the bundled model, on http://127.0.0.1:7860
    python -m agejax.demo --workdir runs/utk    # a model you trained and exported
    python -m agejax.demo --model DIR --port 8080

Drop one or several photos (or take a webcam snapshot where the browser allows) and see every
face boxed and numbered, with its age +- std, 90% interval, gender and race (for models with
those heads), a plot of each face's age distribution, and the results as JSON and CSV files.

Built on Gradio (`pip install 'agejax[demo]'`), the convention of such demos. It serves on
127.0.0.1 only, makes no request outside it (no analytics, no share link, fonts and scripts
from the package) and keeps no upload: each is deleted once answered, and the results offered
for download (its own copies and Gradio's) are deleted RESULTS_KEPT_S after they were written, by a
sweep at every request and every minute, and all of them when the server stops. Uploads are capped at --max_file_mb and
MAX_PHOTOS a request; unreadable files, decompression bombs and photos without a face get a
message on the page while the app keeps serving.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import tempfile
import threading

import numpy as np

from agejax import export
from agejax import faces as faces_lib
from agejax import predict_lib

MAX_PHOTOS = 50            # photos answered per request
# "look harder": the CNN and HOG, both upsampled once, merged: careful, the most faces in docs/RESULTS.md's
# tables, with the CNN upsampled too for faces under about 60 px (slower than careful's measured rates)
THOROUGH_DETECTOR = dict(detector="careful", upsample=1, cnn_upsample=1)
RESULTS_KEPT_S = 600       # downloadable results are deleted after this
TITLE = "agejax: the age of faces"


@dataclasses.dataclass
class Answer:
  """What the page shows for one request."""
  images: list[tuple[np.ndarray, str]]        # annotated photos with captions
  table: list[list]                           # TABLE_HEADER rows, one per face
  plot: np.ndarray | None                     # every face's age distribution, one panel each
  messages: list[str]                         # per-file problems ("x.txt: not a readable image ...")
  records: list[dict]                         # predict_files records (no pixels, no distributions)


TABLE_HEADER = ["photo", "face", "age", "90% interval", "gender", "race"]


class Estimator:
  """One exported model and face aligner, answering lists of photo files (thread-safe)."""

  def __init__(self, model, aligner=None):
    self.model, self.aligner = model, aligner
    self._thorough = None
    self._lock = threading.Lock()

  def answer(self, paths: list[str], aligned: bool = False, names: list[str] | None = None,
             thorough: bool = False) -> Answer:
    """Predictions for the photo files `paths` (shown as `names`, default their base names);
    `thorough` finds faces with `careful` detection, both detectors upsampled (THOROUGH_DETECTOR),
    instead of the default `auto` detector."""
    names = names or [os.path.basename(p) for p in paths]
    shown = dict(zip(paths, names))
    ans = Answer([], [], None, [], [])
    if len(paths) > MAX_PHOTOS:
      ans.messages.append(f"{len(paths)} photos sent; the first {MAX_PHOTOS} are answered.")
      paths = paths[:MAX_PHOTOS]
    if not paths:
      ans.messages.append("Choose or drop a photo first.")
      return ans
    with self._lock:
      if not aligned and not thorough and self.aligner is None:
        self.aligner = faces_lib.FaceAligner()
      if not aligned and thorough and self._thorough is None:
        self._thorough = faces_lib.FaceAligner(**THOROUGH_DETECTOR)
      records = list(predict_lib.predict_files(self.model, paths, aligned=aligned,
                                               aligner=self._thorough if thorough else self.aligner,
                                               distributions=True))
    panels = []
    for rec in records:
      name = shown[rec["file"]]
      rgb = rec.pop("_rgb", None)
      if "error" in rec:
        ans.messages.append(rec["error"].replace(rec["file"], name))
        ans.records.append({"file": name, "error": ans.messages[-1]})
        continue
      if not rec["faces"]:
        hint = "" if aligned else " (tick 'look harder' for small or old photos, or 'already a face chip')"
        ans.messages.append(f"{name}: no face found{hint}.")
      for i, f in enumerate(rec["faces"]):
        ans.table.append([name, i, f"{f['age']:.1f} ± {f['std']:.1f}",
                          f"{f['interval90'][0]:g}–{f['interval90'][1]:g}",
                          _class_text(f.get("gender")), _class_text(f.get("race"))])
        panels.append((f"{name} · face {i}", f))
      n = len(rec["faces"])
      ans.images.append((np.asarray(predict_lib.draw_faces(rgb, rec["faces"], numbers=True)),
                         f"{name}: {n} face{'s' if n != 1 else ''}"))
      ans.records.append({"file": name, "width": rec["width"], "height": rec["height"],
                          "faces": [{k: v for k, v in f.items() if not k.endswith("probs")} for f in rec["faces"]]})
    ans.plot = distribution_plot(self.model.grid, panels)
    return ans


def _class_text(c: dict | None) -> str:
  return f"{c['label']} ({c['prob']:.0%})" if c else ""


def distribution_plot(grid: np.ndarray, faces: list[tuple[str, dict]], columns: int = 3) -> np.ndarray | None:
  """One RGB picture with a small panel per (title, face): its predicted age distribution, the
  estimate (line) and the 90% interval (red bars). None for no faces."""
  if not faces:
    return None
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  from PIL import Image

  cols = min(columns, len(faces))
  rows = -(-len(faces) // cols)
  fig = Figure(figsize=(3.6 * cols, 2.1 * rows), dpi=100)
  for k, (title, face) in enumerate(faces):
    ax = fig.add_subplot(rows, cols, k + 1)
    probs = np.asarray(face["probs"], np.float32)
    low, high = face["interval90"]
    inside = (grid >= low) & (grid <= high)
    ax.bar(grid, probs, width=1.0, color=np.where(inside, "#d9534f", "#c8c8c8"), linewidth=0)
    ax.axvline(face["age"], color="#222222", linewidth=1)
    ax.set_xlim(max(grid[0], low - 15), min(grid[-1], high + 15))
    ax.set_yticks([])
    ax.tick_params(labelsize=8)
    ax.set_title(f"{title}: {face['age']:.1f} ± {face['std']:.1f}", fontsize=9)
  fig.supxlabel("age (red: the 90% interval; line: the estimate)", fontsize=8)
  fig.tight_layout(pad=0.4)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return np.asarray(Image.open(buf).convert("RGB"))


def write_results(records: list[dict], out_dir: str) -> tuple[str, str]:
  """results.json (the records) and results.csv (predict.py's CSV) in out_dir; their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, csv_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.csv")
  with open(json_path, "w") as f:
    json.dump(records, f, indent=1)
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(predict_lib.CSV_HEADER)
    for rec in records:
      w.writerows(predict_lib.csv_rows(rec))
  return json_path, csv_path


def _snapshot_file(rgb: np.ndarray, folder: str) -> str:
  from PIL import Image
  path = os.path.join(folder, "webcam.png")
  Image.fromarray(np.asarray(rgb, np.uint8)).save(path)
  return path


def build_app(estimator: Estimator, work_dir: str):
  """The Gradio Blocks page around `estimator`; results files go under work_dir."""
  import gradio as gr

  def run(files, snapshot, aligned, thorough):
    sweep_results(work_dir)
    request_dir = tempfile.mkdtemp(dir=work_dir)
    paths = [getattr(f, "name", f) for f in (files or [])]
    names = [os.path.basename(p) for p in paths]
    try:
      if snapshot is not None:
        paths.append(_snapshot_file(snapshot, request_dir))
        names.append("webcam snapshot")
      ans = estimator.answer(paths, aligned=bool(aligned), names=names, thorough=bool(thorough))
    finally:
      for p in paths:  # keep no upload (the snapshot included)
        _remove(p)
    json_path, csv_path = write_results(ans.records, request_dir)
    n_faces = len(ans.table)
    summary = f"**{n_faces} face{'s' if n_faces != 1 else ''}** in {len(ans.images)} photo{'s' if len(ans.images) != 1 else ''}."
    if ans.messages:
      summary += "\n\n" + "\n".join(f"- ⚠ {m}" for m in ans.messages)
    return (summary, ans.images, ans.table, ans.plot, [json_path, csv_path])

  with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(60, RESULTS_KEPT_S)) as page:
    gr.Markdown(f"# {TITLE}\nChoose or drop photos; every face gets an age, a 90% interval"
                + (", gender and race" if estimator.model.meta.get("gender") else "")
                + ". Photos stay on this computer and are deleted once answered.")
    with gr.Row():
      with gr.Column(scale=1):
        files = gr.File(label="Photos", file_count="multiple", elem_id="photos")
        snapshot = gr.Image(label="Webcam snapshot (optional)", sources=["webcam"], type="numpy",
                            elem_id="snapshot")
        aligned = gr.Checkbox(label="Already a face chip (skip face detection)", value=False, elem_id="aligned")
        thorough = gr.Checkbox(label="Look harder for faces: small faces, old photos (several times slower)", value=False,
                               elem_id="thorough")
        go = gr.Button("Estimate ages", variant="primary", elem_id="go")
      with gr.Column(scale=2):
        summary = gr.Markdown(elem_id="summary")
        images = gr.Gallery(label="Faces found", columns=2, height=420, object_fit="contain",
                            buttons=["download", "fullscreen"], elem_id="images")
        table = gr.Dataframe(headers=TABLE_HEADER, label="Per face", interactive=False, elem_id="table")
        plots = gr.Image(label="Age distributions", type="numpy", interactive=False,
                         buttons=["download", "fullscreen"], elem_id="plots")
        downloads = gr.File(label="Results (JSON, CSV)", file_count="multiple", interactive=False,
                            elem_id="downloads")
    go.click(run, [files, snapshot, aligned, thorough], [summary, images, table, plots, downloads], concurrency_limit=1)
  return page


def sweep_results(work_dir: str, max_age_s: float = RESULTS_KEPT_S, now: float | None = None) -> list[str]:
  """Delete the request folders (results offered for download) in work_dir older than max_age_s;
  returns them. The uploads folder is Gradio's, swept by its own delete_cache."""
  import time
  now = time.time() if now is None else now
  removed = []
  for name in os.listdir(work_dir) if os.path.isdir(work_dir) else []:
    path = os.path.join(work_dir, name)
    if name == "uploads" or not os.path.isdir(path):
      continue
    try:
      if now - os.path.getmtime(path) > max_age_s:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    except OSError:
      pass
  return removed


def start_janitor(work_dir: str, every_s: float = 60.0, max_age_s: float = RESULTS_KEPT_S) -> threading.Event:
  """A daemon thread calling sweep_results every `every_s`; set the returned event to stop it."""
  stop = threading.Event()

  def loop():
    while not stop.wait(every_s):
      sweep_results(work_dir, max_age_s)
  threading.Thread(target=loop, daemon=True, name="agejax-demo-janitor").start()
  return stop


def _remove(path: str):
  try:
    os.remove(path)
  except OSError:
    pass


def main(argv=None):
  """python -m agejax.demo [--model DIR | --workdir RUN] [--port 7860] [--max_file_mb 20]"""
  from absl import app, flags

  flags.DEFINE_string("model", None, "An exported model folder (default: the bundled model).")
  flags.DEFINE_string("workdir", None, "A training run with an export/ folder.")
  flags.DEFINE_integer("port", 7860, "Port on 127.0.0.1.")
  flags.DEFINE_enum("runtime", "auto", list(export.RUNTIMES), export.RUNTIME_HELP)
  flags.DEFINE_integer("max_file_mb", 20, "Largest upload accepted, in megabytes.")
  flags.DEFINE_bool("open_browser", False, "Open the page in the default browser.")

  def run(_):
    import sys

    from absl import logging
    logging.set_verbosity(logging.WARNING)
    F = flags.FLAGS
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    work_dir = tempfile.mkdtemp(prefix="agejax-demo-")
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(work_dir, "uploads")
    try:
      import gradio  # noqa: F401
    except ImportError:
      print("error: the web page needs Gradio: pip install 'agejax[demo]'", file=sys.stderr)
      return 2
    from agejax import export
    model_dir = F.model or (os.path.join(F.workdir, "export") if F.workdir else predict_lib.DEFAULT_MODEL)
    try:
      model = export.load(model_dir, F.runtime)
    except (FileNotFoundError, export.ExportError, ImportError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    import signal

    def stop(*_):
      raise KeyboardInterrupt  # Gradio closes its server on it; then the work folder goes
    signal.signal(signal.SIGTERM, stop)
    janitor = start_janitor(work_dir)  # results: deleted RESULTS_KEPT_S after they were written
    try:
      page = build_app(Estimator(model), work_dir)
      print(f"agejax demo: {model_dir} on http://127.0.0.1:{F.port} (Ctrl-C stops)", flush=True)
      page.queue(max_size=16).launch(server_name="127.0.0.1", server_port=F.port, share=False,
                                     inbrowser=F.open_browser, max_file_size=f"{F.max_file_mb}mb",
                                     footer_links=[], quiet=True, ssr_mode=False)
    finally:
      janitor.set()
      shutil.rmtree(work_dir, ignore_errors=True)
    return 0

  app.run(run, argv)


if __name__ == "__main__":
  from agejax import cli
  cli.start_process()
  main()
