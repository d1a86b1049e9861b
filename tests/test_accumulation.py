"""`train.accum_steps`: gradient caching (Gao et al. 2021) gives the full-batch gradient.

The tiny demo model (tests/tiny_run.py, recurrent fast-weight form for compile time, no
dropout) on the 2-device data mesh of conftest, a batch of 8 rows with all three
modalities. Gradients come from `train.compute_grads`, the function the train step calls.
"""

import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from nlmm_jax import config_lib
from nlmm_jax import train
from nlmm_jax.models import nlmm
from nlmm_jax.optim import levels

from tiny_run import TINY_OVERRIDES  # pylint: disable=g-bad-import-order

BATCH = 8
RTOL = 1e-5       # all parameters: |g_accum - g_full| <= RTOL |g_full| (L2 norms)
LEAF_RTOL = 1e-4  # each parameter alone (a small sum of cancelling terms rounds worse)


def random_batch(model_cfg, seed: int, rows: int) -> dict:
  """Random inputs of the config's shapes (numpy), text and audio of random lengths."""
  rng = np.random.default_rng(seed)
  b = nlmm.example_batch(model_cfg, batch_size=rows)
  b["image"] = rng.normal(size=b["image"].shape).astype(np.float32)
  b["text"] = rng.integers(2, model_cfg.vocab_size, size=b["text"].shape).astype(np.int32)
  b["audio"] = rng.normal(size=b["audio"].shape).astype(np.float32)
  b["text_mask"] = np.arange(model_cfg.max_text_len) < rng.integers(
      3, model_cfg.max_text_len + 1, size=(rows, 1))
  b["audio_mask"] = np.arange(model_cfg.max_frames) < rng.integers(
      8, model_cfg.max_frames + 1, size=(rows, 1))
  return b


@pytest.fixture(scope="module")
def env():
  """Config, model, params, the 2-device mesh and a sharded batch of BATCH rows."""
  assert jax.device_count() == 2
  c = config_lib.load_config("demo", TINY_OVERRIDES + ["model.memory.form=recurrent",
                                                       "model.dropout=0.0"])
  c.train.batch_size = BATCH
  model = nlmm.build_model(c.model, c.loss)
  mesh = train.make_mesh(c)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), nlmm.example_batch(c.model))["params"]
  host = random_batch(c.model, 0, BATCH)
  return dict(config=c, model=model, mesh=mesh, params=params, host=host,
              batch=train.to_global(host, train.batch_sharding(mesh)))


def grads_fn(env, accum_steps):
  """`train.compute_grads` jitted on the mesh (params replicated, batch sharded)."""
  fn = functools.partial(train.compute_grads, model=env["model"],
                         loss_cfg=env["config"].loss, accum_steps=accum_steps)
  return jax.jit(fn, in_shardings=(NamedSharding(env["mesh"], P()),
                                   train.batch_sharding(env["mesh"]), None))


