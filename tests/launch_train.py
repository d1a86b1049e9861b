"""The training job's command line (`nlmm_jax.main`), with faults to inject, for
tests/test_multiprocess.py (run by nlmm_jax.launch as `--module=launch_train`).

  NLMM_TEST_SIGTERM=<process>:<batch>  that process sends itself SIGTERM (a preemption
                                       notice) when it fetches its <batch>-th batch
                                       (1-based, counted from this start);
  NLMM_TEST_SIGKILL=<process>:<step>   that process kills itself with SIGKILL (a crash:
                                       no cleanup) once its checkpoint of <step> is
                                       committed.
"""

import os
import signal

from nlmm_jax import checkpointing
from nlmm_jax import main
from nlmm_jax.data import pipeline

from batch_hooks import AtBatch  # pylint: disable=g-bad-import-order


def _fault(name):
  value = os.environ.get(name)
  if not value:
    return None
  process, at = value.split(":")
  return int(process), int(at)


def _process_index() -> int:
  return int(os.environ.get("JAX_PROCESS_ID", "0"))


def _install_faults():
  sigterm, sigkill = _fault("NLMM_TEST_SIGTERM"), _fault("NLMM_TEST_SIGKILL")
  if sigterm and sigterm[0] == _process_index():
    make_iterator = pipeline.train_iterator
    def sigterm_self(batch):
      os.kill(os.getpid(), signal.SIGTERM)
      return batch
    pipeline.train_iterator = lambda *a, **k: AtBatch(make_iterator(*a, **k), sigterm[1],
                                                      sigterm_self)
  if sigkill and sigkill[0] == _process_index():
    save = checkpointing.save

    def killing_save(manager, step, *args, **kwargs):
      out = save(manager, step, *args, **kwargs)
      if step == sigkill[1]:
        manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
      return out
    checkpointing.save = killing_save


if __name__ == "__main__":
  _install_faults()
  main.run()
