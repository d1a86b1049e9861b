"""Fast-weight memory: chunked form == recurrent oracle, padding rules, module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlmm_jax import config_lib
from nlmm_jax.models import fast_weights as fw

B, H, T, E = 2, 2, 36, 8
LENGTHS = (36, 20)  # ragged: row 0 full, row 1 right-padded

# (rule, gated, decay)
VARIANTS = [("hebbian", False, 0.0), ("hebbian", False, 0.2),
            ("delta", False, 0.0), ("delta", True, 0.0)]
VARIANT_IDS = ["hebbian", "hebbian_decay", "delta", "gated_delta"]


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed=0, t=T, lengths=LENGTHS):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = _unit(jax.random.normal(ks[0], (B, H, t, E)))
  k = _unit(jax.random.normal(ks[1], (B, H, t, E)))
  v = jax.random.normal(ks[2], (B, H, t, E))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, H, t)))
  alpha = jax.nn.sigmoid(1.5 + jax.random.normal(ks[4], (B, H, t)))
  mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
  return q, k, v, beta, alpha, mask


def _loss_and_grads(form, rule, gated, decay, direction, chunk_size):
  """jit(value_and_grad) of <y, w> w.r.t. q, k, v, beta (and alpha when gated)."""

  def loss(q, k, v, beta, alpha, mask, w):
    y = fw.fast_weight_memory(q, k, v, beta, alpha if gated else None, mask, rule=rule,
                              form=form, chunk_size=chunk_size, direction=direction,
                              decay=decay)
    return jnp.sum(y * w), y

  argnums = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)
  return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
@pytest.mark.parametrize("rule,gated,decay", VARIANTS, ids=VARIANT_IDS)
def test_chunked_matches_recurrent(rule, gated, decay, direction):
  q, k, v, beta, alpha, mask = _inputs()
  w = jax.random.normal(jax.random.PRNGKey(9), (B, H, T, E))
  args = (q, k, v, beta, alpha, mask, w)
  (_, y_ref), g_ref = _loss_and_grads("recurrent", rule, gated, decay, direction, 0)(*args)
  assert float(jnp.max(jnp.abs(y_ref))) > 0.1
  for chunk_size in (12, 8, 64):  # T = 36: 12 divides it, 8 does not, 64 > T
    (_, y), g = _loss_and_grads("chunked", rule, gated, decay, direction, chunk_size)(*args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=f"C={chunk_size}")
    for name, a, b in zip("q k v beta alpha".split(), g, g_ref):
      if rule == "hebbian" and name == "beta":
        continue  # unused by the hebbian rule
      assert float(jnp.max(jnp.abs(b))) > 0, name
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5,
                                 err_msg=f"grad {name}, C={chunk_size}")


def test_recurrent_matches_explicit_formulas():
  """The oracle against the textbook forms (Eq. 64-65) written out with numpy."""
  q, k, v, beta, alpha, _ = _inputs(seed=1, t=9, lengths=(9, 9))
  q, k, v, beta, alpha = (np.asarray(a, np.float64) for a in (q, k, v, beta, alpha))
  lam = 0.7
  # hebbian with decay: y_t = sum_{j<=t} lam^(t-j) (q_t . k_j) v_j (decayed linear attention)
  y = fw.memory_recurrent(q, k, v, rule="hebbian", decay=1 - lam)
  scores = np.einsum("bhik,bhjk->bhij", q, k)
  tt = np.arange(9)
  dmat = np.where(tt[:, None] >= tt[None, :], lam ** (tt[:, None] - tt[None, :]), 0.0)
  np.testing.assert_allclose(y, np.einsum("bhij,bhjv->bhiv", scores * dmat, v),
                             rtol=1e-5, atol=1e-5)
  # gated delta: S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
  y = fw.memory_recurrent(q, k, v, beta, alpha, rule="delta")
  ref = np.zeros_like(v)
  for bi in range(B):
    for hi in range(H):
      s = np.zeros((E, E))
      for t in range(9):
        kt, bt = k[bi, hi, t][:, None], beta[bi, hi, t]
        s = alpha[bi, hi, t] * (np.eye(E) - bt * kt @ kt.T) @ s + bt * kt @ v[bi, hi, t][None]
        ref[bi, hi, t] = q[bi, hi, t] @ s
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_bidirectional_reverses_each_row_at_its_length(form):
  """Backward pass == causal pass over each row's own reversal (gather len-1-t)."""
  q, k, v, beta, alpha, mask = _inputs(seed=2)
  lengths = jnp.asarray(LENGTHS)
  idx = jnp.where(jnp.arange(T)[None] < lengths[:, None],
                  lengths[:, None] - 1 - jnp.arange(T)[None], jnp.arange(T)[None])  # [B, T]

  def rev(a):  # per-row reversal of the valid part, [B, H, T, ...]
    ix = idx[:, None, :] if a.ndim == 3 else idx[:, None, :, None]
    return jnp.take_along_axis(a, jnp.broadcast_to(ix, a.shape), axis=2)

  kw = dict(rule="delta", form=form, chunk_size=8)
  fwd = fw.fast_weight_memory(q, k, v, beta, alpha, mask, **kw)
  back = rev(fw.fast_weight_memory(rev(q), rev(k), rev(v), rev(beta), rev(alpha), mask, **kw))
  both = fw.fast_weight_memory(q, k, v, beta, alpha, mask, direction="bidirectional", **kw)
  np.testing.assert_allclose(both, fwd + back, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(back))) > 0.1


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_padding_reads_and_writes_nothing(form):
  q, k, v, beta, alpha, mask = _inputs(seed=3)
  kw = dict(rule="delta", form=form, chunk_size=16, direction="bidirectional")
  y = fw.fast_weight_memory(q, k, v, beta, alpha, mask, **kw)
  assert float(jnp.max(jnp.abs(y[1, :, LENGTHS[1]:]))) == 0.0
  # Garbage in the padded positions changes nothing.
  noise = jax.random.normal(jax.random.PRNGKey(4), q.shape) * (~mask)[:, None, :, None]
  pad = ~mask[:, None, :]
  y2 = fw.fast_weight_memory(q + noise, k + noise, v + noise, jnp.where(pad, 0.9, beta),
                             jnp.where(pad, 0.01, alpha), mask, **kw)
  real = mask[:, None, :, None]
  np.testing.assert_array_equal(jnp.where(real, y2, 0), jnp.where(real, y, 0))


