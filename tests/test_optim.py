"""Optimizers (nlmm_jax/optim): DMGD, universal Anderson, CMS level routing, checkpoints.

Every check compares with numbers computed independently here: NumPy re-implementations
of the documented formulas, optax reference optimizers, known optima.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nlmm_jax import config_lib
from nlmm_jax.optim import anderson as anderson_lib
from nlmm_jax.optim import dmgd as dmgd_lib
from nlmm_jax.optim import levels


def _random_tree(rng, tree):
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def _quadratic(n, cond, seed):
  """f(x) = 1/2 (x - x*)^T A (x - x*), A rotated, eigenvalues log-spaced in [1, cond]."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = q @ np.diag(np.logspace(0, math.log10(cond), n)) @ q.T
  x_star = rng.normal(size=(n,))
  return a, x_star


def _run_scan(opt, loss, x0, steps):
  """Runs `steps` updates under one jit; returns the trajectory [steps, ...] and state."""
  params = {"x": jnp.asarray(x0, jnp.float32)}

  def body(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), p["x"]

  (p, s), xs = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))(
      (params, opt.init(params)))
  return np.asarray(xs), s


# ----------------------------------------------------------------------------- DMGD


def test_dmgd_linear_memory_dot_objective_is_heavy_ball():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  lr, beta = 0.05, 0.9
  opt = dmgd_lib.dmgd(lr, hidden=0, objective="dot", alpha=beta, inner_lr=1.0,
                      sigma="identity", debias=False)
  ref = optax.sgd(lr, momentum=beta)
  p1, p2, s1, s2 = params, params, opt.init(params), ref.init(params)
  step1, step2 = jax.jit(opt.update), jax.jit(ref.update)
  for _ in range(20):
    g = _random_tree(rng, params)
    u1, s1 = step1(g, s1, p1)
    u2, s2 = step2(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for k in params:
    np.testing.assert_allclose(p1[k], p2[k], atol=1e-6, rtol=0)
    assert not np.allclose(p1[k], params[k])


def test_dmgd_nsqrt_converges_on_quadratic_and_memory_learns():
  a, x_star = _quadratic(8, 10.0, seed=0)
  loss = lambda p: 0.5 * (p["x"] - x_star) @ jnp.asarray(a, jnp.float32) @ (p["x"] - x_star)
  opt = dmgd_lib.dmgd(0.01)                              # defaults: l2, hidden 8, nsqrt
  xs, state = _run_scan(opt, loss, np.zeros(8), 1000)
  dist = np.linalg.norm(xs - x_star, axis=1)
  tol = 1e-2                                             # stated tolerance: |x - x*| < 1e-2
  assert dist[-1] < tol, dist[-1]
  assert dist[0] > 100 * tol
  # The memory's own parameters moved away from phi_0 (w2 = 0) over the run.
  phi, phi_0 = state[0].phi["x"], dmgd_lib.init_phi(8)
  assert float(jnp.abs(phi["w2"]).max()) > 1e-4
  assert float(jnp.abs(phi["w1"] - phi_0["w1"]).max()) > 1e-6


def test_dmgd_momentum_follows_gradient_sign_changes():
  opt = dmgd_lib.scale_by_dmgd()                         # defaults
  state = opt.init({"w": jnp.zeros((4, 4))})
  step = jax.jit(opt.update)
  rng = np.random.default_rng(2)
  phis = []
  for sign, n in [(1.0, 30), (-1.0, 8), (1.0, 8)]:
    flipped_mu = flipped_u = None
    for i in range(n):
      g = sign * (1.0 + 0.1 * jnp.asarray(rng.random((4, 4)), jnp.float32))
      u, state = step({"w": g}, state)
      if flipped_mu is None and np.all(np.sign(state.mu["w"]) == sign):
        flipped_mu = i + 1
      if flipped_u is None and np.all(np.sign(u["w"]) == sign):
        flipped_u = i + 1
      phis.append(np.asarray(state.phi["w"]["w2"]))
    # The momentum (and the applied direction) take the gradient's sign within 5 steps
    # and keep it: a sign-locked momentum would fail here.
    assert flipped_mu is not None and flipped_mu <= 5, (sign, flipped_mu)
    assert flipped_u is not None and flipped_u <= 5, (sign, flipped_u)
    assert np.all(np.sign(state.mu["w"]) == sign)
  assert not np.allclose(phis[10], phis[-1])           # the memory keeps learning


def test_dmgd_deep_memory_forecasts_alternating_gradient():
  """An alternating gradient is predictable: the MLP learns it, the linear memory can't."""
  key = jax.random.key(0)
  errors = {}
  for hidden in (0, 8):
    opt = dmgd_lib.scale_by_dmgd(hidden=hidden, sigma="identity")
    state, step, err = opt.init({"w": jnp.zeros((16, 16))}), jax.jit(opt.update), []
    forecast = jnp.zeros((16, 16))
    for t in range(300):
      key, k = jax.random.split(key)
      g = (-1.0) ** t + 0.3 * jax.random.normal(k, (16, 16))
      if t >= 200:
        err.append(float(jnp.mean((forecast - g) ** 2)))   # forecast of g_t made at t-1
      _, state = step({"w": g}, state)
      # p_{t+1}: the stored forecast (deep memory), mu_t (linear memory).
      forecast = state.forecast["w"] if hidden else state.mu["w"]
    errors[hidden] = np.mean(err)
  assert errors[8] < 0.5 * errors[0], errors


def test_dmgd_newton_schulz():
  rng = np.random.default_rng(3)
  g = {"m": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
       "v": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  kw = dict(hidden=0, objective="dot", alpha=0.9, inner_lr=1.0)
  ns, ident = dmgd_lib.scale_by_dmgd(sigma="newton_schulz", **kw), dmgd_lib.scale_by_dmgd(
      sigma="identity", **kw)
  u_ns, _ = ns.update(g, ns.init(g))
  u_id, _ = ident.update(g, ident.init(g))
  v = np.asarray(u_id["v"])                                  # 1-D: o / (rms(o) + eps)
  np.testing.assert_allclose(u_ns["v"], v / (np.sqrt(np.mean(v ** 2)) + 1e-8), rtol=1e-5)
  # NumPy quintic Newton-Schulz (Muon's coefficients) on the transposed (4 x 6) matrix.
  x = np.asarray(g["m"], np.float64).T
  x = x / (np.linalg.norm(x) + 1e-8)
  a, b, c = dmgd_lib.MUON_NS_COEFFS
  for _ in range(5):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  np.testing.assert_allclose(u_ns["m"], x.T * math.sqrt(6), rtol=1e-3, atol=1e-4)
  sv = np.linalg.svd(np.asarray(u_ns["m"]) / math.sqrt(6), compute_uv=False)
  assert sv.min() > 0.5 and sv.max() < 1.5, sv


# ------------------------------------------------------------------------- Anderson


def _np_anderson(a, x_star, x0, lr, steps, m, reg, tr, beta, b1, b2, eps, hist=None):
  """NumPy universal Anderson (module doc): returns the trajectory and AA bookkeeping.

  The acceleration runs on the lr-free direction d; `lr` (a number or a function of the
  step k) multiplies the safeguarded step. `hist`: the rounding of what the rings store
  (None: none)."""
  lr_fn = lr if callable(lr) else (lambda k: lr)
  keep = hist or (lambda v: v)
  x = np.asarray(x0, np.float64)
  mom, nu = np.zeros_like(x), np.zeros_like(x)
  dss, dds, prev_d, prev_s = [], [], None, None
  traj, accepted = [], []
  for k in range(steps):
    g = a @ (x - x_star)
    mom = b1 * mom + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g ** 2
    d = (mom / (1 - b1 ** (k + 1))) / (np.sqrt(nu / (1 - b2 ** (k + 1))) + eps)
    if k > 0:
      dss.append(keep(prev_s))
      dds.append(keep(d - prev_d))
      dss, dds = dss[-m:], dds[-m:]
    if dds:
      dD, dS = np.stack(dds, 1), np.stack(dss, 1)                 # [n, cols]
      lam = reg * np.mean(np.sum(dD ** 2, 0))
      # Ridge regression by an augmented least-squares problem (not the normal equations).
      aug = np.concatenate([dD, np.sqrt(lam) * np.eye(dD.shape[1])], 0)
      rhs = np.concatenate([d, np.zeros(dD.shape[1])])
      gamma = np.linalg.lstsq(aug, rhs, rcond=None)[0]
      s = -beta * d - (dS - beta * dD) @ gamma
    else:
      s = -beta * d
    s = s * min(1.0, tr * np.linalg.norm(d) / np.linalg.norm(s))
    ok = s @ g < 0
    u = s if ok else -d
    accepted.append(bool(ok and len(dds) > 0 and not np.allclose(s, -d, rtol=1e-3)))
    x = x + lr_fn(k) * u
    traj.append(x.copy())
    prev_d, prev_s = d, u
  return np.stack(traj), accepted


def test_anderson_steps_match_hand_computation():
  """Against the NumPy reference: the 7-buffer float32 path (b1 = 0), the general path
  (first moment, m = 2, active trust region, beta != 1), a warm-up learning rate (the
  acceleration runs on the lr-free direction) and the bfloat16 history."""
  a = np.array([[3.0, 1.0], [1.0, 0.5]])
  x_star = np.array([0.5, -1.0])
  x0 = np.array([2.0, 1.0])
  loss = lambda p: 0.5 * (p["x"] - x_star) @ jnp.asarray(a, jnp.float32) @ (p["x"] - x_star)
  bf16 = lambda v: np.asarray(np.asarray(v, np.float32).astype(jnp.bfloat16), np.float64)
  warmup = (lambda c: 0.1 * jnp.minimum(1.0, (c + 1) / 4.0),
            lambda k: 0.1 * min(1.0, (k + 1) / 4.0))
  cases = [dict(), dict(b1=0.5, trust_region=1.5, history=2, beta=0.7),
           dict(lr=warmup), dict(history_dtype=jnp.bfloat16)]
  for kw in cases:
    hp = dict(history=3, reg=1e-3, trust_region=10.0, beta=1.0, b1=0.0)
    hp.update(kw)
    lr = hp.pop("lr", (0.1, 0.1))
    hist = hp.get("history_dtype") and bf16
    opt = anderson_lib.anderson(lr[0], **hp)
    xs, _ = _run_scan(opt, loss, x0, 8)
    ref, accepted = _np_anderson(a, x_star, x0, lr[1], 8, hp["history"], hp["reg"],
                                 hp["trust_region"], hp["beta"], hp["b1"], 0.999, 1e-8,
                                 hist=hist)
    # bfloat16: 1e-5 measured; the unrounded reference is 8e-4 away.
    tol = dict(rtol=1e-4, atol=1e-4) if hist else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(xs, ref, **tol, err_msg=str(kw))
    assert sum(accepted) >= 2, (kw, accepted)   # the AA step (not Adam's) was taken


def _steps_to(xs, x_star, tol):
  dist = np.linalg.norm(xs - x_star, axis=1)
  hit = np.nonzero(dist < tol)[0]
  return int(hit[0]) + 1 if hit.size else None


@pytest.mark.parametrize("lr", [0.01, 0.03])
def test_anderson_beats_adam_on_ill_conditioned_quadratic(lr):
  a, x_star = _quadratic(20, 1e3, seed=0)
  loss = lambda p: 0.5 * (p["x"] - x_star) @ jnp.asarray(a, jnp.float32) @ (p["x"] - x_star)
  steps, tol = 4000, 1e-2
  xs_aa, _ = _run_scan(anderson_lib.anderson(lr), loss, np.zeros(20), steps)
  xs_adam, _ = _run_scan(optax.adam(lr), loss, np.zeros(20), steps)
  n_aa, n_adam = _steps_to(xs_aa, x_star, tol), _steps_to(xs_adam, x_star, tol)
  assert n_aa is not None and n_adam is not None, (n_aa, n_adam)
  assert n_aa < n_adam, (n_aa, n_adam)


def _primitives(jaxpr):
  """Names of all primitives in a jaxpr, nested jaxprs (pjit, scan, cond, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for v in eqn.params.values():
      for j in (v if isinstance(v, (list, tuple)) else [v]):
        if hasattr(j, "eqns"):
          yield from _primitives(j)
        elif hasattr(getattr(j, "jaxpr", None), "eqns"):
          yield from _primitives(j.jaxpr)


def test_anderson_and_dmgd_jit_without_host_callbacks():
  params = {"w": jnp.ones((5, 3)), "b": jnp.zeros((3,))}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  for opt in [anderson_lib.anderson(0.1, weight_decay=0.1), dmgd_lib.dmgd(0.1),
              dmgd_lib.dmgd(0.1, sigma="newton_schulz")]:
    state = opt.init(params)
    jaxpr = jax.make_jaxpr(opt.update)(grads, state, params)
    names = set(_primitives(jaxpr.jaxpr))
    if isinstance(state, anderson_lib.AndersonState):
      assert "lu" in names, names          # the walk reached inside jnp.linalg.solve
    assert not [n for n in names if "callback" in n], names
    step = jax.jit(opt.update)
    with jax.transfer_guard("disallow"):                          # no host round trips
      for _ in range(4):
        u, state = step(grads, state, params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))


# --------------------------------------------------------------------------- levels


LEVELS = {"fast": 1, "mid": 4, "slow": 16}


def _level_params():
  rng = np.random.default_rng(4)
  shapes = {"cms_fast": {"Dense_0": {"kernel": (3, 2), "bias": (2,)}},
            "block": {"cms_mid": {"Dense_0": {"kernel": (2, 2)}}, "dense": {"kernel": (3, 3)}},
            "cms_slow": {"Dense_0": {"kernel": (2, 3)}},
            "log_logit_scale": ()}
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _level_config(optimizer, total=64, warmup=8):
  c = config_lib.base_config()
  c.train.total_steps = total
  o = c.optim
  o.optimizer, o.lr, o.warmup_steps, o.lr_floor = optimizer, 0.1, warmup, 0.1
  o.weight_decay, o.clip_norm, o.momentum = 0.0, 0.0, 0.0
  for (name, k), peak in zip(LEVELS.items(), (0.05, 0.02, 0.01)):
    lvl = c.model.cms.levels[name]
    lvl.update_every, lvl.lr, lvl.optimizer = k, peak, optimizer
  return c


def _np_lr(n, peak, warmup, total, floor):
  """Warm-up + cosine at outer step n (1-based), written out."""
  if n < warmup:
    return peak * n / warmup
  prog = min((n - warmup) / (total - warmup), 1.0)
  return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))


def test_label_params_and_weight_decay_mask():
  params = _level_params()
  labels = levels.label_params(params, list(LEVELS))
  assert labels == {"cms_fast": {"Dense_0": {"kernel": "fast", "bias": "fast"}},
                    "block": {"cms_mid": {"Dense_0": {"kernel": "mid"}},
                              "dense": {"kernel": "default"}},
                    "cms_slow": {"Dense_0": {"kernel": "slow"}},
                    "log_logit_scale": "default"}
  extra = {"pos_embedding": jnp.zeros((4, 3)), "Embed_0": {"embedding": jnp.zeros((7, 3))},
           "LayerNorm_0": {"scale": jnp.zeros((3,))}, "head": {"logit_bias": jnp.zeros((1, 1))},
           "w": jnp.zeros((2, 2))}
  mask = levels.weight_decay_mask(extra)
  assert mask == {"pos_embedding": False, "Embed_0": {"embedding": False},
                  "LayerNorm_0": {"scale": False}, "head": {"logit_bias": False}, "w": True}
  assert levels.weight_decay_mask(params)["cms_fast"]["Dense_0"] == {"kernel": True,
                                                                      "bias": False}


def test_learning_rates_follow_warmup_cosine_in_outer_steps():
  c = _level_config("adamw", total=100, warmup=10)
  peaks = {"default": 0.1, "fast": 0.05, "mid": 0.02, "slow": 0.01}
  for step in [0, 3, 9, 10, 42, 77, 99, 150]:
    lrs = levels.learning_rates(c, step)
    assert set(lrs) == set(peaks)
    for name, peak in peaks.items():
      assert lrs[name] == pytest.approx(_np_lr(step + 1, peak, 10, 100, 0.1), rel=1e-5)
  assert levels.learning_rates(c, 0)["default"] > 0


@pytest.mark.parametrize("optimizer,eps", [("sgd", None), ("adamw", None), ("adamw", 1.0)])
def test_levels_update_at_their_own_period_with_mean_gradient(optimizer, eps):
  """Each level moves exactly at the outer steps n % k == 0, by its optimizer applied to
  the MEAN gradient of the k steps, with the outer-step lr schedule.

  sgd: the update is linear in the gradient, so a SUM of the k gradients would be k
  times too large. adamw with its default eps (1e-8) is scale-invariant and cannot tell
  a sum from a mean (it checks the period, the moments advancing once per window and
  the schedule); adamw with eps = 1, as large as the gradients (unit normal), is not:
  m / (sqrt(v) + eps) changes with the gradient's scale, so it checks the mean too."""
  c = _level_config(optimizer)
  if eps is not None:
    c.optim.eps = eps
  params0 = _level_params()
  labels = levels.label_params(params0, list(LEVELS))
  opt = levels.build_optimizer(c)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *opt.update(g, s, p)))
  rng = np.random.default_rng(5)
  grads = [_random_tree(rng, params0) for _ in range(32)]
  periods = dict(LEVELS, default=1)
  peaks = {"default": 0.1, "fast": 0.05, "mid": 0.02, "slow": 0.01}
  # Independent reference for adamw: optax.adamw fed the mean gradient of each period.
  refs = {}
  if optimizer == "adamw":
    for name, k in periods.items():
      sched = lambda cnt, k=k, peak=peaks[name]: jnp.asarray(
          [_np_lr((i + 1) * k, peak, 8, 64, 0.1) for i in range(64)])[cnt]
      ref = optax.adamw(sched, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                        weight_decay=0.0)
      refs[name] = [ref, None]
  params, state = params0, opt.init(params0)
  flat_labels = jax.tree.leaves(labels)
  for n in range(1, 33):
    new_params, state = step(params, state, grads[n - 1])
    for i, (label, p_old, p_new) in enumerate(zip(
        flat_labels, jax.tree.leaves(params), jax.tree.leaves(new_params))):
      k = periods[label]
      delta = np.asarray(p_new) - np.asarray(p_old)
      if n % k:
        assert np.all(delta == 0), (label, n)
        continue
      mean_g = np.mean([jax.tree.leaves(grads[j])[i] for j in range(n - k, n)], axis=0)
      if optimizer == "sgd":
        expected = -_np_lr(n, peaks[label], 8, 64, 0.1) * mean_g
      else:
        ref, ref_states = refs[label]
        if ref_states is None:
          ref_states = refs[label][1] = {}
        st = ref_states.get(i) or ref.init(jnp.asarray(p_old))
        u, ref_states[i] = ref.update(jnp.asarray(mean_g), st, jnp.asarray(p_old))
        expected = np.asarray(u)
      np.testing.assert_allclose(delta, expected, rtol=2e-4, atol=2e-7,
                                 err_msg=f"{label} at step {n}")
      assert np.any(delta != 0)
    params = new_params


