"""Local multi-process runs: N JAX processes on this machine, as on N hosts.

  python -m nlmm_jax.launch --num_processes=2 [--devices_per_process=1] -- \
      --config=demo --workdir=runs/demo2p

starts N copies of `python -m nlmm_jax.main <flags after -->` that find each other
through `jax.distributed` on 127.0.0.1 (a free coordinator port is picked), exactly as
processes on N hosts do through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (see `main._maybe_initialize_distributed`). Each process gets
`--devices_per_process` CPU devices (XLA's host platform device count) and CPU
collectives (gloo), so a multi-host job can be run and tested on one machine.

Each process's output (stdout and stderr together) is streamed with a `[p<i>]` prefix.
When one process exits with an error, the others are stopped (SIGTERM, then SIGKILL
after `--grace_secs`), the launcher's last line names that process and repeats its last
output line, and the launcher exits with its exit status. SIGTERM or Ctrl-C to the
launcher is passed on to every process (the training job then saves a checkpoint and
stops; rerunning the same command resumes).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

DEFAULT_MODULE = "nlmm_jax.main"


def free_port() -> int:
  """A TCP port that was free on 127.0.0.1 a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def process_env(base: dict, process_id: int, num_processes: int, devices: int,
                coordinator: str) -> dict:
  """The environment of process `process_id`: coordinator, id, count, CPU devices."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  env.update(
      JAX_COORDINATOR_ADDRESS=coordinator,
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(process_id),
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      XLA_FLAGS=" ".join(flags),
      PYTHONUNBUFFERED="1")
  return env


class _Process:
  """One child: its Popen, a thread that prefixes and prints its output, its last line."""

  def __init__(self, index: int, cmd: list, env: dict, out, lock: threading.Lock):
    self.index = index
    self.last_line = ""
    self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace",
                                 start_new_session=True)
    self._thread = threading.Thread(target=self._pump, args=(out, lock), daemon=True)
    self._thread.start()

  def _pump(self, out, lock):
    for line in self.proc.stdout:
      line = line.rstrip("\n")
      if line.strip():
        self.last_line = line
      with lock:
        out.write(f"[p{self.index}] {line}\n")
        out.flush()

  def signal(self, sig) -> None:
    if self.proc.poll() is None:
      try:
        os.killpg(self.proc.pid, sig)
      except ProcessLookupError:
        pass

  def join_output(self, timeout: float = 5.0) -> None:
    self._thread.join(timeout)


def launch(args: Sequence[str], num_processes: int, devices_per_process: int = 1,
           module: str = DEFAULT_MODULE, grace_secs: float = 30.0, out=None) -> int:
  """Runs `python -m module args` in `num_processes` processes; returns the exit status."""
  out = out or sys.stdout
  if num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"--devices_per_process must be >= 1, got {devices_per_process}")
  coordinator = f"127.0.0.1:{free_port()}"
  lock = threading.Lock()
  cmd = [sys.executable, "-m", module, *args]
  procs = [_Process(i, cmd, process_env(os.environ, i, num_processes, devices_per_process,
                                        coordinator), out, lock)
           for i in range(num_processes)]

  def forward(signum, frame):
    del frame
    for p in procs:
      p.signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  failed: Optional[_Process] = None
  try:
    while True:
      codes = [p.proc.poll() for p in procs]
      # Of processes found failed together, one killed by a signal is the likelier cause
      # (the others' collectives then fail with an error), then the lowest index.
      failed = min((p for p, c in zip(procs, codes) if c not in (None, 0)),
                   key=lambda p: (p.proc.returncode > 0, p.index), default=None)
      if failed is not None or all(c == 0 for c in codes):
        break
      time.sleep(0.2)
    if failed is not None:
      _stop(procs, grace_secs)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for p in procs:
    p.join_output()
  if failed is None:
    return 0
  code = failed.proc.returncode
  status = f"signal {-code}" if code < 0 else f"exit status {code}"
  with lock:
    out.write(f"launch: process {failed.index} of {num_processes} failed ({status}); "
              f"stopped the others. Its last line: {failed.last_line}\n")
    out.flush()
  return code if code > 0 else 1


def _stop(procs: list, grace_secs: float) -> None:
  """SIGTERM to every running process, SIGKILL to those alive after `grace_secs`."""
  for p in procs:
    p.signal(signal.SIGTERM)
  deadline = time.time() + grace_secs
  while time.time() < deadline and any(p.proc.poll() is None for p in procs):
    time.sleep(0.2)
  for p in procs:
    p.signal(signal.SIGKILL)
    p.proc.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
      argv, [])
  parser = argparse.ArgumentParser(
      prog="python -m nlmm_jax.launch",
      description="Run the training job in several local JAX processes "
                  "(the flags after -- go to every process).")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU devices per process (default 1)")
  parser.add_argument("--grace_secs", type=float, default=30.0,
                      help="after one process fails, how long the others get to stop")
  parser.add_argument("--module", default=DEFAULT_MODULE, help=argparse.SUPPRESS)
  a = parser.parse_args(ours)
  try:
    return launch(rest, a.num_processes, a.devices_per_process, a.module, a.grace_secs)
  except ValueError as e:
    print(f"nlmm_jax.launch: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
