"""Face detection: HOG, the CNN detector, their combination, upsampling, the photos that measure
them (agejax.hard_photos) and detection in worker processes."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

pytest.importorskip("dlib")

from agejax import export, faces, hard_photos, predict_lib  # noqa: E402


@pytest.fixture(scope="module")
def astronaut_small():
  """The astronaut at 256 px (her face about 45 px), in colour and as a gray, blurred old print."""
  from skimage import data
  a = Image.fromarray(data.astronaut()).resize((256, 256), Image.BILINEAR)
  old = ImageOps.grayscale(a).filter(ImageFilter.GaussianBlur(1.5)).convert("RGB")
  return np.asarray(a), np.asarray(old)


def test_upsampling_and_the_cnn_find_what_hog_misses(astronaut_small):
  colour, old = astronaut_small
  hog0, hog1 = faces.FaceAligner(detector="hog", upsample=0), faces.FaceAligner(detector="hog", upsample=1)
  assert len(hog0.detect(colour)) == 0 and len(hog1.detect(colour)) == 1  # 45 px: needs one upsampling
  cnn, careful = faces.FaceAligner(detector="cnn", upsample=1), faces.FaceAligner(detector="careful", cnn_upsample=1)
  assert len(hog1.detect(old)) == 0                                      # HOG loses the gray, blurred face
  found = cnn(old)
  assert len(found) == 1 and found[0].chip.shape == (200, 200, 3)
  l, t, r, b = found[0].box
  assert 60 < (l + r) / 2 < 120 and 20 < (t + b) / 2 < 70               # where her face is
  assert [f.box for f in careful(old)] == [f.box for f in found]        # careful: the CNN's face, HOG found none
  assert [f.box for f in careful(colour)] == [f.box for f in cnn(colour)]  # both found her: one face, the CNN's
  careful0, cnn0 = faces.FaceAligner(detector="careful"), faces.FaceAligner(detector="cnn", upsample=0)
  assert cnn0.detect(colour) == []                                       # her 45 px face is too small for the CNN
  assert [f.box for f in careful0(colour)] == [f.box for f in hog1(colour)]  # ... so careful's is HOG's
  auto = faces.FaceAligner(detector="auto")
  assert auto.cnn_is_fast                                               # agejax's port in ONNX Runtime
  (face,) = auto(old)                                                  # the CNN on the photo doubled:
  centre = lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)             # her face, on a coarser pyramid
  assert np.abs(np.subtract(centre(face.box), centre(found[0].box))).max() <= 6
  width = lambda b: b[2] - b[0]
  assert 0.8 < width(face.box) / width(found[0].box) < 1.25
  with pytest.raises(ValueError, match="detector 'mtcnn'"):
    faces.FaceAligner(detector="mtcnn")
  with pytest.raises(ValueError, match="runtime 'tpu'"):
    faces.FaceAligner(cnn_runtime="tpu")


class _Spy:
  """Records the calls of a detector's method and answers as it does."""

  def __init__(self, target, method):
    self.calls, self._f = [], getattr(target, method)

  def __call__(self, *args):
    self.calls.append(args[1:])
    return self._f(*args)


def _spied(aligner, monkeypatch):
  hog, cnn = _Spy(aligner, "_hog"), _Spy(aligner, "_cnn")
  monkeypatch.setattr(aligner, "_hog", hog)
  monkeypatch.setattr(aligner, "_cnn", cnn)
  return hog, cnn


def test_auto_runs_the_cnn_on_every_photo_and_hog_where_it_finds_none_or_the_photo_is_large(astronaut_small, monkeypatch):
  colour, old = astronaut_small
  auto = faces.FaceAligner(detector="auto")
  hog, cnn = _spied(auto, monkeypatch)
  assert len(auto.detect(colour)) == 1 and hog.calls == []
  assert cnn.calls == [(faces.AUTO_CNN_MAX_SIDE, 1)]           # 256 px: doubled, not shrunk
  large = np.asarray(Image.fromarray(colour).resize((1024, 1024), Image.BILINEAR))
  cnn.calls.clear()
  found = auto.detect(large)
  assert cnn.calls == [(faces.AUTO_CNN_MAX_SIDE, 0)] and hog.calls == [(0,)]  # over AUTO_HOG_SIDE: HOG too
  assert len(auto._hog(large, 0)) == 1 and len(found) == 1     # both found her: merged into one face
  # 320 px: doubled, her 57 px face found; 321: not doubled, missed, so HOG (upsampled) finds it;
  # 960: shrunk to 640, found; 961: HOG beside the CNN
  for side, doubled, hog_calls in ((320, 1, []), (321, 0, [(1,)]), (960, 0, []), (961, 0, [(0,)])):
    cnn.calls.clear(), hog.calls.clear()
    found = auto.detect(np.asarray(Image.fromarray(colour).resize((side, side), Image.BILINEAR)))
    assert cnn.calls == [(faces.AUTO_CNN_MAX_SIDE, doubled)] and hog.calls == hog_calls and len(found) == 1, side
  medium = np.asarray(Image.fromarray(colour).resize((600, 600), Image.BILINEAR))
  cnn.calls.clear(), hog.calls.clear()
  auto.detect(medium)
  assert cnn.calls == [(faces.AUTO_CNN_MAX_SIDE, 0)] and hog.calls == []  # the CNN found her: no HOG
  cnn.calls.clear()
  assert auto.detect(np.full((300, 400, 3), 128, np.uint8)) == []
  assert cnn.calls == [(faces.AUTO_CNN_MAX_SIDE, 0)] and hog.calls == [(1,)]  # none found: HOG, upsampled


