"""Transparent huge pages for the large buffers a training step allocates, set by re-executing once.

XLA:CPU mallocs a fresh temp buffer for every execution and Eigen its convolution
scratch, above glibc's mmap threshold, so every step maps new memory that the kernel
faults in 4 KiB page by page. glibc >= 2.35 backs such mappings with transparent huge
pages when GLIBC_TUNABLES has glibc.malloc.hugetlb=1 (the effect: docs/CPU.md).

glibc reads tunables only at process start, so the command-line entry points call
`reexec_with_hugepages()` first: it re-executes the same command line once with
the tunable added. Importing agejax never re-executes anything. AGEJAX_HUGEPAGES=0
turns it off; where the kernel's THP mode is "never", or the C library is not
glibc >= 2.35, it does nothing. This module imports only the standard library, so
the re-execution costs an interpreter start, not a JAX import.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int]:
  """(major, minor) of the running glibc, (0, 0) where there is none (musl, macOS, Windows)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else (0, 0)
  except (AttributeError, ValueError, OSError):
    return (0, 0)


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), "" if unknown."""
  try:
    text = open(path).read()
  except OSError:
    return ""
  return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def wanted(environ=os.environ, libc=None, mode=None) -> bool:
  """True where re-executing with TUNABLE would change something and is allowed."""
  if environ.get("AGEJAX_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return False
  libc = glibc_version() if libc is None else libc
  mode = thp_mode() if mode is None else mode
  return libc >= (2, 35) and mode in ("always", "madvise")


def active(environ=os.environ) -> bool:
  """True where this environment (a process's, or one a child gets) has TUNABLE."""
  return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def with_tunable(environ=os.environ) -> dict[str, str]:
  """A copy of environ whose GLIBC_TUNABLES (colon-separated) also has TUNABLE."""
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TUNABLE]))
  return env


def reexec_with_hugepages() -> None:
  """Re-executes this process's command line once with TUNABLE set; returns where not wanted.

  Call it first thing under `if __name__ == "__main__":`, before threads or open files
  that the new image would lose.
  """
  if not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable())
  except OSError as e:  # e.g. an embedded interpreter with no executable: run on without
    print(f"agejax: not re-executed with {TUNABLE}: {e}", file=sys.stderr)
