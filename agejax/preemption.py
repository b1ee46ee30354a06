"""Stopping training cleanly on SIGTERM or Ctrl-C, at the same step on every process.

One process: Python handlers note the signal; the loop stops before its next step.
Several processes (jax.distributed): jax's preemption sync point, which the coordination service
answers the same on every process, so all stop at one step. It watches SIGTERM; Ctrl-C (SIGINT)
is turned into a SIGTERM to this process so it takes the same route. Where the preemption service
is not running, the processes instead share their local flags with a small all-gather every step
(said once at start); a signal is never ignored.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np



class StopSignals:
  """`requested(step)`: whether training should stop before `step`; `signum` the signal seen here."""

  def __init__(self, log=None):
    self.signum = 0
    self.previous = {}
    self.multihost = jax.process_count() > 1
    self.mode = "local"
    self.log = log or (lambda text: None)

  def install(self) -> "StopSignals":
    """Choose how to stop and install the handlers (Python allows them on the main thread only: off
    it, a single process cannot be stopped by a signal, while several still reach jax's sync point)."""
    if self.multihost:
      self.mode = "sync_point" if _preemption_service_running() else "allgather"
      if self.mode == "allgather":
        self.log("jax's preemption service is not running: the processes exchange their stop flags every step "
                 "instead.")
    if threading.current_thread() is not threading.main_thread():
      return self
    if self.mode == "sync_point":
      self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_to_sigterm)
    else:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self.previous[sig] = signal.signal(sig, self._note)
    return self

  def _note(self, signum, frame):
    self.signum = signum

  def _forward_to_sigterm(self, signum, frame):
    self.signum = signum
    os.kill(os.getpid(), signal.SIGTERM)  # the preemption notifier watches SIGTERM

  def requested(self, step: int) -> bool:
    if self.mode == "sync_point":
      from jax.experimental import multihost_utils
      reached = bool(multihost_utils.reached_preemption_sync_point(step))
      if reached and not self.signum:
        self.signum = signal.SIGTERM
      return reached
    if self.mode == "allgather":
      from jax.experimental import multihost_utils
      flags = np.asarray(multihost_utils.process_allgather(np.int32(self.signum)))
      if flags.max() and not self.signum:
        self.signum = int(flags.max())
      return bool(flags.max())
    return self.signum != 0

  def restore(self) -> None:
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def _preemption_service_running() -> bool:
  """Whether jax.distributed started its preemption sync manager (it does unless turned off)."""
  try:
    from jax._src import distributed
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
  except ImportError:
    return False
