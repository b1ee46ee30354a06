"""dlib's CNN face detector (MMOD) without dlib: the same weights, pyramid, windows and NMS, run by
ONNX Runtime (about 28x dlib-bin's speed on a CPU, docs/PERFORMANCE.md) or by XLA.

    detector = mmod.MMODDetector()                  # the installed mmod_human_face_detector.dat
    for (left, top, right, bottom), score in detector(rgb):   # best first, like dlib's
        ...

`mmod_human_face_detector.dat` ships in `face_recognition_models` (`pip install agejax[faces]`);
Davis King trained it on his public face detection dataset (dlib.net/files/data). The file is
dlib's DNN serialization (read by `agejax.dlib_format`) of

    loss_mmod<con<1,9,9,1,1, rcon5<rcon5<rcon5<downsampler<input_rgb_image_pyramid<pyramid_down<6>>>>>>>>
    downsampler = relu<affine<con5d<32, relu<affine<con5d<32, relu<affine<con5d<16, SUBNET>>>>>>>>>
    rcon5       = relu<affine<con5<45, SUBNET>>>      (con5d: 5x5 stride 2 unpadded; con5: stride 1, padded)

(dlib/examples/dnn_mmod_face_detection_ex.cpp). What dlib does with it, done here the same way
(dlib/dnn/input.h, loss.h, image_transforms/image_pyramid.h):
- the photo, less the mean colour and over 256, and its 5/6-scaled copies down to 5 px high (each
  resized bilinearly, corners aligned, from the one before) are tiled into one image, zero between
  them (`tiled_pyramid`);
- every output above the threshold (0) is an 80x80 window centred on input pixel 8*(r, c) + 14,
  mapped back to the photo through its pyramid level (x 6/5 + 0.3 per level);
- windows, best first, are dropped where their intersection over their bounding box with one kept
  is above the file's NMS threshold (0.338).
The affine layers are folded into their convolutions (exact). The ONNX graph is written here from
the weights (no converter, no `onnx` package) with dynamic height and width, in a form ONNX Runtime
runs 1.4x faster (`fast_form`: 48 channels in place of 45, the 9x9 score layer as a 1x1
convolution to its taps, summed shifted in numpy), and its pyramid's levels resized by ONNX
Runtime too (`resize_model`). Boxes agree with dlib-bin's to about a
pixel and scores to within 0.02 (tests/test_mmod.py): dlib's own float order differs.
`MMODDetector(pyramid_rate=...)` and its `threshold` depart from dlib on purpose: a coarser pyramid
(0.7 in place of 5/6: about 0.6 of the pixels) with windows kept from a lower score finds as many
faces for less time (`agejax.faces`' "auto"; docs/PERFORMANCE.md); its boxes are then not dlib's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from agejax import dlib_format, onnx_export
from agejax.dlib_format import Layer

STRIDE, OFFSET = 8, 14      # output (r, c) looks at input pixel STRIDE * (r, c) + OFFSET
PYRAMID_RATE = 5 / 6        # pyramid_down<6>: each level's size, floor(5/6 of the one before)
POINT_UP = 6 / 5            # ... and its point_up: p * 6/5 + 0.3, as dlib computes it
MIN_LEVEL_HEIGHT = 5        # dlib stops the pyramid below this
THRESHOLD = 0.0             # dlib's: windows scored above this are faces


def default_path() -> str:
  """The installed `face_recognition_models` package's copy of the detector."""
  return dlib_format.installed_model("dlib's CNN face detector", "mmod_human_face_detector.dat",
                                     "cnn_face_detector_model_location")


@dataclasses.dataclass(frozen=True)
class MMODWeights:
  """The detector as read from its file, affine layers folded in."""
  convs: tuple            # ((kernel (O, I, kh, kw) float32, bias (O,), stride, padding), ...), input first
  mean: tuple             # the input layer's (red, green, blue) averages
  window: tuple           # (width, height) of the detection window, pixels of a pyramid level
  nms_iou: float          # overlaps_nms: intersection over the bounding box above this
  nms_covered: float      # ... or intersection over either box above this
  padding: int = 10       # between the tiled pyramid's levels
  outer_padding: int = 11  # around them


