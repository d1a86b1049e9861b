"""The self-modifying Titans memory (models/titans.py): the chunk-parallel form against the
token-by-token oracle and against a per-chunk reference loop written here, padding,
causality, the bidirectional form, and gradients that reach every initial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlmm_jax.models import titans

B, H, E, N = 2, 2, 4, 3


def _inputs(hidden, t=9, seed=0, lengths=(9, 6)):
  """Initial states, read-outs, x, q [B, H, T, E] and a mask with the given lengths."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 32))
  normal = lambda shape, s=1.0: s * jax.random.normal(next(keys), shape)
  states = {}
  for c in titans.MEMORIES:
    if hidden:
      states[c] = dict(w1=normal((B, H, E, hidden), 0.6), w2=normal((B, H, hidden, E), 0.4))
    else:
      states[c] = dict(w=normal((B, H, E, E), 0.3))
  readout = dict(eta_w=normal((H, E)), eta_b=normal((H,)) - 1.0,
                 alpha_w=normal((H, E)), alpha_b=normal((H,)) + 2.0)
  x, q = normal((B, H, t, E)), normal((B, H, t, E))
  mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
  return states, readout, x, q, mask


# ----------------------------------------------------------------------------- reference


def _m(theta, x):
  """One memory on one vector x [E] (theta of one batch row and head)."""
  if "w" in theta:
    return x + x @ theta["w"]
  return x + jax.nn.silu(x @ theta["w1"]) @ theta["w2"]


def _unit(x):
  return x / jnp.sqrt(jnp.sum(x * x) + 1e-6)


def _reference(states, readout, x, q, mask, chunks):
  """The chunked rule written out per row, head, chunk and token: every token of a chunk
  reads the chunk's starting states and takes its gradient there; the chunk's steps are
  then applied one after another: W <- alpha W - eta grad_i(theta_start), and on the layer
  whose input is the key (Eq. 88) also - eta k^T (k W) with W the state before the step."""
  y = np.zeros(x.shape, np.float32)
  for b in range(x.shape[0]):
    for h in range(x.shape[1]):
      theta = {c: jax.tree.map(lambda w: w[b, h], states[c]) for c in titans.MEMORIES}
      for lo, hi in chunks:
        cur = theta
        for t in range(lo, hi):
          if not mask[b, t]:
            continue
          xt = x[b, h, t]
          k = _unit(_m(theta["k"], xt))
          v = _unit(_m(theta["v"], xt))
          eta = titans.ETA_MAX * jax.nn.sigmoid(_m(theta["eta"], xt) @ readout["eta_w"][h]
                                                + readout["eta_b"][h])
          alpha = jax.nn.sigmoid(_m(theta["alpha"], xt) @ readout["alpha_w"][h]
                                 + readout["alpha_b"][h])
          y[b, h, t] = _m(theta["memory"], _unit(q[b, h, t]))
          nxt = {}
          for c in titans.MEMORIES:
            target = _m(theta[c], v)
            grad = jax.grad(lambda th, target=target: jnp.sum((_m(th, k) - target) ** 2))(
                theta[c])
            nxt[c] = jax.tree.map(lambda w, g: alpha * w - eta * g, cur[c], grad)
            first = "w" if "w" in cur[c] else "w1"
            nxt[c][first] = nxt[c][first] - eta * jnp.outer(k, k @ cur[c][first])
          cur = nxt
        theta = cur
  return y


def _chunk_bounds(t, chunk_size):
  return [(lo, min(lo + chunk_size, t)) for lo in range(0, t, chunk_size)]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("hidden", [N, 0])
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_chunked_with_chunk_one_equals_recurrent(hidden, direction):
  """Outputs and gradients w.r.t. inputs, initial states and read-outs, 1e-5 in fp32."""
  states, readout, x, q, mask = _inputs(hidden)
  proj = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  def loss(form, states, readout, x, q):
    y = titans.titans_memory(states, readout, x, q, mask, form=form, chunk_size=1,
                             direction=direction)
    return jnp.sum(y * proj), y

  args = (states, readout, x, q)
  (l1, y1), g1 = jax.value_and_grad(lambda *a: loss("recurrent", *a), argnums=(0, 1, 2, 3),
                                    has_aux=True)(*args)
  (l2, y2), g2 = jax.value_and_grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2, 3),
                                    has_aux=True)(*args)
  np.testing.assert_allclose(y2, y1, atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(y1))) > 0.1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g2, g1)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g1))


