"""Export a trained NL-MM as serialized `jax.export` functions that run without this package.

  python -m nlmm_jax.export --workdir=runs/demo --output=exported/demo [--step=best]

  from nlmm_jax import export
  m = export.load("exported/demo")          # needs jax + numpy only (no flax, no nlmm_jax)
  ids, mask = m.encode_text(["a dog runs"])             # int32 / bool [1, max_text_len]
  t = m.embed_text(ids, mask)                           # [1, E], L2-normalised
  i = m.embed_image(images)       # float32 [B, S, S, 3], ImageNet-normalised (see settings)
  a = m.embed_audio(mels, mels_mask)                    # float32 [B, F, n_mels], bool [B, F]

Layout of the output folder:
  manifest.json          format version, files, input signatures
  params.npz             the parameters as a flat list (arr_000000, ...), passed to every
                         function as its first argument (stored once for all functions)
  text.jaxexport         embed text: ids int32 [b, L], mask bool [b, L]
  image.jaxexport        embed images [b, S, S, 3] (S fixed by the model)
  audio.jaxexport        embed log-mels [b, F, n_mels], mask bool [b, F]
  tokenizer.json         the caption vocabulary (Tokenizer.to_json) and its rules
  settings.json          preprocessing settings (image sizes, mean/std, log-mel, lengths)
  README.txt             how to call the functions (also without nlmm_jax)

What is symbolic. The batch size b and the sequence lengths L and F are symbolic
dimensions (jax.export shape polymorphism), constrained to L <= model.max_text_len and
F <= model.max_frames (the learned positional tables). Sequence lengths are symbolic
because the functions are traced with the memory's `recurrent` form (a `lax.scan` over
tokens, `fast_weights.fast_weight_memory`'s oracle), whatever form the model trained
with: the `chunked` form plans its chunks and inverts its c x c triangular matrices with
Python integers taken from T, which a symbolic T cannot give. Both forms compute the same
function (tested equal to 1e-5 in fp32) from the same parameters, so an exported
embedding equals `nlmm_jax.load(...)`'s to float rounding (the export test checks 1e-5);
the price is a sequential scan over tokens at inference. `load` passes an input longer
than the table only if its extra positions are masked out (they are dropped).

`load` imports nothing from this package besides this module (jax, numpy, json, re only),
so the folder plus this single file is all a consumer needs.
"""

import argparse
import json
import os
import re
import shutil
import sys
from typing import Any, Optional, Sequence

import numpy as np

FORMAT = "nlmm-jax-export/2"   # /1 (per-length buckets) is not read: re-export
MANIFEST = "manifest.json"
PARAMS = "params.npz"
TOKENIZER = "tokenizer.json"
SETTINGS = "settings.json"
README = "README.txt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = nlmm_jax.data.features (checked by the exporter)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOKEN_RE = r"[^\W_]+|[^\w\s]|_"       # = nlmm_jax.data.tokenizer._TOKEN_RE (checked too)
PAD, UNK, BOS, EOS = 0, 1, 2, 3


class ExportError(RuntimeError):
  """An export folder is missing, incomplete or not of this format."""


# ------------------------------------------------------------------------------ export


def _flat_params(params) -> tuple[list[np.ndarray], Any]:
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(params)
  return [np.asarray(x) for x in leaves], treedef


def _save_params(path: str, leaves: list[np.ndarray]) -> list[str]:
  """Saves leaves as arr_%06d; non-numpy dtypes (bfloat16, ...) as same-width uints."""
  dtypes, arrays = [], {}
  for i, a in enumerate(leaves):
    dtypes.append(a.dtype.name)
    if a.dtype.kind not in "biufc":  # ml_dtypes (bfloat16, float8): store the raw bits
      a = a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))
    arrays[f"arr_{i:06d}"] = a
  np.savez(path, **arrays)
  return dtypes


