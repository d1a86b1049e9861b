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

  # Token mixer of every block (encoders and central latent memory), each followed by
  # the CMS: "nl" (the fast-weight memory below) | "hope" (the self-modifying Titans
  # memory, paper Sec. 8, `model.hope`) | "attention" (softmax attention: the baseline).
  m.block = "nl"
  m.hope = ConfigDict()
  m.hope.hidden = 32                 # hidden units of each memory MLP (0: linear memories)
  m.hope.form = "chunked"            # "recurrent" (lax.scan over tokens: the oracle) | "chunked"
  m.hope.chunk_size = 16             # C: tokens per chunk (the chunk's updates are applied
                                     # together at its end, so C changes the function)

  # Fast-weight associative memory (design section 3, paper Eq. 64-65).
  m.memory = ConfigDict()
  m.memory.rule = "delta"            # "hebbian" | "delta"
  m.memory.form = "chunked"          # "recurrent" (lax.scan over tokens: the oracle) | "chunked"
  m.memory.chunk_size = 64           # C
  m.memory.decay = 0.0               # hebbian only: lambda = 1 - decay (an error with delta)
  m.memory.gate = False              # delta only: gated delta rule (alpha_t; an error with hebbian)
  m.memory.qk_norm = "l2"            # "l2" | "rms"
  m.memory.context_gain = True       # per-token gains on q, k, v from the context seen so
                                     # far (prefix mean when causal); NOT the paper's HOPE
  m.memory.context_hidden = 64       # hidden width of the context-gain MLP (d -> 64 -> 3h)
  m.memory.precision = "highest"     # intra-chunk score matmuls: "highest" | "high" | "default"
                                     # (state recurrence and triangular inverse: always highest)
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
      objective="l2",                # "l2" | "dot" (dot, hidden=0, inner_lr=1, no debias: heavy
                                     # ball)
      alpha=0.99,                    # retention of the memory (l2: mu <- (alpha-eta) mu + eta g)
      sigma="nsqrt",                 # "identity" | "nsqrt" (o / sqrt(v_hat), b2, eps)
                                     # | "newton_schulz" (kernels as [prod(shape[:-1]), n];
                                     # 0-D / 1-D: o / rms(o))
      ns_steps=5,
      phi_sample=16384,              # memory MLP's inner gradient on <= this many coordinates
                                     # per tensor (strided sample); 0: all (exact, slower)
      activation="cubic",            # memory MLP's activation: "cubic" (cheap) | "tanh"
  ))
  o.anderson = ConfigDict(dict(
      history=3,                     # m
      reg=1e-3,                      # Tikhonov regularisation, relative to mean |dF_j|^2
      trust_region=10.0,             # max ratio |anderson step| / |adam step|
      beta=1.0,                      # mixing
      b1=0.0,                        # Adam first-moment decay inside the AA fixed-point map
                                     # (0: a stationary map; AA supplies the acceleration)
      history_dtype="float32",       # dtype of the 2m history rings ("bfloat16" halves them)
  ))
  return o


def data_config() -> ConfigDict:
  """Data (design section 5)."""
  d = ConfigDict()
  d.name = "demo"                    # "demo" (generated, Flickr8k layout) | "flickr8k"
                                     # | "manifest" (your own corpus: `data.manifest`)
                                     # | "tfds:<name>" (a prepared TFDS image-text set)
  d.root = "data/demo_corpus"        # a Flickr8k + FACC root (any accepted layout)
  d.manifest = ""                    # data.name="manifest": a JSONL file, one image per
                                     # line (format: nlmm_jax/data/manifest.py)
  # data.name="tfds:<name>" (nlmm_jax/data/tfds_source.py): image-text only.
  d.tfds_data_dir = ""               # the TFDS data dir ("": $TFDS_DATA_DIR or
                                     # ~/tensorflow_datasets)
  d.tfds_splits = ConfigDict(dict(train="train", dev="val", test="test"))  # -> TFDS splits
  d.tfds_image_key = "image"
  d.tfds_caption_key = "captions/text"  # "/" into nested features; a string or strings
  d.tfds_id_key = ""                 # a feature naming the image; "": "<split>[<i>]"
  # Several corpora (nlmm_jax/data/mixture.py): entries such as
  # dict(name="manifest", manifest="m.jsonl", weight=2.0, label="mine"), each overriding
  # keys of this section for one corpus; weighted sampling, evaluation per corpus.
  d.mixture = ()
  d.cache_dir = "data/cache"         # preprocessed TFDS/ArrayRecord cache
  d.cache_verify = "stat"            # what keys the cache per media file: "stat" (size +
                                     # mtime) | "hash" (sha256 of the bytes; reads them all)
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


