"""XLA:CPU flags for agejax's training step: YNNPACK for dots only, Eigen for convolutions.

jaxlib 0.10's XLA:CPU hands every convolution to YNNPACK, whose kernel gradients ran
single-threaded and several times slower than XLA's Eigen path (docs/CPU.md).

The flags only take effect if set before JAX creates its CPU client, so the command-line
entry points apply them first (`agejax.cpu.start_process`); importing agejax does not. A user's own setting of the same flag in XLA_FLAGS wins;
AGEJAX_XLA_DEFAULTS=0 turns this off.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",)
MIN_JAXLIB = (0, 10)  # the first jaxlib these flags were measured on; older ones may not know them


def _jaxlib_version() -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return (0, 0)


def host_devices(environ=os.environ) -> int:
  """The CPU devices JAX will create: --xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES, else 1."""
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
  count = found[-1] if found else environ.get("JAX_NUM_CPU_DEVICES", "1")
  return int(count) if str(count).isdigit() else 1


def apply_defaults(environ=os.environ) -> bool:
  """Appends DEFAULT_FLAGS to XLA_FLAGS unless the user opted out or set them; True if changed.

  Only for one CPU device, where agejax's CPU layers run: with several, the models take the
  plain Flax layers, whose batch-norm gradients XLA:CPU computed about 1% off with this flag
  (and right without it; docs/CPU.md).
  """
  if environ.get("AGEJAX_XLA_DEFAULTS", "1") == "0" or _jaxlib_version() < MIN_JAXLIB or host_devices(environ) > 1:
    return False
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return False
  environ["XLA_FLAGS"] = " ".join(filter(None, [flags, *DEFAULT_FLAGS]))
  return True