LAYERS = ((16, 5, 2), (32, 5, 2), (32, 5, 2), (45, 5, 1), (45, 5, 1), (45, 5, 1))  # (filters, size, stride)
SCORE_LAYER = (1, 9, 1)     # the last convolution: one score a window, no affine or relu after it


def network_layers() -> list[Layer]:
  """The detector's chain as its serialization sees it, from the loss layer down to the input."""
  chain = [Layer("loss_mmod"), Layer("con", f"con_{len(LAYERS)}", SCORE_LAYER)]
  for i in reversed(range(len(LAYERS))):
    chain += [Layer("relu"), Layer("affine", f"affine_{i}", ("batch_norm",)), Layer("con", f"con_{i}", LAYERS[i])]
  return chain + [Layer("input")]


def _read_options(s, out: dict) -> None:
  name = s.string()
  if name != "loss_mmod_":
    s.fail(f"loss layer {name!r}, expected loss_mmod_ (a detector)")
  version = s.version((1, 2, 3, 4))
  if version == 1:
    windows = [(s.int(), s.int())]
  else:
    windows = []
    for _ in range(s.int()):
      v = s.version((1, 2))
      windows.append((s.int(), s.int()))
      if v == 2:
        s.string()  # label
  floats = [s.float() for _ in range(7)]  # false alarm, missed target, match IoU, nms (iou, covered), ignore (2)
  if version >= 3:
    if bytes(s.take(1)) != b"\x01":  # assume_image_pyramid, one raw byte
      s.fail("a detector that does not assume an image pyramid")
  if version >= 4 and s.bool():
    s.fail("a detector with bounding box regression (not supported)")
  if version >= 4:
    s.float()
  if len(windows) != 1:
    s.fail(f"{len(windows)} detector windows, expected one")
  out.update(window=windows[0], nms_iou=floats[3], nms_covered=floats[4])


def _read_input(s, out: dict) -> None:
  name = s.string()
  if name not in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
    s.fail(f"input layer {name!r}, expected input_rgb_image_pyramid")
  out["mean"] = (s.float(), s.float(), s.float())
  if name == "input_rgb_image_pyramid2":
    out["padding"], out["outer_padding"] = s.int(), s.int()


def read_mmod(path: str | None = None) -> MMODWeights:
  """The detector in `path` (default: the installed file); `dlib_format.DlibFormatError` where the
  file is not this network."""
  path = path or default_path()
  with open(path, "rb") as f:
    data = f.read()
  s = dlib_format.Stream(data, path, expected="dlib's CNN face detector (mmod_human_face_detector.dat)")
  extra, weights = {}, {}
  dlib_format.read_chain(s, network_layers(), weights, read_loss=lambda st: _read_options(st, extra),
                         read_input=lambda st, layer: _read_input(st, extra))
  if s.pos != len(data):
    s.where = "the end of the network"
    s.fail(f"{len(data) - s.pos} bytes after the network")
  convs = []
  for i, (_, size, stride) in enumerate(LAYERS + (SCORE_LAYER,)):
    conv = weights[f"con_{i}"]
    kernel, bias = conv["kernel"].transpose(3, 2, 0, 1), conv["bias"]  # HWIO -> OIHW
    if i < len(LAYERS):  # affine after the convolution: g (W x + b) + beta
      g, beta = weights[f"affine_{i}"]["scale"], weights[f"affine_{i}"]["bias"]
      kernel, bias = kernel * g[:, None, None, None], g * bias + beta
    pad = size // 2 if stride == 1 else 0
    convs.append((np.ascontiguousarray(kernel, np.float32), bias.astype(np.float32), stride, pad))
  return MMODWeights(convs=tuple(convs), **extra)