def global_error(got, want) -> float:
  """|got - want| / |want| over all leaves together (L2)."""
  diff = sum(np.sum(np.square(np.asarray(g, np.float64) - np.asarray(w, np.float64)))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  return float(np.sqrt(diff / sum(np.sum(np.square(np.asarray(w, np.float64)))
                                  for w in jax.tree.leaves(want))))


def relative_errors(got, want) -> dict:
  """{parameter path: |got - want| / |want|} (L2 norms; 1e-12 guards zero gradients)."""
  flat = jax.tree_util.tree_flatten_with_path(want)[0]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  return {jax.tree_util.keystr(path): float(np.linalg.norm(np.asarray(g) - np.asarray(w))
                                            / (np.linalg.norm(np.asarray(w)) + 1e-12))
          for (path, w), g in zip(flat, jax.tree.leaves(got))}


def compiled_grads(env, accum_steps):
  """(compiled `grads_fn`, {(collective op, result shape)} of its program)."""
  compiled = grads_fn(env, accum_steps).lower(env["params"], env["batch"],
                                              jax.random.PRNGKey(1)).compile()
  found = re.findall(r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|"
                     r"reduce-scatter)(?:-start)?\(", compiled.as_text())
  return compiled, {(op, shape.split("{")[0]) for shape, op in found}


@pytest.fixture(scope="module")
def full(env):
  """((loss, metrics, logit_scale, grads) of the whole batch with accum_steps = 1, the
  collectives of that program)."""
  compiled, collectives = compiled_grads(env, 1)
  return jax.device_get(compiled(env["params"], env["batch"],
                                 jax.random.PRNGKey(1))), collectives


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_cached_gradient_equals_full_batch(env, full, accum_steps):
  """accum_steps = 2, 4 (micro-batches of 4 and 2 rows, one per device and micro-batch
  at 4): the loss equals the full batch's and the gradient too, to 1e-5 relative over
  all parameters (measured 1.3e-6 and 1.5e-6) and 1e-4 for each parameter alone
  (measured <= 2.4e-6; up to 1.1e-5 on other random inputs), log_logit_scale included. The program moves no batch rows
  between devices: its collectives are among the full-batch program's (the loss's
  gathers of the embeddings), as the strided micro-batches are local to each device's
  block of rows (with contiguous ones XLA all-gathers every input)."""
  full, full_collectives = full
  compiled, collectives = compiled_grads(env, accum_steps)
  assert full_collectives and collectives <= full_collectives, (
      collectives - full_collectives)
  loss, metrics, scale, grads = jax.device_get(
      compiled(env["params"], env["batch"], jax.random.PRNGKey(1)))
  np.testing.assert_allclose(loss, full[0], rtol=1e-6)
  assert sorted(metrics) == sorted(full[1]) == [
      "loss/image_audio", "loss/image_text", "loss/text_audio"]
  np.testing.assert_allclose(scale, full[2], rtol=0)
  error = global_error(grads, full[3])
  assert error <= RTOL, error
  errors = relative_errors(grads, full[3])
  worst = max(errors, key=errors.get)
  assert errors[worst] <= LEAF_RTOL, (worst, errors[worst])
  assert abs(float(full[3]["log_logit_scale"])) > 1e-3  # the loss's own parameter counts


def test_plain_accumulation_differs(env, full):
  """The mean of per-micro-batch gradients (each micro-batch's loss with only its own
  rows as negatives) is another gradient: far outside the tolerances above (measured:
  0.60 relative over all parameters, median 0.40 per parameter), so the equality test
  can fail."""
  full = full[0]
  k = 2
  jitted = grads_fn(env, 1)
  sharding = train.batch_sharding(env["mesh"])
  parts = [jitted(env["params"], train.to_global({key: v[j::k] for key, v in
                                                   env["host"].items()}, sharding),
                  jax.random.PRNGKey(1))[3] for j in range(k)]
  plain = jax.device_get(jax.tree.map(lambda *g: sum(g) / k, *parts))
  error = global_error(plain, full[3])
  assert error > 1000 * RTOL, error
  errors = relative_errors(plain, full[3])
  assert np.median(list(errors.values())) > 100 * LEAF_RTOL, sorted(errors.values())[::10]


def test_train_step_with_accumulation_equals_full_batch(env):
  """One train step (SGD with momentum on every label, the CMS levels' MultiSteps
  included) with accum_steps = 2 gives the new parameters and optimizer state of
  accum_steps = 1, with the same step counter and RNG key. Images and text only (the
  audio encoder's compile time; its gradients are compared above)."""
  c = env["config"]
  c = config_lib.ConfigDict(c.to_dict())
  # SGD, constant lr, no clipping: an update linear in the gradient (see test_train).
  c.optim.optimizer, c.optim.warmup_steps, c.optim.clip_norm = "sgd", 0, 0.0
  for lvl in c.model.cms.levels.values():
    lvl.optimizer = "sgd"
  tx = levels.build_optimizer(c)
  mesh = env["mesh"]
  p0 = jax.device_get(env["params"])
  start = train.TrainState(step=jnp.zeros((), jnp.int32), params=env["params"],
                           opt_state=jax.jit(tx.init)(env["params"]),
                           rng=jax.random.PRNGKey(0))
  shardings = train.state_sharding(start, mesh)
  batch = {k: v for k, v in env["batch"].items() if not k.startswith("audio")}
  new = {}
  for k in (1, 2):
    step = jax.jit(functools.partial(train.train_step, model=env["model"], tx=tx,
                                     loss_cfg=c.loss, accum_steps=k),
                   in_shardings=(shardings, train.batch_sharding(mesh)),
                   out_shardings=(shardings, None))
    state, metrics = step(start, batch)
    assert bool(metrics["finite"]) and int(state.step) == 1
    new[k] = jax.device_get(state)
  np.testing.assert_array_equal(new[1].rng, new[2].rng)
  delta = lambda s: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s.params, p0)
  errors = relative_errors(delta(new[2]), delta(new[1]))
  assert max(errors.values()) <= 1e-4, max(errors.items(), key=lambda kv: kv[1])
  # The optimizer state too: momenta, and the mid/slow levels' MultiSteps accumulators
  # (which hold this step's gradient until their window ends).
  errors = relative_errors(new[2].opt_state, new[1].opt_state)
  assert max(errors.values()) <= 1e-4, max(errors.items(), key=lambda kv: kv[1])
  held = [jax.tree_util.keystr(p) for p, x in
          jax.tree_util.tree_flatten_with_path(new[1].opt_state)[0] if np.any(x != 0)]
  assert any("acc_grads" in p for p in held), "no accumulator holds a gradient"
  moved = [p for p, e in relative_errors(new[1].params, p0).items() if e > 0]
  assert any("cms_fast" in p for p in moved), "the step did not update the parameters"


def test_accum_steps_config_errors():
  """The default is 1; a value that does not divide the batch, or leaves micro-batches
  that do not split over the devices, is a ValueError naming what to change."""
  assert config_lib.base_config().train.accum_steps == 1
  c = config_lib.load_config("demo", ["train.batch_size=8", "train.accum_steps=4",
                                      "train.total_steps=3"])
  assert train._check_config(c, steps_per_epoch=10) == 3  # 8 / 4 = 2 rows, 2 devices
  c.train.accum_steps = 3
  with pytest.raises(ValueError, match=r"train.accum_steps=3 must divide "
                                       r"train.batch_size=8"):
    train._check_config(c, steps_per_epoch=10)
  c.train.accum_steps = 8
  with pytest.raises(ValueError, match=r"micro-batches of 8 / 8 = 1 rows, not divisible by "
                                       r"the 2 devices.*divisor of 4"):
    train._check_config(c, steps_per_epoch=10)
  c.train.accum_steps = 0
  with pytest.raises(ValueError, match="must be >= 1"):
    train._check_config(c, steps_per_epoch=10)
  with pytest.raises(ValueError, match="divide the batch's 8 rows"):
    train.compute_grads({}, {"image": np.zeros((8, 2))}, None, model=None, loss_cfg=None,
                        accum_steps=3)
