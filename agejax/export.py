"""A trained model as a self-contained artifact: serialized StableHLO, ONNX, the weights and a JSON.

    export/model.jaxexport   jax.export of uint8 faces (b, S, S, 3) -> age, std, distribution
                             [, gender and race probabilities], batch size symbolic,
                             weights baked in, flip averaging inside
    export/model.onnx        the same function as ONNX (`agejax.onnx_export`), checked against it on
                             real faces before the export finishes (where jax2onnx is installed)
    export/model.int8.onnx   model.onnx quantised to int8 by ONNX Runtime's tools (`--int8 static`),
                             kept where its validation MAE is at most 0.05 years above float's
                             and its stds within 0.1 years on average
    export/weights.msgpack   the network's variables (flax msgpack: no pickle), to make other
                             formats later without retraining
    export/model.json        image size, label grid, preprocessing, heads, provenance, the ONNX check,
                             the calibration temperature

`load(path, runtime)` needs only jax and numpy (and onnxruntime for the ONNX runtimes): no Flax, no
config, no training code. Runtime "auto" takes ONNX Runtime where it is installed, with
model.int8.onnx where the folder has one, else model.onnx (docs/PERFORMANCE.md has the speeds), else jax.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")  # lowered for each, on any host: the artifact runs where the user has it


RUNTIMES = ("auto", "jax", "onnx", "onnx-int8")
# auto: the int8 ONNX model where the export kept one (within onnx_export's INT8_*_TOLERANCE), else model.onnx,
# in ONNX Runtime where it is installed; else the jax.export artifact.
RUNTIME_HELP = ("The network's runtime: onnx-int8 / onnx (ONNX Runtime on model.int8.onnx / model.onnx, pip install "
                "'agejax[onnx]'), jax (XLA), auto (onnx-int8 where the model has it and ONNX Runtime is installed, "
                "else onnx, else jax).")


def export_state(trainer, state, out_dir: str, provenance: dict[str, Any] | None = None,
                 weights_dtype: str = "float32", onnx: bool = False,
                 check_faces: np.ndarray | None = None, check_source: str = "") -> str:
  """Write the artifact for a train state of `trainer` (a train_lib.Trainer) into out_dir.

  weights_dtype="bfloat16" stores the weights rounded to bfloat16 (half the file; the network
  still computes in float32 on them). `onnx` also writes model.onnx (`python -m agejax.export`
  asks for it where jax2onnx is installed), checked on `check_faces` (uint8 (N, S, S, 3) real face chips; `check_source` says
  which) and recorded in model.json.
  """
  import jax
  import jax.numpy as jnp
  from jax import export as jax_export

  from agejax import faces, models, objectives, train_lib
  from agejax.data import labels

  config = trainer.config
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  if weights_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"weights_dtype {weights_dtype!r}: float32 or bfloat16.")
  stored = jax.tree_util.tree_map(lambda a: np.asarray(a, jnp.dtype(weights_dtype)), variables)
  # The plain Flax/XLA layers: standard XLA ops only, which every platform compiles with its own kernels.
  model, objective, grid = train_lib.make_model(config, ops="plain"), trainer.objective, trainer.grid
  size = config.image_size
  net, prepare = models.pixel_input(model)

  def predict(images):
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(jnp.float32), stored)
    # the mirrored view is made of the uint8 faces (a quarter of the bytes to move), and the network
    # reads pixels where it can fold the normalisation into its weights (`models.pixel_input`)
    apply = lambda x: net.apply(variables, prepare(x), train=False)
    return objectives.predict_images(objective, apply, images, grid, flip=True)

  b, = jax_export.symbolic_shape("b")
  exp = jax_export.export(jax.jit(predict), platforms=PLATFORMS)(jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8))
  os.makedirs(out_dir, exist_ok=True)
  from agejax import onnx_export
  for stale in ("model.onnx", onnx_export.INT8_FILE):  # an earlier export's, of another network
    if os.path.exists(os.path.join(out_dir, stale)):
      os.remove(os.path.join(out_dir, stale))
  with open(os.path.join(out_dir, "model.jaxexport"), "wb") as f:
    f.write(exp.serialize())
  meta = {
      "format_version": FORMAT_VERSION, "image_size": size, "label_grid": np.asarray(grid).tolist(),
      "input": "uint8 RGB face chips (b, S, S, 3), aligned like UTKFace (dlib 5-point get_face_chip, 200 px), "
               "resized to S; normalisation is inside",
      "outputs": sorted(exp.out_tree.unflatten([0] * exp.out_tree.num_leaves).keys()),
      "model": config.model.name, "loss": config.loss.name, "dataset": config.dataset.name,
      "mixture": config.dataset.get("mixture", ""),
      "gender": bool(config.model.gender), "race": bool(config.model.race),
      "race_names": list(labels.RACE_NAMES), "gender_names": list(labels.GENDER_NAMES),
      "chip": {"size": 200, "padding": faces.CHIP_PADDING}, "weights_dtype": weights_dtype,
      "platforms": list(exp.platforms), **(provenance or {})}
  from flax import serialization
  with open(os.path.join(out_dir, "weights.msgpack"), "wb") as f:
    f.write(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, stored)))
  meta["weights_file"] = "weights.msgpack"
  if onnx:
    faces = check_faces if check_faces is not None else np.zeros((2, size, size, 3), np.uint8)
    meta["onnx"] = {**onnx_export.write(predict, size, out_dir, faces),
                    "checked_on": check_source or ("real faces" if check_faces is not None else "blank images")}
  with open(os.path.join(out_dir, "model.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return out_dir



class ExportError(ValueError):
  """An export folder whose files are damaged or do not belong together; the message names the file."""


REQUIRED_KEYS = ("format_version", "image_size", "label_grid", "outputs")


class ExportedModel:
  """A loaded artifact: `predict(uint8 images) -> dict of numpy arrays`.

  Validated on loading: model.json's keys and format version, the model file the runtime reads
  (model.jaxexport for jax, model.onnx for ONNX Runtime, which then imports no JAX), its input
  shape against image_size and its distribution's width against the label grid.
  """

  def __init__(self, path: str, runtime: str = "auto", threads: int | None = None):
    if runtime not in RUNTIMES:
      raise ValueError(f"runtime {runtime!r}: one of {', '.join(RUNTIMES)}.")
    meta_path = os.path.join(path, "model.json")
    blob_path = os.path.join(path, "model.jaxexport")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"{path}: not an exported agejax model (needs model.json and model.jaxexport "
                              "or model.onnx).")
    try:
      with open(meta_path) as f:
        self.meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      raise ExportError(f"{meta_path}: not valid JSON ({e}).") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(self.meta, dict) or k not in self.meta]
    if missing:
      raise ExportError(f"{meta_path}: missing {', '.join(missing)}; not an agejax model description.")
    if self.meta["format_version"] != FORMAT_VERSION:
      raise ExportError(f"{meta_path}: format version {self.meta['format_version']!r}; this agejax reads "
                        f"version {FORMAT_VERSION} (re-export the model with this version).")
    self.image_size = int(self.meta["image_size"])
    self.grid = np.asarray(self.meta["label_grid"], np.float32)
    from agejax import onnx_export
    files = {"onnx": os.path.join(path, "model.onnx"), "onnx-int8": os.path.join(path, onnx_export.INT8_FILE)}
    if runtime in files and not os.path.exists(files[runtime]):
      how = f"--int8 {onnx_export.INT8_MODES[0]}" if runtime == "onnx-int8" else "jax2onnx installed"
      raise FileNotFoundError(f"{path}: no {os.path.basename(files[runtime])}; export the model again with {how} "
                              "(python -m agejax.export ...), or use --runtime jax.")
    if runtime == "auto" and onnx_export.available():
      runtime = next((r for r in ("onnx-int8", "onnx") if os.path.exists(files[r])), "jax")
    self.onnx, self._exported = None, None
    if runtime in files:  # ONNX Runtime alone: no JAX is imported on this path
      self.runtime = runtime
      try:
        self.onnx = onnx_export.OnnxRunner(files[runtime], threads)
      except onnx_export.OnnxUnavailable:
        raise
      except Exception as e:  # ONNX Runtime's InvalidProtobuf, Fail, ... on a damaged file
        raise ExportError(f"{files[runtime]}: not a model ONNX Runtime can load (damaged or truncated?): "
                          f"{type(e).__name__}: {e}") from None
      (in_shape, shapes), source = self.onnx.shapes(), files[runtime]
    else:
      self.runtime = "jax"
      if not os.path.exists(blob_path):
        raise FileNotFoundError(f"{path}: no model.jaxexport (the jax runtime's); use --runtime onnx, or export "
                                "the model again.")
      from jax import export as jax_export
      try:
        with open(blob_path, "rb") as f:
          self._exported = jax_export.deserialize(bytearray(f.read()))
      except Exception as e:  # flatbuffers raises assorted errors on truncated or foreign bytes
        raise ExportError(f"{blob_path}: not a readable jax.export artifact (damaged or truncated?): "
                          f"{type(e).__name__}: {e}") from None
      shapes = self._exported.out_tree.unflatten([a.shape for a in self._exported.out_avals])
      in_shape, source = self._exported.in_avals[0].shape, blob_path
    if tuple(in_shape[1:]) != (self.image_size, self.image_size, 3):
      raise ExportError(f"{source}: takes images of shape {tuple(in_shape[1:])}, but {meta_path} says "
                        f"image_size {self.image_size}.")
    if not isinstance(shapes, dict) or "probs" not in shapes or shapes["probs"][-1] != len(self.grid):
      width = shapes.get("probs", ("none",))[-1] if isinstance(shapes, dict) else "no"
      raise ExportError(f"{source}: the network gives {width} age probabilities, but {meta_path}'s label "
                        f"grid has {len(self.grid)} ages.")

  @property
  def temperature(self) -> float:
    """The calibration temperature model.json records (1.0: none)."""
    return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

  def predict(self, images: np.ndarray, batch_size: int = 64, calibrated: bool = True) -> dict[str, np.ndarray]:
    """The network's outputs for uint8 faces. With `calibrated` (and a temperature in model.json),
    "probs" are the calibrated distributions and "std" their spread (`agejax.calibration`); "age"
    is the network's expectation either way."""
    images = np.asarray(images, np.uint8)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"expected uint8 images (b, {self.image_size}, {self.image_size}, 3), got {images.shape}.")
    call = self.onnx.run if self.onnx is not None else self._exported.call
    parts = [call(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    if calibrated and self.temperature != 1.0:
      from agejax import calibration, ldl
      out["probs"] = calibration.apply_temperature(out["probs"], self.temperature)
      out["std"] = np.asarray(ldl.distribution_std(out["probs"], self.grid))
    return out


CHECK_FACES = 64  # real faces the ONNX model is compared on


def check_faces(config) -> tuple[np.ndarray | None, str]:
  """Up to CHECK_FACES face chips of the config's first dataset's validation split at the model's
  size (where that dataset is built here), with where they come from; (None, "") otherwise."""
  from agejax.data import builders, mixture, pipeline
  spec = mixture.sources(config.dataset)[0]
  b = builders.get_builder(spec.name, spec.config or None, config.dataset.data_dir or None)
  split = spec.eval_split or spec.test_split
  if not b.is_prepared() or not split:
    return None, ""
  src = b.as_data_source(split)
  n = min(CHECK_FACES, len(src))
  return (np.stack([pipeline.decode_face(src[i]["image"], config.image_size) for i in range(n)]),
          f"{n} faces of {spec.label} {split}")


def calibrate(out_dir: str, datasets: list[str], data_dir: str | None = None, degradations: tuple[str, ...] = (),
              floor: float | None = None) -> dict:
  """Fit the exported model's temperature on `datasets`' validation splits (and, with
  `degradations`, on those faces degraded, each condition held to `floor`: `heldout.fit_on_validation`)
  and record it, with what it was fitted on and the coverage before and after, as model.json's
  "calibration". The float model answers (model.onnx where there is one)."""
  from agejax import heldout, onnx_export
  runtime = "onnx" if os.path.exists(os.path.join(out_dir, "model.onnx")) and onnx_export.available() else "jax"
  fit = heldout.fit_on_validation(load(out_dir, runtime), datasets, data_dir, degradations=degradations, floor=floor)
  fit["fitted_with"] = f"runtime {runtime} (float32); the int8 model's distributions differ by rounding"
  return record_in_meta(out_dir, "calibration", fit)


def record_in_meta(out_dir: str, key: str, value: dict) -> dict:
  """Set model.json's `key` to `value` (written to a temporary file, then renamed); returns value."""
  path = os.path.join(out_dir, "model.json")
  with open(path) as f:
    meta = json.load(f)
  meta[key] = value
  with open(path + ".tmp", "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(path + ".tmp", path)
  return value


INT8_CALIBRATION_FACES = 256  # from the training splits, shared among the sources


def quantize(out_dir: str, config, mode: str = "static", data_dir: str | None = None, limit: int | None = None) -> dict:
  """model.int8.onnx of out_dir's model.onnx (`onnx_export.quantize`): activation ranges from
  INT8_CALIBRATION_FACES faces of the config's sources' training splits, the MAE compared on their
  validation splits (the first `limit` faces of each); recorded as model.json's "int8"."""
  from agejax import heldout, onnx_export
  from agejax.data import mixture
  if not os.path.exists(os.path.join(out_dir, "model.onnx")):
    raise FileNotFoundError(f"{out_dir}: no model.onnx to quantise (export with jax2onnx installed).")
  size = int(config.image_size)
  names = [spec.label for spec in mixture.sources(config.dataset)]
  data_dir = data_dir or config.dataset.data_dir or None
  calibration, faces, ages, used = [], [], [], []
  rng = np.random.RandomState(0)
  for name in names:
    source, _ = heldout.open_split(name, "train", data_dir)
    take = np.sort(rng.choice(len(source), min(len(source), INT8_CALIBRATION_FACES // len(names)), replace=False))
    calibration.append(heldout.split_images([source[int(i)] for i in take], size)[0])
    source, split = heldout.open_split(name, "validation", data_dir)
    f, a = heldout.split_images(source, size, limit)
    faces.append(f)
    ages.append(a)
    used.append(f"{name} {split} ({len(a)})")
  record = onnx_export.quantize(out_dir, np.concatenate(calibration), np.concatenate(faces), np.concatenate(ages), mode)
  record["checked_on"] = used
  return record_in_meta(out_dir, "int8", record)


def load(path: str, runtime: str = "auto", threads: int | None = None) -> ExportedModel:
  """The exported model in `path`; `threads`: ONNX Runtime's intra-op threads (default one per core;
  `predict` asks for 1 where detection workers take the other cores)."""
  return ExportedModel(path, runtime, threads)


def main(argv=None):
  """python -m agejax.export --config CONFIG --workdir DIR [--checkpoint best] [--out DIR/export]"""
  from absl import app, flags
  from ml_collections import config_flags

  from agejax import onnx_export
  flags.DEFINE_string("workdir", None, "The training run.")
  flags.DEFINE_string("checkpoint", "best", "best | last | a step number.")
  flags.DEFINE_string("out", None, "Output folder (default WORKDIR/export).")
  flags.DEFINE_enum("weights", "float32", ["float32", "bfloat16"], "Stored weight precision (bfloat16: half the size).")
  flags.DEFINE_bool("onnx", None, "Also write model.onnx (default: where jax2onnx is installed).")
  flags.DEFINE_enum("int8", "none", ["none", *onnx_export.INT8_MODES], "Also write model.int8.onnx, quantised by ONNX "
                    "Runtime (static: activation ranges from training faces; dynamic: per batch), kept where its "
                    f"MAE on the validation splits is at most {onnx_export.INT8_MAE_TOLERANCE} years above model.onnx's "
                    f"and its stds within {onnx_export.INT8_STD_TOLERANCE} years on average.")
  flags.DEFINE_bool("calibrate", False, "Fit the 90% interval's temperature on the validation splits of the "
                    "datasets the model was trained on (agejax.calibration) and record it in model.json.")
  flags.DEFINE_list("calibrate_degradations", [], "With --calibrate: also fit on those validation faces degraded "
                    "(agejax.data.degrade names, e.g. blur,low_resolution,dark), each held to --coverage_floor.")
  flags.DEFINE_float("coverage_floor", 0.85, "With --calibrate_degradations: the coverage each dataset's validation "
                     "faces, clean and under each degradation, must reach.", lower_bound=0.0, upper_bound=1.0)
  config_flags.DEFINE_config_file("config", None, "The config the model was trained with.", lock_config=True)

  def run(_):
    from agejax import cli, evaluate_lib, train_lib
    from agejax.data import degrade, mixture
    F = flags.FLAGS
    if F.calibrate_degradations and not F.calibrate:
      raise app.UsageError("--calibrate_degradations needs --calibrate.")
    bad = [d for d in F.calibrate_degradations if d not in degrade.DEGRADATIONS]
    if bad:
      raise app.UsageError(f"--calibrate_degradations: unknown {bad}; choose from {', '.join(degrade.DEGRADATIONS)}.")
    if F.calibrate and not F.config.dataset.eval_split:
      raise app.UsageError("--calibrate fits on the validation splits, which this config (full_train) trains on; "
                           "calibrate a model trained with a held-out validation split.")
    cli.setup_jax(F.config)
    trainer = train_lib.Trainer(F.config, F.workdir, with_data=False)  # the dataset may not be here
    state = evaluate_lib.load_checkpoint(trainer, F.workdir, F.checkpoint)
    faces, source = check_faces(F.config)
    out = export_state(trainer, state, F.out or os.path.join(F.workdir, "export"),
                       {"checkpoint": F.checkpoint, "step": int(np.asarray(state.step))}, weights_dtype=F.weights,
                       onnx=onnx_export.available(convert=True) if F.onnx is None else F.onnx,
                       check_faces=faces, check_source=source)
    result = {"exported": out}
    if F.int8 != "none":
      result["int8"] = quantize(out, F.config, F.int8)
    if F.calibrate:
      result["calibration"] = calibrate(out, [spec.label for spec in mixture.sources(F.config.dataset)],
                                        F.config.dataset.data_dir or None, tuple(F.calibrate_degradations),
                                        F.coverage_floor)
    print(json.dumps(result))

  app.run(run, argv)


if __name__ == "__main__":
  main()
