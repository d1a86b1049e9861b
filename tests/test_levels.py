"""CMS level routing (nlmm_jax/optim/levels.py): the gated accumulation wrapper.

`every_k` must behave as optax.MultiSteps (the reference, built here from optax and the
documented chain) while running a level's optimizer only on the steps it updates.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlmm_jax import config_lib
from nlmm_jax.optim import anderson as anderson_lib
from nlmm_jax.optim import levels

PERIODS = {"default": 1, "fast": 1, "mid": 4, "slow": 16}
PEAKS = {"default": 0.1, "fast": 0.05, "mid": 0.02, "slow": 0.01}


def _params():
  rng = np.random.default_rng(11)
  shapes = {"cms_fast": {"Dense_0": {"kernel": (3, 2), "bias": (2,)}},
            "block": {"cms_mid": {"Dense_0": {"kernel": (2, 2), "bias": (2,)}},
                      "dense": {"kernel": (3, 3)}},
            "cms_slow": {"Dense_0": {"kernel": (3, 4)}},
            "log_logit_scale": ()}
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _config(optimizer, unwrapped="same"):
  """All labels use `optimizer`; the k = 1 labels (default, fast) `unwrapped` if given."""
  c = config_lib.base_config()
  c.train.total_steps = 64
  o = c.optim
  o.optimizer = optimizer if unwrapped == "same" else unwrapped
  o.lr, o.warmup_steps, o.lr_floor = PEAKS["default"], 8, 0.1
  o.weight_decay, o.clip_norm, o.momentum = 0.05, 0.5, 0.9
  for name, lvl in c.model.cms.levels.items():
    lvl.update_every, lvl.lr = PERIODS[name], PEAKS[name]
    lvl.optimizer = o.optimizer if PERIODS[name] == 1 else optimizer
  return c


def _reference(c):
  """optax.multi_transform over the labels of MultiSteps(every_k_schedule=k,
  clip_by_global_norm -> base optimizer), the base optimizer's schedule counted in
  outer steps (its c-th update at outer step (c + 1) k): levels.py's documented chain,
  with optax's accumulation wrapper. (The clip is levels.py's, compared with optax's
  below, so that rounding differences do not hide the wrapper's.)"""
  o = c.optim
  transforms = {}
  for name, k in PERIODS.items():
    outer = levels.outer_schedule(c, PEAKS[name])
    sched = lambda count, outer=outer, k=k: outer((count + 1) * k)
    mask = levels.weight_decay_mask
    optimizer = o.optimizer if name == "default" else c.model.cms.levels[name].optimizer
    if optimizer == "adamw":
      base = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                         mask=mask)
    elif optimizer == "sgd":
      base = optax.chain(optax.add_decayed_weights(o.weight_decay, mask),
                         optax.sgd(sched, momentum=o.momentum, nesterov=True))
    else:
      a = o.anderson
      base = anderson_lib.anderson(sched, history=a.history, reg=a.reg,
                                   trust_region=a.trust_region, beta=a.beta, b1=a.b1,
                                   b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                   mask=mask)
    inner = optax.chain(levels.clip_by_global_norm(o.clip_norm), base)
    transforms[name] = (inner if k == 1 else
                        optax.MultiSteps(inner, every_k_schedule=k).gradient_transformation())
  names = [n for n in PERIODS if n != "default"]
  return optax.multi_transform(transforms, lambda p: levels.label_params(p, names))


def _assert_states_equal(got, want, n):
  got = {jax.tree_util.keystr(q): x for q, x in jax.tree_util.tree_flatten_with_path(got)[0]}
  want = {jax.tree_util.keystr(q): x for q, x in jax.tree_util.tree_flatten_with_path(want)[0]}
  assert list(got) == list(want)
  for path, x in got.items():
    if ".acc_grads" in path:
      mini_step = got[path.split(".acc_grads")[0] + ".mini_step"]
      if int(mini_step) == 0:
        continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(want[path]), rtol=1e-6,
                               atol=1e-7, err_msg=f"{path} step {n}")


def _step_fn(opt):
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, u
  return jax.jit(step)


@pytest.mark.parametrize("optimizer,unwrapped", [("adamw", "same"), ("sgd", "same"),
                                                ("anderson", "sgd")])
