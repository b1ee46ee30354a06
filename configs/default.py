"""Defaults faithful to DLDL-v2 (Gao et al., IJCAI 2018) and its official code.

Dataset configs import `get_config` from here and change a few fields; the
string after ":" on the command line is a comma-separated list of variants:
  model:    thin | tiny | vgg16 | resnet18 | resnet34 | mtmsa (age+gender+race, MSA)
            | multitask (gender and race heads on the chosen trunk)
            | face_resnet (dlib's face-pretrained ResNet, fine-tuned: 150 px, the trunk at
              a tenth of the heads' learning rate, warm-up, cosine decay, flips + shifts;
              its affine layers train as affine layers)
            | face_resnet_bn (the same with the affine layers turned into batch norm
              initialised to compute what they computed)
            | scratch (the same network and schedule from random initialisation, with
              batch norm in place of the affine layers and one learning rate)
  loss:     any name in agejax.objectives (dldl_v2, dldl, dex, mean_variance, sord,
            ranking_bce, coral, corn, l1, l2, gaussian_nll; distill: DLDL-v2 with a
            teacher's distributions as labels, `--config.loss.teacher=FILE`)
  schedule: smoke (seconds; tests) | cpu (TinyAgeNet at 64 px, useful within an
            hour on 2 CPU cores) | the paper's (default)
  two_stage: the official code's KL-only first stage, then KL + L1
  full_train: train on the held-out part too (the paper's exact training set): no
            checkpoint selection, evaluate.py scores the last checkpoint
  flip_only: horizontal flips as the only augmentation
  degrade:  grayscale, sepia, blur, low resolution, darkness, JPEG damage and scan
            noise, each with probability DEGRADE_P (agejax.data.degrade)
  tuned:    agejax's short-schedule recipe (docs/RESULTS.md): cosine decay after a
            300-step warmup, AdamW (weight decay 0.01), flips and shifts of up
            to 1/16 of the side as the only augmentation
The order does not matter: `resnet18,cpu` trains a ResNet-18 on the cpu schedule.
e.g. `--config configs/chalearn16.py:tiny,cpu`.
"""

import inspect

import ml_collections

from agejax import losses, models, objectives
from agejax.data import degrade, mixture

MODELS = models.MODEL_NAMES          # the registries' names: a new model or loss is a variant at once
SCHEDULES = ("smoke", "cpu")
DEGRADE_P = 0.1  # the `degrade` variant: each degradation's probability
LOSSES = tuple(objectives.OBJECTIVES)


def set_dataset(c: ml_collections.ConfigDict, name: str) -> None:
  """The dataset and its protocol's train / select / report splits (`agejax.data.mixture.PROTOCOLS`)."""
  c.dataset.name = name
  c.dataset.train_split, c.dataset.eval_split, c.dataset.test_split = mixture.PROTOCOLS[name]


def _default(fn, name: str):
  return inspect.signature(fn).parameters[name].default


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = ml_collections.ConfigDict(dict(
      name="utkface", config="", data_dir="", manual_dir="", on_error="raise",
      train_split="", eval_split="", test_split="",  # set_dataset: the dataset's protocol
      mixture=""))  # "utkface:0.75,aaf:0.25": train on several datasets (agejax.data.mixture)
  set_dataset(c, "utkface")
  c.label_grid = ml_collections.ConfigDict(dict(start=0.0, stop=100.0, step=1.0))
  c.model = ml_collections.ConfigDict(dict(
      name="thin", dtype="float32", gender=False, race=False,
      msa_stages=(), msa_rates=(1, 2, 5), msa_reduction=4, norm="",
      pretrained="",           # "dlib" (or a .dat path): start the face_resnet trunk from dlib's face ResNet
      age_bias_init="zeros",   # "prior": coral / ranking_bce biases = logit P(y > l_k) of the training ages
      ops="auto"))             # layers: auto (XLA:CPU's on one CPU device, else plain Flax) | plain | cpu
  # The losses' hyper-parameters start from their functions' defaults (agejax.losses: one place each).
  c.loss = ml_collections.ConfigDict(dict(
      name="dldl_v2", lam=_default(losses.dldl_v2, "lam"), sigma=objectives.DEFAULT_SIGMA, min_sigma=0.0,
      kl_reduction=_default(losses.dldl_v2, "kl_reduction"),
      lam_mean=_default(losses.mean_variance, "lam_mean"), lam_var=_default(losses.mean_variance, "lam_var"),
      alpha=_default(losses.sord, "alpha"), gender_weight=1.0, race_weight=1.0,
      stage1_epochs=0,   # > 0: KL only for these epochs (the official two-stage recipe)
      teacher="",        # loss distill: a teacher file of `python -m agejax.distill`
      # distill's label: this x the teacher's distribution + the rest x the Gaussian
      teacher_weight=_default(losses.distillation, "teacher_weight")))
  c.augment = ml_collections.ConfigDict(dict(
      flip=0.5, grayscale=0.5, rescale=True, rotate=15.0, color_jitter=0.4, translate=0.0,
      # how real photos look (agejax.data.degrade): each one's probability, 0 = off
      **{name: 0.0 for name in degrade.CONFIG_FIELDS}))
  c.image_size = 224
  c.batch_size = 128                 # global, over all devices of all hosts
  c.num_epochs = 60
  c.num_train_steps = -1             # > 0 overrides num_epochs
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, eps=1e-7, weight_decay=0.0, decay_epochs=(30,), decay_factor=0.1,
      schedule="step", final_fraction=0.0,  # schedule "cosine": decay to final_fraction x lr instead of steps
      warmup_steps=0, grad_clip=0.0,
      trunk_lr_factor=1.0))  # the trunk's learning rate is this times the heads' (fine-tuning: < 1)
  c.seed = 0
  c.workers = 0                      # grain worker processes (0: threads in the main process)
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.eval_limit = -1                  # > 0: evaluate on only this many images (smoke tests)
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.flip_tta = True
  c.distributed = False              # call jax.distributed.initialize() (multi-host)
  c.debug_nan_step = -1              # tests: poison the loss with NaN at this step
  return c


