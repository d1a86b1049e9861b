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
  for k, v in model_overrides.items():
    node = m
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def init_model(config, batch_size=2, seed=0):
  model = nlmm.build_model(config.model, config.loss)
  params = jax.jit(model.init)(jax.random.key(seed),
                               nlmm.example_batch(config.model, batch_size))["params"]
  return model, params


@functools.lru_cache(maxsize=None)
def _embed_fn(model, modality):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, modality, method=nlmm.NLMM.embed))


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


INVARIANCE_VARIANTS = {
    "default": {},
    # post-norm, chain CMS, attention readout, bidirectional text, hebbian with decay
    "variant": {"norm": "post", "cms.structure": "chain", "clm_readout": "attention",
                "memory.direction.text": "bidirectional", "memory.rule": "hebbian",
                "memory.decay": 0.1, "remat": True},
}


@pytest.fixture(scope="module", params=sorted(INVARIANCE_VARIANTS))
def variant_model(request):
  c = small_config(**INVARIANCE_VARIANTS[request.param])
  model, params = init_model(c)
  return c, model, params


def _text_batch(rng, lengths, pad_to, vocab):
  b = len(lengths)
  text = rng.integers(1, vocab, size=(b, pad_to)).astype(np.int32)  # garbage in padding
  mask = np.arange(pad_to)[None] < np.asarray(lengths)[:, None]
  return text, mask


def test_text_embedding_ignores_batch_mates_and_padding(variant_model):
  c, model, params = variant_model
  rng = np.random.default_rng(0)
  text, mask = _text_batch(rng, [7, 12, 3], 40, c.model.vocab_size)
  full = embed(model, params, {"text": text, "text_mask": mask}, "text")     # [3, E]
  np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
  alone = embed(model, params, {"text": text[:1], "text_mask": mask[:1]}, "text")
  np.testing.assert_allclose(alone[0], full[0], atol=1e-5)
  # The same caption padded to 20 instead of 40 tokens, with other garbage after it.
  short = rng.integers(1, c.model.vocab_size, size=(1, 20)).astype(np.int32)
  short[0, :7] = text[0, :7]
  short_emb = embed(model, params, {"text": short, "text_mask": mask[:1, :20]}, "text")
  np.testing.assert_allclose(short_emb[0], full[0], atol=1e-5)
  # Control: the real tokens do matter.
  assert np.abs(full[0] - full[1]).max() > 1e-3


def test_audio_embedding_ignores_batch_mates_and_padding(variant_model):
  c, model, params = variant_model
  rng = np.random.default_rng(1)
  lengths = [37, 64, 21]
  audio = rng.normal(size=(3, 64, c.model.n_mels)).astype(np.float32)  # garbage in padding
  mask = np.arange(64)[None] < np.asarray(lengths)[:, None]
  full = embed(model, params, {"audio": audio, "audio_mask": mask}, "audio")
  alone = embed(model, params, {"audio": audio[:1], "audio_mask": mask[:1]}, "audio")
  np.testing.assert_allclose(alone[0], full[0], atol=1e-5)
  # The same 37-frame clip padded to 48 frames (odd/even lengths at every stage differ).
  short = rng.normal(size=(1, 48, c.model.n_mels)).astype(np.float32)
  short[0, :37] = audio[0, :37]
  short_emb = embed(model, params, {"audio": short, "audio_mask": mask[:1, :48]}, "audio")
  np.testing.assert_allclose(short_emb[0], full[0], atol=1e-5)
  assert np.abs(full[0] - full[2]).max() > 1e-3


def test_image_embedding_ignores_batch_mates(variant_model):
  c, model, params = variant_model
  rng = np.random.default_rng(2)
  image = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  full = embed(model, params, {"image": image}, "image")
  alone = embed(model, params, {"image": image[1:2]}, "image")
  np.testing.assert_allclose(alone[0], full[1], atol=1e-5)


