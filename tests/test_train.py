"""The training job end to end on a tiny demo corpus: files, resume, sharding, orbax."""

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlmm_jax import config_lib
from nlmm_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(root, cache, **train_overrides):
  c = config_lib.load_config("demo")
  c.data.root = str(root)
  c.data.cache_dir = str(cache)
  c.data.demo_num_images = 20
  c.data.eval_batch_size = 8
  c.model.width, c.model.heads, c.model.mlp_mult = 32, 2, 2
  c.model.num_latents, c.model.embed_dim = 4, 32
  c.model.image_size, c.model.patch_size = 16, 8
  c.model.max_frames, c.model.max_text_len, c.model.vocab_size = 48, 16, 64
  c.model.depth.text = c.model.depth.image = c.model.depth.audio = 1
  c.model.memory.chunk_size = 8
  c.optim.warmup_steps = 1
  c.train.batch_size = 4
  c.train.total_steps = 4
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.progress_bar = False
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A 20-image demo corpus and its cache, shared by the tests of this file."""
  base = tmp_path_factory.mktemp("demo")
  c = tiny_config(base / "corpus", base / "cache")
  from nlmm_jax.data import pipeline
  pipeline.prepare(c)  # generates the corpus and builds the cache once
  return base


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  c = tiny_config(corpus / "corpus", corpus / "cache")
  test_metrics = train.train_and_evaluate(c, str(workdir))
  return workdir, c, test_metrics


def test_job_writes_everything(finished_run):
  workdir, c, test_metrics = finished_run
  assert json.load(open(workdir / "config.json"))["train"]["total_steps"] == 4
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [(l["step"], l["split"]) for l in lines] == [(2, "dev"), (4, "dev"), (4, "test")]
  dev = json.load(open(workdir / "eval_dev.json"))
  r_keys = [f"{d}_R@{k}" for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")
            for k in (1, 5, 10)]
  for key in r_keys + ["mean_R@1", "mean", "rsum"]:
    assert key in dev and 0.0 <= dev[key] <= (1800 if key == "rsum" else 100), key
  assert dev["rsum"] == pytest.approx(sum(dev[k] for k in r_keys))
  assert os.path.getsize(workdir / "training_progress.png") > 10_000
  assert "rsum" in test_metrics and (workdir / "eval_test.json").exists()
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints/*"))
                 if os.path.basename(p).isdigit())
  assert steps and steps[-1] == 4

  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  events = glob.glob(str(workdir / "events.out.tfevents.*"))
  assert events
  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  tags = acc.Tags()["tensors"]
  for tag in ("train/loss", "train/loss/image_text", "train/temperature",
              "train/grad_norm", "train/examples_per_sec", "lr/default", "eval_dev/rsum"):
    assert tag in tags, (tag, tags)
  losses = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")]
  assert len(losses) == 4 and all(np.isfinite(losses))
  rsum = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("eval_dev/rsum")]
  assert rsum[-1] == pytest.approx(dev["rsum"], rel=1e-5)


def test_plain_orbax_restore(finished_run):
  """The README's snippet: a checkpoint restores with plain orbax, no project code."""
  workdir, _, _ = finished_run
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(str(workdir / "checkpoints"))
  restored = mngr.restore(mngr.latest_step())
  params = restored["state"]["params"]
  assert int(restored["state"]["step"]) == 4
  assert restored["config"]["model"]["width"] == 32
  assert sum(np.size(x) for x in jax.tree.leaves(params)) > 1000


CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from absl import flags, logging
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO)
    import ml_collections
    from nlmm_jax import checkpointing, train
    cfg = ml_collections.ConfigDict(json.load(open(sys.argv[1])))
    workdir, kill_at, when = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    save = checkpointing.save
    def killing_save(manager, step, *args, **kwargs):
      out = save(manager, step, *args, **kwargs)
      if step == kill_at:
        if when == "after_save":
          manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks
      return out
    checkpointing.save = killing_save
    train.train_and_evaluate(cfg, workdir)