def test_auto_runs_the_cnn_on_a_coarser_pyramid_and_keeps_its_lower_scores(monkeypatch):
  from agejax import mmod
  assert faces.FaceAligner(detector="auto").cnn.pyramid_rate == faces.AUTO_PYRAMID_RATE < mmod.PYRAMID_RATE
  for kind in ("cnn", "careful"):
    assert faces.FaceAligner(detector=kind).cnn.pyramid_rate == mmod.PYRAMID_RATE  # dlib's pyramid and threshold
  asked = []

  def fake_cnn(rgb, upsample=0, threshold=0.0):  # as the port: windows scored above `threshold`
    asked.append(threshold)
    found = [((10, 10, 90, 90), 0.5), ((100, 10, 180, 90), -0.2), ((200, 10, 280, 90), -0.6)]
    return [(b, s) for b, s in found if s > threshold]
  rgb = np.zeros((120, 300, 3), np.uint8)
  for kind, scores in (("auto", [0.5, -0.2]), ("cnn", [0.5])):
    aligner = faces.FaceAligner(detector=kind)
    monkeypatch.setitem(aligner.__dict__, "cnn", fake_cnn)
    asked.clear()
    assert [s for _, s in aligner._cnn(rgb, 640, 0)] == scores
    assert asked == [faces.AUTO_CNN_THRESHOLD if kind == "auto" else 0.0]
  slow = faces.FaceAligner(detector="auto", cnn_runtime="dlib")  # dlib's own CNN: its pyramid and threshold
  monkeypatch.setitem(slow.__dict__, "cnn", fake_cnn)
  asked.clear()
  slow._cnn(rgb, 640, 0)
  assert asked == [mmod.THRESHOLD]
  with pytest.raises(ValueError, match="dlib's pyramid"):
    faces.cnn_detector("dlib", pyramid_rate=0.7)
  from skimage import data
  dlibs = faces.cnn_detector("dlib")                   # dlib's own, asked for a threshold over her score
  assert len(dlibs(data.astronaut())) == 1 and dlibs(data.astronaut(), 0, 2.0) == []


def test_without_the_fast_cnn_auto_runs_hog_first_and_dlibs_cnn_only_where_it_finds_none(astronaut_small, monkeypatch):
  colour, old = astronaut_small
  auto = faces.FaceAligner(detector="auto", upsample=1, cnn_upsample=1, cnn_runtime="dlib")
  assert not auto.cnn_is_fast
  hog, cnn = _spied(auto, monkeypatch)
  assert len(auto.detect(colour)) == 1 and hog.calls == [(1,)] and cnn.calls == []  # 256 px: small, upsampled
  assert len(auto.detect(old)) == 1 and cnn.calls == [(faces.SLOW_CNN_MAX_SIDE, 1)]  # HOG found none: the CNN
  monkeypatch.setattr(faces, "SMALL_PHOTO_SIDE", 200)  # now a 256 px photo counts as large
  hog.calls.clear()
  auto.detect(colour)
  assert hog.calls == [(0,)]                            # no upsampling (her 45 px face is then the CNN's)


