"""Entry point: `python -m nlmm_jax.main --config=small --workdir=DIR`.

  --config             a config: a bare name (demo, tiny, small, medium, large: the
                       packaged configs/*.py, from any directory and after `pip install`)
                       or a path to a config file (configs/demo.py from a clone); override
                       keys with --config.train.total_steps=100 (an unknown key is an error)
  --workdir            checkpoints, TensorBoard events, metrics and plots; rerunning
                       with the same workdir resumes
  --mode               train (default) | eval (best checkpoint, or config.init_from, on test)

Multi-host: each process runs the same command; `jax.distributed.initialize()` is called
when the environment describes several processes (cluster auto-detection: SLURM, TPU
pods, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID).
"""

import os
import sys
import traceback
from typing import Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config name (demo, tiny, small, medium, large) or a config file path.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that describe bad input or a diverged run (their messages say what to do).
# FloatingPointError covers train.NonFiniteLossError and evaluate.NonFiniteEmbeddingError.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def distributed_args(env) -> Optional[dict]:
  """How this process joins a multi-process job, read from its environment.

  None: a single process (no `jax.distributed`). Otherwise the keyword arguments for
  `jax.distributed.initialize`: explicit ones from JAX_COORDINATOR_ADDRESS +
  JAX_NUM_PROCESSES (+ JAX_PROCESS_ID, default 0), or {} (JAX's own cluster detection)
  inside a SLURM job of several tasks, an Open MPI job of several ranks, or a TPU pod
  slice of several workers.
  """
  if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
    return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env.get("JAX_PROCESS_ID", "0")))
  if "SLURM_JOB_ID" in env:
    processes = int(env.get("SLURM_NTASKS", "1"))
  elif "OMPI_COMM_WORLD_SIZE" in env:
    processes = int(env["OMPI_COMM_WORLD_SIZE"])
  elif env.get("TPU_WORKER_HOSTNAMES"):
    processes = len(env["TPU_WORKER_HOSTNAMES"].split(","))
  else:
    processes = 1
  return {} if processes > 1 else None


def set_cpu_devices(n: int, env) -> bool:
  """`train.cpu_devices`: JAX's CPU platform as n devices (before JAX starts a backend).

  On a CPU the data-parallel train step then runs one shard of the batch per device, each
  on its own thread; XLA's CPU backend keeps two cores far less busy with one device (the
  demo on 2 cores: 6 min 27 s with 2 devices, 7 min 35 s with one). Left alone when
  n <= 0 or when the environment already sets the count (the launcher, the tests).
  Returns whether it set it.
  """
  if n <= 0 or "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "") or (
      "JAX_NUM_CPU_DEVICES" in env):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", n)
  return True


def _maybe_initialize_distributed() -> None:
  args = distributed_args(os.environ)
  if args is not None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(**args)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # TensorFlow (for clu's writers and TFDS) must not take the accelerator from JAX.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  config = _CONFIG.value
  set_cpu_devices(int(config.train.cpu_devices), os.environ)
  _maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from nlmm_jax import host_memory  # pylint: disable=g-import-not-at-top
  from nlmm_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  logging.info("Host allocator: %s", "glibc malloc with transparent huge pages "
               "(GLIBC_TUNABLES; NLMM_HUGEPAGE_MALLOC=0 to leave it)"
               if host_memory.hugepages_on() else "as started")
  logging.info("Config:\n%s", config)
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(config, _WORKDIR.value)
    else:
      train.evaluate_checkpoint(config, _WORKDIR.value)
  except USER_ERRORS as e:
    # Bad input (config, files, a diverged run) gets its message, not a traceback; the
    # traceback stays available at --verbosity=1.
    logging.debug("traceback:", exc_info=True)
    sys.stderr.write(f"error: {e}\n")
    _exit(1)
  except Exception:  # a bug: its traceback, then the same prompt exit with several processes
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    _exit(1)


def _exit(code: int) -> None:
  """sys.exit, or with several processes os._exit once the output is flushed.

  sys.exit would run jax.distributed's shutdown, which waits for every other process:
  those still training or waiting in a collective would keep this one (and the job)
  hanging. Files are already closed (metrics are appended line by line, TensorBoard was
  flushed, orbax commits a checkpoint by renaming it), so nothing written is lost; the
  launcher or cluster scheduler then ends the others.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with a bare `--config=NAME` replaced by the packaged file's path.

  config_flags loads `--config`'s value as a file path (relative to the working
  directory) while parsing flags, so a name is turned into a path before `app.run`:
  `--config=demo` (or `--config demo`) becomes `--config=<CONFIG_DIR>/demo.py`; a value
  that is an existing file (`configs/demo.py` in a clone) is kept; a `:arg` suffix
  (config_flags' get_config argument) is kept. `--config.x=y` overrides are untouched (they
  are read from sys.argv, not from this value). A name or path that does not exist raises
  FileNotFoundError listing the names (config_flags would defer that error to the first
  use of the config). Not rewritten: a --config given inside a --flagfile.
  """
  from nlmm_jax import config_lib  # pylint: disable=g-import-not-at-top
  out = list(argv)
  i = 1
  while i < len(out):
    arg = out[i]
    if arg == "--":
      break
    for prefix in ("--config=", "-config="):
      if arg.startswith(prefix):
        out[i] = prefix + _resolve_config_value(arg[len(prefix):], config_lib)
        break
    else:
      if arg in ("--config", "-config") and i + 1 < len(out):
        out[i + 1] = _resolve_config_value(out[i + 1], config_lib)
        i += 1
    i += 1
  return out


def _resolve_config_value(value: str, config_lib) -> str:
  if os.path.isfile(value):
    return value
  path, sep, rest = value.partition(":")
  return os.fspath(config_lib.config_path(path)) + sep + rest


def run() -> None:
  """The command line: huge pages for XLA's host buffers (`host_memory`: re-executes this
  command once where they apply), a bare --config name resolved, then app.run(main)."""
  from nlmm_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_hugepages()
  try:
    sys.argv = resolve_config_argv(sys.argv)
  except FileNotFoundError as e:
    sys.stderr.write(f"error: --config: {e}\n")
    sys.exit(1)
  app.run(main)


if __name__ == "__main__":
  run()
