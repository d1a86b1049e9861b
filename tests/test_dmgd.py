"""DMGD (nlmm_jax/optim/dmgd.py): stability, the memory's inner step, sigma, bias correction.

References are computed independently here: optax.adam / optax.sgd, jax.grad of the inner
objective as the module doc states it, NumPy singular values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlmm_jax.optim import dmgd as dmgd_lib

LR, B2, EPS = 1e-3, 0.999, 1e-8


def _rms(x):
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _update_ratios(grads, **kw):
  """RMS(dmgd update) / RMS(adam update) per step, same lr / b2 / eps, one [32, 32] leaf."""
  opt = dmgd_lib.dmgd(LR, b2=B2, eps=EPS, **kw)
  ref = optax.adam(LR, b2=B2, eps=EPS)
  params = {"w": jnp.zeros((32, 32))}
  s1, s2 = opt.init(params), ref.init(params)
  step1, step2 = jax.jit(opt.update), jax.jit(ref.update)
  ratios = []
  for g in grads:
    u1, s1 = step1({"w": g}, s1)
    u2, s2 = step2({"w": g}, s2)
    ratios.append(_rms(u1["w"]) / _rms(u2["w"]))
  return np.asarray(ratios)


@pytest.mark.parametrize("collapse", [0.0, 1e-3])
def test_updates_stay_adam_sized_after_gradient_scale_collapse(collapse):
  """Two steps whose gradient is zero (or 1e-3 of its scale) while the momentum is not:
  every update, before, during and for 40 steps after, is within 3x Adam's RMS."""
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(32, 32))
  normal = lambda: jnp.asarray(mean + 0.5 * rng.normal(size=(32, 32)), jnp.float32)
  grads = [normal() for _ in range(40)]
  grads += [collapse * normal() for _ in range(2)]
  grads += [normal() for _ in range(40)]
  ratios = _update_ratios(grads)
  assert np.all(np.isfinite(ratios))
  assert ratios.max() < 3.0, (ratios.argmax(), ratios.max())
  assert ratios.min() > 1 / 3.0, (ratios.argmin(), ratios.min())


def test_first_step_matches_adam():
  """Bias correction: the first update is within 1.25x of Adam's (uncorrected: ~0.1x)."""
  rng = np.random.default_rng(1)
  g = jnp.asarray(rng.normal(size=(32, 32)), jnp.float32)
  ratios = _update_ratios([g, g, g])
  assert np.all((ratios > 0.8) & (ratios < 1.25)), ratios


# ------------------------------------------------- the memory's step: jax.grad reference


def _act(name, x):
  if name == "tanh":
    return jnp.tanh(x)
  y = jnp.clip(x, -1.5, 1.5)                       # cubic sigmoid of the module doc
  return y - 4.0 / 27.0 * y ** 3


def _mlp(phi, u, act):
  """r_phi(u) as a matrix product: u [N, 2] -> [N]."""
  return _act(act, u @ phi["w1"] + phi["b1"]) @ phi["w2"]


def _ell(objective, p, g):
  return 0.5 * (p - g) ** 2 if objective == "l2" else -p * g


