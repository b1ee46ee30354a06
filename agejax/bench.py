"""Speed benchmark: images/s of a full training step, of inference, or of the input pipeline, as JSON.

    python -m agejax.bench --model tiny --size 64 --batch 64 --mode train
    python -m agejax.bench --model thin --size 224 --batch 32 --mode infer --dtype bfloat16
    python -m agejax.bench --mode pipeline --dataset utkface --size 64 --workers 2
    python -m agejax.bench --mode predict --aligned --count 256      # predict.py on a folder of chips
    python -m agejax.bench --mode predict --count 64 --workers 1     # photos, detection in a worker
    python -m agejax.bench --mode detect --utkface UTKFace.tar.gz    # detectors' recall on hard photos

Training step = train.py's own `train_lib.train_step` (forward, DLDL-v2 loss, backward, Adam
update, the logged metrics), jitted with the state donated, augmentation off and no data
loading; inference = `train_lib.eval_step` without flips. `--ops plain` times the plain Flax
layers instead of the XLA:CPU ones on a CPU.
Random inputs; warm-up steps first, then the median over --repeats windows of
--steps steps each. FLOPs per image come from XLA's cost analysis of the
compiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

try:
  import resource  # POSIX only
except ImportError:
  resource = None

import jax
import jax.numpy as jnp
import optax

from agejax import cpu, ldl, models


# What `train_lib.train_step` reads of a config: DLDL-v2 as train.py runs it, augmentation off.
STEP_CONFIG = {"augment": {"flip": 0.0, "grayscale": 0.0, "rescale": False, "rotate": 0.0, "color_jitter": 0.0,
                           "translate": 0.0},
               # the loss's hyper-parameters are left to agejax.losses' defaults
               "loss": {"name": "dldl_v2", "gender_weight": 1.0, "race_weight": 1.0, "stage1_epochs": 0},
               "debug_nan_step": -1}


def make_steps(model, variables, batch: int, size: int):
  """(state, batch, train, infer): train.py's `train_lib.train_step` (Adam, donated state) and
  `train_lib.eval_step` without flips, jitted for random uint8 images."""
  import functools

  import ml_collections

  from agejax import objectives, train_lib
  grid = ldl.label_grid()
  objective = objectives.get("dldl_v2")
  tx = optax.adam(1e-3, eps=1e-7)
  config = ml_collections.ConfigDict(STEP_CONFIG)
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                               batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
                               rng=jax.random.PRNGKey(0))
  images = jax.random.randint(jax.random.PRNGKey(1), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
  ages = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 101).astype(jnp.float32)
  data = {"image": images, "age": ages, "index": jnp.arange(batch)}
  train = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, objective=objective, grid=grid,
                                    config=config), donate_argnums=(0,))
  infer = jax.jit(functools.partial(train_lib.eval_step, model=model, objective=objective, grid=grid,
                                    flip_tta=False))
  return state, data, train, infer


def flops_of(model_name: str, dtype: str, size: int, batch: int, mode: str) -> float | None:
  """XLA's FLOP count of the step on the plain Flax layers: its cost analysis sees no FLOPs inside
  agejax's native CPU convolutions (custom calls), and the plain layers compute the same function."""
  try:
    model = models.create(model_name, dtype=dtype, ops="plain")
    state, data, train, infer = make_steps(model, models.init(model, jax.random.PRNGKey(0), size), batch, size)
    step = train if mode == "train" else infer
    cost = step.lower(state, data).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # cost analysis is best effort across backends
    return None


def run(model_name: str, size: int, batch: int, mode: str, steps: int, repeats: int, dtype: str,
        ops: str = "auto") -> dict:
  model = models.create(model_name, dtype=dtype, ops=ops)
  variables = models.init(model, jax.random.PRNGKey(0), size)
  state, data, train, infer = make_steps(model, variables, batch, size)
  flops = flops_of(model_name, dtype, size, batch, mode)
  if mode == "train":  # step returns (state, output); a train step's output is its new state
    step = lambda s: (train(s, data)[0], None)
  else:  # one forward pass a step; the state passes through unchanged
    step = lambda s: (s, infer(s, data))
  for _ in range(2):
    state, out = step(state)
  jax.block_until_ready((state, out))
  rates, faults = [], _page_faults()
  for _ in range(repeats):
    t = time.perf_counter()
    outs = []
    for _ in range(steps):
      state, out = step(state)
      outs.append(out)
    jax.block_until_ready((state, outs))
    rates.append(batch * steps / (time.perf_counter() - t))
  faults = (_page_faults() - faults) / (repeats * steps)
  return {"framework": "jax", "version": jax.__version__, "model": model_name, "mode": mode, "size": size,
          "batch": batch, "dtype": dtype, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "ops": model.trunk.ops.name, "params": models.count_params(variables["params"]),
          "gflops_per_image": round(flops / batch / 1e9, 3) if flops else None,
          "images_per_s": round(statistics.median(rates), 2), **cpu.describe(),
          "page_faults_per_step": round(faults)}


