"""Training: create_train_state, train_step, eval_step, train_and_evaluate.

One jitted step over a 1-D ('data',) mesh: parameters replicated, the batch
sharded over every device of every host, the state donated. Batch-norm
statistics are means over the global batch (the sharded arrays are global, so
XLA inserts the all-reduce). Multi-host: each process feeds its slice of the
global batch with `jax.make_array_from_process_local_data`; process 0 writes logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from agejax import checkpoints, ldl, models, objectives, preemption, summaries, workdir as workdir_lib
from agejax.data import augment, builders, mixture, pipeline, teacher
from agejax.models.heads import with_age_bias
from agejax.reporting import MetricWriter, Progress


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


class Preempted(Exception):
  """Training stopped on SIGTERM / SIGINT after saving a checkpoint of the step it reached."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name if signum else "preemption"
    super().__init__(f"Stopped by {name} at step {step}; checkpoint {step} is saved in "
                     f"{os.path.join(workdir, 'checkpoints')}. Run the same command to resume.")


def validate(config: ml_collections.ConfigDict, training: bool = True):
  """Fail before any computation on values the type-checked flags cannot catch (`training`: also
  what only training needs, e.g. a distill loss's one dataset)."""
  objectives.get(config.loss.name)
  if config.model.name not in models.MODEL_NAMES:
    raise ValueError(f"config.model.name: unknown model {config.model.name!r}; choose one of {models.MODEL_NAMES}.")
  if config.dataset.name not in builders.BUILDERS:
    raise ValueError(f"config.dataset.name: unknown dataset {config.dataset.name!r}; "
                     f"choose one of {sorted(builders.BUILDERS)}.")
  if config.batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {jax.device_count()} devices.")
  if config.image_size < 32:
    raise ValueError(f"config.image_size={config.image_size}: the VGG trunks need at least 32 pixels.")
  if config.model.name == "face_resnet" and config.image_size < 103:
    raise ValueError(f"config.image_size={config.image_size}: the face ResNet's unpadded strided layers need "
                     "at least 103 pixels (it was trained at 150).")
  if config.model.age_bias_init not in ("zeros", "prior"):
    raise ValueError(f"config.model.age_bias_init: {config.model.age_bias_init!r} is not zeros or prior.")
  if config.model.age_bias_init == "prior" and config.loss.name not in objectives.PRIOR_BIAS_LOSSES:
    raise ValueError(f"config.model.age_bias_init=prior sets logit P(y > l_k) as the biases of the losses "
                     f"{objectives.PRIOR_BIAS_LOSSES}, not of {config.loss.name!r}.")
  if config.loss.name == "distill" and not config.loss.teacher:
    raise ValueError("config.loss.teacher: the distill loss learns a teacher's distributions; make a teacher file "
                     "with python -m agejax.distill --config <this config> --out FILE and pass "
                     "--config.loss.teacher=FILE.")
  if config.loss.teacher and config.loss.name != "distill":
    raise ValueError(f"config.loss.teacher is set, but the loss {config.loss.name!r} does not read it "
                     "(use the distill loss, or drop the teacher).")
  if not 0.0 <= config.loss.teacher_weight <= 1.0:
    raise ValueError(f"config.loss.teacher_weight={config.loss.teacher_weight} is not in [0, 1].")
  if config.dataset.get("mixture", ""):
    mixture.parse(config.dataset.mixture)
    if config.loss.name == "distill" and training:
      raise ValueError("config.dataset.mixture: the distill loss reads a teacher file of one dataset's training split; "
                       "train on one dataset to distil.")
  if config.model.ops not in models.ops.KINDS:
    raise ValueError(f"config.model.ops: {config.model.ops!r} is not one of {models.ops.KINDS}.")
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.model.dtype: {config.model.dtype!r} is not float32, bfloat16 or float16.")


def make_grid(config) -> jax.Array:
  g = config.label_grid
  return ldl.label_grid(g.start, g.stop, g.step)


