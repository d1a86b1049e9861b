"""Test-time training (models/ttt.py): identity at init, objective and its gradient against
a straightforward reference, batch independence, trained parameters untouched, jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlmm_jax import config_lib
from nlmm_jax.models import nlmm
from nlmm_jax.models import ttt

LR, STEPS, RANK = 0.1, 2, 4


def _tiny_model_config():
  c = config_lib.load_config("demo")
  m = c.model
  m.width, m.heads, m.mlp_mult, m.num_latents, m.embed_dim = 16, 2, 2, 4, 16
  m.image_size, m.patch_size = 16, 8                  # 4 patches
  m.max_frames, m.audio_subsample = 16, 4             # 4 audio tokens
  m.max_text_len, m.vocab_size = 8, 32
  m.depth.text = m.depth.image = m.depth.audio = 1
  m.memory.chunk_size = 4                             # text: 2 chunks
  m.memory.context_gain = True                       # every term of the objective active
  m.memory.context_hidden = 8
  return c


@pytest.fixture(scope="module")
def setup():
  c = _tiny_model_config()
  model = nlmm.build_model(c.model, c.loss)
  # Random parameters of the model's shapes (no init to compile; the context-gain output
  # layer, zero at init, must be non-zero here).
  leaves, tree = jax.tree_util.tree_flatten_with_path(nlmm.abstract_params(c))
  keys = jax.random.split(jax.random.key(1), len(leaves))

  def draw(path, leaf, key):
    name = str(path[-1].key)
    z = jax.random.normal(key, leaf.shape, leaf.dtype)
    if "scale" in name:
      return 1.0 + 0.1 * z
    if name == "kernel":
      return z / math.sqrt(math.prod(leaf.shape[:-1]))
    return 0.1 * z

  params = jax.tree.unflatten(tree, [draw(p, l, k) for (p, l), k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  lengths = np.array([8, 5, 3, 6])
  mask = np.arange(8)[None] < lengths[:, None]
  text = {"text": jnp.asarray(rng.integers(1, 32, (4, 8)) * mask, jnp.int32),
          "text_mask": jnp.asarray(mask)}
  image = {"image": jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)}
  amask = np.arange(16)[None] < np.array([[16], [10]])
  audio = {"audio": jnp.asarray(rng.normal(size=(2, 16, 80)) * amask[..., None], jnp.float32),
           "audio_mask": jnp.asarray(amask)}
  return dict(model=model, params=params, config=c,
              inputs={"text": text, "image": image, "audio": audio})


@pytest.fixture(scope="module")
def ttt_text(setup):
  """jit(ttt.embed) for text, compiled once, and its output on the text batch."""
  model = setup["model"]
  fn = jax.jit(lambda p, x: ttt.embed(model, p, x, "text", steps=STEPS, lr=LR, rank=RANK))
  return fn, fn(setup["params"], setup["inputs"]["text"])


@pytest.fixture(scope="module")
def plain(setup):
  """{modality: (plain embedding, ttt.embed with steps=0, the adapter path with fresh
  adapters)}, each modality's three in one jit."""
  model = setup["model"]

  def three(params, inputs, modality):
    embed = lambda variables: model.apply(variables, inputs, modality, method=nlmm.NLMM.embed)
    return (embed({"params": params}), ttt.embed(model, params, inputs, modality, steps=0),
            embed({"params": params, "ttt": ttt.init_adapters(params, RANK, modality)}))

  fn = jax.jit(three, static_argnums=2)
  return {m: fn(setup["params"], setup["inputs"][m], m) for m in ("text",)}


def _row(inputs, i):
  return {k: v[i:i + 1] for k, v in inputs.items()}


def test_steps_zero_is_the_plain_embedding(plain):
  for ref, steps0, _ in plain.values():
    np.testing.assert_array_equal(np.asarray(steps0), np.asarray(ref))


def test_adapters_are_the_identity_at_init(setup, plain):
  """The adapter path with fresh adapters computes the trained model's embedding."""
  assert "ttt" not in str(jax.tree_util.tree_structure(setup["params"]))
  for ref, _, identity in plain.values():
    np.testing.assert_allclose(identity, ref, atol=1e-6, rtol=0)
  assert set(ttt.init_adapters(setup["params"], RANK, "text")) == {"text_encoder", "clm"}


