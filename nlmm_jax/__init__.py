"""NL-MM in JAX/Flax: tri-modal retrieval from Nested Learning blocks."""

import os as _os

__version__ = "0.1.0"

# XLA's CPU backend (jaxlib 0.10.2) can stall forever executing the backward pass of the
# chunked delta-rule memory (scans inside scans) under its concurrency-optimised
# scheduler; the default scheduler runs it. The flag is read when JAX starts its CPU
# backend, so it is appended here, before any backend exists; it does not affect GPUs.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


def load(path, step="best", batch_size=32, *, ttt_steps=None, ttt_lr=None, ttt_rank=None):
  """A trained model from a workdir or checkpoint (see `nlmm_jax.api.load`); ttt_*:
  test-time training settings (default: the checkpoint config's `ttt`, off)."""
  from nlmm_jax import api  # pylint: disable=g-import-not-at-top  (jax imports lazily)
  return api.load(path, step=step, batch_size=batch_size, ttt_steps=ttt_steps,
                  ttt_lr=ttt_lr, ttt_rank=ttt_rank)
