"""Text, image and audio encoders built from NL blocks (design section 3).

Every encoder maps its inputs to tokens [B, T, d] and a mask [B, T] (None for images: no
padding) through `depth[modality]` blocks and a final RMSNorm. A block is a token mixer
(`model.block`: the fast-weight memory, the HOPE block's self-modifying memory, or
softmax attention; `token_mixer`) followed by the CMS. Padded tokens are zeroed
at the output; they write nothing into any fast-weight memory and are masked out of the
central latent memory's cross-attention, so an embedding does not depend on how much
padding follows the real tokens or on its batch mates.

Modules take `cfg`, the model config (`config.model`) as an `ml_collections`
FrozenConfigDict (hashable, so modules stay static-friendly).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlmm_jax.models import attention
from nlmm_jax.models import cms as cms_lib
from nlmm_jax.models import fast_weights
from nlmm_jax.models import titans

Array = jax.Array

NORMS = ("pre", "post")


def compute_dtype(cfg) -> Any:
  return jnp.dtype(cfg.dtype)


def deepnorm_alpha(num_blocks: int) -> float:
  """DeepNet residual scale for an encoder of N blocks: alpha = (2N)^(1/4)."""
  return (2.0 * max(num_blocks, 1)) ** 0.25


def deepnorm_beta(num_blocks: int) -> float:
  """DeepNet init scale for an encoder of N blocks: beta = (8N)^(-1/4)."""
  return (8.0 * max(num_blocks, 1)) ** -0.25


BLOCKS = ("nl", "hope", "attention")


def token_mixer(cfg, direction: str, dtype: Any, name: str = "memory") -> nn.Module:
  """The token mixer of a block, by `model.block`: x [B, T, d], mask [B, T] -> [B, T, d].

  nl: the fast-weight memory (`fast_weights.FastWeightMemory`, `model.memory`);
  hope: the self-modifying Titans memory (`titans.SelfModifyingMemory`, `model.hope`;
  with the CMS after it, the HOPE block of Eq. 94-97); attention: softmax self-attention
  (`attention.SelfAttention`). All take the same direction and padding mask.
  """
  if cfg.block == "nl":
    return fast_weights.FastWeightMemory.from_config(cfg.memory, cfg.width, cfg.heads,
                                                     direction, dtype, name=name)
  if cfg.block == "hope":
    return titans.SelfModifyingMemory(width=cfg.width, heads=cfg.heads, hidden=cfg.hope.hidden,
                                      form=cfg.hope.form, chunk_size=cfg.hope.chunk_size,
                                      direction=direction, dtype=dtype, name=name)
  if cfg.block == "attention":
    return attention.SelfAttention(width=cfg.width, heads=cfg.heads, direction=direction,
                                   dtype=dtype, name=name)
  raise ValueError(f"model.block must be one of {BLOCKS}, got {cfg.block!r}")


class NLBlock(nn.Module):
  """Nested Learning block: a fast-weight memory then a CMS, each on a residual branch.

  pre  (default): x <- x + FW(RMSNorm(x), mask);  x <- x + CMS(RMSNorm(x))
  post (DeepNorm): x <- RMSNorm(alpha x + FW(x, mask));  x <- RMSNorm(alpha x + CMS(x)),
                  alpha = (2N)^(1/4), CMS output layers initialised with gain (8N)^(-1/4).
  x [B, T, d], mask [B, T] bool or None -> [B, T, d].
  """
  cfg: Any
  direction: str = "causal"
  num_blocks: int = 1                                 # N of the encoder (DeepNorm)
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    cfg = self.cfg
    dtype = compute_dtype(cfg)
    post = cfg.norm == "post"
    if cfg.norm not in NORMS:
      raise ValueError(f"model.norm must be one of {NORMS}, got {cfg.norm!r}")
    memory = token_mixer(cfg, self.direction, dtype, name="memory")
    cms = cms_lib.CMS.from_config(
        cfg, dtype, out_init_scale=deepnorm_beta(self.num_blocks) if post else 1.0,
        name="cms")
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
    norm_memory = nn.RMSNorm(name="norm_memory")
    norm_cms = nn.RMSNorm(name="norm_cms")
    if post:
      alpha = deepnorm_alpha(self.num_blocks)
      x = norm_memory(alpha * x + drop(memory(x, mask)))
      x = norm_cms(alpha * x + drop(cms(x, self.deterministic)))
    else:
      x = x + drop(memory(norm_memory(x), mask))
      x = x + drop(cms(norm_cms(x), self.deterministic))
    return x.astype(jnp.float32)                      # [B, T, d] fp32 residual stream


def nl_stack(cfg, x: Array, mask: Optional[Array], modality: str,
             deterministic: bool) -> tuple[Array, Optional[Array]]:
  """`depth[modality]` NL blocks + final RMSNorm, in the calling module's scope.

  x [B, T, d], mask [B, T] or None -> tokens [B, T, d] (zero on padding), mask.
  """
  depth = int(cfg.depth[modality])
  block_cls = nn.remat(NLBlock) if cfg.remat else NLBlock
  for i in range(depth):
    x = block_cls(cfg, direction=cfg.memory.direction[modality], num_blocks=depth,
                  deterministic=deterministic, name=f"block_{i}")(x, mask)
  x = nn.RMSNorm(name="norm_out")(x)
  if mask is not None:
    x = x * mask[..., None].astype(x.dtype)
  return x, mask


def _pos_embedding(module: nn.Module, rows: int, t: int, d: int, what: str) -> Array:
  """Learned positions [t, d] (the first t of `rows`)."""
  if t > rows:
    raise ValueError(f"{what}: {t} positions but only {rows} learned (raise the config)")
  pos = module.param("pos_embedding", nn.initializers.normal(0.02), (rows, d), jnp.float32)
  return pos[:t]


class TextEncoder(nn.Module):
  """Token embedding + learned positions + NL blocks. text [B, L] int, mask [B, L] bool."""
  cfg: Any

  @nn.compact
  def __call__(self, text: Array, text_mask: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, Array]:
    cfg = self.cfg
    if text_mask is None:
      text_mask = text != 0
    text_mask = jnp.asarray(text_mask, bool)
    b, l = text.shape
    x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(text)        # [B, L, d]
    x = x + _pos_embedding(self, cfg.max_text_len, l, cfg.width, "text")[None]
    return nl_stack(cfg, x, text_mask, "text", deterministic)


IMAGE_STEMS = ("patch", "conv")
IMAGE_POSEMBS = ("learn", "sincos2d")


def sincos2d(gh: int, gw: int, d: int, temperature: float = 10000.0) -> Array:
  """Fixed 2-D sine-cosine positions [gh * gw, d] (row-major grid), as in MAE / big_vision:
  d/4 frequencies omega_i = temperature^(-i / (d/4)); [sin(y w), cos(y w), sin(x w), cos(x w)].
  """
  if d % 4:
    raise ValueError(f"model.image_posemb='sincos2d' needs width % 4 == 0, got {d}")
  y, x = jnp.meshgrid(jnp.arange(gh, dtype=jnp.float32), jnp.arange(gw, dtype=jnp.float32),
                      indexing="ij")
  omega = temperature ** -(jnp.arange(d // 4, dtype=jnp.float32) / (d // 4))
  y = y.reshape(-1)[:, None] * omega[None]           # [N, d/4]
  x = x.reshape(-1)[:, None] * omega[None]
  return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=1)


def conv_stem_channels(width: int, patch_size: int) -> tuple[int, ...]:
  """Channels of the `conv` stem's stride-2 stages: log2(patch) stages ending at `width`,
  each half the next (patch 8, d 128 -> (32, 64, 128))."""
  n = patch_size.bit_length() - 1
  if patch_size < 2 or 2 ** n != patch_size:
    raise ValueError(f"model.image_stem='conv' needs a power-of-2 patch_size >= 2, "
                     f"got {patch_size}")
  return tuple(max(width // 2 ** (n - 1 - i), 8) for i in range(n))


class ImageEncoder(nn.Module):
  """Image [B, H, W, 3] -> patch tokens [B, (H/p)(W/p), d] + positions + NL blocks.

  Stem (`model.image_stem`): `patch` = one linear conv with kernel = stride = p (ViT);
  `conv` = log2(p) 3x3 stride-2 convs with GELU between them (the early-convolution stem
  of Xiao et al., 2021), same token grid, local nonlinear features in each token.
  Positions (`model.image_posemb`): `learn` (from N(0, 0.02)) or `sincos2d` (fixed).
  """
  cfg: Any

  @nn.compact
  def __call__(self, image: Array, deterministic: bool = True) -> tuple[Array, None]:
    cfg = self.cfg
    p = cfg.patch_size
    dtype = compute_dtype(cfg)
    stem = cfg.image_stem
    if stem == "patch":
      x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID",
                  dtype=dtype, name="patch_embed")(image)            # [B, H/p, W/p, d]
    elif stem == "conv":
      if cfg.image_size % p:
        raise ValueError(f"model.image_size {cfg.image_size} is not a multiple of "
                         f"model.patch_size {p}")
      x = image
      channels = conv_stem_channels(cfg.width, p)
      for i, ch in enumerate(channels):
        x = nn.Conv(ch, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype,
                    name=f"stem_conv_{i}")(x)                          # [B, H/2^(i+1), ., ch]
        if i + 1 < len(channels):
          x = nn.gelu(x)
    else:
      raise ValueError(f"model.image_stem must be one of {IMAGE_STEMS}, got {stem!r}")
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d).astype(jnp.float32)  # [B, N, d]
    if cfg.image_posemb == "learn":
      rows = (cfg.image_size // p) ** 2
      x = x + _pos_embedding(self, rows, gh * gw, d, "image patches")[None]
    elif cfg.image_posemb == "sincos2d":
      x = x + sincos2d(gh, gw, d)[None]
    else:
      raise ValueError(f"model.image_posemb must be one of {IMAGE_POSEMBS}, "
                       f"got {cfg.image_posemb!r}")
    return nl_stack(cfg, x, None, "image", deterministic)


def subsample_strides(factor: int) -> tuple[int, ...]:
  """The conv front-end's per-stage strides: the prime factors of `factor` (4 -> (2, 2))."""
  if factor < 1:
    raise ValueError(f"model.audio_subsample must be >= 1, got {factor}")
  strides, f, p = [], int(factor), 2
  while f > 1:
    while f % p == 0:
      strides.append(p)
      f //= p
    p += 1
  return tuple(strides)


