"""nlmm_jax/host_memory.py: when the huge-page malloc tunable applies, and the re-execution."""

import os
import subprocess
import sys

from nlmm_jax import host_memory

LINUX, NEW, OLD = "linux", (2, 36), (2, 31)


def test_tunable_applies_only_where_it_can_work():
  env = {"PATH": "/bin"}
  out = host_memory.tunable_environment(env, LINUX, NEW, "madvise")
  assert out == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                 host_memory.REEXECUTED: "1"}
  assert env == {"PATH": "/bin"}                                   # not modified
  # "always": huge pages already; the re-executed process never re-executes again (in
  # secure-execution mode glibc drops GLIBC_TUNABLES).
  assert host_memory.tunable_environment({host_memory.REEXECUTED: "1"}, LINUX, NEW,
                                         "madvise") is None
  for args in [(LINUX, NEW, "always"), (LINUX, NEW, "never"), (LINUX, NEW, ""),
               (LINUX, OLD, "madvise"),
               (LINUX, None, "madvise"), ("darwin", NEW, "madvise")]:
    assert host_memory.tunable_environment(env, *args) is None, args
  assert host_memory.tunable_environment({host_memory.OPT_OUT: "0"}, LINUX, NEW,
                                         "madvise") is None


def test_other_tunables_are_kept_and_an_explicit_setting_wins():
  out = host_memory.tunable_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                        LINUX, NEW, "madvise")
  assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert host_memory.hugepages_on(out)
  for value in ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1"):
    assert host_memory.tunable_environment({"GLIBC_TUNABLES": value}, LINUX, NEW,
                                           "madvise") is None
  assert not host_memory.hugepages_on({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) == ""


def _child(env):
  """A Python child that calls reexec_with_hugepages(), then prints its pid and tunables."""
  code = ("import os; from nlmm_jax import host_memory; host_memory.reexec_with_hugepages(); "
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', '-'))")
  proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          text=True)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  pid, tunables = out.split()
  return proc.pid, int(pid), tunables


def test_the_command_line_is_reexecuted_in_place_where_it_applies():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT, host_memory.REEXECUTED)}
  expected = host_memory.tunable_environment(env, sys.platform, host_memory.glibc_version(),
                                             host_memory.thp_mode())
  started, pid, tunables = _child(env)
  assert pid == started                                            # same process
  assert tunables == ("glibc.malloc.hugetlb=1" if expected else "-")
  _, _, tunables = _child({**env, host_memory.OPT_OUT: "0"})
  assert tunables == "-"


def test_a_failed_reexecution_warns_and_returns(monkeypatch, capsys):
  def fail(*args):
    raise OSError("exec format error")
  monkeypatch.setattr(host_memory, "tunable_environment", lambda *a: {"GLIBC_TUNABLES": "x"})
  monkeypatch.setattr(host_memory.os, "execve", fail)
  host_memory.reexec_with_hugepages()                              # returns, does not raise
  assert "could not re-execute" in capsys.readouterr().err
