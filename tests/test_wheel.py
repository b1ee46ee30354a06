"""The package as users get it: a wheel built without warnings, installed (not editable) into a fresh
virtual environment with the faces and onnx extras, whose `agejax predict` answers as predict.py
in the checkout."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(args, **kw):
  p = subprocess.run(args, capture_output=True, text=True, timeout=1500, **kw)
  assert p.returncode == 0, f"{args[:4]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
  return p


def test_wheel_installs_and_its_agejax_command_answers_as_the_checkout(tmp_path):
  pytest.importorskip("skimage")
  pytest.importorskip("dlib")
  from PIL import Image
  from skimage import data
  built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path / "dist"), ROOT])
  text = built.stdout + built.stderr
  assert "Warning" not in text and "would be ignored" not in text and "!!" not in text, \
      [line for line in text.splitlines() if "arning" in line or "!!" in line][:10]
  wheel, = glob.glob(str(tmp_path / "dist" / "agejax-*.whl"))
  _run([sys.executable, "-m", "venv", str(tmp_path / "venv")])
  py = str(tmp_path / "venv" / "bin" / "python")
  _run([py, "-m", "pip", "install", "-q", f"{wheel}[faces,onnx]"])
  photo = tmp_path / "elsewhere" / "astronaut.png"
  photo.parent.mkdir()
  Image.fromarray(data.astronaut()).save(photo)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  installed = _run([str(tmp_path / "venv" / "bin" / "agejax"), "predict", "--json", photo.name],
                   cwd=photo.parent, env=env)
  # the installed package, not the checkout
  where = _run([py, "-c", "import agejax, os; print(os.path.dirname(agejax.__file__))"], cwd=photo.parent, env=env)
  assert where.stdout.strip().startswith(str(tmp_path / "venv"))
  checkout = _run([sys.executable, "predict.py", "--json", str(photo)], cwd=ROOT)
  a = json.loads(installed.stdout.strip().splitlines()[-1])["faces"]
  b = json.loads(checkout.stdout.strip().splitlines()[-1])["faces"]
  assert len(a) == len(b) == 1
  assert a[0]["box"] == b[0]["box"] and abs(a[0]["age"] - b[0]["age"]) <= 0.01