""")


XLA_CACHE = tempfile.mkdtemp(prefix="nlmm_jax_test_xla_cache_")


def _run_child(cfg, workdir, kill_at=-1, when="after_save"):
  """Runs the job in a fresh process on one CPU device. The children share a persistent
  XLA compilation cache, so only the first compiles. (Two CPU devices running
  executables loaded from that cache have deadlocked in XLA's in-process all-gather;
  sharded equality has its own test below.)"""
  cfg_path = os.path.join(str(workdir) + "_cfg.json")
  with open(cfg_path, "w") as f:
    f.write(cfg.to_json())
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=2", "")
  env["JAX_COMPILATION_CACHE_DIR"] = XLA_CACHE
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return subprocess.run([sys.executable, "-c", CHILD, cfg_path, str(workdir), str(kill_at),
                         when], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=env)


def _final_params(workdir):
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mngr.latest_step()
  return step, mngr.restore(step)["state"]["params"]


def test_exact_resume_after_sigkill(corpus, tmp_path):
  """4 steps straight == 2 steps, SIGKILL, resume; then a kill inside the async save of
  step 4 (the torn checkpoint is ignored) and a second resume."""
  cfg = tiny_config(corpus / "corpus", corpus / "cache")
  straight = tmp_path / "straight"
  r = _run_child(cfg, straight)
  assert r.returncode == 0, r.stderr[-3000:]
  killed = tmp_path / "killed"
  r = _run_child(cfg, killed, kill_at=2, when="after_save")
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  assert not (killed / "eval_test.json").exists()
  r = _run_child(cfg, killed, kill_at=4, when="during_save")  # resumes at 2
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  assert "Resumed from" in r.stderr and "step 2" in r.stderr
  r = _run_child(cfg, killed)  # the same command again: resumes at 2 or 4, finishes
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from" in r.stderr

  s1, p1 = _final_params(str(straight))
  s2, p2 = _final_params(str(killed))
  assert s1 == s2 == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), p1, p2)
  drop = lambda m: {k: v for k, v in m.items() if k != "eval_seconds"}
  m1 = [drop(json.loads(l)) for l in open(straight / "metrics.jsonl")]
  m2 = [drop(json.loads(l)) for l in open(killed / "metrics.jsonl")]
  assert m1 == m2
  t1 = [json.loads(l)["train/loss"] for l in open(straight / "train_metrics.jsonl")]
  t2 = [json.loads(l)["train/loss"] for l in open(killed / "train_metrics.jsonl")]
  assert t1 == t2


def test_two_device_step_equals_one_device(corpus):
  from nlmm_jax.models import nlmm
  from nlmm_jax.optim import levels
  import functools
  assert jax.device_count() == 2
  c = tiny_config(corpus / "corpus", corpus / "cache")
  c.train.total_steps = 10
  # Plain SGD: an update linear in the gradient. (Adam's first step is ~lr*sign(g), which
  # turns float rounding in near-zero gradients into lr-sized differences.)
  c.optim.optimizer = "sgd"
  for lvl in c.model.cms.levels.values():
    lvl.optimizer = "sgd"
  model = nlmm.build_model(c.model, c.loss)
  tx = levels.build_optimizer(c)
  init_fn = train.make_init_fn(model, tx, c)
  rng = np.random.default_rng(0)
  batch = nlmm.example_batch(c.model, batch_size=4)
  batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
  batch["text"] = rng.integers(2, 60, size=batch["text"].shape).astype(np.int32)
  batch["text_mask"][:, 10:] = False
  batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
  batch["audio_mask"][:2, 30:] = False
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    c.train.mesh.data = len(devices)
    mesh = train.make_mesh(c, devices)
    shardings = train.state_sharding(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, loss_cfg=c.loss),
                   in_shardings=(shardings, train.batch_sharding(mesh)),
                   out_shardings=(shardings, None))
    gbatch = train.to_global(batch, train.batch_sharding(mesh))
    assert len(gbatch["image"].sharding.device_set) == len(devices)
    state, metrics = step(state, gbatch)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  (p1, l1), (p2, l2) = results
  assert l1 == pytest.approx(l2, abs=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), p1, p2)


def test_fsdp_mesh_shards_parameters(corpus):
  c = tiny_config(corpus / "corpus", corpus / "cache")
  c.train.mesh.data, c.train.mesh.fsdp = 1, 2
  mesh = train.make_mesh(c)
  tree = {"w": jax.ShapeDtypeStruct((6, 32), jnp.float32),
          "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  sh = train.state_sharding(tree, mesh)
  assert sh["w"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert sh["b"].spec == jax.sharding.PartitionSpec()


def test_non_finite_loss_stops_with_message(corpus, tmp_path):
  c = tiny_config(corpus / "corpus", corpus / "cache", total_steps=6, eval_every=100,
                  checkpoint_every=2)
  c.optim.lr = 1e30  # diverges
  for lvl in c.model.cms.levels.values():
    lvl.lr = 1e30
  with pytest.raises(train.NonFiniteLossError, match=r"step \d+.*Last good checkpoint"):
    train.train_and_evaluate(c, str(tmp_path / "nan"))


def test_bad_mesh_config_is_explained(corpus):
  c = tiny_config(corpus / "corpus", corpus / "cache")
  c.train.mesh.fsdp = 3
  with pytest.raises(ValueError, match="fsdp"):
    train.make_mesh(c)