def subsampled_length(frames: int, factor: int) -> int:
  """Frames after the front-end: ceil(F / factor) (= one ceil per stage)."""
  return -(-frames // factor)


def strided_centre(mask: Array, k: int, s: int) -> Array:
  """mask [B, F] bool -> [B, ceil(F / s)]: element j is mask[:, s*j] (= mask[:, ::s]).

  Computed as the conv front-end's own windowing (kernel k, stride s, padding k//2) with a
  one-hot centre tap, so its length is the conv output's length expression; `mask[:, ::s]`
  has the same value but a length jax.export cannot prove equal for a symbolic F.
  """
  centre = jnp.zeros((k, 1, 1), jnp.float32).at[k // 2].set(1.0)
  m = jax.lax.conv_general_dilated(
      jnp.asarray(mask, jnp.float32)[..., None], centre, (s,), ((k // 2, k // 2),),
      dimension_numbers=("NWC", "WIO", "NWC"))
  return m[..., 0] > 0.5


class AudioEncoder(nn.Module):
  """Log-mel [B, F, n_mels] + mask [B, F] -> conv front-end (x audio_subsample) -> NL blocks.

  Each front-end stage is a 1-D conv with stride s, kernel k = 2*(s//2)+1 and fixed
  symmetric padding k//2, then GELU. Output frame j reads input frames [s*j - k//2,
  s*j + k//2], so frame alignment never depends on the array length; it has
  ceil(F / s) frames and frame j is real iff input frame s*j is (mask[:, ::s], i.e.
  ceil(len / s) real frames for a prefix mask). Padded frames are zeroed before every
  stage, so a clip gives the same features whatever padding follows it.
  """
  cfg: Any

  @nn.compact
  def __call__(self, audio: Array, audio_mask: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, Array]:
    cfg = self.cfg
    dtype = compute_dtype(cfg)
    b, f, _ = audio.shape
    mask = (jnp.ones((b, f), bool) if audio_mask is None
            else jnp.asarray(audio_mask, bool))
    x = jnp.asarray(audio, jnp.float32) * mask[..., None]   # [B, F, n_mels]
    strides = subsample_strides(cfg.audio_subsample)
    if not strides:
      x = nn.Dense(cfg.width, dtype=dtype, name="frontend")(x)
    for i, s in enumerate(strides):
      k = 2 * (s // 2) + 1
      x = nn.Conv(cfg.width, (k,), strides=(s,), padding=((k // 2, k // 2),),
                  dtype=dtype, name=f"conv_{i}")(x)
      x = nn.gelu(x)
      mask = strided_centre(mask, k, s)
      x = x * mask[..., None].astype(x.dtype)         # [B, ceil(F_i / s), d]
    x = x.astype(jnp.float32)
    rows = subsampled_length(cfg.max_frames, cfg.audio_subsample)
    x = x + _pos_embedding(self, rows, x.shape[1], cfg.width, "audio frames")[None]
    return nl_stack(cfg, x, mask, "audio", deterministic)


ENCODERS = {"text": TextEncoder, "image": ImageEncoder, "audio": AudioEncoder}