DATA_NAMES = ("demo", "flickr8k", "manifest", "tfds:<name>")
TFDS_PREFIX = "tfds:"


def check_data_name(name) -> None:
  """Raises ValueError when `name` is not a corpus kind of DATA_NAMES."""
  if not (name in DATA_NAMES[:3] or (isinstance(name, str) and name.startswith(TFDS_PREFIX)
                                      and name[len(TFDS_PREFIX):].strip())):
    raise ValueError(f"data.name must be one of {DATA_NAMES} (e.g. tfds:coco_captions), "
                     f"got {name!r}")


def check_data(data: ConfigDict) -> None:
  """Raises ValueError, naming the key, when `data.name` is unknown or, for
  `data.name="manifest"`, when `data.manifest` is unset or names no file."""
  check_data_name(data.name)
  if data.name != "manifest":
    return
  path = data.get("manifest") or ""
  if not isinstance(path, str) or not path.strip():
    raise ValueError("data.name='manifest' reads its corpus from data.manifest, which is "
                     "unset: pass --config.data.manifest=PATH (a JSONL file, format in "
                     "nlmm_jax/data/manifest.py; scripts/make_manifest.py writes one)")
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(full):
    raise ValueError(f"data.manifest={path!r} is not a file (looked for {full}, working "
                     f"directory {os.getcwd()}): set --config.data.manifest to the path of "
                     "your manifest JSONL file")


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
  t.accum_steps = 1                  # > 1: the batch in this many micro-batches by gradient
                                     # caching (train._cached_grads): the same loss (all
                                     # negatives of the batch) and gradient, one micro-batch's
                                     # activation memory, one extra forward per micro-batch
  t.total_steps = 1000
  t.epochs = 0                       # > 0: total_steps = epochs * steps_per_epoch
  t.log_every = 10
  t.eval_every = 250
  t.checkpoint_every = 250
  t.keep_checkpoints = 3
  t.mesh = ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  t.cpu_devices = 0                  # CPU runs from the command line: split the CPU into this
                                     # many JAX devices (data parallel, one batch shard each);
                                     # 0: JAX's default, one. No effect on GPU/TPU runs, or
                                     # when XLA_FLAGS / JAX_NUM_CPU_DEVICES already set it
  t.eval_splits = ("test",)          # --mode=eval: the splits evaluated (e.g. ("dev", "test"))
  t.progress_bar = True
  return t


def check_accum_steps(batch_size: int, accum_steps: int, n_devices: int) -> None:
  """Raises ValueError, naming what to change, unless train.accum_steps >= 1 divides
  train.batch_size into micro-batches that each split evenly over the n devices the batch
  is sharded over (all devices of the mesh: its data x fsdp axes, `train.batch_sharding`).
  Called by `train._check_config` before a run."""
  if accum_steps < 1:
    raise ValueError(f"train.accum_steps={accum_steps} must be >= 1 (1: no accumulation)")
  if batch_size % accum_steps:
    raise ValueError(f"train.accum_steps={accum_steps} must divide train.batch_size="
                     f"{batch_size}: change either")
  micro = batch_size // accum_steps
  if micro % n_devices:
    raise ValueError(
        f"train.accum_steps={accum_steps} leaves micro-batches of {batch_size} / "
        f"{accum_steps} = {micro} rows, not divisible by the {n_devices} devices the batch "
        f"is sharded over: lower train.accum_steps to a divisor of "
        f"{batch_size // n_devices} (train.batch_size / devices) or raise train.batch_size")


