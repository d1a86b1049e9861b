"""The training job end to end on a tiny demo corpus: files, resume, sharding, orbax."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlmm_jax import train

from batch_hooks import AtBatch  # pylint: disable=g-bad-import-order
from tiny_run import tiny_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tiny_corpus):
  """The session's 20-image demo corpus and its cache (tests/conftest.py)."""
  return tiny_corpus


@pytest.fixture(scope="module")
def finished_run(tiny_job):
  """(workdir, config, test metrics, saved) of the session's 4-step job (conftest)."""
  return tiny_job


def _rsum_key(metrics):
  """`rsum` is being renamed `rsum_all` (all 18 recalls): accept whichever exists."""
  return "rsum_all" if "rsum_all" in metrics else "rsum"


def test_job_writes_everything(finished_run):
  """Config, metrics files, plot, test metrics, checkpoints and TensorBoard scalars."""
  workdir, c, test_metrics, _ = finished_run
  assert json.load(open(workdir / "config.json"))["train"]["total_steps"] == 4
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [(l["step"], l["split"]) for l in lines] == [(2, "dev"), (4, "dev"), (4, "test")]
  dev = json.load(open(workdir / "eval_dev.json"))
  rsum = _rsum_key(dev)
  r_keys = [f"{d}_R@{k}" for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")
            for k in (1, 5, 10)]
  for key in r_keys + ["mean_R@1", "mean", rsum]:
    assert key in dev and 0.0 <= dev[key] <= (1800 if key == rsum else 100), key
  assert dev[rsum] == pytest.approx(sum(dev[k] for k in r_keys))
  assert os.path.getsize(workdir / "training_progress.png") > 10_000
  assert rsum in test_metrics and (workdir / "eval_test.json").exists()
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
              "train/grad_norm", "train/examples_per_sec", "lr/default", f"eval_dev/{rsum}"):
    assert tag in tags, (tag, tags)
  losses = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")]
  assert len(losses) == 4 and all(np.isfinite(losses))
  logged = [float(tensor_util.make_ndarray(e.tensor_proto))
            for e in acc.Tensors(f"eval_dev/{rsum}")]
  assert logged[-1] == pytest.approx(dev[rsum], rel=1e-5)


def _by_path(tree):
  """{('opt_state', 'inner_states', 'mid', ...): leaf}: one key per leaf, the same for a
  typed tree (dataclass, optax NamedTuples) and the plain dicts orbax restores it as."""
  def name(k):
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {tuple(name(k) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_equal(got, want, what):
  got, want = _by_path(got), _by_path(want)
  assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:10])
  for path, w in want.items():
    assert got[path].dtype == w.dtype and got[path].shape == w.shape, (what, path)
    np.testing.assert_array_equal(got[path], w, err_msg=f"{what} {path}")


def test_plain_orbax_restore(finished_run):
  """The README's snippet: a checkpoint restores with plain orbax, no project code, and
  holds exactly the state the job had at that step.

  Compared leaf by leaf, bit for bit, with a host copy taken when the job called save:
  params, the whole optimizer state (every label's moments and count, the MultiSteps
  accumulators and counters of the mid/slow CMS levels), step, the RNG key, the grain
  iterator state and the config. Catches: whatever `checkpointing.save` writes other
  than what the job handed it (a sub-tree dropped or replaced, a dtype cast, another
  iterator state or config); a state of another step (the counter must read 4); and,
  in the second half, `checkpointing.restore` taking a field from its target instead
  of the disk, or losing the optax types. Not here: a loop handing save a wrong state
  with the right counter (the resume test sees its effects)."""
  workdir, c, _, saved = finished_run
  import orbax.checkpoint as ocp
  from nlmm_jax import checkpointing
  mngr = ocp.CheckpointManager(str(workdir / "checkpoints"))
  step = mngr.latest_step()
  assert step == 4 and sorted(saved) == [2, 4]
  restored = mngr.restore(step)
  want = saved[step]
  assert int(restored["state"]["step"]) == int(want["state"].step) == 4
  assert restored["config"]["model"]["width"] == 32
  assert restored["config"] == want["config"]
  assert restored["data"] == want["data"]
  _assert_trees_equal(restored["state"]["params"], want["state"].params, "params")
  _assert_trees_equal(restored["state"]["opt_state"], want["state"].opt_state, "opt_state")
  _assert_trees_equal(restored["state"]["rng"], want["state"].rng, "rng")
  _assert_trees_equal(restored["state"], want["state"], "state")  # nothing else either
  # The key the job carries moves on every step (else dropout repeats its masks).
  assert not np.array_equal(saved[2]["state"].rng, saved[4]["state"].rng)
  assert sum(np.size(x) for x in jax.tree.leaves(want["state"].params)) > 1000
  mngr.close()

  # The project's restore (typed target) gives the same values with the optax types.
  # The target is all zeros: a field taken from the target instead of the disk shows.
  manager = checkpointing.make_manager(str(workdir), c, read_only=True)
  typed, _ = checkpointing.restore(manager, step, jax.tree.map(np.zeros_like, want["state"]))
  manager.close()
  assert jax.tree.structure(typed) == jax.tree.structure(want["state"])
  _assert_trees_equal(typed, want["state"], "checkpointing.restore")


CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from absl import flags, logging
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO)
    import ml_collections
    import orbax.checkpoint as ocp
    from nlmm_jax import checkpointing, train
    cfg = ml_collections.ConfigDict(json.load(open(sys.argv[1])))
    workdir, kill_at, when = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if when == "after_save":
      save = checkpointing.save
      def killing_save(manager, step, *args, **kwargs):
        out = save(manager, step, *args, **kwargs)
        if step == kill_at:
          manager.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks
        return out
      checkpointing.save = killing_save
    elif when == "during_save":
      # Killed from orbax's background commit thread at the last moment of the save:
      # every item of step `kill_at` written into its temporary directory, the rename
      # that commits the step not yet done.
      atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
      finalize = atomic.finalize
      async def killing_finalize(self, *args, **kwargs):
        if self.get_final().name == str(kill_at):
          os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *args, **kwargs)
      atomic.finalize = killing_finalize
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


@pytest.mark.slow
def test_exact_resume_after_sigkill(corpus, tmp_path):
  """4 steps straight == 2 steps, SIGKILL, resume; then a kill inside the async save of
  step 4 (the torn checkpoint is ignored) and a second resume.

  Dropout is on, so a resume that does not restore the RNG key (or a step that does not
  advance it) changes the result. A SIGKILL right after `manager.save` returns is not
  reliably mid-save (checked with orbax 0.12.8 on a small save: in one of three tries
  the kill came before the step's temporary directory existed, so nothing was torn):
  the child kills itself inside orbax's commit instead (see CHILD), always mid-save."""
  cfg = tiny_config(corpus / "corpus", corpus / "cache")
  cfg.model.dropout = 0.1
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
  # What the kill left: step 2 committed; step 4 only as orbax's temporary directory
  # (`4.orbax-checkpoint-tmp...`) with its items written but no commit marker.
  ckpt = killed / "checkpoints"
  entries = sorted(os.listdir(ckpt))
  assert "2" in entries and "4" not in entries, entries
  assert (ckpt / "2" / "commit_success.txt").exists()
  torn = [e for e in entries if e.startswith("4.") and "tmp" in e]
  assert len(torn) == 1, entries
  assert not (ckpt / torn[0] / "commit_success.txt").exists()
  assert any(n.startswith("state") for n in os.listdir(ckpt / torn[0])), (
      os.listdir(ckpt / torn[0]))  # the save had started writing the state
  r = _run_child(cfg, killed)  # the same command again: resumes at 2 again, finishes
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from" in r.stderr and "step 2" in r.stderr

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


def _random_batch(model_cfg, seed, batch_size=4):
  """A batch of random inputs (its own for each seed), some text/audio padding."""
  from nlmm_jax.models import nlmm
  rng = np.random.default_rng(seed)
  b = nlmm.example_batch(model_cfg, batch_size=batch_size)
  b["image"] = rng.normal(size=b["image"].shape).astype(np.float32)
  b["text"] = rng.integers(2, model_cfg.vocab_size, size=b["text"].shape).astype(np.int32)
  for i, n in enumerate(rng.integers(3, model_cfg.max_text_len + 1, size=batch_size)):
    b["text_mask"][i, n:] = False
  b["audio"] = rng.normal(size=b["audio"].shape).astype(np.float32)
  for i, n in enumerate(rng.integers(8, model_cfg.max_frames + 1, size=batch_size)):
    b["audio_mask"][i, n:] = False
  return b


STEPS = 16  # the slow CMS level's period in the base config: every level updates