def _reference(grads, *, hidden, inner_lr, phi_lr, alpha, objective, activation, sigma,
               phi_sample, bound=8.0):
  """The documented step (D1)-(D7), inner gradients by jax.grad of J_mu and J_phi.

  Returns the updates, mu and phi after the last step. Features, scales and the sample
  S_t are recomputed here from the gradients; nothing is read from the optimizer.
  """
  theta = np.pi * np.arange(hidden) / hidden
  phi_0 = {"w1": jnp.asarray(np.stack([np.cos(theta), np.sin(theta)]), jnp.float32),
           "b1": jnp.zeros(hidden), "w2": jnp.zeros(hidden)}
  shape, n = grads[0].shape, grads[0].size
  if phi_sample and n > phi_sample:                # S_t: stride coprime with the columns
    stride = -(-n // phi_sample)
    while np.gcd(stride, shape[-1]) != 1:
      stride += 1
  else:
    stride = 1
  k = n // stride
  rms = lambda x: jnp.sqrt(jnp.mean(x ** 2))
  rho = alpha - inner_lr if objective == "l2" else alpha
  phi, mu, nu = phi_0, jnp.zeros(n), jnp.zeros(n)
  u_prev, s_prev = jnp.zeros((n, 2)), 0.0
  outs = []
  for t, g in enumerate(grads, start=1):
    g = jnp.asarray(g, jnp.float32).reshape(-1)
    forecast = lambda m, q: m + s_prev * _mlp(q, u_prev, activation)
    d_mu = jax.grad(lambda m: jnp.sum(_ell(objective, forecast(m, phi), g)))(mu)
    new_mu = alpha * mu - inner_lr * d_mu
    s = jnp.maximum(rms(g), rms(new_mu)) + EPS
    s_bar = jnp.maximum(s_prev, s)
    idx = t % stride + stride * np.arange(k)
    j_phi = lambda q: jnp.sum(_ell(objective, forecast(mu, q)[idx], g[idx])) / (k * s_bar ** 2)
    d_phi = jax.grad(j_phi)(phi)
    phi = jax.tree.map(lambda q, q0, d: q0 + alpha * (q - q0) - phi_lr * d, phi, phi_0, d_phi)
    mu = new_mu
    u = jnp.clip(jnp.stack([g, mu], axis=1) / s, -bound, bound)        # [N, 2]
    o = mu / (1 - rho ** t) + s * _mlp(phi, u, activation)
    if sigma == "nsqrt":
      nu = B2 * nu + (1 - B2) * g ** 2
      o = o / (jnp.sqrt(nu / (1 - B2 ** t)) + EPS)
    outs.append(np.asarray(o).reshape(shape))
    u_prev, s_prev = u, s
  return outs, np.asarray(mu).reshape(shape), phi


@pytest.mark.parametrize("objective,activation,phi_sample,sigma", [
    ("l2", "cubic", 0, "nsqrt"),          # exact: J_phi over all 384 coordinates
    ("dot", "tanh", 0, "identity"),
    ("l2", "tanh", 64, "identity"),       # sampled: stride 7 (coprime with 24), K = 54
    ("l2", "cubic", 64, "nsqrt"),
])
def test_memory_step_is_gradient_step_on_stated_objective(objective, activation, phi_sample,
                                                          sigma):
  rng = np.random.default_rng(4)
  grads = [rng.normal(size=(16, 24)) * (1 + 0.5 * rng.random((16, 24))) + 2.0 * (-1.0) ** t
           for t in range(6)]
  for g in grads:
    g[3, 5] = 60.0                  # an outlier: its feature g / s (about 17) is clipped to F
  kw = dict(hidden=4, inner_lr=0.2, phi_lr=0.3, alpha=0.95, objective=objective,
            activation=activation, sigma=sigma, phi_sample=phi_sample)
  ref, ref_mu, ref_phi = _reference(grads, **kw)
  opt = dmgd_lib.scale_by_dmgd(b2=B2, eps=EPS, **kw)
  state, step = opt.init({"w": jnp.zeros((16, 24))}), jax.jit(opt.update)
  for g, r in zip(grads, ref):
    u, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
    np.testing.assert_allclose(u["w"], r, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.mu["w"], ref_mu, rtol=1e-4, atol=1e-6)
  for name, v in ref_phi.items():
    np.testing.assert_allclose(state.phi["w"][name], v, rtol=1e-4, atol=1e-6)
  assert np.abs(ref_phi["w2"]).max() > 1e-2       # the MLP did learn: the test sees phi


def test_heavy_ball_through_the_deep_memory_code_path():
  """hidden = 4 with eta_phi = 0: phi stays phi_0 (w2 = 0, r = 0) while the deep path runs
  (stored forecast, features, phi's gradient); dot, eta = 1, no debias: heavy ball."""
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  lr, beta = 0.05, 0.9
  opt = dmgd_lib.dmgd(lr, hidden=4, phi_lr=0.0, objective="dot", alpha=beta, inner_lr=1.0,
                      sigma="identity", debias=False)
  ref = optax.sgd(lr, momentum=beta)
  p1, p2, s1, s2 = params, params, opt.init(params), ref.init(params)
  step1, step2 = jax.jit(opt.update), jax.jit(ref.update)
  for _ in range(20):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u1, s1 = step1(g, s1, p1)
    u2, s2 = step2(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert s1[0].phi is not None and s1[0].forecast is not None    # the deep path's state
  for name in params:
    np.testing.assert_allclose(p1[name], p2[name], atol=1e-6, rtol=0)
    assert not np.allclose(p1[name], params[name])


@pytest.mark.parametrize("activation", ["cubic", "tanh"])
def test_full_read_equals_the_matrix_form_of_the_mlp(activation):
  """residual (the read over every coordinate, written per unit and, for the cubic, as
  y (w2 + c y^2)) against the MLP as a matrix product with the activation as the module
  doc states it, NumPy in float64; pre-activations reach past the cubic's clip at 1.5."""
  rng = np.random.default_rng(2)
  phi = {"w1": rng.normal(size=(2, 6)), "b1": rng.normal(size=6) * 0.5,
         "w2": rng.normal(size=6)}
  a, b = rng.normal(size=(2, 40, 3)) * 2.0
  pre = np.stack([a, b], -1) @ phi["w1"] + phi["b1"]                      # [40, 3, H]
  assert np.abs(pre).max() > 3.0 and np.abs(pre).min() < 1.0
  if activation == "tanh":
    act = np.tanh(pre)
  else:
    y = np.clip(pre, -1.5, 1.5)
    act = y - 4.0 / 27.0 * y ** 3
  want = act @ phi["w2"]
  got = dmgd_lib.residual(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), phi),
                          jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), activation)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sampled_phi_gradient_close_to_exact():
  """phi_sample = 4096 on a [512, 512] leaf (stride 65, K = 4032) against the exact step
  over 10 steps: phi's displacement from phi_0 and the updates agree within 5%."""
  rng = np.random.default_rng(6)
  mean = rng.normal(size=(512, 512))
  alt = rng.random((512, 512)) < 0.3
  grads = [jnp.asarray(np.where(alt, 2.0 * (-1.0) ** t, mean) + 0.5 * rng.normal(size=mean.shape),
                       jnp.float32) for t in range(10)]
  runs = {}
  for phi_sample in (4096, 0):
    opt = dmgd_lib.scale_by_dmgd(phi_sample=phi_sample)
    state, step, us = opt.init({"w": grads[0]}), jax.jit(opt.update), []
    for g in grads:
      u, state = step({"w": g}, state)
      us.append(u["w"])
    runs[phi_sample] = us, state
  assert runs[4096][1].u_prev["w"].shape == (2, 4032)
  assert runs[0][1].u_prev["w"].shape == (2, 512 * 512)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  for a, b in zip(runs[4096][0], runs[0][0]):
    assert rel(a, b) < 0.05
  phi_0 = dmgd_lib.init_phi(8)
  for name in ("w1", "w2"):
    a, b = runs[4096][1].phi["w"][name], runs[0][1].phi["w"][name]
    assert rel(a - phi_0[name], b - phi_0[name]) < 0.05, name
  assert float(jnp.abs(runs[0][1].phi["w"]["w2"]).max()) > 1e-2