def ttt_config() -> ConfigDict:
  """Test-time training at inference (models/ttt.py): per-example low-rank key adapters
  fitted by `steps` SGD steps on the fast-weight memories' prediction error."""
  t = ConfigDict()
  t.steps = 0                        # inner SGD steps per example (0: off, the plain model)
  t.lr = 0.1                         # inner step size
  t.rank = 4                         # adapter rank r (W_k + A B, A [d, r], B [r, d] = 0 at init)
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
  c.ttt = ttt_config()
  return c


FREE_FORM = ("model.cms.levels",)  # sections whose keys are names the user chooses


def config_from_dict(saved: dict, what: str = "the saved config") -> ConfigDict:
  """A run's saved config (e.g. a checkpoint's `config` item) over today's defaults.

  Raises ValueError naming every key that this version does not know (a checkpoint from
  another version or another project), so a model is never rebuilt from a config that
  means something else; keys added since the run take their defaults.
  """
  config = base_config()
  unknown = []

  def merge(node: ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      path = f"{prefix}{key}"
      if path in FREE_FORM:
        node[key] = ConfigDict(value)
      elif key not in node:
        unknown.append(path)
      elif isinstance(node[key], ConfigDict):
        if not isinstance(value, dict):
          unknown.append(f"{path} (a section here, {type(value).__name__} there)")
        else:
          merge(node[key], value, path + ".")
      else:
        try:
          node[key] = value
        except TypeError as e:
          unknown.append(f"{path} ({e})")

  merge(config, saved, "")
  if unknown:
    raise ValueError(f"{what} does not match this version of nlmm_jax: unknown or "
                     f"mistyped keys {unknown}")
  return config


def _config_dir() -> pathlib.Path:
  """Where the named configs live: the package's copy, else the clone's `configs/`.

  An installed nlmm_jax (`pip install .`, a wheel) carries the root `configs/` folder as
  the package `nlmm_jax.configs` (pyproject.toml maps it; the files are not duplicated in
  the repository); a clone or an editable install reads `<repo>/configs` directly.
  """
  here = pathlib.Path(__file__).resolve().parent
  packaged = here / "configs"
  return packaged if packaged.is_dir() else here.parent / "configs"


CONFIG_DIR = _config_dir()


def config_names() -> list[str]:
  """The named configs (`demo`, `tiny`, `small`, ...)."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(name_or_path: str) -> pathlib.Path:
  """The config file for a bare name (`demo`) or a path (`configs/demo.py`, `my.py`).

  A value that is an existing file is used as is; otherwise a value without a suffix is
  the name of a packaged config (`CONFIG_DIR/<name>.py`), so `demo` works from any working
  directory and after a non-editable install. Anything else is a FileNotFoundError that
  lists the names.
  """
  path = pathlib.Path(name_or_path)
  if path.is_file():
    return path
  if not path.suffix and len(path.parts) == 1:
    packaged = CONFIG_DIR / f"{name_or_path}.py"
    if packaged.is_file():
      return packaged
    raise FileNotFoundError(
        f"no config named {name_or_path!r}; available: {config_names()} (in {CONFIG_DIR}), "
        f"or give the path of a config file")
  hint = ""
  if path.suffix == ".py" and (CONFIG_DIR / path.name).is_file():
    hint = f"; the installed package has it: use the bare name {path.stem!r}"
  raise FileNotFoundError(
      f"config file {name_or_path} not found (working directory {os.getcwd()}){hint}; "
      f"available names: {config_names()}")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads a config by name (`demo`, see `config_path`) or path and applies overrides.

  Overrides use the command line's syntax (`train.total_steps=10`) and go through
  ml_collections' own flag parser, so a wrong key fails exactly as on the command line.
  """
  path = config_path(name_or_path)
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
