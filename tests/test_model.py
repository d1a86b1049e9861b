"""NL-MM model: CMS naming/structure, embedding invariances, modality isolation, configs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nlmm_jax import config_lib
from nlmm_jax import losses
from nlmm_jax.models import cms as cms_lib
from nlmm_jax.models import encoders
from nlmm_jax.models import fusion
from nlmm_jax.models import nlmm

CONFIGS = ["demo", "tiny", "small", "medium", "large"]



def small_config(**model_overrides) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  m = c.model
  m.width, m.heads, m.mlp_mult, m.embed_dim, m.num_latents = 32, 2, 2, 16, 4
  m.depth = ml_collections.ConfigDict(dict(text=2, image=1, audio=1))
  m.image_size, m.patch_size = 16, 8
  m.n_mels, m.max_frames, m.max_text_len, m.vocab_size = 8, 64, 40, 50
  m.memory.chunk_size = 8
  m.memory.form = "recurrent"            # the oracle: cheapest to compile
  for k, v in model_overrides.items():
    node = m
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


# XLA's CPU backend optimisations cost more compile time than these tiny programs save.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def init_model(config, batch_size=2, seed=0):
  model = nlmm.build_model(config.model, config.loss)
  params = jit(model.init)(jax.random.key(seed),
                           nlmm.example_batch(config.model, batch_size))["params"]
  return model, params


def random_params(config, seed=0):
  """Params of the config's shapes without compiling `init` (fan-in scaled normals).

  Values cycle through one pool of 1,000,003 normals (a prime length, so rows of a matrix
  do not repeat): drawing 100 M+ fresh normals for the large config costs seconds.
  """
  pool = np.random.default_rng(seed).standard_normal(1_000_003, dtype=np.float32)

  def leaf(path, s):
    name = path[-1].key
    if name == "log_logit_scale":
      return np.full(s.shape, np.log(1 / config.loss.temperature_init), np.float32)
    if name == "scale" or name.endswith("_scale"):
      return np.ones(s.shape, np.float32)
    if name == "bias":
      return np.zeros(s.shape, np.float32)
    std = 0.02 if (name.endswith("embedding") or len(s.shape) < 2) else (
        1.0 / np.sqrt(np.prod(s.shape[:-1])))
    return np.float32(std) * np.resize(pool, s.shape)

  return jax.tree_util.tree_map_with_path(leaf, nlmm.abstract_params(config))


@functools.lru_cache(maxsize=None)
def _embed_fn(model, modality):
  return jit(lambda p, x: model.apply({"params": p}, x, modality, method=nlmm.NLMM.embed))


def embed(model, params, inputs, modality):
  return np.asarray(_embed_fn(model, modality)(params, inputs))


# ----------------------------------------------------------------------------------- CMS


def _cms_config(structure, levels):
  c = small_config()
  c.model.cms.structure = structure
  c.model.cms.levels = ml_collections.ConfigDict(
      {n: dict(update_every=u, lr=1e-3, optimizer="adamw") for n, u in levels})
  return ml_collections.FrozenConfigDict(c.model)


def test_level_order_is_by_frequency():
  cfg = _cms_config("chain", [("a_slow", 64), ("z_fast", 1), ("m_mid", 8)])
  assert cms_lib.level_order(cfg.cms.levels) == ("z_fast", "m_mid", "a_slow")


@pytest.mark.parametrize("structure", ["parallel", "chain"])
def test_cms_structure(structure):
  cfg = _cms_config(structure, [("fast", 1), ("mid", 4), ("slow", 16)])
  cms = cms_lib.CMS.from_config(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  params = cms.init(jax.random.key(1), x)["params"]
  assert set(params) == {"cms_fast", "cms_mid", "cms_slow"}
  out = cms.apply({"params": params}, x)
  level = lambda name, y: cms_lib.CMSLevel(mult=2).apply({"params": params[name]}, y)
  if structure == "parallel":
    ref = level("cms_fast", x) + level("cms_mid", x) + level("cms_slow", x)
  else:  # Eq. 70: y_k = y_{k-1} + f_k(y_{k-1}), fastest level first; returns y_K - x
    y = x
    for name in ("cms_fast", "cms_mid", "cms_slow"):
      y = y + level(name, y)
    ref = y - x
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # The two structures differ once there is more than one level.
  other = cms_lib.CMS.from_config(
      _cms_config("chain" if structure == "parallel" else "parallel",
                  [("fast", 1), ("mid", 4), ("slow", 16)]))
  assert not np.allclose(other.apply({"params": params}, x), out, atol=1e-4)


def _collect_cms(tree, path=()):
  """Paths of every module named `cms` in a param tree -> its children's names."""
  found = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      if k == "cms":
        found[path + (k,)] = set(v)
      found.update(_collect_cms(v, path + (k,)))
  return found


