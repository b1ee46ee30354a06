"""Native XLA:CPU convolution kernels, compiled for this machine before anything is traced.

`kernels.cc` holds direct convolutions (3x3 stride 1 forward and kernel gradient, strided
stems over few channels, the input gradient's flipped kernel), exposed to XLA through its FFI
(`jax.ffi`); `conv3x3` and `strided` make them differentiable JAX functions. Why they exist and
what they bought: docs/CPU.md.

It is built for x86-64 CPUs with AVX2 (`cpu_support` says why another CPU gets none) with
the system C++ compiler and `-march=native` (AVX-512 where the CPU has it, else AVX2) against
the FFI headers jaxlib ships, once per source, compiler flags, jaxlib and CPU, into
AGEJAX_CACHE_DIR (default ~/.cache/agejax). The command-line tools build it before anything is
traced (`agejax.cpu.prepare`, with a one-line message); `python -m agejax.cpu.native` builds it on its own. A
process builds into a temporary file and renames it, so concurrent processes never load a
half-written library; compiler warnings are logged. Where the CPU is not supported, there is no
compiler, or it fails, agejax warns once, in one line, and keeps XLA's convolution: the results
are the same up to float rounding. AGEJAX_NATIVE=0 turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import metadata
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
TARGETS = ("agejax_conv3x3_forward", "agejax_conv3x3_kernel_grad", "agejax_strided_forward",
           "agejax_strided_kernel_grad", "agejax_flip_swap")

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled(environ=os.environ) -> bool:
  """False where the user turned native kernels off (AGEJAX_NATIVE=0) or inside `disabled()`."""
  return environ.get("AGEJAX_NATIVE", "1") != "0" and not _state.get("off", 0)


@contextlib.contextmanager
def disabled():
  """Traces inside use XLA's convolution only: a reference for the native kernels' results
  (exports need no switch: they are built on the plain Flax layers)."""
  with _lock:
    _state["off"] = _state.get("off", 0) + 1
  try:
    yield
  finally:
    with _lock:
      _state["off"] -= 1


def cache_dir(environ=os.environ) -> Path:
  return Path(environ.get("AGEJAX_CACHE_DIR") or Path.home() / ".cache" / "agejax")


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and instruction-set flags."""
  try:
    text = Path("/proc/cpuinfo").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(lines)
  except OSError:
    return platform.processor() or platform.machine()


def cpu_support(machine: str | None = None, cpuinfo: str | None = None) -> str | None:
  """None where the kernels are built for this CPU (x86-64 with AVX2), else why not."""
  machine = (machine or platform.machine()).lower()
  if machine not in ("x86_64", "amd64"):
    return f"the native kernels are for x86-64 CPUs; this one is {machine}"
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      return None  # no /proc (not Linux): let the compiler's -march=native decide
  flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
  if "avx2" not in flags:
    return "this CPU has no AVX2"
  return None


def find_compiler() -> str | None:
  """$CXX, else g++, else clang++; None where there is none."""
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def library_path(compiler: str) -> Path:
  """The cached library for this source, compiler, flags, jaxlib and CPU."""
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(),
               metadata.version("jaxlib").encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b"\0")
  return cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def build(compiler: str, out: Path) -> str:
  """Compiles SOURCE into `out` atomically and returns the compiler's warnings (its stderr);
  raises CalledProcessError with the compiler's message."""
  import jax.ffi  # the FFI headers ship with jaxlib

  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    # jaxlib's headers as system headers: their warnings are not ours; ours stay visible
    done = subprocess.run([compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp],
                          check=True, capture_output=True, text=True)
    os.replace(tmp, out)
    return done.stderr
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load() -> int | None:
  """Builds (if needed), loads and registers the kernels; returns their vector width in floats."""
  reason = cpu_support()
  if reason:
    raise RuntimeError(reason)
  compiler = find_compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++ or clang++, or $CXX) found")
  path = library_path(compiler)
  if not path.exists():
    announce = _state.get("announce")
    if announce:
      announce(f"agejax: building the native CPU convolution kernels into {path} (once per machine and jaxlib)")
    try:
      warnings = build(compiler, path)
    except subprocess.CalledProcessError as e:
      log = path.with_suffix(".log")
      log.write_text(e.stderr or "")
      first = next((ln for ln in (e.stderr or "").splitlines() if "error" in ln), f"exit status {e.returncode}")
      raise RuntimeError(f"{compiler} failed ({first.strip()[:200]}; the whole message: {log})") from None
    if warnings.strip():
      logging.warning("agejax: the C++ compiler warned building the native kernels:\n%s", warnings[-4000:])
  import jax

  lib = ctypes.CDLL(str(path))
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  _state["lib"] = lib  # keep it loaded
  return int(lib.agejax_vector_floats())


def vector_floats() -> int | None:
  """The native kernels' vector width in floats (16 AVX-512, 8 AVX2), or None where unavailable.

  The first call builds and registers them; a failure is logged once and then remembered.
  """
  if not enabled():
    return None
  with _lock:
    if "width" not in _state:
      try:
        _state["width"] = _load()
      except Exception as e:  # no compiler, a failed build, a CPU without AVX2 ...: XLA's path stays
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logging.warning("agejax: native convolution unavailable, using XLA's: %s", first)
        _state["width"] = None
    return _state["width"]


def prepare(announce=None) -> int | None:
  """Build and load the kernels now, before anything is traced, where they can apply (XLA:CPU,
  enabled); `announce(line)` is told when a build starts. Returns `vector_floats()`."""
  import jax
  if not enabled() or jax.default_backend() != "cpu":
    return None
  _state["announce"] = announce
  try:
    return vector_floats()
  finally:
    _state.pop("announce", None)


def require() -> int:
  """`vector_floats()`, raising where the kernels are unavailable: for code that was told they are."""
  width = vector_floats()
  if width is None:
    raise RuntimeError("agejax's native kernels are unavailable here (see the warning logged above)")
  return width


def usable(dtype) -> bool:
  """True where the kernels apply at all: built, XLA:CPU, one device (a custom call has no sharding
  rule, so XLA would gather a batch sharded over several devices onto each), float32."""
  import jax
  import jax.numpy as jnp

  return (jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu" and jax.device_count() == 1
          and vector_floats() is not None)
