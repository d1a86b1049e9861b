"""Fast-weight memory: chunked form == recurrent oracle, padding rules, module.

Everything runs at the default matmul precision (no `default_matmul_precision` context):
the memory passes explicit precisions, and a jaxpr test checks which ones.
"""

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


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed=0, t=T, lengths=LENGTHS):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = _unit(jax.random.normal(ks[0], (B, H, t, E)))
  k = _unit(jax.random.normal(ks[1], (B, H, t, E)))
  v = jax.random.normal(ks[2], (B, H, t, E))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, H, t)))
  log_alpha = jax.nn.log_sigmoid(1.5 + jax.random.normal(ks[4], (B, H, t)))
  mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
  return q, k, v, beta, log_alpha, mask


def _loss_and_grads(form, rule, gated, decay, direction, chunk_size):
  """jit(value_and_grad) of <y, w> w.r.t. q, k, v, beta (and log alpha when gated)."""

  def loss(q, k, v, beta, log_alpha, mask, w):
    y = fw.fast_weight_memory(q, k, v, beta, log_alpha if gated else None, mask, rule=rule,
                              form=form, chunk_size=chunk_size, direction=direction,
                              decay=decay)
    return jnp.sum(y * w), y

  argnums = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)
  return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
@pytest.mark.parametrize("rule,gated,decay", VARIANTS, ids=VARIANT_IDS)
def test_chunked_matches_recurrent(rule, gated, decay, direction):
  q, k, v, beta, log_alpha, mask = _inputs()
  w = jax.random.normal(jax.random.PRNGKey(9), (B, H, T, E))
  args = (q, k, v, beta, log_alpha, mask, w)
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
  q, k, v, beta, log_alpha, _ = _inputs(seed=1, t=9, lengths=(9, 9))
  q, k, v, beta, log_alpha = (np.asarray(a, np.float64) for a in (q, k, v, beta, log_alpha))
  alpha = np.exp(log_alpha)
  lam = 0.7
  # hebbian with decay: y_t = sum_{j<=t} lam^(t-j) (q_t . k_j) v_j (decayed linear attention)
  y = fw.memory_recurrent(q, k, v, rule="hebbian", decay=1 - lam)
  scores = np.einsum("bhik,bhjk->bhij", q, k)
  tt = np.arange(9)
  dmat = np.where(tt[:, None] >= tt[None, :], lam ** (tt[:, None] - tt[None, :]), 0.0)
  np.testing.assert_allclose(y, np.einsum("bhij,bhjv->bhiv", scores * dmat, v),
                             rtol=1e-5, atol=1e-5)
  # gated delta: S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
  y = fw.memory_recurrent(q, k, v, beta, log_alpha, rule="delta")
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
  q, k, v, beta, log_alpha, mask = _inputs(seed=2)
  lengths = jnp.asarray(LENGTHS)
  idx = jnp.where(jnp.arange(T)[None] < lengths[:, None],
                  lengths[:, None] - 1 - jnp.arange(T)[None], jnp.arange(T)[None])  # [B, T]

  def rev(a):  # per-row reversal of the valid part, [B, H, T, ...]
    ix = idx[:, None, :] if a.ndim == 3 else idx[:, None, :, None]
    return jnp.take_along_axis(a, jnp.broadcast_to(ix, a.shape), axis=2)

  kw = dict(rule="delta", form=form, chunk_size=8)
  fwd = fw.fast_weight_memory(q, k, v, beta, log_alpha, mask, **kw)
  back = rev(fw.fast_weight_memory(rev(q), rev(k), rev(v), rev(beta), rev(log_alpha), mask,
                                   **kw))
  both = fw.fast_weight_memory(q, k, v, beta, log_alpha, mask, direction="bidirectional", **kw)
  np.testing.assert_allclose(both, fwd + back, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(back))) > 0.1


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_padding_reads_and_writes_nothing(form):
  q, k, v, beta, log_alpha, mask = _inputs(seed=3)
  kw = dict(rule="delta", form=form, chunk_size=16, direction="bidirectional")
  y = fw.fast_weight_memory(q, k, v, beta, log_alpha, mask, **kw)
  assert float(jnp.max(jnp.abs(y[1, :, LENGTHS[1]:]))) == 0.0
  # Garbage in the padded positions changes nothing.
  noise = jax.random.normal(jax.random.PRNGKey(4), q.shape) * (~mask)[:, None, :, None]
  pad = ~mask[:, None, :]
  y2 = fw.fast_weight_memory(q + noise, k + noise, v + noise, jnp.where(pad, 0.9, beta),
                             jnp.where(pad, -4.0, log_alpha), mask, **kw)
  real = mask[:, None, :, None]
  np.testing.assert_array_equal(jnp.where(real, y2, 0), jnp.where(real, y, 0))