@pytest.mark.parametrize("hidden,chunk_size", [(N, 4), (0, 3)])
def test_chunked_equals_the_per_chunk_reference(hidden, chunk_size):
  states, readout, x, q, mask = _inputs(hidden, t=11, lengths=(11, 7))
  got = titans.titans_chunked(states, readout, x, q, mask, chunk_size=chunk_size)
  want = _reference(states, readout, np.asarray(x), np.asarray(q), np.asarray(mask),
                    _chunk_bounds(11, chunk_size))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The chunks differ from the token-by-token rule (else this test could not tell).
  rec = titans.titans_recurrent(states, readout, x, q, mask)
  assert float(jnp.max(jnp.abs(rec - got))) > 1e-3


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_padding_writes_and_reads_nothing(form, direction):
  """Row 1 has 6 real tokens: with 3 or 9 more padded tokens of garbage, its real outputs
  are those of the 6 tokens alone, and its padded outputs are zero."""
  states, readout, x, q, mask = _inputs(N, t=9, lengths=(9, 6))
  run = lambda x, q, mask: titans.titans_memory(states, readout, x, q, mask, form=form,
                                                chunk_size=4, direction=direction)
  y = run(x, q, mask)
  alone = run(x[:, :, :6], q[:, :, :6], mask[:, :6])
  np.testing.assert_allclose(y[1, :, :6], alone[1], atol=1e-5)
  assert float(jnp.max(jnp.abs(y[1, :, 6:]))) == 0.0
  garbage = jax.random.normal(jax.random.PRNGKey(5), (B, H, 9, E)) * 100
  longer = lambda a: jnp.concatenate([a, garbage], axis=2)
  y_long = run(longer(x), longer(q), jnp.concatenate([mask, jnp.zeros((B, 9), bool)], 1))
  np.testing.assert_allclose(y_long[1, :, :6], alone[1], atol=1e-5)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_causal_output_ignores_later_tokens(form):
  states, readout, x, q, mask = _inputs(N, t=9, lengths=(9, 9))
  run = lambda x, q, direction: titans.titans_memory(states, readout, x, q, mask, form=form,
                                                     chunk_size=3, direction=direction)
  changed = x.at[:, :, 5:].add(3.0), q.at[:, :, 5:].add(3.0)
  np.testing.assert_allclose(run(*changed, "causal")[:, :, :5], run(x, q, "causal")[:, :, :5],
                             atol=1e-6)
  # The bidirectional memory does see them.
  assert float(jnp.max(jnp.abs(run(*changed, "bidirectional")[:, :, :5]
                               - run(x, q, "bidirectional")[:, :, :5]))) > 1e-3


def test_bidirectional_is_both_causal_passes():
  """y = the causal pass + the causal pass over each row's real tokens reversed (the
  padding, here 3 tokens of row 1, stays at the end)."""
  states, readout, x, q, mask = _inputs(N, lengths=(9, 6))
  run = lambda x, q, direction: titans.titans_memory(states, readout, x, q, mask,
                                                     chunk_size=4, direction=direction)
  rev = np.concatenate([np.arange(8, -1, -1), np.arange(5, -1, -1).tolist() + [6, 7, 8]])
  rows = lambda a: jnp.stack([a[0][:, rev[:9]], a[1][:, rev[9:]]])
  np.testing.assert_array_equal(rows(x), titans.reverse_real_tokens(x, mask))
  want = run(x, q, "causal") + rows(run(rows(x), rows(q), "causal"))
  np.testing.assert_allclose(run(x, q, "bidirectional"), want, atol=1e-6)


@pytest.mark.parametrize("hidden", [8, 0])
def test_gradient_reaches_every_initial_state(hidden):
  """Through the layer: every parameter (W_q, the five memories' initial states, the rate
  read-outs, the output projection) gets a non-zero gradient."""
  mod = titans.SelfModifyingMemory(width=16, heads=2, hidden=hidden, chunk_size=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
  mask = jnp.arange(7)[None] < jnp.array([[7], [5]])
  params = mod.init(jax.random.PRNGKey(1), x, mask)["params"]
  expected = {"query", "out", "eta_w", "eta_b", "alpha_w", "alpha_b"} | {
      f"M_{c}_{w}" for c in titans.MEMORIES for w in (("w1", "w2") if hidden else ("w",))}
  assert set(params) == expected
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(mod.apply({"params": p}, x, mask))))(params)
  for name, g in grads.items():
    assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g)) > 1e-7, name


def test_bad_options_are_errors():
  states, readout, x, q, mask = _inputs(N)
  with pytest.raises(ValueError, match="hope.form"):
    titans.titans_memory(states, readout, x, q, mask, form="parallel")
  with pytest.raises(ValueError, match="direction"):
    titans.titans_memory(states, readout, x, q, mask, direction="both")


@pytest.mark.parametrize("hidden", [32, 0])
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_memories_stay_bounded_at_the_largest_rate(hidden, form):
  """64 tokens of random input with eta at ETA_MAX and alpha near 1 (no forgetting): the
  read-outs stay of the size they start at (with ETA_MAX = 1 the linear memories' grew
  5-30 times over these tokens, at 2 they overflowed)."""
  mod = titans.SelfModifyingMemory(width=32, heads=2, hidden=hidden, chunk_size=8, form=form)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 32))
  params = mod.init(jax.random.PRNGKey(1), x)["params"]
  params = dict(params, eta_b=jnp.full_like(params["eta_b"], 6.0),
                alpha_b=jnp.full_like(params["alpha_b"], 8.0))
  y = mod.apply({"params": params}, x)
  assert bool(jnp.all(jnp.isfinite(y)))
  assert float(jnp.max(jnp.abs(y[:, -8:]))) < 2.0 * float(jnp.max(jnp.abs(y[:, :8])))
