"""The exported model as ONNX, and ONNX Runtime behind `agejax.export.ExportedModel`.

`write(predict, image_size, out_dir, faces)` converts the same function as model.jaxexport (uint8
faces in, normalisation, network, flip averaging, distribution, age, std and the other heads out;
the batch dimension symbolic) with jax2onnx, the maintained JAX-to-ONNX converter that reads jaxprs
directly (tf2onnx would need TensorFlow, and `jax.export`'s StableHLO has no ONNX importer). It
then runs the ONNX model in ONNX Runtime on `faces` and compares every output with the JAX
function's, refusing (and deleting model.onnx) where an age differs by more than AGE_TOLERANCE
years. `OnnxRunner` runs a model.onnx with the threads the machine has.

Needs `pip install 'agejax[onnx]'` (onnxruntime) to run, and jax2onnx to convert.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

AGE_TOLERANCE = 0.01  # years: the largest age difference the export accepts between ONNX and JAX
OPSET = 21            # onnxruntime 1.18 (2024) and newer run it (the extras ask for it)


class OnnxUnavailable(ImportError):
  """ONNX Runtime (or, to convert, jax2onnx) is not installed."""


def available(convert: bool = False) -> bool:
  """Whether ONNX Runtime is installed (what runs an exported model and the face detector's graph,
  `agejax.mmod`), and jax2onnx and onnx where a model is to be converted (`convert`). Imports
  nothing (no JAX)."""
  import importlib.util
  need = ["onnxruntime"] + (["onnx", "jax2onnx"] if convert else [])
  return all(importlib.util.find_spec(m) is not None for m in need)


def output_names(predict: Callable, image_size: int) -> list[str]:
  import jax
  import jax.numpy as jnp
  shapes = jax.eval_shape(predict, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8))
  return sorted(shapes)


def write(predict: Callable, image_size: int, out_dir: str, faces: np.ndarray) -> dict:
  """Write out_dir/model.onnx and check it against `predict` on `faces` (uint8, (N, S, S, 3));
  returns what model.json records of it. ValueError (no file left) where they disagree."""
  if not available(convert=True):
    raise OnnxUnavailable("Writing model.onnx needs jax2onnx, onnx and onnxruntime: pip install 'agejax[onnx-export]'")
  import jax
  import jax.numpy as jnp
  import logging

  import jax2onnx
  import onnx
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # notes on untyped shape constants

  names = output_names(predict, image_size)

  def fn(images):  # one call of predict: jax2onnx writes every call's graph, with no common-subexpression pass
    out, seen, outputs = predict(images), set(), []
    for k in names:  # an ONNX value has one name: an output that is another output's value gets its own
      v = out[k]
      outputs.append(v + jnp.zeros_like(v) if id(v) in seen else v)
      seen.add(id(v))
    return tuple(outputs)

  proto = jax2onnx.to_onnx(fn, [_uint8_spec(image_size)], model_name="agejax", opset=OPSET,
                           input_names=["images"], output_names=names)
  dedupe_initializers(proto)
  path = os.path.join(out_dir, "model.onnx")
  tmp = path + ".tmp"
  try:
    onnx.save(proto, tmp)
    want = {k: np.asarray(v) for k, v in jax.jit(predict)(jnp.asarray(faces)).items()}
    got = OnnxRunner(tmp).run(faces)
    diffs = {k: float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in names}
    if not diffs.get("age", np.inf) <= AGE_TOLERANCE:
      raise ValueError(f"the ONNX model's ages differ from the JAX function's by up to {diffs.get('age')} years "
                       f"(more than {AGE_TOLERANCE}) on {len(faces)} faces; no model.onnx written.")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  from importlib import metadata
  return {"file": "model.onnx", "converter": f"jax2onnx {metadata.version('jax2onnx')}", "opset": OPSET, "inputs": {"images": ["B", image_size, image_size, 3], "dtype": "uint8"},
          "outputs": names, "checked_faces": int(len(faces)),
          "max_abs_difference": {k: round(v, 7) for k, v in diffs.items()}}


INT8_FILE = "model.int8.onnx"
INT8_MODES = ("static", "dynamic")
INT8_MAE_TOLERANCE = 0.05  # years: int8 is kept only where its MAE is at most this above the float model's
INT8_STD_TOLERANCE = 0.1   # years: ... and its stds (the distributions' spread) this close to float's on average
INT8_OPS = ("Conv",)       # what is quantised: the convolutions (nearly all the work); the heads, softmax and
                           # expectation stay float (quantised, the distributions' tails lose their shape)


def float32_weights(model) -> int:
  """Replace each Cast of a bfloat16 weight to float32 by the float32 weight itself (exact: every
  bfloat16 value is a float32 value), so that quantisation sees the weights as constants. Returns
  how many Casts went."""
  from onnx import TensorProto, numpy_helper
  inits = {i.name: i for i in model.graph.initializer}
  done = 0
  for node in list(model.graph.node):
    src = inits.get(node.input[0]) if node.op_type == "Cast" and node.input else None
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    if src is None or src.data_type != TensorProto.BFLOAT16 or to != TensorProto.FLOAT:
      continue
    weight = np.asarray(numpy_helper.to_array(src)).astype(np.float32)  # to_array gives ml_dtypes' bfloat16
    model.graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
    model.graph.node.remove(node)
    done += 1
  used = {i for n in model.graph.node for i in n.input}
  keep = [i for i in model.graph.initializer if i.name in used]
  del model.graph.initializer[:]
  model.graph.initializer.extend(keep)
  return done


def quantize(out_dir: str, calibration: np.ndarray, faces: np.ndarray, ages: np.ndarray,
             mode: str = "static") -> dict:
  """Write out_dir/model.int8.onnx: out_dir/model.onnx quantised to int8 by ONNX Runtime's own tools
  ("static": QDQ, weights per channel, activations' ranges from the uint8 faces `calibration`;
  "dynamic": weights only, activations' ranges per batch; INT8_OPS only). It is kept only where its
  age MAE on `faces` (with true `ages`) is at most INT8_MAE_TOLERANCE above model.onnx's and its
  stds within INT8_STD_TOLERANCE of model.onnx's on average; returns what model.json records either
  way ("kept": false and no file otherwise)."""
  if mode not in INT8_MODES:
    raise ValueError(f"int8 mode {mode!r}: one of {', '.join(INT8_MODES)}.")
  if not available(convert=True):
    raise OnnxUnavailable("Quantising needs onnx and onnxruntime: pip install 'agejax[onnx-export]'")
  import logging
  src = os.path.join(out_dir, "model.onnx")
  path = os.path.join(out_dir, INT8_FILE)
  root, level = logging.getLogger(), logging.getLogger().level
  root.setLevel(max(level, logging.WARNING))  # the quantiser's per-node notes
  try:
    return _quantize(src, path, calibration, faces, ages, mode)
  finally:
    root.setLevel(level)


def _quantize(src: str, path: str, calibration: np.ndarray, faces: np.ndarray, ages: np.ndarray, mode: str) -> dict:
  import tempfile

  import onnx
  import onnxruntime
  from onnxruntime import quantization as q
  from onnxruntime.quantization.shape_inference import quant_pre_process
  onnxruntime.set_default_logger_severity(3)  # the calibration sessions' shape-merging notes
  with tempfile.TemporaryDirectory() as tmp:
    model = onnx.load(src)
    float32_weights(model)
    plain, pre = os.path.join(tmp, "float32.onnx"), os.path.join(tmp, "pre.onnx")
    onnx.save(model, plain)
    quant_pre_process(plain, pre, skip_symbolic_shape=True)  # jax2onnx's graph is shaped already
    tmp_out = os.path.join(tmp, INT8_FILE)
    if mode == "static":
      batches = [{"images": np.ascontiguousarray(calibration[i:i + 16], np.uint8)} for i in range(0, len(calibration), 16)]

      class Reader(q.CalibrationDataReader):
        def __init__(self):
          self.it = iter(batches)

        def get_next(self):
          return next(self.it, None)

      q.quantize_static(pre, tmp_out, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                        op_types_to_quantize=list(INT8_OPS))
    else:
      q.quantize_dynamic(pre, tmp_out, weight_type=q.QuantType.QInt8, op_types_to_quantize=list(INT8_OPS))
    quantized = onnx.load(tmp_out)
    dedupe_initializers(quantized)
    onnx.save(quantized, tmp_out)
    mae, std = {}, {}
    for name, file in (("float32", src), ("int8", tmp_out)):
      runner = OnnxRunner(file)
      out = [runner.run(faces[i:i + 64]) for i in range(0, len(faces), 64)]
      mae[name] = round(float(np.mean(np.abs(np.concatenate([o["age"] for o in out]) - ages))), 4)
      std[name] = np.concatenate([o["std"] for o in out]).astype(np.float64)
    std_change = round(float(np.mean(np.abs(std["int8"] - std["float32"]))), 4)
    kept = (mae["int8"] - mae["float32"] <= INT8_MAE_TOLERANCE  # a better int8 model is kept too
            and std_change <= INT8_STD_TOLERANCE)
    if kept:
      os.replace(tmp_out, path)
    elif os.path.exists(path):
      os.remove(path)
  return {"file": INT8_FILE if kept else None, "mode": mode, "kept": bool(kept), "mae": mae,
          "std_mean_abs_change": std_change, "std_tolerance": INT8_STD_TOLERANCE, "quantised_ops": list(INT8_OPS),
          "checked_faces": int(len(faces)), "calibration_faces": int(len(calibration)) if mode == "static" else 0,
          "tolerance": INT8_MAE_TOLERANCE}


def dedupe_initializers(model) -> int:
  """Keep one copy of each identical weight tensor (jax2onnx writes a network's weights once per
  use: the flip-averaged function uses each twice, and each kernel's layout change again); the
  inputs of the graph's nodes are renamed to the kept copy (the graphs written here have no
  subgraphs). Returns how many copies were dropped."""
  import hashlib
  kept, rename = {}, {}
  for init in list(model.graph.initializer):
    if not init.raw_data:  # typed-field tensors are small; only raw bytes are compared
      continue
    key = (init.data_type, tuple(init.dims), hashlib.sha256(init.raw_data).hexdigest())
    if key in kept:
      rename[init.name] = kept[key]
    else:
      kept[key] = init.name
  if not rename:
    return 0
  keep = [i for i in model.graph.initializer if i.name not in rename]
  del model.graph.initializer[:]
  model.graph.initializer.extend(keep)
  for node in model.graph.node:
    for i, name in enumerate(node.input):
      if name in rename:
        node.input[i] = rename[name]
  return len(rename)


def _uint8_spec(image_size: int):
  """A ("B", S, S, 3) uint8 input for jax2onnx (a symbolic batch)."""
  import jax
  import jax.numpy as jnp
  from jax import export as jax_export
  b, = jax_export.symbolic_shape("B")
  return jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.uint8)


class OnnxRunner:
  """An ONNX Runtime session of a model.onnx: `run(uint8 faces) -> {output: array}`."""

  def __init__(self, path: str, threads: int | None = None):
    try:
      import onnxruntime as ort
    except ImportError as e:
      raise OnnxUnavailable("ONNX Runtime is not installed: pip install 'agejax[onnx]'") from e
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or _cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    self.input = self.session.get_inputs()[0].name
    self.names = [o.name for o in self.session.get_outputs()]

  def shapes(self) -> tuple[tuple, dict]:
    """(the input's shape, {output: shape}) as the model declares them (symbolic sizes as names)."""
    return (tuple(self.session.get_inputs()[0].shape),
            {o.name: tuple(o.shape) for o in self.session.get_outputs()})

  def run(self, faces: np.ndarray) -> dict[str, np.ndarray]:
    outs = self.session.run(None, {self.input: np.ascontiguousarray(faces, np.uint8)})
    return dict(zip(self.names, outs))


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