def _perturb_hope(params):
  """Nonzero HOPE output layer (zero at init) so the modulation is exercised."""
  return jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.1 if "hope_out" in jax.tree_util.keystr(p) else a, params)


def _module(**kw):
  base = dict(width=16, heads=2, rule="delta", form="chunked", chunk_size=8)
  base.update(kw)
  return fw.FastWeightMemory(**base)


@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
@pytest.mark.parametrize("rule,gate,decay", [("delta", True, 0.0), ("hebbian", False, 0.1)])
def test_module_padding_invariance(direction, rule, gate, decay):
  n = 13
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 40, 16))
  module = _module(rule=rule, gate=gate, decay=decay, direction=direction)
  lengths = jnp.asarray([n, 17])
  params = _perturb_hope(module.init(jax.random.PRNGKey(6), x[:, :4], None))
  outs = []
  for t in (20, 40):
    mask = jnp.arange(t)[None] < lengths[:, None]
    xt = x[:, :t]
    y = jax.jit(module.apply)(params, xt, mask)
    assert y.shape == (2, t, 16)
    assert float(jnp.max(jnp.abs(y[0, n:]))) == 0.0   # padded positions read nothing
    outs.append(y)
  np.testing.assert_allclose(outs[0][:, :n], outs[1][:, :n], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs[0][1, :17], outs[1][1, :17], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(outs[0][0, :n]))) > 1e-3


def test_module_forms_agree_and_bf16_close():
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 21, 16))
  mask = jnp.arange(21)[None] < jnp.asarray([21, 11])[:, None]
  chunked = _module(gate=True, direction="bidirectional")
  params = _perturb_hope(chunked.init(jax.random.PRNGKey(8), x, mask))
  y = jax.jit(chunked.apply)(params, x, mask)
  y_rec = jax.jit(_module(gate=True, direction="bidirectional", form="recurrent").apply)(
      params, x, mask)
  np.testing.assert_allclose(y, y_rec, rtol=1e-5, atol=1e-5)
  y16 = jax.jit(_module(gate=True, direction="bidirectional", dtype=jnp.bfloat16).apply)(
      params, x, mask)
  assert y16.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y)))
  assert err < 0.05 * float(jnp.max(jnp.abs(y))), err
  # Gradients flow to every parameter.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(chunked.apply(p, x, mask) ** 2)))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_from_config():
  cfg = config_lib.model_config()
  cfg.memory.rule = "hebbian"
  cfg.memory.decay = 0.05
  module = fw.FastWeightMemory.from_config(cfg.memory, width=16, heads=4,
                                           direction=cfg.memory.direction.image,
                                           dtype="bfloat16")
  assert (module.rule, module.decay, module.direction) == ("hebbian", 0.05, "bidirectional")
  assert module.dtype == jnp.bfloat16 and module.chunk_size == cfg.memory.chunk_size
  x = jnp.ones((1, 5, 16))
  params = module.init(jax.random.PRNGKey(0), x, None)
  assert module.apply(params, x, None).shape == (1, 5, 16)


def test_invalid_arguments():
  q, k, v, beta, alpha, mask = _inputs()
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, beta, rule="oja")
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, beta, form="parallel")
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, beta, direction="sideways")
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, rule="delta")  # delta needs beta
