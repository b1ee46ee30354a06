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

from typing import Any

import numpy as np

from agejax import dlib_format
from agejax.dlib_format import DlibFormatError, Layer, Stream as _Stream, read_chain
from agejax.models import face_resnet


def default_path() -> str:
  """The installed `face_recognition_models` package's copy of the network."""
  return dlib_format.installed_model("dlib's face ResNet", "dlib_face_recognition_resnet_model_v1.dat",
                                     "face_recognition_model_location")


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


def read_dlib_weights(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{flax module path: {"kernel" | "scale" | "bias": array}} of every weighted layer in the file."""
  with open(path, "rb") as f:
    data = f.read()
  s = _Stream(data, path, expected="dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1.dat)")
  weights: dict[str, dict[str, np.ndarray]] = {}
  read_chain(s, network_layers(), weights, _loss_metric, _input_layer)
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
