"""XLA:CPU acceleration, behind one boundary: everything agejax does for speed on one CPU device.

    agejax.cpu.layers()          the CPU op set's layers (conv, norm, max_pool), drop-ins for
                                 nn.Conv, nn.BatchNorm and nn.max_pool; `models.create` uses them on a
                                 single CPU device unless told `ops="plain"`
    agejax.cpu.start_process()   XLA:CPU flags and the huge-page malloc, before JAX loads
                                 (the command-line tools call it first)
    agejax.cpu.prepare()         the native kernels' build, before anything is traced
    agejax.cpu.describe()        what this process has of them (for benchmarks' reports)

Modules: `conv`, `batch_norm`, `pooling` (the layers), `stored` (a fusion workaround they use),
`native` (C++ kernels through XLA's FFI), `xla_flags`, `hugepages`. Importing this package loads
only the standard library and changes nothing; the measurements behind each part are in
docs/CPU.md.
"""

from __future__ import annotations


def layers() -> dict:
  """{"conv": Conv, "norm": BatchNorm, "max_pool": max_pool}: the XLA:CPU layers, with nn.Conv's,
  nn.BatchNorm's and nn.max_pool's interfaces, variables and results (up to float rounding)."""
  from agejax.cpu import batch_norm, conv, pooling
  return {"conv": conv.Conv, "norm": batch_norm.BatchNorm, "max_pool": pooling.max_pool}


def start_process() -> None:
  """Before JAX loads: the XLA:CPU flags (`xla_flags`), then the huge-pages re-execution
  (`hugepages`), which inherits them. Standard library only."""
  from agejax.cpu import hugepages, xla_flags
  xla_flags.apply_defaults()
  hugepages.reexec_with_hugepages()


def prepare(announce=None) -> int | None:
  """Builds and loads the native kernels where they apply (XLA:CPU, x86-64 with AVX2, enabled);
  `announce(line)` is told when a build starts. Returns their vector width in floats, or None."""
  from agejax.cpu import native
  return native.prepare(announce)


def describe() -> dict:
  """{"malloc": "hugetlb" | "default", "native_conv_floats": vector width or None}: what this process runs with."""
  import jax

  from agejax.cpu import hugepages, native
  return {"malloc": "hugetlb" if hugepages.active() else "default",
          # vector width of the native convolution (16 AVX-512, 8 AVX2); None: XLA's only
          "native_conv_floats": native.vector_floats() if jax.default_backend() == "cpu" else None}
