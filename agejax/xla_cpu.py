"""XLA:CPU settings measured to make agejax's training step faster.

jaxlib 0.10's XLA:CPU hands every convolution to YNNPACK. For the kernel
gradient of a 3x3 convolution (a convolution whose window is the whole feature
map) that path ran at 3-13 GFLOP/s on a 2-core EPYC, single-threaded, against
25-70 GFLOP/s for XLA's Eigen path. Keeping YNNPACK for dots only made the
TinyAgeNet 64 px training step 2.6x faster (docs/RESULTS.md, "What helped").

The flags only take effect if set before JAX creates its CPU client, so the
command-line entry points apply them first (`agejax.cli.start_process`); importing
agejax does not. A user's own setting of the same flag in XLA_FLAGS wins;
AGEJAX_XLA_DEFAULTS=0 turns this off.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",)
MIN_JAXLIB = (0, 10)  # the first jaxlib these flags were measured on; older ones may not know them


def _jaxlib_version() -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return (0, 0)


def apply_defaults(environ=os.environ) -> bool:
  """Appends DEFAULT_FLAGS to XLA_FLAGS unless the user opted out or set them; True if changed."""
  if environ.get("AGEJAX_XLA_DEFAULTS", "1") == "0" or _jaxlib_version() < MIN_JAXLIB:
    return False
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return False
  environ["XLA_FLAGS"] = " ".join(filter(None, [flags, *DEFAULT_FLAGS]))
  return True
