"""Logs and progress: JSON-lines metrics, TensorBoard events, and honest throughput.

`Progress` reports images/s and ETA over the time spent in training steps only:
compilation (the first step) and evaluation pauses are excluded, as
big_vision's Chrono does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from tqdm.auto import tqdm


class MetricWriter:
  """Appends one JSON line per (step, prefix) to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.file = open(self.path, "a")
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict, prefix: str):
    if not self.enabled:
      return
    row = {"step": int(step), "split": prefix, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self.tb.flush()

  def log_text(self, text: str):
    if self.enabled:
      print(text, file=sys.stderr, flush=True)

  def close(self):
    if self.enabled:
      self.file.close()
      self.tb.close()


class Progress:
  """A tqdm bar plus images/s and ETA measured over step time only (first step excluded)."""

  def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.total, self.done = total, initial
    self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                    disable=not enabled, mininterval=2.0)
    self.images = 0
    self.seconds = 0.0
    self.timed_steps = 0
    self._t = None  # time of the last update; None after a pause and before the first step

  def update(self, n: int = 1, images: int = 0):
    """Count the wall time since the previous update (steady state, compile excluded)."""
    now = time.perf_counter()
    if self._t is not None:
      self.seconds += now - self._t
      self.images += images
      self.timed_steps += n
    self._t = now
    self.done += n
    self.bar.update(n)
    if self.seconds > 0:
      self.bar.set_postfix_str(f"{self.images / self.seconds:.1f} img/s", refresh=False)

  def rates(self) -> dict:
    ips = self.images / self.seconds if self.seconds > 0 else 0.0
    return {"images_per_sec": ips}

  def eta_seconds(self) -> float:
    return (self.total - self.done) * self.seconds / self.timed_steps if self.timed_steps else float("nan")

  def eta_str(self) -> str:
    s = self.eta_seconds()
    if s != s:
      return "?"
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"

  def log(self, text: str):
    if self.enabled:
      self.bar.write(text, file=sys.stderr)

  @contextlib.contextmanager
  def paused(self):
    """Time inside is not counted (evaluation); the next step is timed from the block's end."""
    try:
      yield
    finally:
      self._t = time.perf_counter()

  def close(self):
    self.bar.close()
