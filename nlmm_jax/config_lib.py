"""Shared config defaults (big_vision style: one function per section) and loading.

Each `configs/<name>.py` starts from `base_config()` here and overrides what differs.
The defaults live in the package (not next to the config files) so that a config file
loads from any working directory, a notebook, or a test. Everything the code reads is
in this tree; an override of a key that is not here (`--config.model.widht=3`) fails
with the key's name (ml_collections raises on unknown keys).
"""

import importlib.util
import os
import pathlib
import sys
from typing import Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict


def model_config() -> ConfigDict:
  """NL-MM architecture (design section 3)."""
  m = ConfigDict()
  m.width = 128                      # d
  m.heads = 4                        # h; head width e = d / h
  m.depth = ConfigDict(dict(text=2, image=2, audio=2))  # NL blocks per modality encoder
  m.mlp_mult = 4                     # CMS level MLP: d -> mult*d -> d
  m.norm = "pre"                     # "pre" (default) | "post" (post-norm with DeepNorm alpha)
  m.embed_dim = 128                  # joint embedding size
  m.num_latents = 16                 # L_mem: central latent memory slots
  m.clm_readout = "mean"             # CLM slots -> embedding: "mean" | "attention" | "concat"
  m.dtype = "float32"                # matmul dtype: "float32" | "bfloat16" (params/states stay fp32)
  m.remat = False                    # gradient checkpointing per NL block
  m.dropout = 0.0

  # Fast-weight associative memory (design section 3, paper Eq. 64-65).
  m.memory = ConfigDict()
  m.memory.rule = "delta"            # "hebbian" | "delta"
  m.memory.form = "chunked"          # "recurrent" (lax.scan over tokens: the oracle) | "chunked"
  m.memory.chunk_size = 64           # C
  m.memory.decay = 0.0               # hebbian: lambda = 1 - decay
  m.memory.gate = False              # delta: gated delta rule (alpha_t)
  m.memory.qk_norm = "l2"            # "l2" | "rms"
  m.memory.hope = True               # HOPE modulation of q, k, v by the block's context
  m.memory.direction = ConfigDict(dict(
      text="causal", image="bidirectional", audio="bidirectional", latent="bidirectional"))

  # Continuum Memory System (design section 3/4). ConfigDict sorts keys by name, so the
  # chain order is by update_every (highest frequency first), ties by name (cms.level_order).
  # Each level: update_every (optimizer steps between updates), lr (peak), optimizer.
  m.cms = ConfigDict()
  m.cms.structure = "parallel"       # "parallel" (sum of levels) | "chain" (paper Eq. 70)
  m.cms.levels = ConfigDict()
  m.cms.levels.fast = ConfigDict(dict(update_every=1, lr=1e-3, optimizer="adamw"))
  m.cms.levels.mid = ConfigDict(dict(update_every=4, lr=1e-3, optimizer="adamw"))
  m.cms.levels.slow = ConfigDict(dict(update_every=16, lr=1e-3, optimizer="adamw"))

  # Inputs.
  m.image_size = 64
  m.patch_size = 8
  m.image_stem = "patch"             # "patch" (linear patchify) | "conv" (3x3 stride-2 convs)
  m.image_posemb = "learn"           # "learn" | "sincos2d" (fixed 2-D sine-cosine)
  m.n_mels = 80
  m.max_frames = 400                 # log-mel frames before the conv front-end
  m.audio_subsample = 4              # conv front-end time stride
  m.vocab_size = 1000
  m.max_text_len = 32
  return m


