"""Universal Anderson (nlmm_jax/optim/anderson.py): lr-free acceleration, state size,
reductions per step, the history dtype option.

The hand-computed trajectories (NumPy reference) are in test_optim.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlmm_jax import config_lib
from nlmm_jax.optim import anderson as anderson_lib
from nlmm_jax.optim import levels


def _gradient_sequence(steps, seed=0):
  """Gradients of an ill-conditioned quadratic along a fixed (plain Adam) trajectory,
  split over two leaves: the same sequence for every optimizer fed with it."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
  a = q @ np.diag(np.logspace(0, 2, 20)) @ q.T
  x_star = rng.normal(size=20)
  x = np.zeros(20)
  adam = optax.adam(0.05)
  state = adam.init(jnp.asarray(x, jnp.float32))
  grads = []
  for _ in range(steps):
    g = a @ (x - x_star)
    grads.append({"w": jnp.asarray(g[:16].reshape(4, 4), jnp.float32),
                  "b": jnp.asarray(g[16:], jnp.float32)})
    u, state = adam.update(jnp.asarray(g, jnp.float32), state)
    x = x + np.asarray(u, np.float64)
  return grads


def _updates(opt, grads):
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state = opt.init(params)
  step = jax.jit(opt.update)
  out = []
  for g in grads:
    u, state = step(g, state, params)
    out.append(u)
  return out


def test_learning_rate_change_alone_leaves_the_directions_unchanged():
  """Same gradients, no weight decay: the update divided by its lr (the direction s_k)
  is the same under a constant lr and under a warm-up/decay schedule (the acceleration
  runs on the lr-free direction; with the residual -lr_k d_k the history would record
  the rate's changes). The AA step is taken at several of these steps (the direction is
  not Adam's -d_k), so the check covers the acceleration, not only its fallback."""
  steps = 14
  grads = _gradient_sequence(steps)
  rates = 0.01 * np.concatenate([np.arange(1, 6) / 5, np.linspace(1.0, 0.2, steps - 5)])
  table = jnp.asarray(rates, jnp.float32)
  constant = _updates(anderson_lib.anderson(0.01), grads)
  scheduled = _updates(anderson_lib.anderson(lambda c: table[c]), grads)
  adam_dirs = _updates(optax.scale_by_adam(b1=0.0), grads)
  accelerated = 0
  for k in range(steps):
    for name in grads[0]:
      s_const = np.asarray(constant[k][name]) / 0.01
      s_sched = np.asarray(scheduled[k][name]) / rates[k]
      np.testing.assert_allclose(s_sched, s_const, rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} at step {k}")
    s = np.concatenate([np.ravel(constant[k][n]) for n in grads[0]]) / 0.01
    d = np.concatenate([np.ravel(adam_dirs[k][n]) for n in grads[0]])
    accelerated += not np.allclose(s, -d, rtol=1e-3, atol=1e-6)
  assert accelerated >= 4, accelerated


@pytest.mark.parametrize("kw,expected", [
    (dict(), 7.0),                                    # nu + 2m rings
    (dict(b1=0.9), 8.0),                              # + Adam's first moment
    (dict(history_dtype=jnp.bfloat16), 5.0),          # nu, d_{k-1} + 2m half-size rings
    (dict(history=5), 11.0),                          # 2m + 1
])
def test_state_size(kw, expected):
  """With m = 3: 2m + 1 = 7 parameter-sized buffers (was 2m + 4 = 10: Adam's unused
  first moment, and the previous update and residual next to the rings). Counted over
  the state's leaves: every leaf is a parameter-shaped buffer ([...] or a ring
  [m, ...]), the step count or the [m, m] Gram matrix."""
  m = kw.get("history", 3)
  params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros((6,))}
  shapes = {(8, 6), (6,), (m, 8, 6), (m, 6)}
  state = anderson_lib.anderson(0.1, **kw).init(params)
  leaves = jax.tree.leaves(state)
  other = sorted(x.shape for x in leaves if x.shape not in shapes)
  assert other == [(), (m, m)], other
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves if x.shape in shapes)
  assert nbytes / (4 * 54) == expected


def _reductions(jaxpr, min_size):
  """reduce_sum equations (nested jaxprs included) over at least min_size elements."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.size >= min_size:
      n += 1
    for v in eqn.params.values():
      for j in (v if isinstance(v, (list, tuple)) else [v]):
        if hasattr(j, "eqns"):
          n += _reductions(j, min_size)
        elif hasattr(getattr(j, "jaxpr", None), "eqns"):
          n += _reductions(j.jaxpr, min_size)
  return n


def test_reductions_per_step_do_not_grow_with_the_history():
  """The Gram matrix is kept in the state and updated by one stacked reduction per leaf
  (<dD_i, dD_p> for all i at once), the right-hand side by another: the number of
  reductions over the parameters is the same for m = 2, 3 and 6 (separate inner products
  per pair of slots would grow like m^2)."""
  params = {"w": jnp.ones((16, 8))}
  grads = {"w": jnp.full((16, 8), 0.3)}
  counts = []
  for m in (2, 3, 6):
    opt = anderson_lib.anderson(0.1, history=m)
    jaxpr = jax.make_jaxpr(opt.update)(grads, opt.init(params), params)
    counts.append(_reductions(jaxpr.jaxpr, 128))
  assert counts[0] == counts[1] == counts[2], counts
  assert counts[0] <= 7, counts


def test_history_dtype_from_config():
  """config.optim.anderson.history_dtype reaches the rings of every anderson label."""
  c = config_lib.base_config()
  c.optim.optimizer = "anderson"
  c.optim.anderson.history_dtype = "bfloat16"
  for lvl in c.model.cms.levels.values():
    lvl.optimizer = "anderson"
  params = {"dense": {"kernel": jnp.zeros((4, 3))},
            "cms_slow": {"Dense_0": {"kernel": jnp.zeros((3, 2))}}}
  state = levels.build_optimizer(c).init(params)
  rings = [x for x in jax.tree.leaves(state) if x.ndim == 3]
  assert len(rings) == 4 and all(x.dtype == jnp.bfloat16 for x in rings), rings
  assert config_lib.base_config().optim.anderson.history_dtype == "float32"
  with pytest.raises(ValueError, match="history_dtype"):
    anderson_lib.anderson(0.1, history_dtype=jnp.int32)