def test_ttt_changes_the_embedding_and_lowers_the_objective(setup, plain, ttt_text):
  _, got = ttt_text
  assert np.all(np.abs(np.asarray(got) - np.asarray(plain["text"][0])).max(axis=1) > 1e-3)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def sgd_text(setup):
  """Explicit SGD on ONE (padded) text example: jit(value_and_grad of the objective) and
  jit(embed with given adapters), each compiled once."""
  model, params = setup["model"], setup["params"]
  example = _row(setup["inputs"]["text"], 1)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda ad: ttt.objective(model, params, ad, example, "text")[0]))
  embed = jax.jit(lambda ad: model.apply({"params": params, "ttt": ad}, example, "text",
                                         method=nlmm.NLMM.embed)[0])

  def run(steps, lr):
    """(objective before each step and after the last, embedding after `steps`)."""
    adapters, losses = ttt.init_adapters(params, RANK, "text"), []
    for _ in range(steps):
      value, grads = value_and_grad(adapters)
      losses.append(float(value))
      adapters = jax.tree.map(lambda a, g: a - lr * g, adapters, grads)
    losses.append(float(value_and_grad(adapters)[0]))
    return losses, embed(adapters)
  return run


def test_objective_decreases_for_small_steps(sgd_text):
  losses, _ = sgd_text(5, 0.01)
  assert np.all(np.diff(losses) < 0), losses
  assert losses[-1] < 0.99 * losses[0], losses


# --------------------------------------------------------------------- the reference


@pytest.mark.parametrize("rule,gated,direction", [("delta", True, "bidirectional"),
                                                  ("hebbian", False, "causal")])
def test_prediction_errors_chunked_equal_recurrent(rule, gated, direction):
  """The chunked form's e_t == the token-by-token oracle's (padded rows, 3 chunks)."""
  from nlmm_jax.models import fast_weights as fw  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.key(3), 5)
  b, h, t, e = 2, 2, 11, 4
  unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  q, k = unit(jax.random.normal(ks[0], (b, h, t, e))), unit(jax.random.normal(ks[1], (b, h, t, e)))
  v = jax.random.normal(ks[2], (b, h, t, e))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, h, t)))
  log_alpha = jax.nn.log_sigmoid(1.5 + jax.random.normal(ks[4], (b, h, t))) if gated else None
  mask = jnp.arange(t)[None] < jnp.array([[t], [7]])
  kw = dict(rule=rule, direction=direction, decay=0.1 if rule == "hebbian" else 0.0,
            return_errors=True)
  y_rec, e_rec = fw.fast_weight_memory(q, k, v, beta, log_alpha, mask, form="recurrent", **kw)
  y_chk, e_chk = fw.fast_weight_memory(q, k, v, beta, log_alpha, mask, form="chunked",
                                       chunk_size=4, **kw)
  np.testing.assert_allclose(e_chk, e_rec, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_chk, y_rec, atol=1e-5, rtol=1e-5)
  assert float(jnp.min(jnp.where(mask[:, None], e_rec, 1.0))) > 0
  assert float(jnp.max(jnp.abs(jnp.where(mask[:, None], 0.0, e_rec)))) == 0  # padding
  y_plain = fw.fast_weight_memory(q, k, v, beta, log_alpha, mask, form="chunked",
                                  chunk_size=4, rule=rule, direction=direction,
                                  decay=kw["decay"])
  np.testing.assert_array_equal(y_plain, y_chk)