def test_level_clip_weight_decay_and_momentum_act_once_per_window_on_the_mean():
  """Where clipping, weight decay and momentum sit relative to the accumulation window
  (levels.py: `every_k(chain(clip_by_global_norm, base optimizer))`): every_k
  accumulates the RAW gradients; at the window's last step the label's chain gets their
  mean, clips it by the global norm of that label's parameters alone, adds the weight
  decay of the parameters at that moment, then the Nesterov momentum, which advances
  once per window. Reference: the same optax pieces applied by hand to the window mean,
  one chain per label. Clipping is active at every update (checked; so this test is
  blind to a sum instead of the mean, which the test above covers), and momentum
  shows from each level's second update on."""
  clip, wd, momentum = 0.1, 0.05, 0.9
  c = _level_config("sgd")
  c.optim.clip_norm, c.optim.weight_decay, c.optim.momentum = clip, wd, momentum
  params0 = _level_params()
  opt = levels.build_optimizer(c)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *opt.update(g, s, p)))
  rng = np.random.default_rng(7)
  grads = [_random_tree(rng, params0) for _ in range(32)]
  periods = dict(LEVELS, default=1)
  peaks = {"default": 0.1, "fast": 0.05, "mid": 0.02, "slow": 0.01}
  flat_labels = jax.tree.leaves(levels.label_params(params0, list(LEVELS)))
  flat_mask = jax.tree.leaves(levels.weight_decay_mask(params0))
  assert any(flat_mask) and not all(flat_mask)
  idx = {name: [i for i, l in enumerate(flat_labels) if l == name] for name in periods}
  refs, ref_states = {}, {}
  for name, k in periods.items():
    sched = lambda cnt, k=k, peak=peaks[name]: jnp.asarray(
        [_np_lr((i + 1) * k, peak, 8, 64, 0.1) for i in range(64)])[cnt]
    refs[name] = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.add_decayed_weights(wd, [flat_mask[i] for i in idx[name]]),
        optax.sgd(sched, momentum=momentum, nesterov=True))
  params, state = params0, opt.init(params0)
  updates_seen = {name: 0 for name in periods}
  for n in range(1, 33):
    new_params, state = step(params, state, grads[n - 1])
    old, new = jax.tree.leaves(params), jax.tree.leaves(new_params)
    for name, k in periods.items():
      deltas = [np.asarray(new[i]) - np.asarray(old[i]) for i in idx[name]]
      if n % k:
        assert all(np.all(d == 0) for d in deltas), (name, n)
        continue
      mean_g = [jnp.asarray(np.mean([jax.tree.leaves(grads[j])[i] for j in range(n - k, n)],
                                    axis=0)) for i in idx[name]]
      assert float(optax.global_norm(mean_g)) > 1.5 * clip, (name, n)  # the clip acts
      p_old = [jnp.asarray(old[i]) for i in idx[name]]
      if name not in ref_states:
        ref_states[name] = refs[name].init(p_old)
      expected, ref_states[name] = refs[name].update(mean_g, ref_states[name], p_old)
      updates_seen[name] += 1
      for d, e, i in zip(deltas, expected, idx[name]):
        np.testing.assert_allclose(d, np.asarray(e), rtol=2e-4, atol=2e-7,
                                   err_msg=f"{name} leaf {i} at step {n}")
    params = new_params
  assert updates_seen == {"default": 32, "fast": 32, "mid": 8, "slow": 2}, updates_seen