def make_model(config, ops: str | None = None) -> nn.Module:
  """The configured network; its layers `ops` (default `config.model.ops`; "auto": the XLA:CPU set on
  a single CPU device, the plain Flax set elsewhere, see `models.resolve_ops`)."""
  obj = objectives.get(config.loss.name)
  grid = config.label_grid
  return models.create(
      config.model.name, age_head=obj.age_head, num_labels=int(make_grid(config).shape[0]),
      age_center=(grid.start + grid.stop) / 2, gender=config.model.gender, race=config.model.race,
      dtype=config.model.dtype, msa_stages=tuple(config.model.msa_stages), msa_rates=tuple(config.model.msa_rates),
      msa_reduction=config.model.msa_reduction, norm=config.model.norm, ops=ops or config.model.ops)


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam (lr 1e-3, eps 1e-7) with step decays at the configured epochs (DLDL-v2: x0.1 from epoch 31),
  or (`optimizer.schedule = "cosine"`) a cosine decay to `final_fraction` of the rate over the run."""
  o = config.optimizer
  if o.schedule == "step":
    boundaries = {int(e * steps_per_epoch): o.decay_factor for e in o.decay_epochs}
    lr = optax.piecewise_constant_schedule(o.learning_rate, boundaries)
  elif o.schedule == "cosine":
    total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
    lr = optax.cosine_decay_schedule(o.learning_rate, max(1, total - o.warmup_steps), alpha=o.final_fraction)
  else:
    raise ValueError(f"config.optimizer.schedule: {o.schedule!r} is not step or cosine.")
  if o.warmup_steps:
    lr = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), lr], [o.warmup_steps])
  if o.name == "adam":
    opt = optax.adam(lr, eps=o.eps) if not o.weight_decay else optax.adamw(lr, eps=o.eps, weight_decay=o.weight_decay)
  elif o.name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(lr, momentum=0.9))
  else:
    raise ValueError(f"config.optimizer.name: {o.name!r} is not adam or sgd.")
  if o.trunk_lr_factor != 1.0:  # Adam's and SGD's updates are linear in the rate: scaling them is exact
    trunk_only = lambda params: {k: jax.tree_util.tree_map(lambda _: k == "trunk", v) for k, v in params.items()}
    opt = optax.chain(opt, optax.masked(optax.scale(o.trunk_lr_factor), trunk_only))
  if o.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  return opt, lr


def make_mesh():
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


CALIBRATION_IMAGES = 256  # training images whose statistics initialise batch norm from affine layers


def pretrained_trunk(config, train_source=None):
  """{"params", "batch_stats"} of the trunk `config.model.pretrained` names, or None (random init).

  With model.norm="batch" the affine layers become batch norm computing the same function
  on the first CALIBRATION_IMAGES training images (`pretrained.batch_norm_trunk`).
  """
  source = config.model.pretrained
  if not source:
    return None
  norm = config.model.norm or "affine"
  if config.model.name != "face_resnet" or norm not in ("affine", "batch"):
    raise ValueError(f"config.model.pretrained={source!r} loads dlib's face ResNet: it needs "
                     "model.name=face_resnet and model.norm=affine or batch.")
  from agejax import pretrained
  trunk = pretrained.trunk_variables(None if source == "dlib" else source)
  if norm == "affine":
    return {"params": trunk, "batch_stats": {}}
  if train_source is None:
    raise ValueError("Initialising batch norm from the pretrained affine layers needs the training images.")
  n = min(CALIBRATION_IMAGES, len(train_source))
  images = np.stack([pipeline.decode_face(train_source[i]["image"], config.image_size) for i in range(n)])
  return pretrained.batch_norm_trunk(trunk, augment.normalize(images))


def create_train_state(config, model, tx, rng, mesh, age_bias=None, trunk=None) -> TrainState:
  """The initial state, replicated. `age_bias`: K-1 values replacing the ordinal heads' initial biases;
  `trunk`: pretrained {"params", "batch_stats"} replacing the trunk's (MSA modules and heads keep
  their initialisation)."""
  replicated = NamedSharding(mesh, P())
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)

  def init(rng, age_bias, trunk):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init({"params": init_rng, "dropout": init_rng}, x, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if trunk is not None:
      params = {**params, "trunk": {**params["trunk"], **trunk["params"]}}
      if trunk["batch_stats"]:
        batch_stats = {**batch_stats, "trunk": {**batch_stats["trunk"], **trunk["batch_stats"]}}
    if age_bias is not None:
      params = with_age_bias(params, model.heads.age_head, age_bias)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=state_rng)

  if trunk is not None:
    shapes = jax.eval_shape(lambda: model.init({"params": rng, "dropout": rng}, x, train=False))
    for collection, tree in trunk.items():
      for name, leaves in tree.items():
        want = jax.tree_util.tree_map(lambda a: a.shape, shapes[collection]["trunk"].get(name))
        if want != jax.tree_util.tree_map(np.shape, leaves):
          raise ValueError(f"The pretrained trunk's {collection} {name} does not fit the model's ({want}).")
  return jax.jit(init, out_shardings=replicated)(rng, age_bias, trunk)


def train_step(state: TrainState, batch, *, model, tx, objective, grid, config, stage1_steps: int = 0):
  """One optimisation step on a global batch; returns the new state and scalar metrics.
  `stage1_steps` > 0: the L1 term is off for those first steps (DLDL-v2's two-stage recipe)."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, drop_rng = jax.random.split(step_rng)
  images = augment.augment(aug_rng, batch["image"], dict(config.augment), batch.get("index"))
  hp = dict(config.loss)
  if stage1_steps > 0:
    hp["lam"] = jnp.where(state.step < stage1_steps, 0.0, config.loss.lam)
  weights = {"gender": config.loss.gender_weight, "race": config.loss.race_weight}

  def loss_fn(params):
    outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": drop_rng})
    total, parts = objectives.total_loss(objective, outputs, batch, grid, hp, weights)
    return total, (parts, outputs, updates)

  (loss, (parts, outputs, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if config.debug_nan_step >= 0:
    loss = jnp.where(state.step == config.debug_nan_step, jnp.nan, loss)
    grads = jax.tree_util.tree_map(lambda g: jnp.where(state.step == config.debug_nan_step, jnp.nan, g), grads)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  pred = objectives.predict(objective, outputs, grid)
  metrics = {"loss": loss, "train_mae": jnp.mean(jnp.abs(pred["age"] - batch["age"])),
             "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
  metrics.update({f"loss_{k}": v for k, v in parts.items()})
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=updates["batch_stats"],
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model, objective, grid, flip_tta: bool):
  """Predictions for a batch (`objectives.predict_images`), flip-averaged where flip_tta."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  apply = lambda x: model.apply(variables, x, train=False)
  return objectives.predict_images(objective, apply, augment.normalize(batch["image"]), grid, flip=flip_tta)


class Trainer:
  """Holds the compiled steps, shardings and data for one configuration."""

  def __init__(self, config, workdir: str | None = None, with_data: bool = True, training: bool = True):
    """with_data=False opens no dataset (nor builds one): enough to restore a checkpoint and run the
    model, e.g. to export it on a machine without the training data. The optimizer's state has the
    same structure for any schedule, so steps_per_epoch is then a placeholder. training=False
    (evaluation) reads no teacher file."""
    validate(config, training)
    self.config = config
    self.workdir = workdir
    self.mesh = make_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.objective = objectives.get(config.loss.name)
    self.grid = make_grid(config)
    self.model = make_model(config)
    ds = config.dataset
    self.sources = mixture.sources(ds)
    self.is_mixture = bool(ds.get("mixture", ""))
    if with_data:
      self.builders = [builders.ensure_built(s.name, s.config or None, ds.data_dir or None, s.manual_dir or None,
                                             on_error=ds.on_error) for s in self.sources]
      self.builder = self.builders[0]
      self.train_sources = [b.as_data_source(s.train_split) for b, s in zip(self.builders, self.sources)]
      self.train_source = self.train_sources[0]
      # A mixture's epoch: as many examples as its training splits hold together.
      self.steps_per_epoch = max(1, sum(len(t) for t in self.train_sources) // config.batch_size)
      self.per_record = {}
      if config.loss.name == "distill" and training:
        self.per_record["teacher_probs"] = teacher.load(
            config.loss.teacher, np.asarray(self.grid), pipeline.label_array(self.train_source, "age"),
            f"{ds.name}/{ds.config or 'default'} {ds.train_split}",
            filenames=pipeline.label_array(self.train_source, "filename"),
            identity={"dataset": ds.name, "config": ds.config, "split": ds.train_split})
    else:
      self.builder = self.train_source = None
      self.builders, self.train_sources = [], []
      self.per_record = {}
      self.steps_per_epoch = 1
    self.num_steps = (config.num_train_steps if config.num_train_steps > 0
                      else int(config.num_epochs * self.steps_per_epoch))
    self.stage1_steps = int(config.loss.stage1_epochs * self.steps_per_epoch)
    self.tx, self.lr_fn = make_optimizer(config, self.steps_per_epoch)
    self.train_step = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx, objective=self.objective, grid=self.grid,
                          config=config, stage1_steps=self.stage1_steps),
        in_shardings=(self.replicated, self.data_sharding), out_shardings=(self.replicated, self.replicated),
        donate_argnums=(0,))
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.model, objective=self.objective, grid=self.grid,
                          flip_tta=config.flip_tta),
        in_shardings=(self.replicated, self.data_sharding), out_shardings=self.data_sharding)

  def init_state(self, fresh: bool = True) -> TrainState:
    """The initial state. fresh=False: only a template for restoring a checkpoint, whose values
    are overwritten, so the training labels are not read for the label-prior biases."""
    age_bias = None
    if fresh and self.config.model.age_bias_init == "prior":
      ages = np.concatenate([pipeline.label_array(t, "age") for t in self.train_sources])
      age_bias = ldl.ranking_prior_logits(ages, self.grid)
    trunk = pretrained_trunk(self.config, self.train_source) if fresh else None
    return create_train_state(self.config, self.model, self.tx, jax.random.PRNGKey(self.config.seed), self.mesh,
                              age_bias, trunk)

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.data_sharding, v) for k, v in local.items()}

  def train_iterator(self):
    if self.is_mixture:
      return pipeline.train_iterator(self.train_sources, size=self.config.image_size,
                                     global_batch=self.config.batch_size, seed=self.config.seed,
                                     workers=self.config.workers, weights=[s.weight for s in self.sources])
    return pipeline.train_iterator(self.train_source, size=self.config.image_size,
                                   global_batch=self.config.batch_size, seed=self.config.seed,
                                   workers=self.config.workers, per_record=self.per_record)

  def data_files(self) -> list[str]:
    """The record files of the training splits (for messages about damaged records)."""
    import glob
    files = []
    for b, spec in zip(self.builders, self.sources):
      for part in spec.train_split.split("+"):
        files += sorted(glob.glob(os.path.join(os.fspath(b.data_dir), f"*-{part}.array_record*")))
    return files

  def data_source(self, split: str, source: int = 0):
    """The records of a split of the `source`-th dataset (0: the config's own, or the mixture's first)."""
    return self.builders[source].as_data_source(split)

  def validate_sources(self, state, limit: int | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(pooled summary, {source label: summary}) over every source's validation split. The pooled
    one (every validation image once) selects checkpoints; a single dataset has no per-source part."""
    per_source, preds = {}, []
    for k, spec in enumerate(self.sources):
      if not spec.eval_split:
        continue
      p = self.predict_split(state, spec.eval_split, limit, source=k)
      preds.append(p)
      if self.is_mixture:
        per_source[spec.label] = summaries.summarize(p, self.grid)
    pooled = {key: np.concatenate([p[key] for p in preds]) for key in preds[0]}
    return summaries.summarize(pooled, self.grid), per_source

  def predict_split(self, state, split: str, limit: int | None = None, progress: bool = False,
                    source: int = 0) -> dict[str, np.ndarray]:
    """Predictions and labels for every image of a split (of the `source`-th dataset), gathered on
    every host."""
    from jax.experimental import multihost_utils
    source = self.data_source(split, source)
    limit = limit if (limit and limit > 0) else None
    n = len(source) if limit is None else min(limit, len(source))
    batches = pipeline.eval_batches(source, size=self.config.image_size, global_batch=self.config.batch_size,
                                    limit=limit)
    total = math.ceil(math.ceil(n / jax.process_count()) / (self.config.batch_size // jax.process_count()))
    bar = Progress(total, f"eval {split}", unit="batch", enabled=progress and jax.process_index() == 0)
    chunks = []
    for local in batches:
      batch = self.global_batch(local)
      pred = self.eval_step(state, batch)
      out = {**{k: v for k, v in batch.items() if k != "image"}, **{f"pred_{k}": v for k, v in pred.items()}}
      chunks.append(jax.tree_util.tree_map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), out))
      bar.update(1, images=self.config.batch_size)
    bar.close()
    merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    keep = merged["valid"] > 0
    merged = {k: v[keep] for k, v in merged.items()}
    order = np.argsort(merged["index"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


# Kept under their old names for callers of train_lib.
checkpoint_managers = checkpoints.managers
restore_state = checkpoints.restore_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (resuming from the newest checkpoint in `workdir` that restores), validating periodically.

  Returns the final validation summary. Raises NonFiniteLossError if the loss
  goes NaN/Inf; checkpoints are only written after the losses since the last
  check were verified finite, so the last one on disk is good. On SIGTERM or SIGINT
  it saves a checkpoint of the step it reached, waits for it and raises Preempted.
  A workdir whose recorded config differs from `config` (in anything but RESUMABLE_FIELDS) is
  refused before anything is written (workdir.ConfigChangedError). The workdir is held by one
  training at a time (workdir_lib.lock).
  """
  workdir_lib.check_resume_config(workdir, config)  # before a dataset is opened or built
  trainer = Trainer(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir_lib.prepare(workdir)
  with workdir_lib.lock(workdir) if is_main else contextlib.nullcontext():
    return _train(trainer, config, workdir, is_main)


def _start_state(trainer: Trainer, config, workdir: str, last_mgr, log):
  """(manager, state, data iterator, step resumed from or None): the newest checkpoint that
  restores, else a fresh state."""
  it = trainer.train_iterator()
  state, start = None, None
  if last_mgr.all_steps():
    last_mgr, state, start = checkpoints.restore_newest(workdir, config, last_mgr, trainer.init_state(fresh=False),
                                                        it, log)
    if start is None:
      log(f"No checkpoint in {workdir}/checkpoints restores; training from step 0.")
      it = trainer.train_iterator()
  if state is None:
    state = trainer.init_state()
  return last_mgr, state, it, start


def _train(trainer: Trainer, config, workdir: str, is_main: bool) -> dict[str, Any]:
  log = checkpoints.log_line if is_main else (lambda text: None)
  last_mgr, best_mgr = checkpoints.managers(workdir, config)
  try:
    last_mgr, state, it, start = _start_state(trainer, config, workdir, last_mgr, log)
  except BaseException:
    last_mgr.close()
    best_mgr.close()
    raise
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    dropped = workdir_lib.truncate_metrics(workdir, start or 0)
    if start is not None:
      log(f"Resumed from step {start} in {workdir}/checkpoints"
          + (f" (dropped {dropped} metrics rows logged after it)." if dropped else "."))
  writer = MetricWriter(workdir, enabled=is_main)
  step = int(jax.device_get(state.step))
  progress = Progress(trainer.num_steps, "train", unit="step", initial=step, enabled=is_main)
  loop = _Loop(trainer, config, workdir, last_mgr, best_mgr, writer, progress, it)
  stop = preemption.StopSignals(log).install()
  try:
    summary = loop.run(state, step, stop)
  finally:
    stop.restore()
    progress.close()
    try:
      checkpoints.guarded(workdir, last_mgr, last_mgr.wait_until_finished)
    finally:
      last_mgr.close()
      best_mgr.close()
      writer.close()
  final = os.path.join(workdir, "final_validation.json")
  if not summary:  # no validation in this call (a finished run run again, or none configured)
    if os.path.exists(final):
      with open(final) as f:
        return json.load(f)
    return summary
  if is_main:
    with open(final, "w") as f:
      json.dump(summaries.jsonable(summary), f, indent=2)
  return summary


class _Loop:
  """The training loop's steps, logging, checks, checkpoints and validation."""

  def __init__(self, trainer, config, workdir, last_mgr, best_mgr, writer, progress, it):
    self.trainer, self.config, self.workdir = trainer, config, workdir
    self.last_mgr, self.best_mgr, self.writer, self.progress, self.it = last_mgr, best_mgr, writer, progress, it
    self.pending: list[dict[str, jax.Array]] = []
    self.eval_every = max(1, int(config.eval_every_epochs * trainer.steps_per_epoch))

  def run(self, state, step: int, stop) -> dict[str, Any]:
    config, trainer = self.config, self.trainer
    summary: dict[str, Any] = {}
    while step < trainer.num_steps:
      if stop.requested(step):
        self.check_finite(step)
        self.save(step, state, force=True)
        checkpoints.guarded(self.workdir, self.last_mgr, self.last_mgr.wait_until_finished)
        raise Preempted(stop.signum, step, self.workdir)
      local = self.next_batch()
      state, metrics = trainer.train_step(state, trainer.global_batch(local))
      step += 1
      self.pending.append(metrics)
      self.progress.update(1, images=config.batch_size)
      if step % config.log_every_steps == 0 or step == trainer.num_steps:
        self.log_train(step)
      if step % config.checkpoint_every_steps == 0 or step == trainer.num_steps:
        self.check_finite(step)
        self.save(step, state)
      if config.dataset.eval_split and (step % self.eval_every == 0 or step == trainer.num_steps):
        summary = self.validate(step, state)
    return summary

  def next_batch(self):
    try:
      return next(self.it)
    except Exception as e:
      err = pipeline.as_data_error(e, self.trainer.data_files())
      if err is e:
        raise
      raise err from None

  def check_finite(self, at_step: int):
    pending, self.pending = self.pending, []
    if not pending:
      return
    losses = np.asarray(jax.device_get([m["loss"] for m in pending]))
    if not np.all(np.isfinite(losses)):
      bad = at_step - len(pending) + int(np.argmin(np.isfinite(losses)))
      last = self.last_mgr.latest_step()
      self.last_mgr.wait_until_finished()
      raise NonFiniteLossError(
          f"The training loss became {losses[~np.isfinite(losses)][0]} at step {bad + 1}. "
          f"The last good checkpoint is step {last} in {os.path.join(self.workdir, 'checkpoints')} (left intact). "
          "Lower config.optimizer.learning_rate, set config.optimizer.grad_clip, or check the data.")

  def log_train(self, step: int):
    pending = self.pending
    self.check_finite(step)
    trainer = self.trainer
    avg = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
    avg["learning_rate"] = float(trainer.lr_fn(step - 1))
    avg["epoch"] = step / trainer.steps_per_epoch
    avg.update(self.progress.rates())
    self.writer.write(step, avg, prefix="train")
    self.progress.log(f"step {step}/{trainer.num_steps} epoch {avg['epoch']:.2f} loss {avg['loss']:.4f} "
                      f"mae {avg['train_mae']:.2f} lr {avg['learning_rate']:.2e} "
                      f"{avg['images_per_sec']:.1f} img/s ETA {self.progress.eta_str()}")

  def save(self, step: int, state, force: bool = False):
    if self.last_mgr.latest_step() == step:
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(self.it))
    checkpoints.guarded(self.workdir, self.last_mgr, self.last_mgr.save, step, args=args, force=force)

  def validate(self, step: int, state) -> dict[str, Any]:
    self.check_finite(step)
    with self.progress.paused():
      summary, per_source = self.trainer.validate_sources(state, self.config.eval_limit)
      row = summaries.scalars(summary)
      for label, s in per_source.items():
        row.update({f"{label}/{k}": v for k, v in summaries.scalars(s).items()})
      self.writer.write(step, row, prefix="val")
      self.progress.log(f"step {step} validation MAE {summary['mae']:.3f} CS@5 {summary['cs'][5]:.3f}"
                        + "".join(f"; {label} {s['mae']:.3f}" for label, s in per_source.items()))
      checkpoints.guarded(self.workdir, self.best_mgr, self.best_mgr.save, step,
                          args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                          metrics={"val_mae": float(summary["mae"])})
    return summary
