"""The entry points' one re-execution with glibc's huge-page tunable (agejax/cpu/hugepages.py)."""

import json
import os
import subprocess
import sys

import pytest

from agejax.cpu import hugepages

SUPPORTED = dict(libc=(2, 36), mode="madvise")


def test_wanted_only_where_glibc_and_the_kernel_can_and_nobody_opted_out():
  assert hugepages.wanted({}, **SUPPORTED)
  assert hugepages.wanted({}, libc=(2, 35), mode="always")
  assert not hugepages.wanted({"AGEJAX_HUGEPAGES": "0"}, **SUPPORTED)
  assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **SUPPORTED)  # the user's own choice
  assert not hugepages.wanted({"GLIBC_TUNABLES": hugepages.TUNABLE}, **SUPPORTED)  # already re-executed
  assert not hugepages.wanted({}, libc=(2, 34), mode="madvise")  # the tunable is new in glibc 2.35
  assert not hugepages.wanted({}, libc=(0, 0), mode="madvise")  # musl, macOS
  assert not hugepages.wanted({}, libc=(2, 36), mode="never")
  assert not hugepages.wanted({}, libc=(2, 36), mode="")


def test_with_tunable_keeps_the_users_other_tunables():
  env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
  assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_active_reads_the_tunable_among_others():
  assert hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})
  assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) and not hugepages.active({})


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hugepages.thp_mode(str(f)) == "always"
  assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


SCRIPT = """
import json, os, sys
print("start", flush=True)
from agejax.cpu import hugepages
hugepages.reexec_with_hugepages()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                  "utf8_mode": sys.flags.utf8_mode, "jax_loaded": "jax" in sys.modules}))
"""


@pytest.mark.skipif(not hugepages.wanted({}), reason="this machine's libc or kernel has no huge-page malloc")
def test_reexec_runs_the_same_command_line_once_with_the_tunable(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "AGEJAX_HUGEPAGES")}
  out = subprocess.run([sys.executable, "-X", "utf8", str(script), "--flag", "a b"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  assert out[:2] == ["start", "start"] and len(out) == 3  # one re-execution, then the program proper
  got = json.loads(out[2])
  assert got["tunables"] == hugepages.TUNABLE
  assert got["argv"] == ["--flag", "a b"] and got["utf8_mode"] == 1  # arguments and interpreter options kept
  assert not got["jax_loaded"]  # the entry points re-execute before paying for a JAX import

  env["AGEJAX_HUGEPAGES"] = "0"
  out = subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True, text=True).stdout
  assert out.count("start") == 1 and json.loads(out.splitlines()[-1])["tunables"] is None