def _reference_layer_objective(x, p, adapters, direction, mask, heads):
  """The docstring's L_l for one example and one memory layer, token by token.

  x [T, d] the layer input, p its params, adapters {key_a, key_b}, mask [T] bool.
  (The demo memory: delta rule, ungated, l2 key norm, context gain.)
  """
  t_len = x.shape[0]
  m = np.ones(t_len, bool) if mask is None else np.asarray(mask)
  mf = jnp.asarray(m, jnp.float32)[:, None]
  k = x @ p["key"]["kernel"] + (x @ adapters["key_a"]) @ adapters["key_b"]     # [T, W]
  v = x @ p["value"]["kernel"]
  e = k.shape[-1] // heads
  k, v = k.reshape(t_len, heads, e), v.reshape(t_len, heads, e)
  k = k / jnp.sqrt(jnp.sum(k * k, axis=-1, keepdims=True) + 1e-6)
  if direction == "causal":
    s = jnp.cumsum(x * mf, axis=0) / jnp.maximum(jnp.cumsum(mf, axis=0), 1.0)
  else:
    s = jnp.broadcast_to(jnp.sum(x * mf, axis=0) / jnp.maximum(jnp.sum(mf), 1.0), x.shape)
  hidden = jax.nn.gelu(s @ p["gain_hidden"]["kernel"] + p["gain_hidden"]["bias"])
  z = jnp.tanh(hidden @ p["gain_out"]["kernel"] + p["gain_out"]["bias"]).reshape(t_len, 3, heads)
  k = k * (1.0 + (math.sqrt(2.0) - 1.0) * z[:, 1])[..., None]
  v = v * (1.0 + z[:, 2])[..., None]
  beta = jax.nn.sigmoid(x @ p["beta"]["kernel"] + p["beta"]["bias"])       # [T, H]
  orders = [range(t_len)] + ([] if direction == "causal" else [range(t_len - 1, -1, -1)])
  total = 0.0
  for order in orders:
    state = jnp.zeros((heads, e, e))
    for t in order:
      if not m[t]:
        continue                                     # padding writes and predicts nothing
      r = v[t] - jnp.einsum("hk,hkv->hv", k[t], state, precision="highest")
      total = total + jnp.sum(r * r)
      state = state + jnp.einsum("hk,hv->hkv", k[t], beta[t][:, None] * r,
                                 precision="highest")
  return total / m.sum()


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


# text: causal, padded, two chunks; audio: bidirectional, padded (front padding in the
# reversed pass); the CLM layer of both: bidirectional, unmasked.
@pytest.mark.parametrize("modality,row", [("text", 1), ("audio", 1)])
def test_inner_gradient_equals_the_reference(setup, modality, row):
  """jax.grad of the memories' own objective == grad of the stated equation, per layer."""
  model, params, cfg = setup["model"], setup["params"], setup["config"].model
  example = _row(setup["inputs"][modality], row)
  # Non-zero adapters, so that every term (and the gradient w.r.t. A) is active.
  adapters = ttt.init_adapters(params, RANK, modality)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  adapters = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                       for a, k in zip(leaves, keys)])

  @jax.jit
  def under_test(adapters):
    value, grads = jax.value_and_grad(
        lambda ad: ttt.objective(model, params, ad, example, modality)[0])(adapters)
    # Each memory's input, from a forward with the same adapters.
    _, inter = model.apply({"params": params, "ttt": adapters}, example, modality,
                           method=nlmm.NLMM.embed, capture_intermediates=(
                               lambda mdl, method: mdl.name == "norm_memory"),
                           mutable=["intermediates"])
    return value, grads, inter

  value, grads, inter = under_test(adapters)
  mask = example.get(f"{modality}_mask")
  token_mask = None if mask is None else np.asarray(mask[0])
  if modality == "audio":                            # the front-end's subsampled mask
    token_mask = token_mask[::cfg.audio_subsample]
  total = 0.0
  paths = ttt._memory_paths(params, modality)        # pylint: disable=protected-access
  assert len(paths) == 2                             # the encoder block and the CLM
  for path in paths:
    x = _get(inter["intermediates"], path[:-1] + ("norm_memory", "__call__"))[0][0]
    latent = path[0] == "clm"
    direction = cfg.memory.direction["latent" if latent else modality]
    ref = lambda ad, x=x, path=path, latent=latent, direction=direction: (
        _reference_layer_objective(x, _get(params, path), ad, direction,
                                   None if latent else token_mask, cfg.heads))
    ref_value, ref_grad = jax.jit(jax.value_and_grad(ref))(_get(adapters, path))
    total += float(ref_value)
    for name in ("key_a", "key_b"):
      got, want = _get(grads, path)[name], ref_grad[name]
      assert float(jnp.max(jnp.abs(want))) > 1e-3
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(want))),
                                 err_msg=f"{'/'.join(path)} {name}")
  np.testing.assert_allclose(float(value), total, rtol=1e-5)