# ----------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(64, 24), (24, 64)])
def test_newton_schulz_singular_values_near_one(shape):
  x = jnp.asarray(np.random.default_rng(7).normal(size=shape), jnp.float32)
  sv = np.linalg.svd(np.asarray(dmgd_lib.newton_schulz(x, 5)), compute_uv=False)
  assert sv.min() > 0.6 and sv.max() < 1.2, sv
  sv_in = np.linalg.svd(np.asarray(x), compute_uv=False)
  assert sv_in.max() / sv_in.min() > 3            # the input was far from orthogonal


def test_newton_schulz_sigma_update_rms_about_one_for_every_rank():
  """sigma = newton_schulz: update RMS in [0.8, 1.2] for 0-D to 4-D leaves; conv kernels
  are orthogonalised as [prod(shape[:-1]), shape[-1]] matrices."""
  rng = np.random.default_rng(8)
  shapes = {"s": (), "v": (48,), "m": (40, 24), "k3": (3, 16, 24), "k4": (3, 3, 8, 24)}
  g = {k: jnp.asarray(100.0 * rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  opt = dmgd_lib.scale_by_dmgd(hidden=0, sigma="newton_schulz")      # o = mu = 0.1 g
  u, _ = jax.jit(opt.update)(g, opt.init(g))
  for name, shape in shapes.items():
    assert u[name].shape == shape
    assert 0.8 < _rms(u[name]) < 1.2, (name, _rms(u[name]))
  for name in ("m", "k3", "k4"):
    mat = np.asarray(u[name]).reshape(-1, shapes[name][-1])
    sv = np.linalg.svd(mat / np.sqrt(max(mat.shape)), compute_uv=False)
    assert sv.min() > 0.6 and sv.max() < 1.2, (name, sv)


def _level_step_temp_bytes(n_tensors: int) -> int:
  """XLA's temporary bytes of one step of DMGD inside a CMS level (levels.every_k, the
  inner chain under lax.cond) on n [256, 512] tensors (sampled: N > phi_sample)."""
  from nlmm_jax.optim import levels
  tree = {f"w{i}": jnp.zeros((256, 512)) for i in range(n_tensors)}
  opt = levels.every_k(dmgd_lib.dmgd(LR), 4)
  state = jax.eval_shape(opt.init, tree)

  def step(carry, g):
    params, s = carry
    updates, s = opt.update(g, s, params)
    return optax.apply_updates(params, updates), s

  compiled = jax.jit(step, donate_argnums=0).lower((tree, state), tree).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_cms_level_step_writes_no_parameter_sized_temporary():
  """Each tensor adds less than half its size to the step's temporary memory: XLA writes
  the update into the accumulator's buffer. (While the sample of g was read after the
  update was written, every tensor added a temporary of its own size, about 1.2x, which
  the CPU page-faults on every step.)"""
  leaf_bytes = 256 * 512 * 4
  growth = (_level_step_temp_bytes(8) - _level_step_temp_bytes(4)) / 4
  assert growth < 0.5 * leaf_bytes
