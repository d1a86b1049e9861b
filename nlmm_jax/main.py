"""Entry point: `python -m nlmm_jax.main --config=configs/small.py --workdir=DIR`.

  --config             a config file (configs/*.py); override keys with
                       --config.train.total_steps=100 (an unknown key is an error)
  --workdir            checkpoints, TensorBoard events, metrics and plots; rerunning
                       with the same workdir resumes
  --mode               train (default) | eval (best checkpoint, or config.init_from, on test)

Multi-host: each process runs the same command; `jax.distributed.initialize()` is called
when the environment describes several processes (cluster auto-detection: SLURM, TPU
pods, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ
  explicit = "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env
  cluster = any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                   "OMPI_COMM_WORLD_SIZE"))
  if explicit:
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env.get("JAX_PROCESS_ID", "0")))
  elif cluster and int(env.get("SLURM_NTASKS", env.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # TensorFlow (for clu's writers and TFDS) must not take the accelerator from JAX.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  _maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from nlmm_jax import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  logging.info("Config:\n%s", config)
  if _MODE.value == "train":
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    train.evaluate_checkpoint(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
