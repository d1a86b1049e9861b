"""Contrastive losses against a direct NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nlmm_jax import config_lib
from nlmm_jax import losses


def _unit(rng, n, e):
  x = rng.normal(size=(n, e)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _loss_cfg(kind="infonce", **weights):
  c = config_lib.loss_config()
  c.kind = kind
  for k, v in weights.items():
    c.weights[k] = v
  return c


def _np_logsumexp(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _np_infonce(a, b, scale):
  s = scale * a.astype(np.float64) @ b.astype(np.float64).T
  n = len(s)
  ce_ab = np.mean([_np_logsumexp(s[i], 0) - s[i, i] for i in range(n)])
  ce_ba = np.mean([_np_logsumexp(s[:, j], 0) - s[j, j] for j in range(n)])
  return 0.5 * (ce_ab + ce_ba)


def _np_siglip(a, b, scale, bias):
  s = scale * a.astype(np.float64) @ b.astype(np.float64).T + bias
  total = 0.0
  for i in range(len(s)):
    for j in range(len(s)):
      z = 1.0 if i == j else -1.0
      total += np.log1p(np.exp(-z * s[i, j]))          # -log sigmoid(z s)
  return total / len(s)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_loss_matches_numpy(kind):
  rng = np.random.default_rng(0)
  emb = {m: _unit(rng, 6, 8) for m in ("image", "text", "audio")}
  weights = dict(image_text=1.0, image_audio=0.5, text_audio=2.0)
  cfg = _loss_cfg(kind, **weights)
  scale, bias = 7.5, -3.0
  loss, metrics = jax.jit(
      lambda e, s, b: losses.contrastive_loss(e, s, cfg, logit_bias=b))(
          emb, jnp.float32(scale), jnp.float32(bias))
  ref = {}
  for a, b in losses.PAIRS:
    if kind == "infonce":
      ref[f"{a}_{b}"] = _np_infonce(emb[a], emb[b], scale)
    else:
      ref[f"{a}_{b}"] = _np_siglip(emb[a], emb[b], scale, bias)
  assert sorted(metrics) == sorted(f"loss/{p}" for p in ref)
  for p, v in ref.items():
    np.testing.assert_allclose(metrics[f"loss/{p}"], v, rtol=1e-5)
  total = sum(weights[p] * v for p, v in ref.items()) / sum(weights.values())
  np.testing.assert_allclose(loss, total, rtol=1e-5)


def test_only_present_pairs_count():
  rng = np.random.default_rng(1)
  emb = {"image": _unit(rng, 5, 4), "text": _unit(rng, 5, 4)}
  cfg = _loss_cfg(image_text=3.0)
  loss, metrics = losses.contrastive_loss(emb, 10.0, cfg)
  assert list(metrics) == ["loss/image_text"]
  np.testing.assert_allclose(loss, _np_infonce(emb["image"], emb["text"], 10.0), rtol=1e-5)


def test_perfect_alignment_beats_random():
  rng = np.random.default_rng(2)
  a = _unit(rng, 8, 16)
  cfg = _loss_cfg()
  aligned, _ = losses.contrastive_loss({"image": a, "text": a}, 50.0, cfg)
  shuffled, _ = losses.contrastive_loss({"image": a, "text": a[::-1]}, 50.0, cfg)
  assert float(aligned) < 0.1 < float(shuffled)


def test_errors():
  rng = np.random.default_rng(3)
  emb = {"image": _unit(rng, 4, 4), "text": _unit(rng, 4, 4)}
  with pytest.raises(ValueError, match="logit_bias"):
    losses.contrastive_loss(emb, 10.0, _loss_cfg("siglip"))
  with pytest.raises(ValueError, match="two modalities"):
    losses.contrastive_loss({"image": emb["image"]}, 10.0, _loss_cfg())
  with pytest.raises(ValueError, match="kind"):
    losses.contrastive_loss(emb, 10.0, _loss_cfg("triplet"))


def test_sharded_batch_uses_global_negatives():
  """Under jit with the batch split over 2 devices the loss equals the unsharded one."""
  rng = np.random.default_rng(4)
  emb = {m: _unit(rng, 8, 8) for m in ("image", "text", "audio")}
  cfg = _loss_cfg()
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(emb, NamedSharding(mesh, P("data")))
  loss, metrics = jax.jit(lambda e: losses.contrastive_loss(e, 20.0, cfg))(sharded)
  ref, ref_metrics = losses.contrastive_loss(emb, 20.0, cfg)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-6)
  # And it is not the mean of per-shard losses (4 negatives instead of 8 per row).
  half = [losses.contrastive_loss({m: v[i:i + 4] for m, v in emb.items()}, 20.0, cfg)[0]
          for i in (0, 4)]
  assert abs(float(np.mean(half)) - float(ref)) > 1e-3