@pytest.fixture(scope="module")
def step_env(corpus):
  """The tiny model with SGD on every label and no clipping, and `env.step(n)`: the
  job's jitted train step (donated state) over an n-device data mesh, compiled once per
  mesh and shared by the tests below."""
  from nlmm_jax.models import nlmm
  from nlmm_jax.optim import levels
  import functools
  c = tiny_config(corpus / "corpus", corpus / "cache")
  c.train.total_steps = STEPS
  # Plain SGD: an update linear in the gradient (Adam's first step is ~lr*sign(g), which
  # turns float rounding in near-zero gradients into lr-sized differences). No clipping:
  # a clipped update hides the gradient's scale, e.g. a sum over devices instead of the
  # mean. lr 0.01 (momentum 0.9): updates far above the float32 rounding of the
  # parameters, yet no chaotic growth of rounding differences over 16 steps (0.05 has it).
  c.optim.optimizer, c.optim.clip_norm, c.optim.lr = "sgd", 0.0, 0.01
  periods = {name: int(lvl.update_every) for name, lvl in c.model.cms.levels.items()}
  assert sorted(periods.values()) == [1, 4, 16], periods
  for lvl in c.model.cms.levels.values():
    lvl.optimizer, lvl.lr = "sgd", 0.01
  model = nlmm.build_model(c.model, c.loss)
  tx = levels.build_optimizer(c)
  init_fn = train.make_init_fn(model, tx, c)
  compiled = {}

  def step(n):
    if n not in compiled:
      c.train.mesh.data = n
      mesh = train.make_mesh(c, jax.devices()[:n])
      shardings = train.state_sharding(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh)
      fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, loss_cfg=c.loss),
                   in_shardings=(shardings, train.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=(0,))
      init = jax.jit(init_fn, out_shardings=shardings)
      compiled[n] = (init, fn, train.batch_sharding(mesh))
    return compiled[n]

  class Env:
    pass
  env = Env()
  env.config, env.step, env.periods = c, step, periods
  return env


def test_two_device_step_equals_one_device(step_env):
  """16 steps on a 2-device data mesh == the same 16 steps on one device.

  The updates (p_16 - p_0) agree to a relative 1e-3 for every parameter, and every CMS
  level (fast, mid, slow: periods 1, 4, 16) has moved, so the comparison covers the
  MultiSteps levels too. No clipping and a per-step batch: gradients summed over the
  devices instead of averaged double every update and fail here."""
  assert jax.device_count() == 2
  c = step_env.config
  batches = [_random_batch(c.model, seed) for seed in range(STEPS)]
  results = []
  for n in (1, 2):
    init, step, sharding = step_env.step(n)
    state = init(jax.random.PRNGKey(0))
    p0 = jax.device_get(state.params)
    losses = []
    for batch in batches:
      gbatch = train.to_global(batch, sharding)
      assert len(gbatch["image"].sharding.device_set) == n
      state, metrics = step(state, gbatch)
      assert bool(metrics["finite"])
      losses.append(float(metrics["loss"]))
    assert int(state.step) == STEPS
    p = jax.device_get(state.params)
    results.append((jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p, p0), losses))
  (d1, l1), (d2, l2) = results
  np.testing.assert_allclose(l2, l1, rtol=1e-4)
  moved = {name: 0 for name in step_env.periods}
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(d1)[0], jax.tree.leaves(d2)):
    where = jax.tree_util.keystr(path)
    scale = np.linalg.norm(a)
    # Measured: relative differences <= 2e-4. The absolute 1e-7 is for parameters with
    # no gradient (attention key biases: their updates are float noise, ~1e-9).
    assert np.linalg.norm(b - a) <= 1e-3 * scale + 1e-7, (where, np.linalg.norm(b - a), scale)
    for name in moved:
      if f"cms_{name}" in where:
        assert scale > 0, f"{where}: the {name} CMS level never updated"
        moved[name] += 1
  assert all(moved.values()), moved


def test_train_step_skips_non_finite_update(step_env):
  """A batch with a NaN image: the step reports `finite` False and the state comes back
  bit-identical (params, every optimizer buffer incl. the mid/slow levels' MultiSteps
  accumulators and counters, step); the next finite batch trains normally and moves
  the RNG key on. Guards the `jnp.where(finite, new, old)` in train.train_step."""
  c = step_env.config
  init, step, sharding = step_env.step(2)
  state = init(jax.random.PRNGKey(0))
  for seed in range(2):            # mid-window for the mid and slow levels
    state, metrics = step(state, train.to_global(_random_batch(c.model, seed), sharding))
    assert bool(metrics["finite"])
  before = jax.device_get(state)
  bad = _random_batch(c.model, 2)
  bad["image"][1, 3, 5, 0] = np.nan
  state, metrics = step(state, train.to_global(bad, sharding))
  assert not bool(metrics["finite"])
  assert not np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) == 2
  _assert_trees_equal(after.params, before.params, "params")
  _assert_trees_equal(after.opt_state, before.opt_state, "opt_state")
  assert any(np.any(x != 0) for p, x in _by_path(before.opt_state).items()
             if "mid" in p and "acc_grads" in p), "no accumulator to protect"

  state, metrics = step(state, train.to_global(_random_batch(c.model, 3), sharding))
  good = jax.device_get(state)
  assert bool(metrics["finite"]) and int(good.step) == 3
  assert not np.array_equal(good.rng, after.rng)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good.params),
                                                     jax.tree.leaves(after.params)))