def export_model(model, output: str, platforms: Optional[Sequence[str]] = None,
                 overwrite: bool = False) -> dict:
  """Writes the export folder for `model` (an `nlmm_jax.api.Model`); returns the manifest."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from nlmm_jax.data import features  # pylint: disable=g-import-not-at-top
  from nlmm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from nlmm_jax.models import nlmm  # pylint: disable=g-import-not-at-top

  # The loader's copies of the preprocessing constants must be the package's.
  assert tuple(features.IMAGENET_MEAN.tolist()) == tuple(np.float32(IMAGENET_MEAN).tolist())
  assert tuple(features.IMAGENET_STD.tolist()) == tuple(np.float32(IMAGENET_STD).tolist())
  assert tokenizer_lib._TOKEN_RE.pattern == _TOKEN_RE  # pylint: disable=protected-access
  assert (PAD, UNK, BOS, EOS) == (tokenizer_lib.PAD, tokenizer_lib.UNK, tokenizer_lib.BOS,
                                  tokenizer_lib.EOS)

  output = os.path.abspath(output)
  if os.path.exists(output) and not os.path.isdir(output):
    raise FileExistsError(f"--output {output} exists and is not a folder")
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise FileExistsError(f"--output {output} exists and is not empty (pass --overwrite "
                          "to replace it)")
  cfg = model.config
  m = cfg.model
  if m.block != "nl":
    # The HOPE memory's chunks are part of its function and need a Python T; attention
    # would export, but nobody has tested it yet.
    raise ValueError(f"export supports model.block='nl' only; this model has {m.block!r}")
  max_len, max_frames, n_mels = int(m.max_text_len), int(m.max_frames), int(m.n_mels)
  size = int(m.image_size)
  platforms = tuple(platforms) if platforms else (jax.default_backend(),)

  leaves, treedef = _flat_params(model.params)
  abstract_leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
  # The same parameters in the token-by-token form (see the module docstring).
  model_cfg = ml_collections.ConfigDict(m.to_dict())
  model_cfg.memory.form = "recurrent"
  module = nlmm.build_model(model_cfg, cfg.loss)

  def export_one(modality, keys, shapes_dtypes):
    def fn(flat, *arrays):
      params = jax.tree.unflatten(treedef, list(flat))
      return module.apply({"params": params}, dict(zip(keys, arrays)), modality,
                          method=nlmm.NLMM.embed)
    exported = jax_export.export(jax.jit(fn), platforms=platforms)(
        abstract_leaves, *[jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes])
    return exported.serialize()

  b, length = jax_export.symbolic_shape("b, L", constraints=[f"L <= {max_len}"])
  blobs = {"text": export_one("text", ("text", "text_mask"),
                              [((b, length), jnp.int32), ((b, length), jnp.bool_)])}
  (b,) = jax_export.symbolic_shape("b")
  blobs["image"] = export_one("image", ("image",), [((b, size, size, 3), jnp.float32)])
  b, frames = jax_export.symbolic_shape("b, F", constraints=[f"F <= {max_frames}"])
  blobs["audio"] = export_one("audio", ("audio", "audio_mask"),
                              [((b, frames, n_mels), jnp.float32), ((b, frames), jnp.bool_)])

  tmp = f"{output}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    for modality, blob in blobs.items():
      with open(os.path.join(tmp, f"{modality}.jaxexport"), "wb") as f:
        f.write(blob)
    dtypes = _save_params(os.path.join(tmp, PARAMS), leaves)
    s = model._settings  # pylint: disable=protected-access
    settings = {
        "image_size": size,
        "stored_size": int(s.stored_size),
        "crop_margin": int(cfg.data.crop_margin),
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "sample_rate": int(s.sample_rate),
        "n_fft": int(s.n_fft),
        "hop_length": int(s.hop_length),
        "n_mels": int(s.n_mels),
        "fmax": float(s.fmax),
        "top_db": float(s.top_db),
        "amin": float(features.AudioSettings().amin),
        "mel_storage_dtype": "float16",
        "max_text_len": int(m.max_text_len),
        "max_frames": int(m.max_frames),
        "audio_subsample": int(m.audio_subsample),
        "embed_dim": int(m.embed_dim),
    }
    tokenizer = dict(model.tokenizer.to_json())
    tokenizer.update(pattern=_TOKEN_RE, lowercase=True,
                     ids={"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS})
    manifest = {
        "format": FORMAT,
        "jax_version": jax.__version__,
        "platforms": list(platforms),
        "source": {"path": str(model.path), "step": int(model.step)},
        "embed_dim": int(m.embed_dim),
        "params": {"file": PARAMS, "count": len(leaves), "dtypes": dtypes},
        "text": {"file": "text.jaxexport", "max_length": max_len,
                 "inputs": ["text int32 [b, L]", "text_mask bool [b, L]"],
                 "symbolic": ["b >= 1", f"1 <= L <= {max_len}"]},
        "image": {"file": "image.jaxexport", "size": size,
                  "inputs": [f"image float32 [b, {size}, {size}, 3]"], "symbolic": ["b >= 1"]},
        "audio": {"file": "audio.jaxexport", "max_length": max_frames,
                  "inputs": [f"audio float32 [b, F, {n_mels}]", "audio_mask bool [b, F]"],
                  "symbolic": ["b >= 1", f"1 <= F <= {max_frames}"]},
    }
    for name, obj in ((MANIFEST, manifest), (SETTINGS, settings), (TOKENIZER, tokenizer)):
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    with open(os.path.join(tmp, README), "w", encoding="utf-8") as f:
      f.write(_readme(manifest, settings))
    if os.path.isdir(output):
      shutil.rmtree(output)
    os.replace(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _readme(manifest: dict, settings: dict) -> str:
  s = settings
  return f"""NL-MM embedding functions exported with jax.export (jax {manifest['jax_version']},
platforms {', '.join(manifest['platforms'])}) from {manifest['source']['path']}
step {manifest['source']['step']}. Each returns L2-normalised float32 embeddings [b, {manifest['embed_dim']}].
The batch size b and the lengths L (tokens, <= {s['max_text_len']}) and F (log-mel frames,
<= {s['max_frames']}) are symbolic: one function per modality serves every shape.

