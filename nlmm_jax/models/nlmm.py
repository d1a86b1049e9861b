"""NL-MM: tri-modal retrieval model (design section 3).

  embed(inputs, modality) = normalize(W_modality CLM(Encoder_modality(inputs), modality))

Each modality is embedded on its own: `embed` sees only that modality's inputs, and
`__call__` is nothing but `embed` per present modality plus the learnable temperature, so
nothing flows between modalities (an index of one modality can be built once and queried
by any other).

Parameter layout (top level): text_encoder, image_encoder, audio_encoder, clm,
projection_<modality>, log_logit_scale (+ logit_bias with the SigLIP loss).

Usage:
  model = build_model(config.model, config.loss)
  params = model.init(rng, batch)["params"]
  embeddings, logit_scale = model.apply({"params": params}, batch)
  text_emb = model.apply({"params": params}, {"text": ..., "text_mask": ...}, "text",
                         method=NLMM.embed)

`python -m nlmm_jax.models.nlmm [CONFIG ...]` prints parameter counts (no allocation).
"""

import math
import sys
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nlmm_jax.models import encoders
from nlmm_jax.models import fusion

Array = jax.Array

MODALITIES = fusion.MODALITIES
MODALITY_KEYS = {"image": ("image",), "text": ("text", "text_mask"),
                 "audio": ("audio", "audio_mask")}


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class NLMM(nn.Module):
  """Encoders + shared central latent memory + per-modality projection heads.

  config: `config.model` as a FrozenConfigDict. The loss settings the model owns (kind,
  initial temperature, logit-scale clip) come from `config.loss` through `build_model`.
  """
  config: Any
  loss_kind: str = "infonce"
  temperature_init: float = 0.07
  max_logit_scale: float = 100.0

  def setup(self):
    cfg = self.config
    self.text_encoder = encoders.TextEncoder(cfg)
    self.image_encoder = encoders.ImageEncoder(cfg)
    self.audio_encoder = encoders.AudioEncoder(cfg)
    self.clm = fusion.CentralLatentMemory(cfg)
    self.projection = {m: nn.Dense(cfg.embed_dim, dtype=jnp.float32) for m in MODALITIES}
    self.log_logit_scale = self.param(
        "log_logit_scale", nn.initializers.constant(math.log(1.0 / self.temperature_init)),
        (), jnp.float32)
    if self.loss_kind == "siglip":
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (),
                                   jnp.float32)

  def encode(self, inputs: Mapping[str, Array], modality: str,
             train: bool = False) -> tuple[Array, Optional[Array]]:
    """One modality's tokens [B, T, d] and mask [B, T] (None for images)."""
    det = not train
    if modality == "text":
      return self.text_encoder(inputs["text"], inputs.get("text_mask"), det)
    if modality == "image":
      return self.image_encoder(inputs["image"], det)
    if modality == "audio":
      return self.audio_encoder(inputs["audio"], inputs.get("audio_mask"), det)
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")

  def embed(self, inputs: Mapping[str, Array], modality: str, train: bool = False) -> Array:
    """inputs (this modality's keys only) -> L2-normalised embedding [B, E] (fp32)."""
    tokens, mask = self.encode(inputs, modality, train)       # [B, T, d], [B, T]
    readout = self.clm(tokens, mask, modality, not train)     # [B, d] ([B, L d]: concat)
    return l2_normalize(self.projection[modality](readout))   # [B, E]

  def scale(self) -> Array:
    """logit_scale = exp(log_logit_scale), fp32 scalar.

    Not clipped here: a clip inside the forward pass has zero gradient above the bound,
    so an overshoot could never come back. The bound is applied to the parameter after
    each update instead (`clip_logit_scale`, as CLIP does).
    """
    return jnp.exp(self.log_logit_scale)

  def __call__(self, batch: Mapping[str, Array], train: bool = False
               ) -> tuple[dict[str, Array], Array]:
    """{modality: [B, E]} for each modality present in `batch`, and logit_scale."""
    embeddings = {}
    for m in MODALITIES:
      if m in batch:
        inputs = {k: batch[k] for k in MODALITY_KEYS[m] if k in batch}
        embeddings[m] = self.embed(inputs, m, train)
    return embeddings, self.scale()


def clip_logit_scale(params: Mapping[str, Any], max_logit_scale: float) -> Mapping[str, Any]:
  """params with log_logit_scale clipped to <= log(max_logit_scale) (after an update)."""
  params = dict(params)
  params["log_logit_scale"] = jnp.minimum(params["log_logit_scale"],
                                          math.log(max_logit_scale))
  return params


def build_model(model_cfg, loss_cfg=None) -> NLMM:
  """NLMM from `config.model` (and `config.loss`; defaults of config_lib when None)."""
  if loss_cfg is None:
    from nlmm_jax import config_lib
    loss_cfg = config_lib.loss_config()
  if 1.0 / float(loss_cfg.temperature_init) > float(loss_cfg.max_logit_scale):
    raise ValueError(f"loss.temperature_init={loss_cfg.temperature_init} starts the logit "
                     f"scale above loss.max_logit_scale={loss_cfg.max_logit_scale}; raise "
                     "temperature_init to at least 1 / max_logit_scale")
  if not isinstance(model_cfg, ml_collections.FrozenConfigDict):
    model_cfg = ml_collections.FrozenConfigDict(model_cfg)
  return NLMM(config=model_cfg, loss_kind=str(loss_cfg.kind),
              temperature_init=float(loss_cfg.temperature_init),
              max_logit_scale=float(loss_cfg.max_logit_scale))


def example_batch(model_cfg, batch_size: int = 1, with_audio: bool = True) -> dict:
  """All-ones/zeros numpy batch of the config's input shapes (for init and shape checks)."""
  m = model_cfg
  b = {"image": np.zeros((batch_size, m.image_size, m.image_size, 3), np.float32),
       "text": np.ones((batch_size, m.max_text_len), np.int32),
       "text_mask": np.ones((batch_size, m.max_text_len), bool)}
  if with_audio:
    b["audio"] = np.zeros((batch_size, m.max_frames, m.n_mels), np.float32)
    b["audio_mask"] = np.ones((batch_size, m.max_frames), bool)
  return b


def param_count(params) -> int:
  """Number of scalars in a param tree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def abstract_params(config) -> Any:
  """Param tree of ShapeDtypeStructs for a full config (or `config.model`); no allocation."""
  model_cfg = config.model if "model" in config else config
  loss_cfg = config.loss if "loss" in config else None
  model = build_model(model_cfg, loss_cfg)
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                       example_batch(model_cfg))
  return jax.eval_shape(lambda r, b: model.init(r, b), jax.random.key(0), batch)["params"]


def count_params(config) -> int:
  """Parameter count of a config's model via `jax.eval_shape` (nothing is allocated)."""
  return param_count(abstract_params(config))


def main(argv) -> None:
  from nlmm_jax import config_lib
  names = argv or ["demo", "tiny", "small", "medium", "large"]
  for name in names:
    print(f"{name}: {count_params(config_lib.load_config(name)):,} parameters")


if __name__ == "__main__":
  main(sys.argv[1:])