# ---------------------------------------------------------------------- checkpoints


def test_optimizer_state_survives_orbax_round_trip(tmp_path):
  c = _level_config("adamw")
  c.optim.weight_decay, c.optim.clip_norm = 0.01, 1.0
  c.model.cms.levels.fast.optimizer = "dmgd"
  c.model.cms.levels.mid.optimizer = "anderson"
  c.model.cms.levels.slow.optimizer = "sgd"
  c.model.cms.levels.mid.update_every = 2
  c.model.cms.levels.slow.update_every = 4
  opt = levels.build_optimizer(c)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *opt.update(g, s, p)))
  rng = np.random.default_rng(6)
  params = _level_params()
  grads = [_random_tree(rng, params) for _ in range(12)]
  state = opt.init(params)
  for g in grads[:7]:                   # mid-period for mid and slow: accumulators non-zero
    params, state = step(params, state, g)

  mgr = ocp.CheckpointManager(tmp_path / "ckpt")
  mgr.save(7, args=ocp.args.StandardSave(state))
  mgr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = mgr.restore(7, args=ocp.args.StandardRestore(abstract))
  mgr.close()

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(state)
             if np.ndim(x) == 3)       # Anderson ring buffers carry history

  p1, s1, p2, s2 = params, state, params, restored
  for g in grads[7:]:
    p1, s1 = step(p1, s1, g)
    p2, s2 = step(p2, s2, g)
  for a, b, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(p0))