def test_audio_frontend_mask():
  assert encoders.subsample_strides(4) == (2, 2)
  assert encoders.subsample_strides(6) == (2, 3)
  assert encoders.subsample_strides(1) == ()
  c = small_config()
  cfg = ml_collections.FrozenConfigDict(c.model)
  enc = encoders.AudioEncoder(cfg)
  audio = jnp.ones((3, 50, c.model.n_mels))
  mask = np.arange(50)[None] < np.array([[50], [13], [1]])
  (tokens, out_mask), _ = enc.init_with_output(jax.random.key(0), audio, mask)
  assert tokens.shape == (3, 13, c.model.width)                      # ceil(50 / 4)
  np.testing.assert_array_equal(out_mask.sum(1), [13, 4, 1])          # ceil(len / 4)
  np.testing.assert_array_equal(np.asarray(tokens)[~np.asarray(out_mask)], 0.0)


# ----------------------------------------------------------------------- isolation


def test_embeddings_isolated_between_modalities():
  c = small_config()
  model, params = init_model(c)
  batch = nlmm.example_batch(c.model, 2)
  rng = np.random.default_rng(3)
  batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
  batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
  batch["text"] = rng.integers(1, c.model.vocab_size, batch["text"].shape).astype(np.int32)
  w = jax.random.normal(jax.random.key(5), (2, c.model.embed_dim))

  def grads(b):
    out = {}
    for m in ("text", "image", "audio"):
      f = lambda bb, m=m: jnp.sum(w * model.apply({"params": params}, bb)[0][m])
      out[m] = jax.grad(f, allow_int=True)(b)
    return out

  g = jax.jit(grads)(batch)
  for target in ("text", "image", "audio"):
    for source in ("image", "audio"):
      norm = float(jnp.abs(g[target][source]).max())
      if source == target:
        assert norm > 0, (target, source)        # control: the test can fail
      else:
        assert norm == 0.0, (target, source)
  # __call__ is embed per modality.
  embs, scale = model.apply({"params": params}, batch)
  np.testing.assert_allclose(
      embs["text"], embed(model, params, {k: batch[k] for k in ("text", "text_mask")}, "text"),
      atol=1e-6)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-6)
  assert set(embs) == {"image", "text", "audio"}
  no_audio = {k: v for k, v in batch.items() if not k.startswith("audio")}
  assert set(model.apply({"params": params}, no_audio)[0]) == {"image", "text"}


def test_logit_scale_and_bias_params():
  c = small_config()
  model, params = init_model(c)
  assert "logit_bias" not in params
  params = dict(params, log_logit_scale=jnp.float32(10.0))
  _, scale = model.apply({"params": params}, nlmm.example_batch(c.model, 1))
  np.testing.assert_allclose(scale, c.loss.max_logit_scale)
  c.loss.kind = "siglip"
  shapes = nlmm.abstract_params(c)
  assert shapes["logit_bias"].shape == ()
  _, params = init_model(c)
  np.testing.assert_allclose(params["logit_bias"], -10.0)


# --------------------------------------------------------------------------- configs


def test_count_params_matches_init():
  c = small_config()
  _, params = init_model(c)
  assert nlmm.count_params(c) == nlmm.param_count(params)


SHRINK = ["model.image_size=32", "model.max_frames=64", "model.max_text_len=16",
          "model.depth.text=1", "model.depth.image=1", "model.depth.audio=1"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_on_two_device_mesh(name):
  c = config_lib.load_config(name, SHRINK)
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
  params = jax.jit(model.init, out_shardings=replicated)(jax.random.key(0), batch)["params"]

  def loss_fn(p, b):
    embs, scale = model.apply({"params": p}, b, train=True)
    return losses.contrastive_loss(embs, scale, c.loss)[0]

  step = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(replicated, data),
                 out_shardings=(replicated, replicated))
  loss, grads = step(params, batch)
  assert np.isfinite(float(loss))
  gnorm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
  assert np.isfinite(gnorm) and gnorm > 0
  # Every encoder's and the CLM's parameters get a gradient.
  for top in ("text_encoder", "image_encoder", "audio_encoder", "clm"):
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[top]))) > 0, top
