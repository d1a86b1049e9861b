"""Central latent memory (CLM), shared by all modalities (design section 3).

L_mem learned latent slots (plus a learned embedding of the modality being read) are the
memory through which every modality is read, one modality at a time:

  z_0 = slots + e_modality                                   [B, L, d]
  z_1 = z_0 + CrossAttn(RMSNorm(z_0), tokens, mask)          read ONE modality's tokens
  z_2 = z_1 + FW(RMSNorm(z_1))                               fast-weight memory over slots
  z_3 = z_2 + CMS(RMSNorm(z_2))                              continuum memory
  r   = pool(RMSNorm(z_3))          [B, d] (mean | attention) or [B, L d] (concat)

The read comes first so that the fast-weight memory runs over slots that already carry the
input: applied to the bare learned slots it would compute one constant per modality. The
cross-attention (`attention.CrossAttention`) is multi-head with logits scaled by 1/sqrt(head
width), padding masked with a large negative before the softmax, in fp32.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlmm_jax.models import attention
from nlmm_jax.models import cms as cms_lib
from nlmm_jax.models import encoders

Array = jax.Array

MODALITIES = ("image", "text", "audio")
READOUTS = ("mean", "attention", "concat")

class CentralLatentMemory(nn.Module):
  """CLM: tokens [B, T, d] + mask [B, T] of one modality -> readout (fp32).

  Readout (`model.clm_readout`): `mean` of the slots [B, d]; `attention`, a learned
  query's softmax pooling of the slots [B, d]; `concat`, the slots side by side [B, L d]
  (each slot keeps its own dimensions in the projection that follows).
  """
  cfg: Any

  @nn.compact
  def __call__(self, tokens: Array, mask: Optional[Array], modality: str,
               deterministic: bool = True) -> Array:
    cfg = self.cfg
    dtype = encoders.compute_dtype(cfg)
    d, n = cfg.width, cfg.num_latents
    if modality not in MODALITIES:
      raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    init = nn.initializers.normal(0.02)
    slots = nn.Embed(n, d, embedding_init=init, name="latents")(jnp.arange(n))   # [L, d]
    slots = slots + nn.Embed(len(MODALITIES), d, embedding_init=init,
                             name="modality_embedding")(jnp.asarray(MODALITIES.index(modality)))
    b = tokens.shape[0]
    z = jnp.broadcast_to(slots[None], (b, n, d)).astype(jnp.float32)  # [B, L, d]
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)

    z = z + drop(attention.CrossAttention(cfg.heads, dtype, name="read")(
        nn.RMSNorm(name="norm_read")(z), tokens, mask))
    memory = encoders.token_mixer(cfg, cfg.memory.direction["latent"], dtype, name="memory")
    z = z + drop(memory(nn.RMSNorm(name="norm_memory")(z), None))
    cms = cms_lib.CMS.from_config(cfg, dtype, name="cms")
    z = z + drop(cms(nn.RMSNorm(name="norm_cms")(z), deterministic))
    z = nn.RMSNorm(name="norm_out")(z).astype(jnp.float32)            # [B, L, d]

    if cfg.clm_readout == "mean":
      return jnp.mean(z, axis=1)                                      # [B, d]
    if cfg.clm_readout == "attention":
      query = self.param("readout_query", init, (d,), jnp.float32)
      logits = jnp.einsum("bld,d->bl", z, query) / math.sqrt(d)
      return jnp.einsum("bl,bld->bd", jax.nn.softmax(logits, axis=-1), z)
    if cfg.clm_readout == "concat":
      return z.reshape(b, n * d)                                      # [B, L d]
    raise ValueError(f"model.clm_readout must be one of {READOUTS}, got {cfg.clm_readout!r}")