# --------------------------------------------------------------------------- the tiled pyramid

def pyramid_layout(height: int, width: int, padding: int, outer_padding: int, rate: float = PYRAMID_RATE):
  """(rects, (rows, cols)): each level's (left, top, right, bottom), inclusive, in the tiled image,
  and its size, as dlib's compute_tiled_image_pyramid_details places them; `rate`: each level's
  size against the one before (dlib's pyramid_down<6>: 5/6)."""
  sizes = [(height, width)]
  nr, nc = height, width
  while True:
    nr, nc = int(np.floor(rate * nr)), int(np.floor(rate * nc))
    if nr * nc == 0 or nr < MIN_LEVEL_HEIGHT:
      break
    sizes.append((nr, nc))
  total = sum(h + padding for h, _ in sizes) - 2 * padding
  col_height, prev_width = 0, 0
  for h, w in sizes:
    if w <= width - prev_width - padding and (col_height - height) * 2 >= total - height:
      break
    col_height += h + padding
    prev_width = w
  col_height -= padding
  rows, cols = col_height + 2 * outer_padding, width + 2 * outer_padding
  rects, y, i = [], outer_padding, 0
  while y < col_height + outer_padding and i < len(sizes):
    h, w = sizes[i]
    rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
    y += h + padding
    i += 1
  y -= padding
  while i < len(sizes):
    h, w = sizes[i]
    right, bottom = outer_padding + width - 1, y - 1
    rect = (right - (w - 1), bottom - (h - 1), right, bottom)
    first = rects[0]
    if not (rect[2] < first[0] or rect[0] > first[2] or rect[3] < first[1] or rect[1] > first[3]):
      break  # the last column would run into the photo
    rects.append(rect)
    y -= h + padding
    i += 1
  return rects, (rows, cols)


def _resize_bilinear(src: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """dlib's resize_image of a (C, H, W) image (bilinear, the corners of source and destination
  aligned), rows then columns."""
  def axis(n_src, n_dst):
    pos = np.arange(n_dst, dtype=np.float32) * np.float32((n_src - 1) / max(n_dst - 1, 1))
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_src - 1), (pos - lo).astype(np.float32)
  r0, r1, fr = axis(src.shape[1], rows)
  c0, c1, fc = axis(src.shape[2], cols)
  by_rows, bottom = np.take(src, r0, axis=1), np.take(src, r1, axis=1)  # in place below: 3x fewer passes
  bottom -= by_rows
  bottom *= fr[None, :, None]
  by_rows += bottom
  out, right = np.take(by_rows, c0, axis=2), np.take(by_rows, c1, axis=2)
  right -= out
  right *= fc
  out += right
  return out


def tiled_pyramid(rgb: np.ndarray, weights: MMODWeights, resize=None,
                  rate: float = PYRAMID_RATE) -> tuple[np.ndarray, list]:
  """((3, rows, cols) float32 network input, level rects) of an (H, W, 3) uint8 photo; each level
  `rate` times the one before, made from it by `resize(level, rows, cols)` (default
  `_resize_bilinear`; the ONNX runtime passes ONNX Runtime's Resize of `resize_model`, 5x faster,
  the same to 1e-4)."""
  resize = resize or _resize_bilinear
  rects, (rows, cols) = pyramid_layout(rgb.shape[0], rgb.shape[1], weights.padding, weights.outer_padding, rate)
  out = np.zeros((3, rows, cols), np.float32)
  mean = np.asarray(weights.mean, np.float32)[:, None, None]
  level = rgb.transpose(2, 0, 1).astype(np.float32, order="C")  # C order: the resizes gather rows
  level -= mean
  level /= np.float32(256.0)
  for i, (left, top, right, bottom) in enumerate(rects):
    if i:
      level = resize(level, bottom - top + 1, right - left + 1)
    out[:, top:bottom + 1, left:right + 1] = level
  return out, rects