def test_fsdp_mesh_shards_parameters(corpus):
  c = tiny_config(corpus / "corpus", corpus / "cache")
  c.train.mesh.data, c.train.mesh.fsdp = 1, 2
  mesh = train.make_mesh(c)
  tree = {"w": jax.ShapeDtypeStruct((6, 32), jnp.float32),
          "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  sh = train.state_sharding(tree, mesh)
  assert sh["w"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert sh["b"].spec == jax.sharding.PartitionSpec()


def _nan_image(batch):
  """The batch with every image NaN."""
  batch = dict(batch)
  assert np.issubdtype(batch["image"].dtype, np.floating), batch["image"].dtype
  batch["image"] = np.full_like(batch["image"], np.nan)
  return batch


def test_non_finite_loss_stops_with_message(corpus, tmp_path, monkeypatch):
  """A NaN batch at step 3 stops the job with a message naming the step and the last
  good checkpoint (step 2); that checkpoint exists, restores with plain orbax and holds
  finite parameters."""
  import orbax.checkpoint as ocp
  from nlmm_jax.data import pipeline
  # total_steps 4, the tiny job's: the same train step as the session's other tiny runs,
  # so the session's compilation cache serves it (the learning-rate schedule is compiled
  # in); the NaN at step 3 stops the job first.
  c = tiny_config(corpus / "corpus", corpus / "cache", total_steps=4, eval_every=100,
                  checkpoint_every=2)
  make_iter = pipeline.train_iterator
  monkeypatch.setattr(pipeline, "train_iterator",
                      lambda *a, **k: AtBatch(make_iter(*a, **k), 3, _nan_image))
  with pytest.raises(train.NonFiniteLossError,
                     match=r"step 3.*Last good checkpoint: step 2 in \S+") as info:
    train.train_and_evaluate(c, str(tmp_path / "nan"))
  good, where = re.search(r"Last good checkpoint: step (\d+) in (\S+)",
                          str(info.value)).groups()
  assert os.path.isdir(where) and os.path.samefile(where, tmp_path / "nan" / "checkpoints")
  mngr = ocp.CheckpointManager(where)
  assert mngr.latest_step() == int(good) == 2
  restored = mngr.restore(int(good))
  mngr.close()
  assert int(restored["state"]["step"]) == 2
  leaves = jax.tree.leaves(restored["state"]["params"])
  assert leaves and all(np.isfinite(x).all() for x in leaves)


def test_bad_mesh_config_is_explained(corpus):
  c = tiny_config(corpus / "corpus", corpus / "cache")
  c.train.mesh.fsdp = 3
  with pytest.raises(ValueError, match="fsdp"):
    train.make_mesh(c)


def test_non_finite_embeddings_stop_the_job(corpus, tmp_path, monkeypatch):
  """A NaN embedding at a dev evaluation stops the run (no checkpoint of that state) with
  the modality, the count and the last good checkpoint, as a non-finite loss does."""
  from nlmm_jax import evaluate
  # total_steps 4 as in the test above (the compilation cache); the job stops at step 2.
  c = tiny_config(corpus / "corpus", corpus / "cache", total_steps=4, eval_every=2)
  embed_all = evaluate.embed_all

  def nan_text(*args, **kwargs):
    embs, ids = embed_all(*args, **kwargs)
    embs["text"][1] = np.nan
    return embs, ids

  monkeypatch.setattr(evaluate, "embed_all", nan_text)
  with pytest.raises(evaluate.NonFiniteEmbeddingError,
                     match=r"eval dev at step 2: .*text: 1 of \d+ rows.*Last good checkpoint: "
                           r"none yet"):
    train.train_and_evaluate(c, str(tmp_path / "nan_eval"))
  assert not glob.glob(str(tmp_path / "nan_eval" / "checkpoints" / "2"))