@pytest.mark.parametrize("structure", ["parallel", "chain"])
def test_model_cms_params_named_by_level(structure):
  c = small_config(**{"cms.structure": structure})
  params = nlmm.abstract_params(c)
  found = _collect_cms(params)
  # one CMS per NL block (2 text + 1 image + 1 audio) + the CLM's
  assert len(found) == 5, found
  for path, children in found.items():
    assert children == {"cms_fast", "cms_mid", "cms_slow"}, path
  # Nothing else carries a cms_ name (the optimizer routes by that path component).
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for kp, _ in leaves:
    names = [k.key for k in kp]
    if any(n.startswith("cms_") for n in names):
      assert "cms" in names


# ------------------------------------------------------------------------- invariances


VARIANTS = {
    "default": {},                     # pre-norm, parallel CMS, mean readout, recurrent form
    # chunked form (chunk 8: sequences span several chunks), gated delta rule,
    # bidirectional text, post-norm, chain CMS, attention readout, remat
    "variant": {"memory.form": "chunked", "memory.gate": True,
                "memory.direction.text": "bidirectional", "norm": "post",
                "cms.structure": "chain", "clm_readout": "attention", "remat": True},
    # The other token mixers (model.block), chunks that do not divide the lengths.
    "hope": {"block": "hope", "hope.chunk_size": 5, "hope.hidden": 8},
    "attention": {"block": "attention", "memory.direction.text": "causal"},
}
_MODELS = {}


def get_model(variant):
  """(config, model, params): `init` for the default, cheap random params for the variant."""
  if variant not in _MODELS:
    c = small_config(**VARIANTS[variant])
    if variant == "default":
      _MODELS[variant] = (c,) + init_model(c)
    else:
      _MODELS[variant] = (c, nlmm.build_model(c.model, c.loss), random_params(c, seed=1))
  return _MODELS[variant]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_model(request):
  return get_model(request.param)


def _text_batch(rng, lengths, pad_to, vocab):
  text = rng.integers(1, vocab, size=(len(lengths), pad_to)).astype(np.int32)  # garbage pads
  mask = np.arange(pad_to)[None] < np.asarray(lengths)[:, None]
  return text, mask


def test_text_embedding_ignores_batch_mates_and_padding(variant_model):
  c, model, params = variant_model
  rng = np.random.default_rng(0)
  text, mask = _text_batch(rng, [7, 12, 3], 40, c.model.vocab_size)
  full = embed(model, params, {"text": text, "text_mask": mask}, "text")   # [3, E]
  np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
  # Caption 0 again, now padded to 20 tokens (other garbage), next to a new batch mate.
  other, other_mask = _text_batch(rng, [7, 15], 20, c.model.vocab_size)
  other[0, :7] = text[0, :7]
  again = embed(model, params, {"text": other, "text_mask": other_mask}, "text")
  np.testing.assert_allclose(again[0], full[0], atol=1e-5)
  assert np.abs(full[0] - full[1]).max() > 1e-3    # control: the real tokens do matter


