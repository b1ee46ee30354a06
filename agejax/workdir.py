"""A training run's folder: made writable, held by one training at a time, its records kept consistent.

- `prepare` makes the folder or says in one line why it cannot (a file in the way, no permission).
- `lock` holds `<workdir>/.lock` (an flock: the operating system releases it when the process
  dies, so a killed run never leaves it stuck) and refuses a second training on the folder.
- `truncate_metrics` drops the rows a killed run logged after the checkpoint a resumed run
  restarts from, so `metrics.jsonl` holds every step once.
- `check_config` compares a config with the one the run recorded in `config.json`, naming
  every field that would make its checkpoints unreadable or its numbers different.
- `check_resume_config` refuses to continue a run that has checkpoints with a config that
  differs from its recorded one in anything but RESUMABLE_FIELDS, before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile

try:
  import fcntl
except ImportError:  # not POSIX: no lock, the rest works
  fcntl = None


class WorkdirError(RuntimeError):
  """The workdir cannot be used; the message says why and what to do."""


def prepare(workdir: str) -> str:
  """Create workdir (and parents) and check that files can be written in it; returns its absolute path."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; name a folder for the run.")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
      pass
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be written ({e.strerror or e}); "
                       "check its permissions or name another folder.") from None
  return path


@contextlib.contextmanager
def lock(workdir: str):
  """Hold the workdir for one training; WorkdirError if another live process holds it."""
  if fcntl is None:
    yield
    return
  path = os.path.join(workdir, ".lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirError(f"{workdir} is in use by another training ({holder}); wait for it to finish, stop it, "
                         "or pick another --workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def truncate_metrics(workdir: str, step: int) -> int:
  """Remove the rows of metrics.jsonl after `step` (written by a run killed after its last
  checkpoint, and about to be written again); returns how many were removed. Atomic."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by the kill
  if len(keep) == len(lines):
    return 0
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
  return len(lines) - len(keep)


# Fields that decide the network's variables or the meaning of its outputs.
MODEL_FIELDS = ("model.name", "model.gender", "model.race", "model.msa_stages", "model.msa_rates",
                "model.msa_reduction", "model.norm", "loss.name", "label_grid.start", "label_grid.stop",
                "label_grid.step")


def _get(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tuple(tree) if isinstance(tree, list) else tree


def check_config(workdir: str, config) -> None:
  """ValueError naming every MODEL_FIELDS value where `config` differs from workdir/config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    recorded = json.load(f)
  given = json.loads(config.to_json_best_effort())
  diffs = [f"{k}={_get(given, k)!r} (trained with {_get(recorded, k)!r})" for k in MODEL_FIELDS
           if _get(recorded, k) is not None and _get(given, k) != _get(recorded, k)]
  if diffs:
    raise ValueError(f"The config does not match the run in {workdir}: " + ", ".join(diffs)
                     + f". Use the config it was trained with (recorded in {path}).")


# Fields a resumed run may change: where data and logs go, how often it reports, how it reads, and
# how long it trains (training longer continues the run; a cosine schedule then follows the new length).
RESUMABLE_FIELDS = ("num_train_steps", "num_epochs", "log_every_steps", "eval_every_epochs", "eval_limit",
                    "checkpoint_every_steps",
                    "keep_checkpoints", "workers", "dataset.data_dir", "dataset.manual_dir", "dataset.on_error",
                    "distributed", "model.ops", "debug_nan_step")


class ConfigChangedError(WorkdirError):
  """A rerun in a workdir whose recorded config differs; the message names the fields."""


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


def check_resume_config(workdir: str, config) -> None:
  """ConfigChangedError naming every field (outside RESUMABLE_FIELDS) where `config` differs from
  workdir/config.json, when the workdir holds checkpoints to resume; nothing is written or moved.
  A workdir without checkpoints (or without config.json) passes."""
  path = os.path.join(workdir, "config.json")
  has_ckpt = any(os.path.isdir(os.path.join(workdir, d)) and
                 any(n.isdigit() for n in os.listdir(os.path.join(workdir, d))) for d in ("checkpoints", "best"))
  if not (os.path.exists(path) and has_ckpt):
    return
  try:
    with open(path) as f:
      recorded = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigChangedError(f"{path} cannot be read ({e}); the run's config is unknown, so it is not resumed. "
                             "Pick another --workdir.") from None
  given = _flatten(json.loads(config.to_json_best_effort()))
  # A field added since the run was recorded counts only where it is set (not at its off value); a
  # field the config no longer has (removed since, e.g. loss.stage1_steps) is not a change.
  diffs = [f"{k}={given.get(k)!r} (recorded {recorded.get(k)!r})" for k in sorted(given)
           if k not in RESUMABLE_FIELDS and given.get(k) != recorded.get(k)
           and not (k not in recorded and given.get(k) in ("", 0, False, None, ()))]
  if diffs:
    raise ConfigChangedError(f"{workdir} holds a run trained with another config: {', '.join(diffs)}. Rerun with "
                             f"the recorded config ({path}) to resume it, or pick another --workdir.")