def _perturb_gain(params):
  """Nonzero context-gain output layer (zero at init) so the gains are exercised."""
  return jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.1 if "gain_out" in jax.tree_util.keystr(p) else a, params)


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
  params = _perturb_gain(module.init(jax.random.PRNGKey(6), x[:, :4], None))
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
  """Chunked == recurrent at the default matmul precision (the module sets its own)."""
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 21, 16))
  mask = jnp.arange(21)[None] < jnp.asarray([21, 11])[:, None]
  chunked = _module(gate=True, direction="bidirectional")
  params = _perturb_gain(chunked.init(jax.random.PRNGKey(8), x, mask))
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
  q, k, v, beta, log_alpha, mask = _inputs()
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, beta, rule="oja")
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, beta, form="parallel")
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, beta, direction="sideways")
  with pytest.raises(ValueError):
    fw.fast_weight_memory(q, k, v, rule="delta")  # delta needs beta


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.parametrize("rule,gate,decay", [("delta", True, 0.0), ("hebbian", False, 0.1)])
def test_causal_output_ignores_later_tokens(form, rule, gate, decay):
  """With every option on (context gain, gate or decay), y_t does not see x_{>t}."""
  t, cut = 24, 11
  x = jax.random.normal(jax.random.PRNGKey(10), (2, t, 16))
  module = _module(rule=rule, gate=gate, decay=decay, form=form, context_gain=True,
                   direction="causal", qk_norm="rms")
  params = _perturb_gain(module.init(jax.random.PRNGKey(11), x, None))
  x2 = x.at[:, cut + 1:].add(3.0 * jax.random.normal(jax.random.PRNGKey(12), (2, t - cut - 1, 16)))
  y, y2 = module.apply(params, x, None), module.apply(params, x2, None)
  np.testing.assert_allclose(y[:, :cut + 1], y2[:, :cut + 1], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(y[:, cut + 1:] - y2[:, cut + 1:]))) > 1e-2


def test_context_gain_is_per_token_prefix_mean_when_causal():
  x = jax.random.normal(jax.random.PRNGKey(13), (2, 5, 3))
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  s = fw.context_summary(x, mask, causal=True)
  np.testing.assert_allclose(s[0, 2], x[0, :3].mean(0), rtol=1e-6)
  np.testing.assert_allclose(s[1, 4], x[1, :3].mean(0), rtol=1e-6)  # padding not counted
  full = fw.context_summary(x, mask, causal=False)
  assert full.shape == (2, 1, 3)
  np.testing.assert_allclose(full[1, 0], x[1, :3].mean(0), rtol=1e-6)
  # The MLP's hidden layer is small (not d x d): context_hidden units.
  shapes = jax.eval_shape(_module(width=64, heads=4, context_hidden=8).init,
                          jax.random.PRNGKey(0), jnp.ones((1, 4, 64)), None)["params"]
  assert shapes["gain_hidden"]["kernel"].shape == (64, 8)
  assert shapes["gain_out"]["kernel"].shape == (8, 12)


@pytest.mark.parametrize("t,c,plan", [(16, 64, (1, 16)), (77, 64, (2, 39)), (36, 8, (5, 8)),
                                      (784, 64, (13, 61)), (64, 64, (1, 64)), (1, 8, (1, 1))])
def test_chunk_plan_never_pads_short_sequences_to_the_chunk(t, c, plan):
  assert fw.chunk_plan(t, c) == plan
  n, cc = plan
  assert cc <= c and n * cc >= t and n * cc - t < n