def test_audio_embedding_ignores_batch_mates_and_padding(variant_model):
  c, model, params = variant_model
  rng = np.random.default_rng(1)
  n_mels = c.model.n_mels
  audio = rng.normal(size=(3, 64, n_mels)).astype(np.float32)            # garbage pads
  mask = np.arange(64)[None] < np.array([[37], [64], [21]])
  full = embed(model, params, {"audio": audio, "audio_mask": mask}, "audio")
  # Clip 0 (37 frames) again, now padded to 48 frames, next to a new batch mate.
  other = rng.normal(size=(2, 48, n_mels)).astype(np.float32)
  other[0, :37] = audio[0, :37]
  other_mask = np.arange(48)[None] < np.array([[37], [30]])
  again = embed(model, params, {"audio": other, "audio_mask": other_mask}, "audio")
  np.testing.assert_allclose(again[0], full[0], atol=1e-5)
  assert np.abs(full[0] - full[2]).max() > 1e-3


def test_image_embedding_ignores_batch_mates():
  c, model, params = get_model("default")
  rng = np.random.default_rng(2)
  image = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  full = embed(model, params, {"image": image}, "image")
  other = np.stack([image[1], rng.normal(size=(16, 16, 3)).astype(np.float32)])
  again = embed(model, params, {"image": other}, "image")
  np.testing.assert_allclose(again[0], full[1], atol=1e-5)


