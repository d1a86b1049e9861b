"""Huge pages for XLA's host buffers: glibc's `glibc.malloc.hugetlb=1` tunable, set by
re-executing the command line once.

On a CPU, XLA allocates each execution's temporary block (activations, gradients, an
optimizer's intermediates) with malloc. A block that large is mmap'ed fresh by glibc and
page-faulted in 4 KiB pages on every step: on the 2-core development machine, writing a
64 MiB result into a fresh buffer took 29 ms against 3 ms in place. With glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc advises the kernel (madvise) to back such
chunks with transparent huge pages (2 MiB), and the same write took 7-11 ms
(`scripts/benchmark.py --only optim_parts`, fresh processes; README, Benchmarks).

Tunables are read once, when a process starts, so the command-line entry points call
`reexec_with_hugepages()` first: when it applies it replaces the process image with the
same command line (same PID, arguments and working directory) and GLIBC_TUNABLES extended;
otherwise it returns and nothing changes. It applies on Linux with glibc >= 2.35 and the
kernel's transparent huge pages in "madvise" mode (with "always" every large mapping gets
them already; with "never" none can), unless GLIBC_TUNABLES already sets the tunable,
NLMM_HUGEPAGE_MALLOC=0, or this process is itself the re-execution (REEXECUTED is set: in
secure-execution mode glibc drops GLIBC_TUNABLES, which would otherwise loop). Python sessions (notebooks, the API) are not
re-executed: export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting them.
"""

import os
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "NLMM_HUGEPAGE_MALLOC"       # "0": leave the allocator alone
REEXECUTED = "NLMM_HUGEPAGE_REEXECUTED"  # set in the re-executed process
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> Optional[tuple]:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  try:
    return tuple(int(x) for x in version.split(".")[:2])
  except ValueError:
    return None


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), or ""."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def tunable_environment(env: Mapping[str, str], platform: str, libc: Optional[tuple],
                        thp: str) -> Optional[dict]:
  """The environment to re-execute with, or None when the tunable does not apply."""
  if env.get(OPT_OUT) == "0" or REEXECUTED in env or not platform.startswith("linux"):
    return None
  if libc is None or libc < (2, 35) or thp != "madvise":
    return None
  current = env.get("GLIBC_TUNABLES", "")
  if TUNABLE in current:
    return None
  out = dict(env)
  out["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
  out[REEXECUTED] = "1"
  return out


def hugepages_on(env: Mapping[str, str] = os.environ) -> bool:
  """Whether this process started with the tunable set to 1."""
  return f"{TUNABLE}=1" in env.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_hugepages() -> None:
  """Re-executes this command line with the tunable set when it applies; else returns."""
  env = tunable_environment(os.environ, sys.platform, glibc_version(), thp_mode())
  if env is None or not sys.executable or not sys.orig_argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError as e:   # the run goes on with the allocator it started with, and says so
    sys.stderr.write(f"warning: could not re-execute with {TUNABLE}=1 ({e}); continuing "
                     f"with 4 KiB pages (set {OPT_OUT}=0 to silence this)\n")