# --------------------------------------------------------------------------- scores to boxes

def _level_of(rects, x: float, y: float) -> int:
  """dlib's nearest_rect: the level containing (x, y), else the nearest."""
  best, best_d = 0, np.inf
  for i, (left, top, right, bottom) in enumerate(rects):
    dx = max(left - x, 0, x - right)
    dy = max(top - y, 0, y - bottom)
    if dx == 0 and dy == 0:
      return i
    if np.hypot(dx, dy) < best_d:
      best, best_d = i, np.hypot(dx, dy)
  return best


def overlaps(a, b, iou: float, covered: float) -> bool:
  """dlib's test_box_overlap on integer rectangles (inclusive corners; the 'union' is the
  bounding box of the two)."""
  iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
  ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
  if iw <= 0 or ih <= 0:
    return False
  inner = iw * ih
  outer = (max(a[2], b[2]) - min(a[0], b[0]) + 1) * (max(a[3], b[3]) - min(a[1], b[1]) + 1)
  area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)
  return inner / outer > iou or inner / area(a) > covered or inner / area(b) > covered


def round_like_dlib(v: float) -> int:
  """dlib's drectangle -> rectangle: the nearest integer, halves away from zero (std::lround)."""
  return int(math.copysign(math.floor(abs(v) + 0.5), v))


def box_to_photo(box, scale: float) -> tuple:
  """A box found in a photo resized by `scale` (pixel centres aligned, as PIL resizes), in the
  photo's pixels."""
  return tuple(round_like_dlib((v + 0.5) / scale - 0.5) for v in box)


def boxes_from_scores(scores: np.ndarray, rects, weights: MMODWeights, threshold: float = THRESHOLD,
                      rate: float = PYRAMID_RATE) -> list:
  """[((left, top, right, bottom) ints, score)], best first, after NMS, of an (R, C) score map of a
  pyramid of `rate`, windows scored above `threshold`. On dlib's 5/6 pyramid a box goes up a level
  as dlib's point_up does (x 6/5 + 0.3); on another, through the corner-aligned resize that made
  the level (x (size before - 1) / (size - 1), each axis)."""
  dlibs = math.isclose(rate, PYRAMID_RATE, rel_tol=1e-9)
  sizes = [(r - l + 1, b - t + 1) for l, t, r, b in rects]  # (width, height) of each level
  rs, cs = np.nonzero(scores > threshold)
  order = np.argsort(-scores[rs, cs], kind="stable")
  w, h = weights.window
  kept = []
  for r, c in zip(rs[order], cs[order]):
    x, y = STRIDE * c + OFFSET, STRIDE * r + OFFSET
    box = np.array([x - (w - 1) / 2, y - (h - 1) / 2, x + (w - 1) / 2, y + (h - 1) / 2])
    level = _level_of(rects, x, y)
    box -= np.array(rects[level][:2] * 2, np.float64)
    for k in range(level, 0, -1):
      if dlibs:
        box = box * POINT_UP + 0.3
      else:
        (w0, h0), (w1, h1) = sizes[k - 1], sizes[k]
        box = box * np.array([(w0 - 1) / max(w1 - 1, 1), (h0 - 1) / max(h1 - 1, 1)] * 2)
    box = tuple(round_like_dlib(v) for v in box)
    if any(overlaps(k, box, weights.nms_iou, weights.nms_covered) for k, _ in kept):
      continue
    kept.append((box, float(scores[r, c])))
  return kept


# --------------------------------------------------------------------------- the network

def output_size(n: int, weights: MMODWeights) -> int:
  """The score map's size along an input side of n pixels."""
  for kernel, _, stride, pad in weights.convs:
    n = (n + 2 * pad - kernel.shape[-1]) // stride + 1
  return n