def _page_faults() -> int:
  """Minor page faults of this process so far: fresh memory faulted in (see agejax/cpu/hugepages.py)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def pipeline_rate(dataset: str, size: int, batch: int, workers: int, batches: int, data_dir: str | None) -> dict:
  """Images/s the grain pipeline delivers (decode + resize + batch), after the first batch."""
  from agejax.data import builders, pipeline
  builder = builders.get_builder(dataset, None, data_dir)
  if not builder.is_prepared():
    raise SystemExit(f"error: build {dataset} first: python -m agejax.data.build {dataset} --manual_dir DIR")
  source = builder.as_data_source("train")
  it = pipeline.train_iterator(source, size=size, global_batch=batch, seed=0, workers=workers,
                               process_index=0, process_count=1)
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batch * batches / (time.perf_counter() - t)
  return {"mode": "pipeline", "dataset": dataset, "size": size, "batch": batch, "workers": workers,
          "images_per_s": round(rate, 1)}


def scan_photos(utkface: str, count: int):
  """`count` of agejax.hard_photos' album scans of UTKFace test faces (labels.csv beside the archive
  names the test split)."""
  from agejax import hard_photos
  names = hard_photos.utkface_test_names(os.path.join(os.path.dirname(utkface), "labels.csv"))
  chips, ages = hard_photos.utkface_labelled_chips(utkface, 3 * count, names)
  return hard_photos.make_scans(chips, count, ages=ages)


def predict_rate(model_dir: str | None, aligned: bool, count: int, workers: int = 0, detector: str = "auto",
                 runtime: str = "auto", photo_set: str = "astronaut", utkface: str | None = None) -> dict:
  """Photos/s and faces/s of `predict` (`predict_lib.predict_files`) over a folder of `count` images:
  `photo_set` "astronaut": built from scikit-image's astronaut photo, 200 px face chips (--aligned)
  or the whole 512 px photo, each shifted, mirrored and brightened a little so no two files are the
  same; "scans": agejax.hard_photos' monochrome album scans of UTKFace test faces (from `utkface`),
  with the faces placed and found (hard_photos.match). Detection by `detector` in `workers`
  processes (0: in this one); the network in `runtime` (`agejax.export.RUNTIMES`)."""
  import tempfile

  import numpy as np
  from PIL import Image
  from skimage import data

  from agejax import export, faces, hard_photos, predict_lib
  model = export.load(model_dir or predict_lib.DEFAULT_MODEL, runtime,  # as predict: one network thread beside workers
                      threads=1 if workers and not aligned else None)
  aligner = None if aligned else faces.FaceAligner(detector=detector)
  scans = scan_photos(utkface, count) if photo_set == "scans" else None
  if scans is None:
    photo = data.astronaut()
    base = faces.FaceAligner()(photo)[0].chip if aligned else photo
  rng = np.random.RandomState(0)
  with tempfile.TemporaryDirectory() as d:
    paths = []
    for i in range(count):
      if scans is not None:
        img = scans[i].rgb
      else:
        img = np.roll(base, (rng.randint(-4, 5), rng.randint(-4, 5)), axis=(0, 1))
        img = np.clip(img.astype(np.int16) + rng.randint(-20, 21), 0, 255).astype(np.uint8)
        img = img[:, ::-1] if i % 2 else img
      paths.append(os.path.join(d, f"{i:04d}.{'png' if scans else 'jpg'}"))
      Image.fromarray(img).save(paths[-1], **({} if scans else {"quality": 92}))
    list(predict_lib.predict_files(model, paths[:2], aligned=aligned, aligner=aligner))  # compile
    t = time.perf_counter()  # worker start-up included: it is part of what a user waits for
    records = list(predict_lib.predict_files(model, paths, aligned=aligned, aligner=aligner, workers=workers,
                                             keep_photo=False))
    seconds = time.perf_counter() - t
  n_faces = sum(len(r.get("faces", [])) for r in records)
  out = {"mode": "predict", "photos_set": photo_set, "runtime": model.runtime, "model": model.meta.get("model"),
         "image_size": model.image_size, "aligned": aligned, "detector": None if aligned else detector,
         "workers": workers, "photos": count, "faces": n_faces, "photos_per_s": round(count / seconds, 2),
         "faces_per_s": round(n_faces / seconds, 2), "seconds": round(seconds, 1), "cpus": os.cpu_count()}
  if scans is not None:
    placed = sum(len(p.faces) for p in scans)
    found = sum(hard_photos.match(p.faces, [f["box"] for f in r.get("faces", [])])[0] for p, r in zip(scans, records))
    out.update(faces_placed=placed, faces_found=found, recall=round(found / placed, 3))
  return out


def detect_recall(utkface: str, photos_per_condition: int, configs: list[str], photo_set: str = "hard",
                  cnn_runtime: str = "auto", aaf_archive: str | None = None) -> dict:
  """Recall, false positives and photos/s of each detector config ("hog:1" = HOG, upsample 1;
  "auto:1"; "cnn:0") on agejax.hard_photos' degraded group photos of UTKFace faces (`photo_set`
  "hard"), its monochrome scans of UTKFace test faces ("scans": 2 x photos_per_condition photos;
  labels.csv beside the archive names the test split) or All-Age-Faces' real test photos ("aaf":
  the first photos_per_condition, from `aaf_archive`; their other detections count as false,
  though a few may be faces behind the labelled one); the CNN detector in `cnn_runtime`
  (`faces.CNN_RUNTIMES`: "dlib" measures the policies with dlib's own CNN; the port on one ONNX
  Runtime thread, as in a detection worker)."""
  from agejax import faces, hard_photos
  if photo_set == "scans":
    photos = scan_photos(utkface, 2 * photos_per_condition)
  elif photo_set == "aaf":
    if not aaf_archive:
      raise ValueError("photo set 'aaf' reads All-Age-Faces' archive: pass aaf_archive (--aaf)")
    photos = hard_photos.aaf_photos(aaf_archive, photos_per_condition)
  else:
    chips = hard_photos.utkface_chips(utkface, 400)
    photos = hard_photos.make_photos(chips, photos_per_condition=photos_per_condition)
  cnn_runtime = faces.resolve_cnn_runtime(cnn_runtime)  # recorded as resolved
  out = {"mode": "detect", "photos": len(photos), "faces": sum(len(p.faces) for p in photos), "cnn_runtime": cnn_runtime,
         "size": list(photos[0].rgb.shape[1::-1]), "cpus": os.cpu_count()}  # the first photo's
  for cfg in configs:
    kind, _, up = cfg.partition(":")
    aligner = faces.FaceAligner(detector=kind, upsample=int(up or 1), cnn_runtime=cnn_runtime, cnn_threads=1)
    out[cfg] = hard_photos.recall(lambda rgb: [(r.left(), r.top(), r.right(), r.bottom())
                                               for r, _ in aligner.detect(rgb)], photos)
  return out


def main(argv=None):
  from agejax import faces
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="tiny", choices=models.MODEL_NAMES)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--mode", default="train", choices=["train", "infer", "pipeline", "predict", "detect"])
  ap.add_argument("--model_dir", default=None, help="predict mode: an exported model (default: the bundled one)")
  ap.add_argument("--aligned", action="store_true", help="predict mode: face chips, no detection")
  ap.add_argument("--count", type=int, default=64, help="predict mode: images in the folder")
  ap.add_argument("--dataset", default="utkface", help="pipeline mode: a built dataset")
  ap.add_argument("--data_dir", default=None, help="pipeline mode: where datasets are built")
  ap.add_argument("--workers", type=int, default=0, help="pipeline mode: grain worker processes; predict "
                  "mode: face detection processes")
  ap.add_argument("--detector", default="auto", choices=list(faces.DETECTORS), help="predict mode: the face detector")
  ap.add_argument("--runtime", default="auto", choices=["auto", "jax", "onnx", "onnx-int8", "both", "all"],
                  help="predict mode: the network's runtime; both: jax then onnx, and their ratio; all: jax, "
                  "onnx and onnx-int8, and the ratios to jax")
  ap.add_argument("--utkface", default=None, help="detect mode and predict mode's scans: UTKFace.tar.gz, labels.csv "
                  "beside it (default $UTKFACE_DIR/UTKFace.tar.gz)")
  ap.add_argument("--per_condition", type=int, default=6, help="detect mode: photos of each condition")
  ap.add_argument("--photos", default=None, choices=["astronaut", "hard", "scans", "aaf"],
                  help="predict mode: astronaut (default) or scans (--count of hard_photos' album scans of "
                  "UTKFace test faces, faces found counted); detect mode: hard (default: hard_photos' group "
                  "photos), scans, or aaf (the first --per_condition of All-Age-Faces' real test photos, "
                  "from --aaf)")
  ap.add_argument("--aaf", default=None, help="detect mode's --photos aaf: AAF-train.tar.gz "
                  "(default $AAF_DIR/AAF-train.tar.gz)")
  ap.add_argument("--configs", default="hog:0,hog:1,hog:2,auto:1,cnn:0,cnn:1",
                  help="detect mode: detector:upsample, comma-separated")
  ap.add_argument("--cnn_runtime", default="auto", choices=list(faces.CNN_RUNTIMES),
                  help="detect mode: the CNN detector's runtime (dlib: dlib's own, for the policies without agejax's port)")
  ap.add_argument("--batches", type=int, default=40, help="pipeline mode: batches timed")
  ap.add_argument("--steps", type=int, default=5, help="steps per timed window")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--ops", default="auto", choices=list(models.ops.KINDS),
                  help="train/infer modes: the layers (auto: XLA:CPU's on one CPU device, else plain Flax)")
  a = ap.parse_args(argv)
  utkface = a.utkface or os.path.join(os.environ.get("UTKFACE_DIR", "."), "UTKFace.tar.gz")
  if a.mode == "predict":
    if a.photos in ("hard", "aaf"):
      ap.error("--photos hard and aaf are detect mode's; predict mode measures astronaut or scans")
    if a.cnn_runtime != "auto":
      ap.error("--cnn_runtime is detect mode's")
    if a.photos == "scans" and a.aligned:
      ap.error("--photos scans are whole photos: drop --aligned")
    runtimes = {"both": ["jax", "onnx"], "all": ["jax", "onnx", "onnx-int8"]}.get(a.runtime, [a.runtime])
    rows = []
    for r in runtimes:  # a runtime the model lacks after the first is skipped, so the others' rows stay
      try:
        rows.append(predict_rate(a.model_dir, a.aligned, a.count, a.workers, a.detector, r, a.photos or "astronaut",
                                 utkface))
      except (FileNotFoundError, ImportError) as e:
        print(f"{'skipped' if rows else 'error'}: {e}", file=sys.stderr)
        if not rows:
          return 1
    for r in rows:
      print(json.dumps(r))
    if len(rows) > 1:
      ratios = {f"{r['runtime'].replace('-', '_')}_over_jax": round(r["faces_per_s"] / rows[0]["faces_per_s"], 2)
                for r in rows[1:]}
      print(json.dumps({"mode": "predict", **ratios}))
    return
  if a.mode == "detect":
    if a.photos == "astronaut":
      ap.error("--photos astronaut is predict mode's; detect mode measures hard, scans or aaf")
    from agejax.data.builders import aaf
    aaf_archive = a.aaf or os.path.join(os.environ.get("AAF_DIR", "."), aaf.ARCHIVE)
    print(json.dumps(detect_recall(utkface, a.per_condition, a.configs.split(","), a.photos or "hard", a.cnn_runtime,
                                   aaf_archive)))
    return
  if a.mode == "pipeline":
    print(json.dumps(pipeline_rate(a.dataset, a.size, a.batch, a.workers, a.batches, a.data_dir)))
    return
  print(json.dumps(run(a.model, a.size, a.batch, a.mode, a.steps, a.repeats, a.dtype, a.ops)))


if __name__ == "__main__":
  from agejax import cli
  cli.start_process()  # XLA flags and huge pages, as train.py does
  main()