def optim_config() -> ConfigDict:
  """Default optimizer chain (design section 4); CMS levels add their own from model.cms."""
  o = ConfigDict()
  o.optimizer = "adamw"              # "adamw" | "sgd" | "dmgd" | "anderson"
  o.lr = 1e-3                        # peak learning rate of the `default` label
  o.warmup_steps = 100
  o.lr_floor = 0.1                   # cosine decays to lr_floor * peak
  o.weight_decay = 0.01
  o.clip_norm = 1.0                  # global-norm clip per chain; <= 0 disables
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.momentum = 0.9                   # sgd (Nesterov)
  o.dmgd = ConfigDict(dict(
      hidden=8,                      # H: hidden units of the memory's residual MLP (0: linear)
      inner_lr=0.1,                  # eta: memory's own step size on its inner objective
      objective="l2",                # "l2" | "dot" (dot + hidden=0 + inner_lr=1: heavy ball)
      alpha=0.99,                    # retention of the memory (l2: mu <- (alpha-eta) mu + eta g)
      sigma="nsqrt",                 # "identity" | "nsqrt" (o / sqrt(v_hat), b2, eps)
                                     # | "newton_schulz" (2-D only; others identity)
      ns_steps=5,
  ))
  o.anderson = ConfigDict(dict(
      history=3,                     # m
      reg=1e-3,                      # Tikhonov regularisation, relative to mean |dF_j|^2
      trust_region=10.0,             # max ratio |anderson step| / |adam step|
      beta=1.0,                      # mixing
      b1=0.0,                        # Adam first-moment decay inside the AA fixed-point map
                                     # (0: a stationary map; AA supplies the acceleration)
  ))
  return o


def data_config() -> ConfigDict:
  """Data (design section 5)."""
  d = ConfigDict()
  d.name = "demo"                    # "demo" (generated, Flickr8k layout) | "flickr8k"
  d.root = "data/demo_corpus"        # a Flickr8k + FACC root (any accepted layout)
  d.cache_dir = "data/cache"         # preprocessed TFDS/ArrayRecord cache
  d.use_audio = True                 # False: image-text only
  d.max_lost_fraction = 0.01         # error if more of a split is lost to quirks
  d.demo_num_images = 1000           # demo corpus size (split 80/10/10)
  d.demo_seed = 0
  d.crop_margin = 8                  # stored image size = image_size + crop_margin
  d.num_workers = 0                  # grain worker processes (0: in-process)
  d.prefetch = 2
  d.eval_batch_size = 128
  # Log-mel settings (n_mels is model.n_mels); all of them key the cache.
  d.sample_rate = 16000              # Hz; other rates are resampled with librosa
  d.n_fft = 400                      # 25 ms window
  d.hop_length = 160                 # 10 ms hop
  d.fmax = 8000.0
  d.log_mel_top_db = 80.0            # log floor: max power * 10^(-top_db/10)
  d.build_workers = -1               # cache build processes (-1: auto; 0: in-process)
  return d


def loss_config() -> ConfigDict:
  l = ConfigDict()
  l.kind = "infonce"                 # "infonce" | "siglip"
  l.weights = ConfigDict(dict(image_text=1.0, image_audio=1.0, text_audio=1.0))
  l.temperature_init = 0.07          # logit scale starts at 1/0.07
  l.max_logit_scale = 100.0
  return l


def train_config() -> ConfigDict:
  t = ConfigDict()
  t.batch_size = 32                  # global batch (all devices, all hosts)
  t.total_steps = 1000
  t.epochs = 0                       # > 0: total_steps = epochs * steps_per_epoch
  t.log_every = 10
  t.eval_every = 250
  t.checkpoint_every = 250
  t.keep_checkpoints = 3
  t.mesh = ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  t.eval_splits = ("dev",)
  t.progress_bar = True
  return t


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.init_from = ""                   # a checkpoint (workdir or step dir) to start a new run from
  c.model = model_config()
  c.optim = optim_config()
  c.data = data_config()
  c.loss = loss_config()
  c.train = train_config()
  return c


CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads `configs/<name>.py` (or a path) and applies `key=value` overrides.

  Overrides use the command line's syntax (`train.total_steps=10`) and go through
  ml_collections' own flag parser, so a wrong key fails exactly as on the command line.
  """
  path = pathlib.Path(name_or_path)
  if not path.suffix:
    path = CONFIG_DIR / f"{name_or_path}.py"
  if not path.is_file():
    raise FileNotFoundError(
        f"config file {path} not found; available: "
        f"{sorted(p.stem for p in CONFIG_DIR.glob('*.py'))}")
  if not overrides:
    spec = importlib.util.spec_from_file_location(f"nlmm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=os.fspath(path), flag_values=fv,
                                  lock_config=False)
  argv = ["prog", f"--config={os.fspath(path)}"] + [f"--config.{o}" for o in overrides]
  saved = sys.argv
  sys.argv = argv  # config_flags reads the overrides from sys.argv
  try:
    fv(argv)
  finally:
    sys.argv = saved
  return fv.config
