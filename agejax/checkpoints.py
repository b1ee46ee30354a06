"""A run's checkpoints: orbax managers, restoring the newest good one, saving without half-written state.

- `managers`: the last-k manager (train state + grain iterator state, asynchronous) and the
  best-by-validation-MAE manager (state), as flax's examples and big_vision keep them.
- `restore_newest`: the newest checkpoint that restores. A checkpoint whose files cannot be read is
  damaged: it is moved (not deleted) to <workdir>/damaged_checkpoints/ and an older one is tried.
  A checkpoint that reads but whose tree does not fit the model is a config mismatch: nothing is
  moved, `CheckpointMismatchError` names what differs.
- `save`: a full disk (or any write error) becomes `CheckpointWriteError` naming the workdir; the
  temporary folder orbax was writing is removed, so no later run can take it for a checkpoint, and
  the earlier checkpoints are untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint that reads fine but holds another model's variables."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, no permission); the message names the workdir."""


def managers(workdir: str, config) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """The last-k manager (state + data iterator) and the best-by-validation-MAE manager (state)."""
  last = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True),
      item_names=("state", "data"))
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "best"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_mae"], best_mode="min",
                                           create=True, enable_async_checkpointing=False),
      item_names=("state",))
  return last, best


def abstract_state(state_like):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_like)


def restore_state(manager: ocp.CheckpointManager, step: int, template, iterator=None):
  items = {"state": ocp.args.StandardRestore(abstract_state(template))}
  if iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def tree_mismatch(manager: ocp.CheckpointManager, step: int, template) -> str | None:
  """What differs between the checkpoint's recorded state tree and `template`'s (paths and shapes),
  or None where they agree or the checkpoint's metadata cannot be read (then it is damaged)."""
  try:
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(str(manager.directory), str(step), "state"))
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
  except Exception:  # orbax raises assorted errors for unreadable metadata
    return None
  if meta is None:
    return None
  shape_of = lambda x: tuple(getattr(x, "shape", ()) or ())
  try:
    saved = {jax.tree_util.keystr(k): shape_of(v) for k, v in jax.tree_util.tree_leaves_with_path(meta)}
  except Exception:
    return None
  want = {jax.tree_util.keystr(k): shape_of(v) for k, v in jax.tree_util.tree_leaves_with_path(template)}
  # orbax's metadata names dataclass fields like dict keys: compare on the path's words, over what the
  # model defines (its parameters and batch statistics)
  def norm(d):
    return {k.replace(".", "/").replace("['", "/").replace("']", "").strip("/"): v for k, v in d.items()}
  saved_all, want_all = norm(saved), norm(want)
  model_part = lambda d: {k: v for k, v in d.items() if k.split("/")[0] in ("params", "batch_stats")}
  saved, want = model_part(saved_all), model_part(want_all)
  # the optimizer's state: its paths are named differently in metadata (namedtuples), so compare the
  # shapes it holds (another optimizer or schedule wrapper holds others)
  opt_shapes = lambda d: sorted(v for k, v in d.items() if k.startswith("opt_state"))
  if not (set(want) - set(saved) or set(saved) - set(want)) and opt_shapes(saved_all) != opt_shapes(want_all):
    return (f"the optimizer state differs ({len(opt_shapes(saved_all))} arrays saved, "
            f"{len(opt_shapes(want_all))} in this config's optimizer)")
  missing = sorted(set(want) - set(saved))
  extra = sorted(set(saved) - set(want))
  shapes = sorted(k for k in set(want) & set(saved) if saved[k] != want[k])
  if not (missing or extra or shapes):
    return None
  parts = []
  if missing:
    parts.append(f"{len(missing)} variable(s) the model has are not in it (e.g. {missing[0]})")
  if extra:
    parts.append(f"{len(extra)} it holds are not in the model (e.g. {extra[0]})")
  if shapes:
    parts.append(f"{len(shapes)} differ in shape (e.g. {shapes[0]}: {saved[shapes[0]]} saved, {want[shapes[0]]} now)")
  return "; ".join(parts)


def restore_newest(workdir: str, config, last_mgr, template, iterator, log):
  """(manager, state, step) from the newest checkpoint that restores, or (manager, None, None).

  Raises CheckpointMismatchError where the newest checkpoint is readable but holds another
  model's tree. A damaged one is moved to <workdir>/damaged_checkpoints/<step> and the next older
  one tried; `log` says which and why. The manager is reopened when one was moved.
  """
  moved = False
  for step in sorted(last_mgr.all_steps(), reverse=True):
    mismatch = tree_mismatch(last_mgr, step, template)
    if mismatch:
      raise CheckpointMismatchError(
          f"Checkpoint {step} in {os.path.join(workdir, 'checkpoints')} was trained with another model than "
          f"this config describes: {mismatch}. Use the config the run was trained with "
          f"({os.path.join(workdir, 'config.json')}) or another --workdir.")
    try:
      return last_mgr, restore_state(last_mgr, step, template, iterator), step
    except Exception as e:  # orbax and grain raise assorted errors for damaged checkpoints
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      if jax.process_index() == 0:
        aside = os.path.join(workdir, "damaged_checkpoints")
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, str(step))
        while os.path.exists(target):
          target += "_"
        shutil.move(os.path.join(os.path.abspath(workdir), "checkpoints", str(step)), target)
        log(f"Checkpoint {step} does not restore ({reason}); moved to {target} and trying an older one.")
      moved = True
  if moved:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("damaged checkpoints moved")
    last_mgr.close()
    last_mgr = managers(workdir, config)[0]
  return last_mgr, None, None


def _write_error(e: BaseException) -> OSError | None:
  """The OSError behind a failed save (orbax wraps them), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e
    if "No space left on device" in str(e):
      return OSError(errno.ENOSPC, "No space left on device")
    e = e.__cause__ or e.__context__
  return None


def remove_unfinished(folder: str) -> list[str]:
  """Delete orbax's temporary folders (a save that never committed) under `folder`; returns them."""
  removed = []
  if not os.path.isdir(folder):
    return removed
  for name in os.listdir(folder):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
      removed.append(name)
  return removed


def guarded(workdir: str, manager: ocp.CheckpointManager, action, *args, **kwargs):
  """`action(*args, **kwargs)` (`manager`'s save or wait_until_finished); an OSError inside it
  (a full disk, above all) becomes CheckpointWriteError once the saves still in flight have ended
  and the half-written folders are removed."""
  try:
    return action(*args, **kwargs)
  except Exception as e:
    err = _write_error(e)
    if err is None:
      raise
    try:
      manager.wait_until_finished()  # an earlier asynchronous save may still be committing
    except Exception:  # it failed too: its folder is half-written and goes below
      pass
    for sub in ("checkpoints", "best"):
      remove_unfinished(os.path.join(os.path.abspath(workdir), sub))
    what = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    raise CheckpointWriteError(err.errno, f"Cannot write a checkpoint in {os.path.abspath(workdir)}: {what}. "
                               "The earlier checkpoints are intact; free space (or fix the folder) and run the "
                               "same command to resume.") from None


def log_line(text: str) -> None:
  print(text, file=sys.stderr, flush=True)
