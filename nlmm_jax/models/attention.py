"""Softmax self-attention with the memories' masks: the `attention` block's token mixer.

With the CMS after it, this is the paper's Hope-Attention variant and the plain
transformer baseline the NL and HOPE blocks are measured against. Per head (row
convention, e = d / H):

  y_t = sum_s softmax_s(q_t . k_s / sqrt(e)) v_s,   s over the real tokens (mask), and
                                                    s <= t when causal

A padded query reads nothing (y = 0), so outputs on real tokens do not depend on the
padding, as for the memories. No key bias (the softmax removes it). Logits and softmax
in fp32 whatever the matmul dtype.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

DIRECTIONS = ("causal", "bidirectional")
MASK_VALUE = -1e30


def attention_mask(t: int, mask: Optional[Array], causal: bool) -> Optional[Array]:
  """Which keys each query may read: [B or 1, 1, T, T] bool, or None (all)."""
  allowed = None
  if mask is not None:
    allowed = mask[:, None, None, :]                  # [B, 1, 1, T] keys
  if causal:
    tri = jnp.tril(jnp.ones((t, t), bool))[None, None]
    allowed = tri if allowed is None else allowed & tri
  return allowed


class SelfAttention(nn.Module):
  """Multi-head softmax self-attention: x [B, T, d], mask [B, T] -> [B, T, d]."""
  width: int
  heads: int
  direction: str = "bidirectional"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    b, t, d = x.shape                                 # [B, T, d]
    h = self.heads
    if self.width % h or d != self.width:
      raise ValueError(f"width {self.width} (input {d}) not divisible by heads {h}")
    if self.direction not in DIRECTIONS:
      raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
    e = d // h
    proj = lambda name, bias=True: nn.DenseGeneral((h, e), use_bias=bias, dtype=self.dtype,
                                                   name=name)
    q = proj("query")(x).astype(jnp.float32)          # [B, T, H, e]
    k = proj("key", bias=False)(x).astype(jnp.float32)
    v = proj("value")(x)
    logits = jnp.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(e)    # [B, H, T, T] fp32
    allowed = attention_mask(t, mask, self.direction == "causal")
    if allowed is not None:
      logits = jnp.where(allowed, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bhqk,bkhe->bqhe", weights, v)     # [B, T, H, e]
    if mask is not None:
      y = y * mask[:, :, None, None].astype(y.dtype)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out")(y)