# ONNX's protobuf messages, written directly (the wire format: field number << 3 | wire type, varint
# or length-delimited; onnx/onnx.proto's field numbers): the detector's graph needs a handful of
# fields, and the `onnx` package takes half a second to import in every detection worker.
def _varint(n: int) -> bytes:
  if n < 0:
    raise ValueError(f"negative varint {n}: not written here")
  n, out = int(n), bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _int(field: int, n: int) -> bytes:
  return _varint(field << 3) + _varint(n)


def _bytes(field: int, data) -> bytes:
  data = data.encode() if isinstance(data, str) else bytes(data)
  return _varint(field << 3 | 2) + _varint(len(data)) + data


FLOAT, INT64, ATTR_STRING, ATTR_INTS = 1, 7, 3, 7   # TensorProto's and AttributeProto's type codes


def _tensor(name: str, array: np.ndarray) -> bytes:        # TensorProto: dims 1, data_type 2, name 8, raw_data 9
  array = np.ascontiguousarray(array, "<f4")
  return b"".join(_int(1, d) for d in array.shape) + _int(2, FLOAT) + _bytes(8, name) + _bytes(9, array.tobytes())


def _value_info(name: str, dims, elem_type: int = FLOAT) -> bytes:  # ValueInfoProto { name 1, type 2 { tensor_type 1 {
  shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, (int, np.integer)) else _bytes(2, d) if d else b"") for d in dims)
  return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, elem_type) + _bytes(2, shape)))  # elem_type 1, shape 2 } } }


def _node(op: str, inputs, outputs, **attributes) -> bytes:  # NodeProto: input 1, output 2, op_type 4, attribute 5
  def attr(k, v):  # AttributeProto: name 1, s 4 (a string) or ints 8, type 20
    if isinstance(v, str):
      return _bytes(1, k) + _bytes(4, v) + _int(20, ATTR_STRING)
    return _bytes(1, k) + b"".join(_int(8, x) for x in v) + _int(20, ATTR_INTS)
  attrs = b"".join(_bytes(5, attr(k, v)) for k, v in sorted(attributes.items()))
  return b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(4, op) + attrs


CHANNEL_BLOCK = 16  # ONNX Runtime's blocked (NCHWc) convolutions on AVX-512 take channels in 16s