def test_image_conv_stem():
  """The conv stem keeps the patch grid, differs from the patch stem, checks its patch."""
  assert encoders.conv_stem_channels(128, 8) == (32, 64, 128)
  assert encoders.conv_stem_channels(512, 16) == (64, 128, 256, 512)
  with pytest.raises(ValueError, match="power-of-2"):
    encoders.conv_stem_channels(128, 6)
  c = small_config(image_stem="conv")
  model, params = init_model(c)
  stem = params["image_encoder"]
  assert "patch_embed" not in stem and sorted(k for k in stem if k.startswith("stem")) == [
      "stem_conv_0", "stem_conv_1", "stem_conv_2"]
  assert stem["stem_conv_2"]["kernel"].shape == (3, 3, 16, 32)   # width 32
  image = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
  tokens, mask = jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x:
                                              m.image_encoder(x)))(params, image)
  assert tokens.shape == (2, (16 // 8) ** 2, 32) and mask is None
  emb = embed(model, params, {"image": image}, "image")
  assert emb.shape == (2, c.model.embed_dim) and np.isfinite(emb).all()
  with pytest.raises(ValueError, match="image_stem"):
    init_model(small_config(image_stem="resnet"))


def test_audio_frontend_mask():
  assert encoders.subsample_strides(4) == (2, 2)
  assert encoders.subsample_strides(6) == (2, 3)
  assert encoders.subsample_strides(1) == ()
  c = small_config()
  enc = encoders.AudioEncoder(ml_collections.FrozenConfigDict(c.model))
  audio = jnp.ones((3, 50, c.model.n_mels))
  mask = np.arange(50)[None] < np.array([[50], [13], [1]])
  (tokens, out_mask), _ = jit(enc.init_with_output)(jax.random.key(0), audio, mask)
  assert tokens.shape == (3, 13, c.model.width)                      # ceil(50 / 4)
  np.testing.assert_array_equal(out_mask.sum(1), [13, 4, 1])          # ceil(len / 4)
  np.testing.assert_array_equal(np.asarray(tokens)[~np.asarray(out_mask)], 0.0)


def test_strided_centre_is_a_strided_slice():
  """The front-end's mask subsampling equals mask[:, ::s] for every length and stride."""
  rng = np.random.default_rng(0)
  for f in (1, 2, 5, 8, 13, 50):
    for s in (2, 3, 5):
      mask = rng.random((3, f)) < 0.6
      got = np.asarray(encoders.strided_centre(jnp.asarray(mask), 2 * (s // 2) + 1, s))
      np.testing.assert_array_equal(got, mask[:, ::s], err_msg=f"F={f} s={s}")


# ----------------------------------------------------------------------- isolation


def test_embeddings_isolated_between_modalities():
  """d embedding_m / d input_n == 0 for m != n, through __call__ with all modalities."""
  c, model, params = get_model("default")
  rng = np.random.default_rng(3)
  text, text_mask = _text_batch(rng, [7, 12, 3], 40, c.model.vocab_size)
  floats = {"image": rng.normal(size=(3, 16, 16, 3)).astype(np.float32),
            "audio": rng.normal(size=(3, 64, c.model.n_mels)).astype(np.float32)}
  audio_mask = np.arange(64)[None] < np.array([[37], [64], [21]])
  ints = {"text": text, "text_mask": text_mask, "audio_mask": audio_mask}
  w = rng.normal(size=(3, c.model.embed_dim)).astype(np.float32)

  def grads(fb):
    f = lambda fb: model.apply({"params": params}, {**fb, **ints})[0]
    embs, vjp_fn = jax.vjp(f, fb)
    # One cotangent per modality: row m is d <w, embedding_m> / d (image, audio).
    cts = {m: jnp.stack([w * (m == n) for n in ("text", "image", "audio")]) for m in embs}
    return embs, jax.vmap(vjp_fn)(cts)[0]

  embs, g = jit(grads)(floats)
  for i, target in enumerate(("text", "image", "audio")):
    for source in ("image", "audio"):
      size = float(jnp.abs(g[source][i]).max())
      if source == target:
        assert size > 0, (target, source)        # control: the test can fail
      else:
        assert size == 0.0, (target, source)
  # __call__ is `embed` per modality.
  alone = embed(model, params, {"text": text, "text_mask": text_mask}, "text")
  np.testing.assert_allclose(embs["text"], alone, atol=1e-5)
  assert set(embs) == {"image", "text", "audio"}
  no_audio = jax.eval_shape(lambda: model.apply(
      {"params": params}, {"image": floats["image"], **ints}))[0]
  assert set(no_audio) == {"image", "text"}


def test_logit_scale_and_bias_params():
  c = small_config()
  model = nlmm.build_model(c.model, c.loss)
  top = model.init(jax.random.key(0), method=nlmm.NLMM.scale)["params"]
  assert set(top) == {"log_logit_scale"}
  np.testing.assert_allclose(model.apply({"params": top}, method=nlmm.NLMM.scale),
                             1 / 0.07, rtol=1e-6)
  c.loss.kind = "siglip"
  model = nlmm.build_model(c.model, c.loss)
  top = model.init(jax.random.key(0), method=nlmm.NLMM.scale)["params"]
  np.testing.assert_allclose(top["logit_bias"], -10.0)
  assert nlmm.abstract_params(c)["logit_bias"].shape == ()


def test_temperature_bound_keeps_its_gradient_and_is_applied_after_the_update():
  """min(exp(s), 100) in the forward pass had zero gradient above the bound, so an
  overshoot could never come back; the bound is now a clip of the parameter."""
  c = small_config()
  model = nlmm.build_model(c.model, c.loss)
  rng = np.random.default_rng(0)
  embs = {m: nlmm.l2_normalize(rng.normal(size=(8, 16)).astype(np.float32))
          for m in ("image", "text")}

  def loss(log_scale):
    scale = model.apply({"params": {"log_logit_scale": log_scale}}, method=nlmm.NLMM.scale)
    return losses.contrastive_loss(embs, scale, c.loss)[0]

  bound = np.log(c.loss.max_logit_scale)
  grads = [float(jax.grad(loss)(jnp.float32(bound + d))) for d in (-0.01, 0.0, 0.01)]
  assert all(g > 1e-2 for g in grads), grads  # random pairs: the loss wants a lower scale
  # One SGD step from the bound moves the scale back below it; the clip only caps.
  stepped = nlmm.clip_logit_scale({"log_logit_scale": jnp.float32(bound) - 0.1 * grads[1]},
                                  c.loss.max_logit_scale)
  assert float(stepped["log_logit_scale"]) < bound - 1e-3
  over = nlmm.clip_logit_scale({"log_logit_scale": jnp.float32(bound + 1.0), "w": 1.0},
                               c.loss.max_logit_scale)
  np.testing.assert_allclose(float(over["log_logit_scale"]), bound, rtol=1e-6)
  assert over["w"] == 1.0


def test_train_step_clips_the_logit_scale_after_the_update():
  from nlmm_jax import train
  from nlmm_jax.optim import levels
  c = small_config()
  c.optim.optimizer = "sgd"
  c.optim.lr, c.optim.warmup_steps = -50.0, 1  # ascent: pushes the scale up past the bound
  model = nlmm.build_model(c.model, c.loss)
  tx = levels.build_optimizer(c)
  state = jit(train.make_init_fn(model, tx, c))(jax.random.PRNGKey(0))
  bound = np.log(c.loss.max_logit_scale)
  state = state.replace(params={**state.params, "log_logit_scale": jnp.float32(bound - 0.01)})
  batch = nlmm.example_batch(c.model, 4)
  rng = np.random.default_rng(0)
  batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
  batch["text"] = rng.integers(1, 50, size=batch["text"].shape).astype(np.int32)
  batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
  step = jit(functools.partial(train.train_step, model=model, tx=tx, loss_cfg=c.loss))
  new, metrics = step(state, batch)
  assert bool(metrics["finite"])
  np.testing.assert_allclose(float(new.params["log_logit_scale"]), bound, rtol=1e-6)


def test_initial_temperature_beyond_the_bound_is_an_error():
  c = small_config()
  c.loss.temperature_init = 0.001
  with pytest.raises(ValueError, match="max_logit_scale"):
    nlmm.build_model(c.model, c.loss)


# --------------------------------------------------------------------------- configs


def test_count_params_matches_init():
  c, _, params = get_model("default")
  n = nlmm.count_params(c)
  assert n == nlmm.param_count(params) == sum(x.size for x in jax.tree.leaves(params))


# Small inputs and depth, real widths/heads/vocab. The fast-weight form is the recurrent
# oracle here: same parameters and outputs as the chunked form, a third of its compile time
# on CPU (the chunked form runs through the full model in the invariance tests above).
SHRINK = ["model.image_size=32", "model.max_frames=64", "model.max_text_len=16",
          "model.depth.text=1", "model.depth.image=1", "model.depth.audio=1",
          "model.memory.form=recurrent"]


# The three slowest cases (20-40 s each: the wide configs compile at XLA's default
# optimisation; HOPE's recurrent memory) run in the slow tier, which CI runs too.
_SLOW_MESH_CASES = {("medium", "nl"), ("large", "nl"), ("demo", "hope")}


@pytest.mark.parametrize("name,block", [
    pytest.param(n, b, marks=[pytest.mark.slow] if (n, b) in _SLOW_MESH_CASES else [])
    for n, b in [(n, "nl") for n in CONFIGS] + [("demo", "hope"), ("demo", "attention")]])
def test_config_trains_on_two_device_mesh(name, block):
  """Real widths/heads/vocab, small inputs and depth: forward+backward under jit, sharded."""
  # The HOPE memory likewise as its recurrent oracle (tests/test_titans.py ties the forms).
  hope_form = ["model.hope.form=recurrent"] if block == "hope" else []
  c = config_lib.load_config(name, SHRINK + hope_form + [f"model.block={block}"])
  full = config_lib.load_config(name)
  assert (c.model.width, c.model.heads) == (full.model.width, full.model.heads)
  model = nlmm.build_model(c.model, c.loss)
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)
  batch = nlmm.example_batch(c.model, 2)
  batch["text"] = rng.integers(1, c.model.vocab_size, batch["text"].shape).astype(np.int32)
  batch["text_mask"][1, 9:] = False
  batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
  batch["audio_mask"][0, 40:] = False
  batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
  batch = jax.device_put(batch, data)
  params = jax.device_put(random_params(c), replicated)

  def loss_fn(p, b):
    embs, scale = model.apply({"params": p}, b, train=True)
    return losses.contrastive_loss(embs, scale, c.loss)[0]

  def step(p, b):  # summaries inside the program: no per-leaf dispatch on the host
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    tops = ("text_encoder", "image_encoder", "audio_encoder", "clm", "log_logit_scale")
    norms = {t: global_norm(grads[t]) for t in tops}
    return loss, norms

  # XLA's default optimisation for the wide configs: at level 0 d=1024 runs ~10x slower.
  compile_fast = c.model.width <= 128
  loss, norms = (jit if compile_fast else jax.jit)(
      step, in_shardings=(replicated, data), out_shardings=replicated)(params, batch)
  assert np.isfinite(float(loss))
  for top, norm in norms.items():
    assert np.isfinite(float(norm)) and float(norm) > 0, top


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def test_image_sincos2d_positions():
  """Fixed 2-D sine-cosine positions: the formula by hand, no learned table, still used."""
  pos = np.asarray(encoders.sincos2d(2, 3, 8))                      # omega = (1, 1e-2)
  assert pos.shape == (6, 8)
  for i in range(6):
    y, x = divmod(i, 3)
    want = [np.sin(y), np.sin(y / 100), np.cos(y), np.cos(y / 100),
            np.sin(x), np.sin(x / 100), np.cos(x), np.cos(x / 100)]
    np.testing.assert_allclose(pos[i], want, atol=1e-6)
  with pytest.raises(ValueError, match="width % 4"):
    encoders.sincos2d(2, 2, 6)
  image = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
  tokens = {}
  for posemb in ("learn", "sincos2d"):
    model, params = init_model(small_config(image_posemb=posemb))
    assert ("pos_embedding" in params["image_encoder"]) == (posemb == "learn")
    tokens[posemb] = jit(lambda p, x: model.apply(
        {"params": p}, x, method=lambda m, x: m.image_encoder(x)[0]))(params, image)
  assert np.abs(np.asarray(tokens["learn"]) - np.asarray(tokens["sincos2d"])).max() > 1e-3
  with pytest.raises(ValueError, match="image_posemb"):
    init_model(small_config(image_posemb="rope"))


def test_clm_readouts_pool_the_same_slots():
  """concat = the L slots side by side; mean and attention pool those same slots."""
  c = small_config()
  m = c.model
  tokens = jnp.asarray(np.random.default_rng(5).normal(size=(3, 7, m.width)), jnp.float32)
  mask = np.arange(7)[None] < np.array([[7], [4], [1]])
  clm = lambda readout: fusion.CentralLatentMemory(
      ml_collections.FrozenConfigDict(dict(m.to_dict(), clm_readout=readout)))
  params = jit(lambda r: clm("mean").init(r, tokens, mask, "image"))(jax.random.key(0))
  run = lambda readout, p: np.asarray(jit(
      lambda p: clm(readout).apply(p, tokens, mask, "image"))(p))
  slots = run("concat", params)
  assert slots.shape == (3, m.num_latents * m.width)
  slots = slots.reshape(3, m.num_latents, m.width)
  np.testing.assert_allclose(run("mean", params), slots.mean(1), atol=1e-5)
  query = np.random.default_rng(6).normal(size=(m.width,)).astype(np.float32)
  p_attn = {"params": dict(params["params"], readout_query=jnp.asarray(query))}
  w = jax.nn.softmax(slots @ query / np.sqrt(m.width), axis=-1)             # [3, L]
  np.testing.assert_allclose(run("attention", p_attn), np.einsum("bl,bld->bd", w, slots),
                             atol=1e-5)
  with pytest.raises(ValueError, match="clm_readout"):
    run("max", params)
