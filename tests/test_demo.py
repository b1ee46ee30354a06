"""The web page (`python -m agejax.demo`): its answers without a browser, then the page itself in
headless Chromium (Debian's `chromium`, driven by Playwright; `.ci/run` installs both and sets
AGEJAX_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping)."""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from agejax import demo, export, predict_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  from skimage import data
  d = tmp_path_factory.mktemp("photos")
  Image.fromarray(data.astronaut()).save(d / "astronaut.png")
  Image.fromarray(data.coffee()).save(d / "coffee.png")  # no face
  (d / "notes.txt").write_text("not a photo\n")
  Image.new("L", (9_400, 9_000)).save(d / "bomb.png")  # 85 M pixels in a few kB
  return d


@pytest.fixture(scope="module")
def estimator():
  return demo.Estimator(export.load(predict_lib.DEFAULT_MODEL))


def test_answer_shows_faces_plots_and_every_problem(estimator, photos, tmp_path):
  paths = [str(photos / n) for n in ("astronaut.png", "coffee.png", "notes.txt", "bomb.png")]
  ans = estimator.answer(paths)
  expected = next(predict_lib.predict_files(estimator.model, paths[:1], aligner=estimator.aligner))["faces"][0]
  assert len(ans.table) == 1 and len(ans.images) == 2  # astronaut and coffee shown
  row = ans.table[0]
  assert row[:3] == ["astronaut.png", 0, f"{expected['age']:.1f} ± {expected['std']:.1f}"]
  assert row[4].startswith(expected["gender"]["label"]) and row[5].startswith(expected["race"]["label"])
  text = "\n".join(ans.messages)
  assert "coffee.png: no face found" in text
  assert "notes.txt: not a readable image" in text and "bomb.png" in text and "limit" in text
  assert str(photos) not in text  # messages name the upload, not the server's folder
  assert ans.plot.shape == (210, 360, 3) and ans.plot.dtype == np.uint8  # one panel
  assert ans.images[0][0].shape == (512, 512, 3) and ans.images[0][1] == "astronaut.png: 1 face"

  json_path, csv_path = demo.write_results(ans.records, str(tmp_path))
  records = json.load(open(json_path))
  assert [r["file"] for r in records] == ["astronaut.png", "coffee.png", "notes.txt", "bomb.png"]
  assert records[0]["faces"][0]["age"] == pytest.approx(expected["age"]) and "probs" not in records[0]["faces"][0]
  rows = list(csv.reader(open(csv_path)))
  assert rows[0] == predict_lib.CSV_HEADER
  assert [r[1] for r in rows[1:]] == ["ok", "no face", "error", "error"]