# ------------------------------------------------------------- independence, params, jit


def test_batch_independence(setup, ttt_text):
  """A row's TTT embedding is the same with other batch mates and other padding lengths."""
  fn, got = ttt_text
  params, text = setup["params"], setup["inputs"]["text"]
  perm = np.array([3, 0, 1, 2])                      # row 1 moves to position 2
  others = {k: v[perm] for k, v in text.items()}
  others["text"] = others["text"].at[0].set((others["text"][0] * 7 + 3) % 32)  # new mate
  moved = fn(params, others)
  np.testing.assert_allclose(moved[2], got[1], atol=1e-5, rtol=0)
  # Alone with a shorter padding (T = 6 >= its 5 tokens) next to another example.
  short = {k: v[jnp.array([1, 2])][:, :6] for k, v in text.items()}
  np.testing.assert_allclose(fn(params, short)[0], got[1], atol=1e-5, rtol=0)


def test_trained_params_unchanged(setup, ttt_text):
  """The params are only read: bit-identical after TTT (nothing donated or updated)."""
  fn, _ = ttt_text
  params = setup["params"]
  before = [np.array(a) for a in jax.tree.leaves(params)]
  fn(params, setup["inputs"]["text"]).block_until_ready()
  for a, b in zip(before, jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_jit_scan_equals_sgd_on_the_adapters_alone(ttt_text, sgd_text):
  """The jitted scan == `STEPS` explicit SGD steps on the adapters only, then the forward
  of the ORIGINAL params with those adapters (so no parameter moved in the loop)."""
  _, got = ttt_text
  _, want = sgd_text(STEPS, LR)
  np.testing.assert_allclose(got[1], want, atol=1e-5, rtol=0)


def test_everything_runs_inside_one_jit(setup):
  steps = 7                                          # no other scan of the model has 7 steps
  jaxpr = str(jax.make_jaxpr(lambda p, x: ttt.embed(
      setup["model"], p, x, "text", steps=steps, lr=LR, rank=RANK))(
          setup["params"], setup["inputs"]["text"]))
  assert "length=7" in jaxpr                         # one scan over the inner steps


def test_settings_and_config():
  c = config_lib.base_config()
  assert (c.ttt.steps, c.ttt.lr, c.ttt.rank) == (0, 0.1, 4)
  # A config saved before TTT existed loads with TTT off.
  saved = c.to_dict()
  del saved["ttt"]
  assert config_lib.config_from_dict(saved).ttt.steps == 0
  with pytest.raises(ValueError, match="ttt.steps"):
    ttt.check_settings(-1, 0.1, 4)
  with pytest.raises(ValueError, match="ttt.rank"):
    ttt.check_settings(1, 0.1, 0)


def test_load_checkpoint_trained_without_ttt(tiny_trained):
  """nlmm_jax.load of a run trained without TTT embeds with it; params never change."""
  import nlmm_jax  # pylint: disable=g-import-not-at-top
  workdir, _ = tiny_trained
  plain = nlmm_jax.load(str(workdir), step="latest")
  adapted = nlmm_jax.load(str(workdir), step="latest", ttt_steps=STEPS)
  assert plain.ttt_settings()[0] == 0 and adapted.ttt_settings() == (STEPS, LR, RANK)
  before = [np.array(a) for a in jax.tree.leaves(adapted.params)]
  captions = ["a small red circle at the top", "a big blue square"]
  e_plain = plain.embed_text(captions)
  e_ttt = adapted.embed_text(captions)
  assert np.abs(e_ttt - e_plain).max() > 1e-4
  np.testing.assert_allclose(plain.embed_text(captions, ttt_steps=STEPS), e_ttt, atol=1e-6)
  np.testing.assert_allclose(adapted.embed_text(captions[:1]), e_ttt[:1], atol=1e-5)
  for a, b in zip(before, jax.tree.leaves(adapted.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