With nlmm_jax installed (or just its nlmm_jax/export.py next to your code):
  from nlmm_jax import export
  m = export.load("THIS_FOLDER")
  ids, mask = m.encode_text(["a dog runs on the grass"])
  text_emb = m.embed_text(ids, mask)      # int32 [b, L], bool [b, L]
  image_emb = m.embed_image(images)       # float32 [b, {s['image_size']}, {s['image_size']}, 3]
  audio_emb = m.embed_audio(mels, mask)   # float32 [b, F, {s['n_mels']}], bool [b, F]
  scores = text_emb @ image_emb.T         # cosine similarities

With jax + numpy only:
  import jax, numpy as np
  z = np.load("THIS_FOLDER/params.npz")
  params = [z[f"arr_{{i:06d}}"] for i in range({manifest['params']['count']})]   # a list, in this order
  f = jax.export.deserialize(open("THIS_FOLDER/text.jaxexport", "rb").read())
  emb = f.call(params, ids, mask)         # ids int32 [b, L], mask bool [b, L]
  (image.jaxexport: f.call(params, images); audio.jaxexport: f.call(params, mels, mask))
Parameters of a non-numpy dtype (manifest params.dtypes, e.g. bfloat16) are stored as
unsigned integers of the same width: view them back with .view(jax.numpy.dtype(name)).
Positions with mask False are padding: they do not change the embedding. Each distinct
(b, L) compiles once per process (jit): pad inputs to a few lengths if that matters.
The functions use the memory's token-by-token form (the same function as the chunked
form the model may have trained with; see nlmm_jax/export.py for why).

