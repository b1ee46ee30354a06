import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from agejax import export, faces, predict_lib
from configs import default
from tests import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A smoke-trained multi-task model, its trainer and state, exported."""
  d = tmp_path_factory.mktemp("export")
  fakes.built_folder(d, n=24, size=48)
  c = default.get_config("smoke,multitask")
  c.dataset.name, c.dataset.data_dir = "folder", str(d / "data")
  c.num_train_steps = 3
  return fakes.smoke_exported(c, str(d / "export"))


def test_exported_model_matches_the_checkpoint(exported):
  trainer, state, path = exported
  model = export.load(path)
  assert model.meta["gender"] and model.meta["race"] and model.image_size == 32
  assert tuple(model._exported.platforms) == ("cpu", "cuda", "tpu") == tuple(model.meta["platforms"])
  preds = trainer.predict_split(state, "test")  # flip-averaged, as the export
  src = trainer.builder.as_data_source("test")
  from agejax.data.pipeline import decode_face
  imgs = np.stack([decode_face(src[int(i)]["image"], 32) for i in preds["index"]])
  out = model.predict(imgs, batch_size=4)  # several calls, symbolic batch
  np.testing.assert_allclose(out["age"], preds["pred_age"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(out["std"], preds["pred_std"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(out["race_probs"], preds["pred_race_probs"], atol=1e-5)
  with pytest.raises(ValueError, match="expected uint8 images"):
    model.predict(np.zeros((2, 16, 16, 3), np.uint8))


def _save(path, img, **kw):
  img.save(path, **kw)
  return str(path)


def test_read_photo_handles_modes_rotation_and_bad_files(tmp_path, monkeypatch):
  wide = Image.new("RGB", (60, 30), (200, 10, 10))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  rotated = faces.read_photo(_save(tmp_path / "rot.jpg", wide, exif=exif.tobytes()))
  assert rotated.shape == (60, 30, 3)
  assert faces.read_photo(_save(tmp_path / "g.png", Image.new("L", (20, 10), 128))).shape == (10, 20, 3)
  rgba = faces.read_photo(_save(tmp_path / "a.png", Image.new("RGBA", (8, 8), (0, 0, 0, 0))))
  assert rgba.shape == (8, 8, 3) and rgba.min() == 255  # transparent -> white background
  (tmp_path / "notes.jpg").write_text("not an image")
  with pytest.raises(faces.PhotoError, match="notes.jpg: not a readable image"):
    faces.read_photo(str(tmp_path / "notes.jpg"))
  with pytest.raises(faces.PhotoError, match="no such file"):
    faces.read_photo(str(tmp_path / "missing.jpg"))
  monkeypatch.setattr(faces, "MAX_PIXELS", 100)
  with pytest.raises(faces.PhotoError, match="over the 100 limit"):
    faces.read_photo(str(tmp_path / "rot.jpg"))


def test_predict_files_goes_on_after_bad_files(exported, tmp_path):
  _, _, path = exported
  model = export.load(path)
  fakes.write_image(str(tmp_path / "in" / "a.jpg"), 1, size=50)
  (tmp_path / "in" / "b.jpg").write_bytes(b"\x00" * 10)
  _save(tmp_path / "in" / "c.png", Image.new("LA", (40, 50), (90, 255)))
  files = predict_lib.expand_paths([str(tmp_path / "in")])
  recs = list(predict_lib.predict_files(model, files, aligned=True))
  assert [os.path.basename(r["file"]) for r in recs] == ["a.jpg", "b.jpg", "c.png"]
  assert "error" in recs[1] and "not a readable image" in recs[1]["error"]
  for r in (recs[0], recs[2]):
    f = r["faces"][0]
    assert f["interval90"][0] <= f["age"] <= f["interval90"][1] + 1
    assert f["gender"]["label"] in ("male", "female") and 0 <= f["race"]["prob"] <= 1


def test_predict_cli_json_and_annotate(exported, tmp_path):
  _, _, path = exported
  fakes.write_image(str(tmp_path / "x.jpg"), 3, size=64)
  (tmp_path / "bad.jpg").write_text("nope")
  p = subprocess.run([sys.executable, "predict.py", "--model", path, "--aligned", "--json", "--annotate",
                      str(tmp_path / "ann"), str(tmp_path / "x.jpg"), str(tmp_path / "bad.jpg")],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1, p.stderr  # some files failed
  lines = [json.loads(l) for l in p.stdout.splitlines()]
  assert len(lines[0]["faces"]) == 1 and "error" in lines[1]
  assert "bad.jpg: not a readable image" in p.stderr and "1 of 2 files failed" in p.stderr
  assert Image.open(tmp_path / "ann" / "x.jpg").size == (64, 64)


def _predict(*args):
  return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_annotate_never_writes_over_inputs_or_existing_files(exported, tmp_path):
  _, _, path = exported
  photos = tmp_path / "photos"
  fakes.write_image(str(photos / "a.jpg"), 1, size=64)
  fakes.write_image(str(photos / "sub" / "a.jpg"), 2, size=64)
  fakes.write_image(str(tmp_path / "other" / "a.jpg"), 3, size=64)
  before = {p: p.read_bytes() for p in tmp_path.rglob("*.jpg")}
  # Into the input folder itself: inputs untouched, relative paths kept, names suffixed.
  p = _predict("--model", path, "--aligned", "--annotate", photos, photos)
  assert p.returncode == 0, p.stderr
  assert all(f.read_bytes() == b for f, b in before.items())
  assert (photos / "a_annotated.jpg").exists() and (photos / "sub" / "a_annotated.jpg").exists()
  # Two inputs with one name: both kept. A second run refuses to overwrite, unless asked.
  out = tmp_path / "out"
  assert _predict("--model", path, "--aligned", "--annotate", out, photos / "a.jpg", tmp_path / "other" / "a.jpg"
                  ).returncode == 0
  assert sorted(f.name for f in out.iterdir()) == ["a.jpg", "a_2.jpg"]
  stamp = (out / "a.jpg").read_bytes()
  (out / "a.jpg").write_bytes(b"mine")
  p = _predict("--model", path, "--aligned", "--annotate", out, photos / "a.jpg")
  assert p.returncode == 1 and "exists; not overwritten" in p.stderr and (out / "a.jpg").read_bytes() == b"mine"
  assert _predict("--model", path, "--aligned", "--overwrite", "--annotate", out, photos / "a.jpg").returncode == 0
  assert (out / "a.jpg").read_bytes() == stamp
  assert all(f.read_bytes() == b for f, b in before.items())


def test_predict_statuses_and_exit_codes(exported, tmp_path):
  _, _, path = exported
  (tmp_path / "empty").mkdir()
  p = _predict("--model", path, tmp_path / "empty")
  assert p.returncode == 2 and "no images" in p.stderr
  fakes.write_image(str(tmp_path / "in" / "ok.jpg"), 1, size=64)
  _save(tmp_path / "in" / "tiny.png", Image.new("RGB", (20, 20), (120, 90, 80)))
  (tmp_path / "in" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
  p = _predict("--model", path, "--aligned", "--csv", tmp_path / "in")
  assert p.returncode == 1
  rows = list(__import__("csv").DictReader(p.stdout.splitlines()))
  status = {os.path.basename(r["file"]): r["status"] for r in rows}
  assert status == {"ok.jpg": "ok", "tiny.png": "error", "bad.jpg": "error"}
  tiny = next(r for r in rows if r["file"].endswith("tiny.png"))
  assert "too small for a face chip" in tiny["message"]
  assert _predict("--model", path, "--aligned", "--csv", tmp_path / "in" / "ok.jpg").returncode == 0


@pytest.mark.skipif(not importlib.util.find_spec("dlib"), reason="faces extra not installed (pip install 'agejax[faces]')")
def test_a_photo_without_a_face_is_an_answer_not_a_failure(exported, tmp_path):
  _, _, path = exported
  _save(tmp_path / "flat.png", Image.new("RGB", (120, 120), (128, 128, 128)))
  p = _predict("--model", path, "--csv", tmp_path / "flat.png")
  assert p.returncode == 0 and ",no face," in p.stdout


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
  from agejax.data import images
  from agejax.data.builders import base
  from agejax.data.pipeline import decode_face
  ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
  png = _save(tmp_path / "g16.png", Image.fromarray(ramp))
  assert Image.open(png).mode == "I;16"
  expected = np.round(ramp / 257.0)
  rgb = faces.read_photo(png)
  assert rgb.dtype == np.uint8 and np.abs(rgb[..., 0] - expected).max() <= 1 and abs(rgb.mean() - 127.5) < 1
  # 32-bit integer greyscale holding 16-bit values, and floats in [0, 1].
  for img in (Image.fromarray(ramp.astype(np.int32), "I"), Image.fromarray(ramp.astype(np.float32) / 65535, "F")):
    assert np.abs(images.to_rgb8(img)[..., 1] - expected).max() <= 1
  # 16-bit RGB TIFF (Pillow reads it as 8-bit RGB) keeps its colours.
  tifffile = pytest.importorskip("tifffile")
  rgb16 = np.stack([ramp, ramp // 2, ramp // 4], -1)
  tifffile.imwrite(tmp_path / "c.tif", rgb16, photometric="rgb")
  tif = faces.read_photo(str(tmp_path / "c.tif"))
  np.testing.assert_allclose(tif.mean((0, 1)), (rgb16 / 257.0).mean((0, 1)), atol=1.5)
  # The dataset builders and the input pipeline read them alike.
  jpeg = base.to_jpeg(open(png, "rb").read(), "g16.png")
  assert abs(decode_face(jpeg, 64).mean() - 127.5) < 2


def test_exported_model_is_validated_when_loaded(exported, tmp_path):
  import shutil
  _, _, path = exported

  def copy(name):
    d = tmp_path / name
    shutil.copytree(path, d)
    return d

  blob = open(os.path.join(path, "model.jaxexport"), "rb").read()
  d = copy("truncated")
  (d / "model.jaxexport").write_bytes(blob[: len(blob) // 3])
  with pytest.raises(export.ExportError, match=r"truncated/model\.jaxexport: not a readable jax.export artifact"):
    export.load(str(d))
  d = copy("garbage")
  (d / "model.jaxexport").write_bytes(b"\0" * 100)
  with pytest.raises(export.ExportError, match="model.jaxexport: not a readable"):
    export.load(str(d))
  meta = json.load(open(os.path.join(path, "model.json")))
  for name, change, message in [
      ("nokeys", lambda m: m.pop("label_grid"), "missing label_grid"),
      ("version", lambda m: m.update(format_version=99), "format version 99"),
      ("grid", lambda m: m.update(label_grid=m["label_grid"][:-3]), "age probabilities"),
      ("size", lambda m: m.update(image_size=48), "image_size 48")]:
    d = copy(name)
    m = json.loads(json.dumps(meta))
    change(m)
    (d / "model.json").write_text(json.dumps(m))
    with pytest.raises(export.ExportError, match=message):
      export.load(str(d))
  d = copy("json")
  (d / "model.json").write_text("{not json")
  with pytest.raises(export.ExportError, match="model.json: not valid JSON"):
    export.load(str(d))
  p = _predict("--model", d, "x.jpg")
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in p.stderr


HAS_DLIB = importlib.util.find_spec("dlib") is not None


@pytest.mark.skipif(not HAS_DLIB, reason="faces extra not installed")
def test_astronaut_one_face_no_face_empty():
  from skimage import data
  aligner = faces.FaceAligner()
  found = aligner(data.astronaut())
  assert len(found) == 1
  l, t, r, b = found[0].box
  assert 150 < l < 200 and 50 < t < 110 and found[0].chip.shape == (200, 200, 3)
  assert aligner(np.full((300, 300, 3), 128, np.uint8)) == []
  assert aligner(data.coffee()) == []


@pytest.mark.skipif(not HAS_DLIB or not os.path.exists(os.path.join(predict_lib.DEFAULT_MODEL, "model.json")),
                    reason="faces extra or bundled model not present")
def test_bundled_model_gives_plausible_age_for_astronaut(tmp_path):
  from skimage import data
  Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
  p = subprocess.run([sys.executable, "predict.py", "--json", str(tmp_path / "astronaut.png")], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  rec = json.loads(p.stdout.splitlines()[0])
  assert len(rec["faces"]) == 1
  face = rec["faces"][0]
  assert 20 <= face["age"] <= 60  # Eileen Collins was about 35-40 in that NASA portrait
  assert face["interval90"][0] <= face["age"] <= face["interval90"][1]
  # The bundled model is multi-task (age + gender + race heads): she is a woman.
  assert face["gender"]["label"] == "female" and face["gender"]["prob"] > 0.5
  assert face["race"]["label"] in ("White", "Black", "Asian", "Indian", "Other")


def _foreign_calls(exported) -> set[str]:
  """The custom calls in an artifact other than jax.export's own shape checks."""
  import re
  text = exported.mlir_module()
  return set(re.findall(r"stablehlo.custom_call @(\w+)", text)) - {"shape_assertion"}