def test_merging_keeps_the_first_detectors_box_of_a_face_and_adds_the_others():
  dlib = pytest.importorskip("dlib")
  first = [(dlib.rectangle(10, 10, 90, 90), 1.0)]
  more = [(dlib.rectangle(20, 15, 95, 100), 2.0), (dlib.rectangle(200, 10, 280, 90), 0.5)]
  merged = faces._merge(first, more)
  assert [(r.left(), s) for r, s in merged] == [(10, 1.0), (200, 0.5)]
  kept = [(dlib.rectangle(0, 0, 99, 99), 1.0)]                  # 100x100 pixels
  half = [(dlib.rectangle(0, 50, 99, 149), 1.0)]                # shares 100x50: half of each, not over it
  more_than_half = [(dlib.rectangle(0, 49, 99, 148), 1.0)]      # shares 100x51
  small = [(dlib.rectangle(40, 40, 59, 79), 1.0)]                # 20x40, wholly inside: all of the smaller
  assert len(faces._merge(kept, half)) == 2 and len(faces._merge(kept, more_than_half)) == 1
  assert len(faces._merge(kept, small)) == 1


def _one_tint(rgb: np.ndarray) -> bool:
  """Gray or single-tint: the pixels lie along one line in RGB (second principal variance < 2%)."""
  var = np.linalg.eigvalsh(np.cov(rgb.reshape(-1, 3)[::97].astype(np.float64), rowvar=False))
  return bool(var[-1] > 0 and var[-2] < 0.02 * var[-1])


def test_cnn_boxes_are_in_the_photos_pixels_when_shrunk(astronaut_small, monkeypatch):
  colour, _ = astronaut_small
  cnn = faces.FaceAligner(detector="cnn", upsample=1)
  full = cnn.detect(colour)[0][0]
  monkeypatch.setattr(faces, "CNN_MAX_SIDE", 200)  # shrinks the 256 px photo by 0.78
  shrunk = cnn.detect(colour)
  assert len(shrunk) == 1
  r = shrunk[0][0]
  assert abs(r.left() - full.left()) < 8 and abs(r.bottom() - full.bottom()) < 8


def test_hard_photos_place_real_faces_and_degrade_them():
  rng = np.random.default_rng(1)
  chips = [rng.integers(0, 255, (200, 200, 3), dtype=np.uint8) for _ in range(3)]
  photos = hard_photos.make_photos(chips, photos_per_condition=2, faces_per_photo=4, seed=3)
  again = hard_photos.make_photos(chips, photos_per_condition=2, faces_per_photo=4, seed=3)
  assert [p.condition for p in photos] == [c for c in hard_photos.CONDITIONS for _ in range(2)]
  assert all(np.array_equal(p.rgb, q.rgb) for p, q in zip(photos, again))  # seeded
  for p in photos:
    lo, hi = hard_photos.CONDITIONS[p.condition]
    assert p.rgb.shape == (480, 640, 3) and p.faces
    for i, f in enumerate(p.faces):
      assert 0 <= f[0] < f[2] <= 640 and 0 <= f[1] < f[3] <= 480
      assert lo / 0.6 - 1 <= f[2] - f[0] <= hi / 0.6 + 1
      for g in p.faces[i + 1:]:
        assert f[2] <= g[0] or g[2] <= f[0] or f[3] <= g[1] or g[3] <= f[1]  # no overlap
    gray = np.abs(p.rgb[..., 0].astype(int) - p.rgb[..., 2]).max() <= 3
    assert gray == (p.condition == "scan")
    if p.condition == "old_print":
      assert (p.rgb[..., 0].astype(int) - p.rgb[..., 2]).mean() > 20  # sepia


def test_scans_are_seeded_monochrome_album_photos():
  rng = np.random.default_rng(2)
  chips = [rng.integers(0, 255, (200, 200, 3), dtype=np.uint8) for _ in range(4)]
  scans = hard_photos.make_scans(chips, 6, seed=5)
  assert all(np.array_equal(p.rgb, q.rgb) for p, q in zip(scans, hard_photos.make_scans(chips, 6, seed=5)))
  assert [p.condition for p in scans] == ["gray_scan", "sepia_scan"] * 3
  for p in scans:
    h, w = p.rgb.shape[:2]
    assert 320 <= max(h, w) <= 640 and min(h, w) == max(h, w) * 3 // 4 and 1 <= len(p.faces) <= 3
    for i, f in enumerate(p.faces):
      assert 0 <= f[0] < f[2] <= w and 0 <= f[1] < f[3] <= h
      assert hard_photos.SCAN_FACES[0] / 0.6 - 1 <= f[2] - f[0] <= hard_photos.SCAN_FACES[1] / 0.6 + 1
      assert all(f[2] <= g[0] or g[2] <= f[0] or f[3] <= g[1] or g[3] <= f[1] for g in p.faces[i + 1:])
    tint = (p.rgb[..., 0].astype(int) - p.rgb[..., 2]).mean()
    assert (tint > 15) == (p.condition == "sepia_scan") and _one_tint(p.rgb)