def test_short_sequence_runs_at_its_own_length():
  """T = 16 with C = 64 builds no 64-sized array (it used to pad to 64 tokens)."""
  q, k, v, beta, log_alpha, mask = _inputs(t=16, lengths=(16, 9))
  jaxpr = jax.make_jaxpr(lambda *a: fw.memory_chunked(*a, rule="delta", chunk_size=64))(
      q, k, v, beta, log_alpha, mask)
  shapes = [tuple(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars]
  assert not [s for s in shapes if 64 in s], "a short sequence was padded up to the chunk"
  y_ref = fw.memory_recurrent(q, k, v, beta, log_alpha, mask, rule="delta")
  np.testing.assert_allclose(fw.memory_chunked(q, k, v, beta, log_alpha, mask, rule="delta",
                                               chunk_size=64), y_ref, rtol=1e-5, atol=1e-5)


def _dot_precisions(fn, *args):
  """Precision config of every dot_general in fn's jaxpr (sub-jaxprs included)."""
  out = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        out.append(eqn.params["precision"])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def test_state_recurrence_and_inverse_run_at_highest_precision():
  """Whatever the default matmul precision, the fp32 memory maths asks for HIGHEST
  (TF32 on GPUs / bf16 passes on TPUs would otherwise apply)."""
  q, k, v, beta, log_alpha, mask = _inputs(t=20, lengths=(20, 13))
  highest = jax.lax.Precision.HIGHEST
  is_highest = lambda p: p is not None and all(x == highest for x in p)
  for fn in (lambda *a: fw.memory_recurrent(*a, rule="delta"),
             lambda *a: fw.memory_chunked(*a, rule="delta", chunk_size=8)):
    precisions = _dot_precisions(fn, q, k, v, beta, log_alpha, mask)
    assert precisions and all(is_highest(p) for p in precisions), precisions
  # precision="default" relaxes only the intra-chunk score products: the inverse and every
  # product with the state stay at HIGHEST.
  relaxed = _dot_precisions(
      lambda *a: fw.memory_chunked(*a, rule="delta", chunk_size=8,
                                   precision=jax.lax.Precision.DEFAULT),
      q, k, v, beta, log_alpha, mask)
  relaxed_count = sum(not is_highest(p) for p in relaxed)
  assert relaxed_count == 3, relaxed  # Q K^T, K K^T, (Q K^T * D) U'; nothing with S


def test_options_that_do_nothing_are_errors():
  q, k, v, beta, log_alpha, mask = _inputs()
  with pytest.raises(ValueError, match="decay.*delta"):
    fw.fast_weight_memory(q, k, v, beta, mask=mask, rule="delta", decay=0.1)
  with pytest.raises(ValueError, match="gate.*hebbian"):
    fw.fast_weight_memory(q, k, v, None, log_alpha, mask, rule="hebbian")
  x = jnp.ones((1, 4, 16))
  with pytest.raises(ValueError, match="decay.*delta"):
    _module(rule="delta", decay=0.1).init(jax.random.PRNGKey(0), x, None)
  with pytest.raises(ValueError, match="gate.*hebbian"):
    _module(rule="hebbian", gate=True).init(jax.random.PRNGKey(0), x, None)
  with pytest.raises(ValueError, match="precision"):
    _module(precision="fast").init(jax.random.PRNGKey(0), x, None)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_bidirectional_counts_each_tokens_own_write_twice(form):
  """Documented behaviour: y_t = q_t S_t^fwd + q_t S_t^bwd, both holding token t's write."""
  q, k, v, _, _, _ = _inputs(t=1, lengths=(1, 1))
  y = fw.fast_weight_memory(q, k, v, rule="hebbian", form=form, chunk_size=4,
                            direction="bidirectional")
  ref = 2.0 * jnp.sum(q * k, -1, keepdims=True) * v
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk_norm", ["l2", "rms"])
def test_delta_keys_are_unit_norm(qk_norm):
  x = 5.0 * jax.random.normal(jax.random.PRNGKey(16), (2, 9, 16))
  module = _module(qk_norm=qk_norm, context_gain=False)
  params = module.init(jax.random.PRNGKey(17), x, None)
  _, inter = module.apply(params, x, None, mutable=["intermediates"])
  k = inter["intermediates"]["unit_key"][0]
  np.testing.assert_allclose(jnp.linalg.norm(k, axis=-1), 1.0, rtol=1e-4)
  assert "key_scale" not in params["params"]  # no learnable scale on the delta key
