"""Stop signals: one process, several with jax's preemption service, several without it."""

import os
import signal

import numpy as np
import pytest

from agejax import preemption


def test_one_process_notes_sigterm_and_ctrl_c():
  before = signal.getsignal(signal.SIGINT)
  for sig in (signal.SIGTERM, signal.SIGINT):
    stop = preemption.StopSignals().install()
    try:
      assert not stop.requested(0)
      os.kill(os.getpid(), sig)
      assert stop.requested(1) and stop.signum == sig
    finally:
      stop.restore()
  assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_several_processes_turn_ctrl_c_into_the_sigterm_the_preemption_service_watches(monkeypatch):
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption, "_preemption_service_running", lambda: True)
  sent = []
  monkeypatch.setattr(preemption.os, "kill", lambda pid, sig: sent.append((pid, sig)))
  stop = preemption.StopSignals().install()
  try:
    assert stop.mode == "sync_point"
    assert signal.getsignal(signal.SIGTERM) is not stop._note  # SIGTERM is left to jax's notifier
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what Ctrl-C runs
    assert sent == [(os.getpid(), signal.SIGTERM)] and stop.signum == signal.SIGINT
  finally:
    stop.restore()


def test_without_the_preemption_service_the_processes_share_their_flags(monkeypatch):
  from jax.experimental import multihost_utils
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption, "_preemption_service_running", lambda: False)
  others = {"flag": 0}
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.array([int(x), others["flag"]], np.int32))
  said = []
  stop = preemption.StopSignals(log=said.append).install()
  try:
    assert stop.mode == "allgather" and "exchange their stop flags" in said[0]
    assert not stop.requested(3)
    others["flag"] = signal.SIGTERM  # the other process was signalled
    assert stop.requested(4) and stop.signum == signal.SIGTERM
  finally:
    stop.restore()