def test_every_k_equals_optax_multisteps(optimizer, unwrapped):
  """48 outer steps, 3 periods of the slowest level (k = 16; mid k = 4, fast and default
  k = 1), clipping, weight decay and momentum on: updates and parameters equal those of
  the MultiSteps reference to 1e-6 (relative; 1e-7 absolute) at every step, and every level has moved; so does the
  state, and the run continues the same from the reference's state (step 20: mid-window
  for mid and slow). (anderson: on the wrapped levels only, which keeps the compilation
  short.)"""
  c = _config(optimizer, unwrapped)
  params0 = _params()
  rng = np.random.default_rng(12)
  # 0.1: window means mostly under the clip threshold (a clipped update would hide
  # their scale), some over it.
  grads = [jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), jnp.float32),
                        params0) for _ in range(48)]
  opt, opt_ref = levels.build_optimizer(c), _reference(c)
  got, want = _step_fn(opt), _step_fn(opt_ref)
  p1, s1 = params0, opt.init(params0)
  p2, s2 = params0, opt_ref.init(params0)
  for n, g in enumerate(grads, start=1):
    p1, s1, u1 = got(p1, s1, g)
    p2, s2, u2 = want(p2, s2, g)
    for what, a, b in (("updates", u1, u2), ("params", p1, p2)):
      for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                              jax.tree.leaves(b)):
        # rtol 1e-6, atol 1e-7: float rounding (measured <= 1.5e-8 absolute).
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)} step {n}")
    # The state holds MultiSteps' fields (a checkpoint written with MultiSteps restores
    # into it) and values, but for the accumulator of a level that has just updated
    # (mini_step 0), which the next step does not read.
    _assert_states_equal(s1, s2, n)
    if n == 20:   # continue from the reference's state, as from a MultiSteps checkpoint
      s1 = jax.tree.structure(s1).unflatten(jax.tree.leaves(s2))
  labels = jax.tree.leaves(levels.label_params(params0, [n for n in PERIODS][1:]))
  moved = {l for l, a, b in zip(labels, jax.tree.leaves(p1), jax.tree.leaves(params0))
           if np.any(np.asarray(a) != np.asarray(b))}
  assert moved == set(PERIODS), moved


def test_level_optimizer_runs_only_on_its_update_steps(monkeypatch):
  """A level's chain (clip -> base optimizer) is run on the steps where it updates, and
  not on the others: over 16 outer steps the base optimizers of `default` and `fast`
  (k = 1) run 16 times, `mid` (k = 4) 4 times and `slow` (k = 16) once. (optax.MultiSteps
  runs its inner optimizer on every step and then discards the result.) Counted by a
  callback in each base optimizer's update, which runs only when its branch executes;
  a label is told apart by the number of parameters it sees."""
  calls = []
  original = levels._base_optimizer

  def counting(name, schedule, config):
    base = original(name, schedule, config)

    def update(updates, state, params=None):
      size = sum(x.size for x in jax.tree.leaves(updates))
      jax.debug.callback(functools.partial(calls.append, size))
      return base.update(updates, state, params)
    return optax.GradientTransformation(base.init, update)

  monkeypatch.setattr(levels, "_base_optimizer", counting)
  c = _config("adamw")
  params = _params()
  opt = levels.build_optimizer(c)
  sizes = {}
  for lbl, x in zip(jax.tree.leaves(levels.label_params(params, ["fast", "mid", "slow"])),
                    jax.tree.leaves(params)):
    sizes[lbl] = sizes.get(lbl, 0) + x.size
  assert len(set(sizes.values())) == 4, sizes
  step = _step_fn(opt)
  state = opt.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  for _ in range(16):
    params, state, _ = step(params, state, g)
  jax.effects_barrier()
  counts = {lbl: calls.count(n) for lbl, n in sizes.items()}
  assert counts == {"default": 16, "fast": 16, "mid": 4, "slow": 1}, counts


def test_clip_by_global_norm_matches_optax():
  """levels.clip_by_global_norm (one scale factor) equals optax.clip_by_global_norm to
  float rounding: norms above and below the threshold, all-zero and non-finite
  gradients."""
  rng = np.random.default_rng(13)
  tree = {"a": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
          "b": {"c": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}}
  ours, ref = levels.clip_by_global_norm(1.5), optax.clip_by_global_norm(1.5)
  for scale in (0.01, 0.2, 1.0, 30.0, 0.0):
    g = jax.tree.map(lambda x: scale * x, tree)
    got, _ = ours.update(g, ours.init(g))
    want, _ = ref.update(g, ref.init(g))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=0,
                                 err_msg=f"scale {scale}")
    norm = float(optax.global_norm(got))
    assert norm == pytest.approx(min(1.5, scale * float(optax.global_norm(tree))), rel=1e-6)
  g = jax.tree.map(lambda x: x.at[0].set(jnp.nan), tree)
  got, _ = ours.update(g, ours.init(g))
  assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(got))