def test_answer_caps_photos_and_handles_aligned_chips_and_nothing(estimator, photos, monkeypatch):
  assert estimator.answer([]).messages == ["Choose or drop a photo first."]
  monkeypatch.setattr(demo, "MAX_PHOTOS", 2)
  ans = estimator.answer([str(photos / "coffee.png")] * 3, aligned=True)
  assert len(ans.table) == 2 and "the first 2 are answered" in ans.messages[0]
  assert ans.plot.shape == (210, 720, 3)  # a panel each


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """`python -m agejax.demo` on a free port, its temporary files under its own TMPDIR."""
  tmp = tmp_path_factory.mktemp("server_tmp")
  port = _free_port()
  env = dict(os.environ, TMPDIR=str(tmp))
  log = open(tmp / "server.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "agejax.demo", "--port", str(port), "--max_file_mb", "1"],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  deadline = time.time() + 180
  while True:
    try:
      urllib.request.urlopen(url, timeout=5)
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        pytest.fail("the demo did not start: " + open(tmp / "server.log").read()[-2000:])
      time.sleep(1)
  yield url, tmp
  proc.terminate()
  proc.wait(timeout=30)
  assert not [p for p in tmp.iterdir() if p.name.startswith("agejax-demo-")], "the work folder outlived the app"


@pytest.fixture(scope="module")
def browser():
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    sync_playwright = None
  if sync_playwright is None or CHROMIUM is None:
    if os.environ.get("AGEJAX_REQUIRE_BROWSER") == "1":
      pytest.fail("AGEJAX_REQUIRE_BROWSER=1 but Playwright or Chromium is missing.")
    pytest.skip("needs Playwright (pip install playwright) and Chromium (apt install chromium)")
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
    yield b
    b.close()


def _summary_after_click(page, timeout_ms=180_000):
  page.click("#go")
  page.wait_for_function("() => { const s = document.querySelector('#summary');"
                         " return s && /face/.test(s.innerText); }", timeout=timeout_ms)
  return page.inner_text("#summary")


@pytest.mark.slow
def test_page_in_a_real_browser(server, browser, photos, tmp_path):
  url, server_tmp = server
  p = subprocess.run([sys.executable, "predict.py", str(photos / "astronaut.png")], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  cli_age = re.search(r"age ([\d.]+) \+- ([\d.]+)", p.stdout)
  assert p.returncode == 0 and cli_age, p.stderr

  page = browser.new_page(viewport={"width": 1280, "height": 1000})
  page.set_default_timeout(120_000)  # a busy 2-core machine
  outside = []
  page.on("request", lambda r: None if r.url.startswith((url[:-1], "data:", "blob:")) else outside.append(r.url))
  page.goto(url)
  page.wait_for_selector("#go")
  page.set_input_files("#photos input[type=file]", [str(photos / "astronaut.png")])
  page.wait_for_selector("#photos :text('astronaut.png')")
  summary = _summary_after_click(page)
  assert summary.startswith("1 face in 1 photo")
  table = page.inner_text("#table")
  assert f"{cli_age[1]} ± {cli_age[2]}" in table  # the page's age is predict.py's
  assert "female" in table or "male" in table
  page.wait_for_function("() => /results[\\s\\S]*\\.json[\\s\\S]*\\.csv/.test("
                         "document.querySelector('#downloads').innerText)")
  assert page.locator("#plots img").count() == 1 and page.locator("#images img").count() >= 1
  artifacts = os.environ.get("AGEJAX_TEST_ARTIFACTS", str(tmp_path))
  os.makedirs(artifacts, exist_ok=True)
  page.screenshot(path=os.path.join(artifacts, "demo_page.png"), full_page=True)

  astronaut = (photos / "astronaut.png").read_bytes()  # no upload is kept
  kept = [f for f in server_tmp.rglob("*") if f.is_file() and f.stat().st_size == len(astronaut)
          and f.read_bytes() == astronaut]
  assert not kept, kept

  page.reload()
  page.wait_for_selector("#go")
  page.set_input_files("#photos input[type=file]", [str(photos / "notes.txt")])
  page.wait_for_selector("#photos :text('notes.txt')")
  summary = _summary_after_click(page)
  assert summary.startswith("0 faces in 0 photos") and "notes.txt: not a readable image" in summary

  big = tmp_path / "big.jpg"  # over the server's 1 MB cap: refused before it reaches agejax
  big.write_bytes(os.urandom(1_500_000))
  page.set_input_files("#photos input[type=file]", [str(big)])
  page.wait_for_selector("text=exceed the maximum allowed size")
  assert urllib.request.urlopen(url, timeout=10).status == 200  # still serving
  assert not outside, f"requests left 127.0.0.1: {outside}"
  page.close()


def test_results_are_deleted_after_the_time_the_page_promises(tmp_path):
  import time as _time
  work = tmp_path / "work"
  old, new, uploads = work / "req_old", work / "req_new", work / "uploads"
  for d in (old, new, uploads):
    d.mkdir(parents=True)
    (d / "results.csv").write_text("x")
  now = _time.time()
  os.utime(old, (now - demo.RESULTS_KEPT_S - 5, now - demo.RESULTS_KEPT_S - 5))
  os.utime(uploads, (now - 10 * demo.RESULTS_KEPT_S,) * 2)
  assert demo.sweep_results(str(work), now=now) == [str(old)]
  assert not old.exists() and (new / "results.csv").exists() and uploads.exists()
  # the janitor thread does the same without requests
  os.utime(new, (now - demo.RESULTS_KEPT_S - 5,) * 2)
  stop = demo.start_janitor(str(work), every_s=0.05)
  try:
    deadline = _time.time() + 10
    while new.exists() and _time.time() < deadline:
      _time.sleep(0.05)
  finally:
    stop.set()
  assert not new.exists()
