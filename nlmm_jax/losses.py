"""Contrastive losses over the modality pairs present (design section 3, "Losses").

For a pair (a, b) of L2-normalised embeddings [B, E] the logits are
`s = logit_scale * a @ b.T` (fp32, highest matmul precision), row i's positive is column i
and every other row of the *global* batch is a negative. Under `jax.jit` with batch-sharded
inputs the arrays are global, so XLA inserts the collectives; nothing here is per-device.

  infonce (CLIP):  L_ab = (CE(s, I) + CE(s^T, I)) / 2, CE averaged over the B rows.
  siglip:          L_ab = -(1/B) sum_ij log sigmoid(z_ij (s_ij + bias)), z = 2I - 1
                   (Zhai et al. 2023; symmetric by construction, bias learnable).

The total is the weighted mean over the present pairs,
`sum_p w_p L_p / sum_p w_p` (normalised by the sum of the *present* pairs' weights), so
its scale does not change when a corpus has no audio.
"""

from typing import Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

PAIRS = (("image", "text"), ("image", "audio"), ("text", "audio"))
KINDS = ("infonce", "siglip")


def pair_name(a: str, b: str) -> str:
  return f"{a}_{b}"


def similarity(a: Array, b: Array, logit_scale: Array) -> Array:
  """logit_scale * a @ b.T in fp32: [B, E] x [B', E] -> [B, B']."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  s = jnp.einsum("ie,je->ij", a, b, precision=jax.lax.Precision.HIGHEST)
  return jnp.asarray(logit_scale, jnp.float32) * s


def infonce(a: Array, b: Array, logit_scale: Array) -> Array:
  """Symmetric InfoNCE of one pair: the mean of the a->b and b->a cross-entropies."""
  logits = similarity(a, b, logit_scale)              # [B, B]
  diag = jnp.diagonal(logits)
  a_to_b = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
  b_to_a = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
  return 0.5 * (a_to_b + b_to_a)


def siglip(a: Array, b: Array, logit_scale: Array, logit_bias: Array) -> Array:
  """Sigmoid loss of one pair: -(1/B) sum_ij log sigmoid(z_ij (s_ij + bias))."""
  logits = similarity(a, b, logit_scale) + jnp.asarray(logit_bias, jnp.float32)
  n = logits.shape[0]
  z = 2.0 * jnp.eye(n, logits.shape[1], dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n


def contrastive_loss(embeddings: Mapping[str, Array], logit_scale: Array, loss_cfg,
                     logit_bias: Optional[Array] = None) -> tuple[Array, dict]:
  """Weighted contrastive loss over the pairs present in `embeddings`.

  embeddings: {modality: [B, E]} L2-normalised; logit_scale: scalar; loss_cfg: config.loss
  (kind, weights); logit_bias: scalar, required when loss_cfg.kind == "siglip" (the model's
  top-level param `logit_bias`). Returns (loss, {"loss/<pair>": ...}) for present pairs.
  """
  kind = loss_cfg.kind
  if kind not in KINDS:
    raise ValueError(f"loss.kind must be one of {KINDS}, got {kind!r}")
  if kind == "siglip" and logit_bias is None:
    raise ValueError("loss.kind='siglip' needs logit_bias (the model's `logit_bias` param)")
  metrics, total, weight_sum = {}, jnp.zeros((), jnp.float32), 0.0
  for a, b in PAIRS:
    if a not in embeddings or b not in embeddings:
      continue
    name = pair_name(a, b)
    w = float(loss_cfg.weights[name])
    if kind == "infonce":
      l = infonce(embeddings[a], embeddings[b], logit_scale)
    else:
      l = siglip(embeddings[a], embeddings[b], logit_scale, logit_bias)
    metrics[f"loss/{name}"] = l
    total = total + w * l
    weight_sum += w
  if not metrics:
    raise ValueError(f"need at least two modalities, got {sorted(embeddings)}")
  if weight_sum <= 0:
    raise ValueError(f"the present pairs {sorted(metrics)} all have weight 0")
  return total / weight_sum, metrics
