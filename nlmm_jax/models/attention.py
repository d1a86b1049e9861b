"""Softmax self-attention with the memories' masks: the `attention` block's token mixer.

With the CMS after it, this is the paper's Hope-Attention variant and the plain
transformer baseline the NL and HOPE blocks are measured against. Per head (row
convention, e = d / H):

  y_t = sum_s softmax_s(q_t . k_s / sqrt(e)) v_s,   s over the real tokens (mask), and
                                                    s <= t when causal

A padded query reads nothing (y = 0), so outputs on real tokens do not depend on the
padding, as for the memories. The same attention (`attend`) is the central latent
memory's cross-attention read (`CrossAttention`).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlmm_jax.models import fast_weights

Array = jax.Array

DIRECTIONS = fast_weights.DIRECTIONS
MASK_VALUE = -1e30


def attention_mask(t: int, mask: Optional[Array], causal: bool) -> Optional[Array]:
  """Which keys each query may read: [B or 1, 1, T or 1, T] bool, or None (all)."""
  allowed = None
  if mask is not None:
    allowed = mask[:, None, None, :]                  # [B, 1, 1, T] keys
  if causal:
    tri = jnp.tril(jnp.ones((t, t), bool))[None, None]
    allowed = tri if allowed is None else allowed & tri
  return allowed


def attend(z: Array, x: Array, allowed: Optional[Array], heads: int, dtype: Any) -> Array:
  """Multi-head attention of queries z [B, L, d] over x [B, T, d] -> [B, L, d].

  Called inside a module's compact method: its projections (`query`, `key` without bias,
  `value`, `out`) are that module's parameters. Logits, softmax and the weighted sum in
  fp32; `allowed` broadcasts to [B, H, L, T].
  """
  d = z.shape[-1]
  if d % heads:
    raise ValueError(f"width {d} not divisible by heads {heads}")
  e = d // heads
  proj = lambda name, bias=True: nn.DenseGeneral((heads, e), use_bias=bias, dtype=dtype,
                                                 name=name)
  q = proj("query")(z).astype(jnp.float32)          # [B, L, H, e]
  # No key bias: it adds q.b to every logit of a query, which the softmax removes, so
  # its true gradient is zero and Adam would turn rounding noise into drift.
  k = proj("key", bias=False)(x).astype(jnp.float32)  # [B, T, H, e]
  v = proj("value")(x).astype(jnp.float32)          # [B, T, H, e]
  logits = jnp.einsum("blhe,bthe->bhlt", q, k) / math.sqrt(e)   # [B, H, L, T] fp32
  if allowed is not None:
    logits = jnp.where(allowed, logits, MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhlt,bthe->blhe", weights, v).astype(dtype)  # [B, L, H, e]
  return nn.DenseGeneral(d, axis=(-2, -1), dtype=dtype, name="out")(o)


class CrossAttention(nn.Module):
  """Multi-head cross-attention: queries z [B, L, d] read x [B, T, d] (mask [B, T])."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, x: Array, mask: Optional[Array] = None) -> Array:
    return attend(z, x, attention_mask(x.shape[1], mask, causal=False), self.heads,
                  self.dtype)


class SelfAttention(nn.Module):
  """Multi-head softmax self-attention: x [B, T, d], mask [B, T] -> [B, T, d]."""
  width: int
  heads: int
  direction: str = "bidirectional"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    if x.shape[-1] != self.width:
      raise ValueError(f"input width {x.shape[-1]} != {self.width}")
    if self.direction not in DIRECTIONS:
      raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
    allowed = attention_mask(x.shape[1], mask, self.direction == "causal")
    y = attend(x, x, allowed, self.heads, self.dtype)  # [B, T, d]
    return y if mask is None else y * mask[..., None].astype(y.dtype)