Preprocessing (settings.json):
  text:  lower-case, split with the regex {_TOKEN_RE!r} (tokenizer.json "pattern"), map each
         piece to 4 + its index in tokenizer.json "words" (unknown -> 1), then
         [BOS=2] + first {s['max_text_len'] - 2} pieces + [EOS=3], padded with 0 to {s['max_text_len']}; the mask is True on the
         BOS..EOS positions.
  image: RGB, shorter side resized (bicubic) to {s['stored_size']}, centre crop {s['stored_size']}x{s['stored_size']}
         (what the training cache stores), then its centre {s['image_size']}x{s['image_size']}, x / 255, (x - mean) / std with mean {s['image_mean']}
         and std {s['image_std']}.
  audio: mono at {s['sample_rate']} Hz; |STFT|^2 (n_fft {s['n_fft']}, hop {s['hop_length']}, centred,
         Hann) times librosa's mel filter bank (n_mels {s['n_mels']}, fmax {s['fmax']}); log of
         max(power, max(amin={s['amin']}, max(power) * 10^(-top_db/10))) with top_db {s['top_db']};
         normalised to zero mean and unit std over the whole clip; rounded to float16
         (as the training cache stores it); time-major [frames, n_mels]; the first
         {s['max_frames']} frames are kept.
"""


# ------------------------------------------------------------------------------ load


class ExportedModel:
  """Loaded export folder: `embed_text`, `embed_image`, `embed_audio`, `encode_text`,
  `normalize_image`, and the `tokenizer`, `settings` and `manifest` dicts."""

  def __init__(self, path: str, manifest: dict, settings: dict, tokenizer: dict,
               params: list, functions: dict):
    self.path = path
    self.manifest = manifest
    self.settings = settings
    self.tokenizer = tokenizer
    self.params = params
    self._functions = functions     # modality -> jitted call
    self.embed_dim = int(manifest["embed_dim"])
    self._word_ids = {w: i + 4 for i, w in enumerate(tokenizer["words"])}
    self._token_re = re.compile(tokenizer.get("pattern", _TOKEN_RE), re.UNICODE)

  # ---- preprocessing helpers (numpy only)

  def encode_text(self, captions: Sequence[str], max_len: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids int32 [N, max_len], mask bool [N, max_len]) like the training."""
    if isinstance(captions, str):
      raise TypeError("encode_text takes a list of captions, not one string")
    max_len = int(max_len or self.settings["max_text_len"])
    ids = np.zeros((len(captions), max_len), np.int32)
    mask = np.zeros((len(captions), max_len), bool)
    for i, c in enumerate(captions):
      body = [self._word_ids.get(w, UNK) for w in self._token_re.findall(str(c).lower())]
      seq = [BOS] + body[:max_len - 2] + [EOS]
      ids[i, :len(seq)] = seq
      mask[i, :len(seq)] = True
    return ids, mask

  def normalize_image(self, crops_u8: np.ndarray) -> np.ndarray:
    """uint8 [..., image_size, image_size, 3] centre crops -> normalised float32."""
    x = np.asarray(crops_u8).astype(np.float32) * (1.0 / 255.0)
    return (x - np.float32(self.settings["image_mean"])) / np.float32(self.settings["image_std"])

  # ---- embeddings

  def _call(self, modality: str, arrays: list, length_axis: Optional[int]) -> np.ndarray:
    if arrays[0].shape[0] == 0:
      return np.zeros((0, self.embed_dim), np.float32)
    if length_axis is not None:
      longest = int(self.manifest[modality]["max_length"])
      mask = arrays[-1]
      if mask.shape[1] > longest:
        if mask[:, longest:].any():
          raise ValueError(f"{modality} inputs have real (mask True) positions beyond "
                           f"{longest}, the longest the model has learned positions for")
        arrays = [a[:, :longest] for a in arrays]
      if arrays[0].shape[1] == 0:
        raise ValueError(f"{modality} inputs need at least one position")
    return np.asarray(self._functions[modality](self.params, *arrays))

  def embed_text(self, ids, mask=None) -> np.ndarray:
    """ids int [B, L], mask bool [B, L] (default ids != 0) -> [B, E] float32."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 2:
      raise ValueError(f"embed_text needs ids [B, L], got shape {ids.shape}")
    mask = ids != PAD if mask is None else np.asarray(mask, bool)
    if mask.shape != ids.shape:
      raise ValueError(f"text mask {mask.shape} does not match ids {ids.shape}")
    return self._call("text", [ids, mask], 1)

  def embed_image(self, images) -> np.ndarray:
    """float32 [B, S, S, 3] normalised images (S = settings image_size) -> [B, E]."""
    images = np.asarray(images, np.float32)
    s = int(self.settings["image_size"])
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise ValueError(f"embed_image needs float32 [B, {s}, {s}, 3], got {images.shape}")
    return self._call("image", [images], None)

  def embed_audio(self, mels, mask=None) -> np.ndarray:
    """float32 log-mels [B, F, n_mels], mask bool [B, F] (default all True) -> [B, E]."""
    mels = np.asarray(mels, np.float32)
    n_mels = int(self.settings["n_mels"])
    if mels.ndim != 3 or mels.shape[2] != n_mels:
      raise ValueError(f"embed_audio needs float32 [B, F, {n_mels}], got {mels.shape}")
    mask = (np.ones(mels.shape[:2], bool) if mask is None else np.asarray(mask, bool))
    if mask.shape != mels.shape[:2]:
      raise ValueError(f"audio mask {mask.shape} does not match mels {mels.shape[:2]}")
    return self._call("audio", [mels, mask], 1)


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ExportError(f"{path} is missing: not a complete nlmm_jax export folder") from None
  except json.JSONDecodeError as e:
    raise ExportError(f"{path} is not valid JSON: {e}") from None


def load(path: str) -> ExportedModel:
  """Loads an export folder written by `python -m nlmm_jax.export` (jax + numpy only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no export folder at {path}")
  manifest = _read_json(os.path.join(path, MANIFEST))
  if manifest.get("format") != FORMAT:
    raise ExportError(f"{path}: format {manifest.get('format')!r}, this loader reads {FORMAT} "
                      "(export the checkpoint again with python -m nlmm_jax.export)")
  settings = _read_json(os.path.join(path, SETTINGS))
  tokenizer = _read_json(os.path.join(path, TOKENIZER))
  p = manifest["params"]
  with np.load(os.path.join(path, p["file"])) as z:
    leaves = []
    for i, name in enumerate(p["dtypes"]):
      a = z[f"arr_{i:06d}"]
      if a.dtype.name != name:
        a = a.view(jax.numpy.dtype(name))
      leaves.append(jax.device_put(a))
  functions = {}
  for modality in ("text", "image", "audio"):
    with open(os.path.join(path, manifest[modality]["file"]), "rb") as f:
      functions[modality] = jax.jit(jax_export.deserialize(bytearray(f.read())).call)
  return ExportedModel(path, manifest, settings, tokenizer, leaves, functions)


# ------------------------------------------------------------------------------ CLI


def _step(value: str):
  if value in ("best", "latest"):
    return value
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--step must be best, latest or a step number, got "
                                     f"{value!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m nlmm_jax.export",
      description="Export a trained NL-MM's embed functions with jax.export.")
  parser.add_argument("--workdir", required=True,
                      help="training workdir, its checkpoints/ folder or a step folder")
  parser.add_argument("--output", required=True, help="folder to write (created)")
  parser.add_argument("--step", default="best", type=_step,
                      help="best (by dev rsum_all), latest or a step number")
  parser.add_argument("--platforms", default="",
                      help="comma-separated jax platforms to lower for (default: this "
                           "machine's backend), e.g. cpu,cuda")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --output folder")
  args = parser.parse_args(argv)

  def fail(message: str) -> int:
    print(f"nlmm_jax.export: error: {message}", file=sys.stderr)
    return 1

  if not os.path.exists(args.workdir):
    return fail(f"--workdir {args.workdir} does not exist")
  if (os.path.isdir(args.output) and os.listdir(args.output)) and not args.overwrite:
    return fail(f"--output {args.output} exists and is not empty (pass --overwrite to "
                "replace it)")
  from nlmm_jax import api  # pylint: disable=g-import-not-at-top
  try:
    model = api.load(args.workdir, step=args.step)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    manifest = export_model(model, args.output, platforms, args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  print(f"exported step {manifest['source']['step']} of {args.workdir} to "
        f"{os.path.abspath(args.output)}: text, image and audio functions (symbolic batch; "
        f"text <= {manifest['text']['max_length']} tokens, audio <= "
        f"{manifest['audio']['max_length']} frames)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