def test_aaf_photos_are_the_test_splits_with_the_face_the_landmarks_place(tmp_path):
  from tests import fakes
  names = fakes.aaf_names({"train": 2, "test": 3})
  fakes.aaf_archive(str(tmp_path), names)
  photos = hard_photos.aaf_photos(str(tmp_path / "AAF-train.tar.gz"), 2)
  test = names[2:]
  assert len(photos) == 2 and [p.condition for p in photos] == ["aaf", "aaf"]  # the first 2 test photos only
  with Image.open(io.BytesIO(fakes.jpeg_bytes(2, size=300))) as want:
    np.testing.assert_array_equal(photos[0].rgb, np.asarray(want.convert("RGB")))  # test[0] is the archive's 3rd
  for p, dx in zip(photos, (2, 0)):  # fakes.aaf_points(i % 3): landmarks 95-203 px across, 120-240 down
    (box,) = p.faces
    cx, cy, half = (95 + 203) / 2 + dx, (120 + 240) / 2, 0.8 * 108
    assert box == (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
  assert len(hard_photos.aaf_photos(str(tmp_path / "AAF-train.tar.gz"), 10)) == len(test)
  fakes.aaf_archive(str(tmp_path / "no_points"), names, drop_points=(test[0],))
  assert len(hard_photos.aaf_photos(str(tmp_path / "no_points" / "AAF-train.tar.gz"), 10)) == len(test) - 1
  fakes.aaf_archive(str(tmp_path / "train_only"), names[:2])
  with pytest.raises(ValueError, match="no photo of All-Age-Faces' test split"):
    hard_photos.aaf_photos(str(tmp_path / "train_only" / "AAF-train.tar.gz"), 10)


def test_labelled_chips_are_the_archives_in_order_with_the_age_their_names_start_with(tmp_path):
  from tests import fakes
  names = ["25_0_0_a.jpg.chip.jpg", "7_1_2_b.jpg.chip.jpg", "61_0_3_c.jpg.chip.jpg"]
  fakes.utkface_archive(str(tmp_path), names)
  archive = str(tmp_path / "UTKFace.tar.gz")
  chips, ages = hard_photos.utkface_labelled_chips(archive, 5, {names[0], names[2]})
  assert ages == [25, 61] and len(chips) == 2 and chips[0].shape == (40, 40, 3)
  assert hard_photos.utkface_labelled_chips(archive, 2)[1] == [25, 7]                # the first `count`
  fakes.utkface_archive(str(tmp_path / "odd"), ["a_0_0_x.jpg.chip.jpg"])
  assert len(hard_photos.utkface_chips(str(tmp_path / "odd" / "UTKFace.tar.gz"), 3)) == 1  # chips need no label
  with pytest.raises(ValueError, match="does not start with an age"):
    hard_photos.utkface_labelled_chips(str(tmp_path / "odd" / "UTKFace.tar.gz"), 3)


def test_scans_carry_each_faces_age_in_the_order_of_their_boxes():
  rng = np.random.default_rng(2)
  chips = [rng.integers(0, 255, (200, 200, 3), dtype=np.uint8) for _ in range(5)]
  ages = [11, 22, 33, 44, 55]
  scans = hard_photos.make_scans(chips, 6, seed=5, ages=ages)
  plain = hard_photos.make_scans(chips, 6, seed=5)
  assert all(np.array_equal(p.rgb, q.rgb) and p.faces == q.faces and q.ages is None for p, q in zip(scans, plain))
  used = [a for p in scans for a in p.ages]
  assert len(used) > len(ages)                             # the chips came round again
  assert [len(p.ages) for p in scans] == [len(p.faces) for p in scans]
  assert used == [ages[k % 5] for k in range(len(used))]  # the chips in turn, so their ages in turn
  with pytest.raises(ValueError, match="2 ages for 5 chips"):
    hard_photos.make_scans(chips, 1, ages=[1, 2])


def test_matching_counts_each_face_once():
  faces_ = [(0, 0, 100, 100), (200, 0, 300, 100)]
  assert hard_photos.match(faces_, [(20, 20, 80, 80), (25, 25, 85, 85), (210, 10, 290, 90)]) == (2, 1)
  assert hard_photos.match(faces_, [(45, 45, 55, 55)]) == (0, 1)     # too small for the face
  assert hard_photos.match(faces_, [(400, 0, 450, 50)]) == (0, 1)
  assert hard_photos.match_pairs(faces_, [(400, 0, 450, 50), (210, 10, 290, 90), (20, 20, 80, 80), (25, 25, 85, 85)]) \
      == [(1, 1), (0, 2)]                                            # which detection found which face
  r = hard_photos.recall(lambda rgb: [(20, 20, 80, 80)], [hard_photos.Photo("small", np.zeros((8, 8, 3)), faces_)])
  assert r["small"]["recall"] == 0.5 and r["all"]["faces"] == 2 and r["all"]["false_per_photo"] == 0


def test_detection_in_workers_gives_the_same_records_in_order(tmp_path):
  from skimage import data
  paths = []
  for i, img in enumerate([data.astronaut(), data.coffee(), None, data.astronaut()[:, ::-1]]):
    paths.append(str(tmp_path / f"{i}.png"))
    if img is None:
      open(paths[-1], "w").write("not an image")
    else:
      Image.fromarray(img).save(paths[-1])
  model = export.load(predict_lib.DEFAULT_MODEL)
  inline = list(predict_lib.predict_files(model, paths, keep_photo=False))
  pooled = list(predict_lib.predict_files(model, paths, workers=2, keep_photo=False))
  assert [r["file"] for r in pooled] == paths and "error" in pooled[2]
  assert [len(r.get("faces", [])) for r in pooled] == [1, 0, 0, 1]
  assert all("_rgb" not in r for r in pooled)
  for a, b in zip(inline, pooled):
    assert a.get("error") == b.get("error")
    for fa, fb in zip(a.get("faces", []), b.get("faces", [])):
      assert fa["box"] == fb["box"] and fa["age"] == pytest.approx(fb["age"], abs=1e-5)


def test_slivers_and_single_pixels_hold_no_faces_and_raise_nothing():
  for detector in ("auto", "cnn", "careful"):
    aligner = faces.FaceAligner(detector=detector)
    for shape in ((1, 1, 3), (2, 3000, 3), (3000, 2, 3)):
      assert aligner.detect(np.zeros(shape, np.uint8)) == [], (detector, shape)


def test_detection_workers_run_the_cnn_on_one_thread_each():
  faces._start_worker(faces.FaceAligner().settings)
  session = faces._worker_aligner.cnn.session
  assert session.get_session_options().intra_op_num_threads == 1
  assert faces._worker_aligner.cnn.pyramid_rate == faces.AUTO_PYRAMID_RATE  # auto's policy in the workers too
  assert faces.FaceAligner().cnn.session.get_session_options().intra_op_num_threads == 0  # in-process: all cores


def test_an_aligner_loads_its_models_on_first_use(astronaut_small, monkeypatch):
  """predict with --workers builds a FaceAligner in the main process only for its settings: it
  must load no detector (the CNN's ONNX graph and session) and no landmark model there."""
  built = []
  real = faces.cnn_detector
  monkeypatch.setattr(faces, "cnn_detector", lambda *a, **k: built.append(a) or real(*a, **k))
  aligner = faces.FaceAligner(detector="auto")
  assert built == [] and not {"cnn", "hog", "predictor"} & set(vars(aligner))
  assert len(aligner(astronaut_small[0])) == 1 and len(built) == 1  # built on first use, once
  aligner(astronaut_small[0])
  assert len(built) == 1


def test_asking_for_the_onnx_cnn_without_onnxruntime_fails_at_once(monkeypatch):
  from agejax import onnx_export
  monkeypatch.setattr(onnx_export, "available", lambda convert=False: False)
  with pytest.raises(ImportError, match="onnxruntime"):
    faces.FaceAligner(detector="auto", cnn_runtime="onnx")
  assert faces.resolve_cnn_runtime("auto") == "dlib"  # auto falls back instead


def test_face_finder_detects_before_it_is_iterated_and_stops_its_workers(tmp_path):
  from skimage import data
  paths = []
  for i, img in enumerate([data.astronaut(), data.coffee(), data.astronaut()[:, ::-1]]):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(img).save(paths[-1])
  aligner = faces.FaceAligner()
  finder = faces.find_faces_in_files(paths, False, aligner, workers=2, keep_photo=False)
  assert isinstance(finder, faces.FaceFinder)
  futures = list(finder._window)
  assert len(futures) == len(paths)  # all submitted when it was made
  for f in futures:  # the workers detect with nobody asking yet: the caller's own loading overlaps them
    f.result(timeout=120)
  pooled = list(finder)
  assert [r["file"] for r, _ in pooled] == paths and [len(f) for _, f in pooled] == [1, 0, 1]
  assert not finder._pool._processes  # iterated to the end: the workers are gone
  with faces.FaceFinder(paths, aligner, workers=1, keep_photo=False) as early:
    pass  # left before any result was taken: no worker left behind
  assert not early._pool._processes