def fast_form(weights: MMODWeights) -> tuple[list, tuple]:
  """The network rearranged for ONNX Runtime, computing the same scores (to float rounding):
  (convolutions [(kernel, bias, stride, pad)], (kh, kw, pad, bias) of the score layer).
  - The 45-channel layers get 3 zero filters (48): ONNX Runtime runs 45-channel inputs unblocked,
    about 2x slower (docs/PERFORMANCE.md).
  - The score layer (one output, 9x9) is split: a 1x1 convolution to its kh*kw taps in the graph,
    then `score_from_taps` sums each tap shifted into place (one output channel is the slowest
    shape for a convolution kernel)."""
  convs, extra = [], 0
  *hidden, (kernel, bias, score_stride, pad) = weights.convs
  if score_stride != 1 or kernel.shape[0] != 1:
    raise ValueError(f"a score layer of {kernel.shape[0]} outputs, stride {score_stride}: expected one, stride 1")
  for k, b, stride, p in hidden:
    out = -(-k.shape[0] // CHANNEL_BLOCK) * CHANNEL_BLOCK
    k2 = np.zeros((out, k.shape[1] + extra) + k.shape[2:], np.float32)
    k2[:k.shape[0], :k.shape[1]] = k
    convs.append((k2, np.pad(b, (0, out - len(b))).astype(np.float32), stride, p))
    extra = out - k.shape[0]
  kh, kw = kernel.shape[2:]
  taps = np.zeros((kh * kw, kernel.shape[1] + extra, 1, 1), np.float32)
  taps[:, :kernel.shape[1], 0, 0] = kernel[0].transpose(1, 2, 0).reshape(kh * kw, kernel.shape[1])
  convs.append((taps, np.zeros(kh * kw, np.float32), 1, 0))
  return convs, (kh, kw, pad, float(bias[0]))


def score_from_taps(taps: np.ndarray, score: tuple) -> np.ndarray:
  """The score map from `fast_form`'s (kh*kw, H, W) taps: sum_ij taps[i*kw + j] shifted by (i, j)."""
  kh, kw, pad, bias = score
  _, h, w = taps.shape
  rows, cols = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
  out = np.full((rows, cols), bias, np.float32)
  for i in range(kh):  # the zero padding is never built: each tap adds where it overlaps the map
    dy = i - pad
    y0, y1 = max(0, -dy), min(rows, h - dy)
    for j in range(kw):
      dx = j - pad
      x0, x1 = max(0, -dx), min(cols, w - dx)
      if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] += taps[i * kw + j, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
  return out


def onnx_model(convs: list, output: str = "scores") -> bytes:
  """Convolutions [(kernel (O, I, kh, kw), bias, stride, pad)], a ReLU after each but the last,
  as a serialized ONNX model (opset 17, IR 8): input "x" (1, 3, H, W) float32, output `output`
  (1, O, H', W'); H and W dynamic. Written without the `onnx` package."""
  nodes, inits, x = [], [], "x"
  for i, (kernel, bias, stride, pad) in enumerate(convs):
    inits += [_tensor(f"w{i}", kernel), _tensor(f"b{i}", bias)]
    out = output if i == len(convs) - 1 else f"c{i}"
    nodes.append(_node("Conv", [x, f"w{i}", f"b{i}"], [out], strides=[stride] * 2, pads=[pad] * 4,
                       kernel_shape=list(kernel.shape[2:])))
    x = out
    if i < len(convs) - 1:
      nodes.append(_node("Relu", [x], [f"r{i}"]))
      x = f"r{i}"
  return _model("mmod_face_detector", nodes, inits, [_value_info("x", [1, 3, "H", "W"])],
                [_value_info(output, [1, int(convs[-1][0].shape[0]), None, None])])


def resize_model() -> bytes:
  """ONNX's Resize as dlib resizes a pyramid level (bilinear, corners aligned): inputs "x" (1, 3, H,
  W) float32 and "sizes" (4,) int64, output "y"."""
  node = _node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", coordinate_transformation_mode="align_corners")
  return _model("mmod_pyramid_level", [node], [], [_value_info("x", [1, 3, "H", "W"]), _value_info("sizes", [4], INT64)],
                [_value_info("y", [1, 3, None, None])])


def _model(name: str, nodes: list, inits: list, inputs: list, outputs: list) -> bytes:
  graph = (b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name)      # GraphProto: node 1, name 2,
           + b"".join(_bytes(5, t) for t in inits)                      # initializer 5,
           + b"".join(_bytes(11, i) for i in inputs)                    # input 11, output 12
           + b"".join(_bytes(12, o) for o in outputs))
  # ModelProto: ir_version 1, producer_name 2, graph 7, opset_import 8 { domain 1, version 2 }
  return _int(1, 8) + _bytes(2, "agejax.mmod") + _bytes(7, graph) + _bytes(8, _bytes(1, "") + _int(2, 17))