def _flips_only(c: ml_collections.ConfigDict) -> None:
  c.augment.update(grayscale=0.0, rescale=False, rotate=0.0, color_jitter=0.0)


def apply_variants(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  # Order on the command line does not matter: schedules first (they pick a default model that a
  # model variant then replaces), two_stage last (it reads the schedule's num_epochs).
  tokens.sort(key=lambda t: 0 if t in SCHEDULES else 2 if t == "two_stage" else 1)
  for token in tokens:
    if token in ("face_resnet", "face_resnet_bn", "scratch"):
      c.model.name = "face_resnet"
      c.model.pretrained = "" if token == "scratch" else "dlib"
      c.image_size = 150              # the pretrained network's input
      c.batch_size = 32
      c.num_epochs = 8                # 592 steps an epoch on UTKFace, ~5 min each on 2 cores
      c.optimizer.update(schedule="cosine", learning_rate=1e-3, warmup_steps=300, weight_decay=1e-4,
                         trunk_lr_factor=1.0 if token == "scratch" else 0.1)
      c.model.norm = "affine" if token == "face_resnet" else "batch"  # random init needs batch norm
      c.eval_every_epochs = 2.0
      c.checkpoint_every_steps = 600
      _flips_only(c)
      c.augment.translate = 1 / 16
    elif token in MODELS:
      c.model.name = token
      if token == "mtmsa":
        c.model.gender = c.model.race = True
        c.model.msa_stages = (3, 4)
    elif token == "multitask":
      c.model.gender = c.model.race = True
    elif token in LOSSES:
      c.loss.name = token
    elif token == "smoke":
      c.model.name = "tiny"
      c.image_size = 32
      c.batch_size = 8
      c.num_epochs = 1
      c.num_train_steps = 6
      c.log_every_steps = 2
      c.eval_every_epochs = 0.5
      c.checkpoint_every_steps = 3
      c.eval_limit = 16
      c.augment.rotate = 5.0
    elif token == "cpu":
      c.model.name = "tiny"
      c.image_size = 64
      c.batch_size = 64
      c.num_epochs = 16               # 296 steps an epoch on UTKFace: ~45 min on 2 cores
      c.optimizer.decay_epochs = (12,)  # x0.1 for the last quarter
      c.log_every_steps = 50
      c.eval_every_epochs = 2.0
      c.checkpoint_every_steps = 300
      c.workers = 0
    elif token == "two_stage":
      c.loss.stage1_epochs = max(1, c.num_epochs // 2)
    elif token == "full_train":
      if c.dataset.eval_split in ("holdout", "validation") and c.dataset.eval_split not in c.dataset.train_split:
        c.dataset.train_split = f"{c.dataset.train_split}+{c.dataset.eval_split}"
      c.dataset.eval_split = ""
    elif token == "flip_only":         # the plain baseline's augmentation (docs/RESULTS.md)
      _flips_only(c)
    elif token == "tuned":
      c.optimizer.schedule = "cosine"
      c.optimizer.warmup_steps = 300
      c.optimizer.weight_decay = 0.01
      _flips_only(c)
      c.augment.translate = 1 / 16
    elif token == "degrade":         # real photos' looks, each at DEGRADE_P (docs/RESULTS.md)
      c.augment.update(grayscale=max(c.augment.grayscale, DEGRADE_P),
                       **{name: DEGRADE_P for name in degrade.CONFIG_FIELDS})
    elif token == "bf16":
      c.model.dtype = "bfloat16"
    else:
      raise ValueError(f"Unknown config variant {token!r}: use a model {MODELS}, a loss {LOSSES}, "
                       "or smoke / cpu / flip_only / tuned / two_stage / multitask / bf16.")
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return apply_variants(base_config(), arg)