def test_exports_are_for_every_platform_and_standard_ops_only(exported):
  _, _, path = exported
  assert _foreign_calls(export.load(path)._exported) == set()


@pytest.mark.skipif(not os.path.exists(os.path.join(predict_lib.DEFAULT_MODEL, "model.json")),
                    reason="bundled model not present")
def test_the_bundled_model_runs_on_cpu_gpu_and_tpu_hosts():
  """Lowered for cpu, cuda and tpu, XLA's standard ops only (no CPU-specific custom calls)."""
  model = export.load(predict_lib.DEFAULT_MODEL, "jax")
  assert tuple(model._exported.platforms) == ("cpu", "cuda", "tpu")
  assert _foreign_calls(model._exported) == set()
  assert model.meta["weights_dtype"] == "bfloat16" and model.meta["gender"] and model.meta["race"]


def test_missing_faces_extra_names_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'agejax\[faces\]'"):
    faces.FaceAligner()


def test_predict_detects_while_it_loads_the_network(tmp_path):
  """Detection starts first (worker processes, or this process on the first photo) and the model
  loads meanwhile in a thread; the workers stop when the model cannot be loaded, and a folder
  without a model is reported before any detection."""
  photos = tmp_path / "photos"
  photos.mkdir()
  for i in range(4):
    Image.new("RGB", (40, 40)).save(photos / f"{i}.jpg")
  broken = tmp_path / "broken"  # a model.json, so predict starts detecting; the fake load then fails
  broken.mkdir()
  (broken / "model.json").write_text("{}")
  code = ("import gc, sys, threading\ngc.disable()\nfrom absl import app\nfrom agejax import export, faces\n"
          "from agejax.tools import predict\n"
          "order, finders, find, load, one = [], [], faces.find_faces_in_files, export.load, faces.find_faces\n"
          "detected = threading.Event()\n"
          "def fake_one(*a, **k):\n  out = one(*a, **k); detected.set(); return out\n"
          "def fake_find(*a, **k):\n  order.append('detect'); finders.append(find(*a, **k)); return finders[-1]\n"
          "def fake_load(*a, **k):\n  thread = threading.current_thread().name\n"
          "  order.append('load in ' + ('a thread' if thread.startswith('ThreadPoolExecutor') else thread))\n"
          "  if len(finders) and type(finders[0]).__name__ == 'generator':\n"
          "    order.append('while detecting' if detected.wait(60) else 'not while detecting')\n"
          "  if '--model' in sys.argv: raise export.ExportError('stop')\n  return load(*a, **k)\n"
          "faces.find_faces_in_files, export.load, faces.find_faces = fake_find, fake_load, fake_one\ntry:\n"
          "  app.run(predict.main, argv=['predict'] + sys.argv[1:])\nexcept SystemExit as e:\n  code = e.code\n"
          "kind = type(finders[0]).__name__ if finders else None\n"
          "left = len(finders[0]._pool._processes or {}) if kind == 'FaceFinder' else 0\n"
          "print(order, code, kind, left)")
  folder, one = str(photos), str(photos / "0.jpg")
  cases = (([folder, "--json"], "['detect', 'load in a thread'] 0 FaceFinder 0"),
           ([folder, "--model", str(broken)], "['detect', 'load in a thread'] 2 FaceFinder 0"),
           ([folder, "--model", str(tmp_path)], "['load in MainThread'] 2 None 0"),
           ([one, "--json"], "['detect', 'load in a thread', 'while detecting'] 0 generator 0"))
  for args, want in cases:
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == want, (args, p.stdout, p.stderr[-1000:])
    if "--json" in args:  # every photo answered once, in order
      assert [json.loads(line)["file"] for line in lines[:-1]] == ([one] if args[0] == one else
                                                                    [str(photos / f"{i}.jpg") for i in range(4)])
  # A failure of the first photo's detection is not taken for the model's (no "error:" line, no exit 2).
  boom = ("import sys\nfrom absl import app\nfrom agejax import faces\nfrom agejax.tools import predict\n"
          "def boom(*a, **k):\n  raise FileNotFoundError('detector broke')\nfaces.find_faces = boom\n"
          "app.run(predict.main, argv=['predict', sys.argv[1]])")
  p = subprocess.run([sys.executable, "-c", boom, one], cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert p.returncode == 1 and "FileNotFoundError: detector broke" in p.stderr and "error: detector broke" not in p.stderr


def test_the_network_takes_one_thread_where_detection_workers_take_the_cores(tmp_path):
  """predict loads the model with one ONNX Runtime thread when worker processes detect faces (the
  cores are theirs), with the default (one per core) otherwise."""
  for i in range(4):
    Image.new("RGB", (40, 40)).save(tmp_path / f"{i}.jpg")
  code = ("import sys\nfrom absl import app\nfrom agejax import export\nfrom agejax.tools import predict\nseen = []\n"
          "def fake(path, runtime='auto', threads=None):\n  seen.append(threads)\n  raise export.ExportError('stop')\n"
          "export.load = fake\ntry:\n  app.run(predict.main, argv=['predict'] + sys.argv[1:])\n"
          "except SystemExit:\n  pass\nprint(seen)")
  folder, one = str(tmp_path), str(tmp_path / "0.jpg")
  cases = [([folder], "[1]"), ([one], "[None]"), ([folder, "--workers", "0"], "[None]"),
           ([folder, "--workers", "3"], "[1]"), ([folder, "--aligned"], "[None]")]
  for args, want in cases:
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().splitlines()[-1] == want, (args, p.stdout, p.stderr[-1000:])
