"""Test setup: two CPU devices (sharded code), absl flags parsed (grain workers)."""

import os

# Must run before jax initialises its backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for this process's session, empty at its start: most
# tests compile the same tiny model, and a train-then-resume test compiled its step twice
# (69 s -> 29 s measured for one such test with the cache warm). Set here, not through
# the environment: processes the tests start do not share it (a two-process job sharing
# it aborted process 1 on SIGTERM in the preemption test; not investigated further).
_OWN_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # noqa: E402
  _OWN_JAX_CACHE = tempfile.mkdtemp(prefix="nlmm_test_jax_cache_")

from absl import flags  # noqa: E402

# grain 0.2.18 worker processes read absl flags (upstream grain #1355).
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
if _OWN_JAX_CACHE is not None:
  jax.config.update("jax_compilation_cache_dir", _OWN_JAX_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)

import pytest  # noqa: E402

import tiny_run  # noqa: E402  pylint: disable=g-bad-import-order


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_JAX_CACHE is not None:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(_OWN_JAX_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  """A 20-image demo corpus and its feature cache: base / {corpus, cache}."""
  from nlmm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("tiny_demo")
  pipeline.prepare(tiny_run.tiny_config(base / "corpus", base / "cache"))
  return base


@pytest.fixture(scope="session")
def tiny_job(tiny_corpus, tmp_path_factory):
  """The tiny job trained 4 steps (checkpoints at 2 and 4), run once per session:
  (workdir, config, test metrics, saved), `saved` a host copy of what each
  `checkpointing.save` was handed (state, data-iterator state, config) at the moment of
  the save, the reference the checkpoints on disk are compared with. Read-only: tests
  that write into a trained workdir use `tiny_trained`, a copy."""
  import json  # pylint: disable=g-import-not-at-top
  from nlmm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from nlmm_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("tiny_job") / "run"
  config = tiny_run.tiny_config(tiny_corpus / "corpus", tiny_corpus / "cache")
  saved = {}
  save = checkpointing.save

  def recording_save(manager, step, state, data_iter, cfg, *args, **kwargs):
    saved[int(step)] = dict(state=jax.device_get(state),
                            data=json.loads(json.dumps(data_iter.get_state())),
                            config=json.loads(json.dumps(cfg.to_dict())))
    return save(manager, step, state, data_iter, cfg, *args, **kwargs)

  checkpointing.save = recording_save
  try:
    test_metrics = train.train_and_evaluate(config, str(workdir))
  finally:
    checkpointing.save = save
  return workdir, config, test_metrics, saved


@pytest.fixture(scope="session")
def tiny_trained(tiny_job, tmp_path_factory):
  """(workdir, config): a copy of `tiny_job`'s workdir for the tests that use a trained
  model (API, retrieval, export, notebooks) and may write into it."""
  import shutil  # pylint: disable=g-import-not-at-top
  src, config = tiny_job[0], tiny_job[1]
  workdir = tmp_path_factory.mktemp("tiny_run") / "run"
  shutil.copytree(src, workdir)
  return workdir, config