def jax_scores(weights: MMODWeights, x):
  """The network in JAX: (3, H, W) float32 -> (H', W') scores (XLA; one compilation per size)."""
  import jax
  import jax.numpy as jnp
  y = jnp.asarray(x)[None]
  for i, (kernel, bias, stride, pad) in enumerate(weights.convs):
    y = jax.lax.conv_general_dilated(y, jnp.asarray(kernel), (stride, stride), [(pad, pad)] * 2,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW")) + bias[:, None, None]
    if i < len(weights.convs) - 1:
      y = jax.nn.relu(y)
  return y[0, 0]


class MMODDetector:
  """dlib's CNN face detector: `detector(rgb, upsample=0, threshold=THRESHOLD)` -> [((left, top,
  right, bottom), score)] of the windows scored above `threshold`, best first, in the photo's
  pixels; faces from about 60-80 px (30-40 px with upsample=1) upwards.

  runtime "onnx" (ONNX Runtime, needs `onnxruntime`: pip install 'agejax[onnx]') or
  "jax"; "auto" takes ONNX Runtime where onnxruntime is installed. `threads`: ONNX
  Runtime's intra-op threads (default: one per core; `agejax.faces`' detection workers, one process
  per core, ask for 1). `pyramid_rate`: each pyramid level's size against the one before; dlib's
  5/6 by default, where the boxes and scores are dlib's; a coarser pyramid (`agejax.faces`' "auto"
  takes 0.7) has fewer pixels to score (about 0.6x the time) and scores faces between its levels
  lower (docs/PERFORMANCE.md). Gray (H, W) and RGBA photos are taken as RGB."""

  def __init__(self, path: str | None = None, runtime: str = "auto", threads: int | None = None,
               pyramid_rate: float = PYRAMID_RATE):
    if not 0.5 <= pyramid_rate < 1:
      raise ValueError(f"pyramid_rate {pyramid_rate}: each level's size against the one before, in [0.5, 1)")
    self.pyramid_rate = pyramid_rate
    self.weights = read_mmod(path)
    if runtime == "auto":
      runtime = "onnx" if onnx_export.available() else "jax"
    if runtime not in ("onnx", "jax"):
      raise ValueError(f"runtime {runtime!r}: auto, onnx or jax")
    self.runtime = runtime
    if runtime == "onnx":
      import onnxruntime as ort
      opts = ort.SessionOptions()
      opts.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one per core
      opts.inter_op_num_threads = 1
      opts.log_severity_level = 3
      convs, self._score = fast_form(self.weights)
      self.session = ort.InferenceSession(onnx_model(convs, "taps"), opts, providers=["CPUExecutionProvider"])
      resizer = ort.InferenceSession(resize_model(), opts, providers=["CPUExecutionProvider"])
      self._resize = lambda level, rows, cols: resizer.run(
          None, {"x": level[None], "sizes": np.array([1, 3, rows, cols], np.int64)})[0][0]
    else:
      import jax
      self._jit = jax.jit(lambda x: jax_scores(self.weights, x))
      self._resize = None

  def scores(self, rgb: np.ndarray) -> tuple[np.ndarray, list]:
    """(score map, level rects) of an (H, W, 3) uint8 photo; an empty map where the tiled pyramid
    is too small for the network (a photo a few pixels high or wide holds no face)."""
    x, rects = tiled_pyramid(rgb, self.weights, self._resize, self.pyramid_rate)
    if min(output_size(n, self.weights) for n in x.shape[1:]) < 1:
      return np.zeros((0, 0), np.float32), rects
    if self.runtime == "onnx":
      out = score_from_taps(self.session.run(None, {"x": x[None]})[0][0], self._score)
    else:
      out = np.asarray(self._jit(x))
    return out, rects

  def __call__(self, rgb: np.ndarray, upsample: int = 0, threshold: float = THRESHOLD) -> list:
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
      rgb = np.repeat(rgb[..., None], 3, axis=-1)
    elif rgb.ndim == 3 and rgb.shape[2] == 4:
      rgb = rgb[..., :3]
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
      raise ValueError(f"expected an (H, W, 3) uint8 RGB photo, got {rgb.dtype} {rgb.shape}")
    if min(rgb.shape[:2]) == 0:
      return []
    scale = 2 ** upsample
    if upsample:
      from PIL import Image
      rgb = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.BILINEAR))
    found = boxes_from_scores(*self.scores(rgb), self.weights, threshold, self.pyramid_rate)
    return [(box_to_photo(box, scale), s) for box, s in found] if upsample else found
