"""Export a trained NL-MM as serialized `jax.export` functions that run without this package.

  python -m nlmm_jax.export --workdir=runs/demo --output=exported/demo [--step=best]

  from nlmm_jax import export
  m = export.load("exported/demo")          # needs jax + numpy only (no flax, no nlmm_jax)
  ids, mask = m.encode_text(["a dog runs"])             # int32 / bool [1, max_text_len]
  t = m.embed_text(ids, mask)                           # [1, E], L2-normalised
  i = m.embed_image(images)       # float32 [B, S, S, 3], ImageNet-normalised (see settings)
  a = m.embed_audio(mels, mels_mask)                    # float32 [B, F, n_mels], bool [B, F]

Layout of the output folder:
  manifest.json          format version, files, input signatures, length buckets
  params.npz             the parameters as a flat list (arr_000000, ...), passed to every
                         function as its first argument (stored once for all functions)
  text_L<L>.jaxexport    embed text of exactly L tokens, symbolic batch size "b"
  image.jaxexport        embed images (size fixed by the model), symbolic batch size "b"
  audio_F<F>.jaxexport   embed F log-mel frames, symbolic batch size "b"
  tokenizer.json         the caption vocabulary (Tokenizer.to_json) and its rules
  settings.json          preprocessing settings (image sizes, mean/std, log-mel, lengths)
  README.txt             how to call the functions (also without nlmm_jax)

What is symbolic and what is not. The batch dimension is symbolic in every function. The
sequence lengths are not: the fast-weight memory cuts a sequence of T tokens into
n = ceil(T / C) chunks of c = ceil(T / n) tokens with Python integers (`chunk_plan`), the
delta rule inverts a c x c triangular matrix by a recursion on c, and a chunk scan of at
most 8 chunks is unrolled; none of these can be traced with a symbolic T (a symbolic text
length makes the inverse recurse forever; T = C*k gets as far as the unrolled scan). So
each length-dependent modality is exported once per length bucket (text: token counts,
audio: log-mel frames), every bucket <= the learned positional table (model.max_text_len;
model.max_frames frames, i.e. ceil(max_frames / audio_subsample) positions). `load` pads an
input with masked-out positions up to the smallest bucket that holds it (the model's
output does not depend on trailing padding: equal up to float rounding, ~1e-6) and
rejects an input with real (mask True) positions beyond the largest bucket. The largest
bucket is always the full length the training and `nlmm_jax.load` use.

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

FORMAT = "nlmm-jax-export/1"
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


def default_buckets(max_len: int, multiple: int = 1) -> list[int]:
  """max/4, max/2, max, each rounded up to a multiple of `multiple` (>= 1, deduplicated)."""
  out = set()
  for div in (4, 2, 1):
    n = -(-max_len // div)
    n = -(-n // multiple) * multiple
    out.add(min(max(n, 1), max_len))
  out.add(int(max_len))
  return sorted(out)


def _parse_buckets(text: Optional[str], max_len: int, what: str, multiple: int = 1
                   ) -> list[int]:
  if not text or text == "auto":
    return default_buckets(max_len, multiple)
  try:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
  except ValueError:
    raise ValueError(f"{what} must be 'auto' or comma-separated integers, got {text!r}"
                     ) from None
  if not values or values[0] < 1 or values[-1] > max_len:
    raise ValueError(f"{what}: each length must be in [1, {max_len}] (the model's learned "
                     f"positions), got {text!r}")
  if values[-1] != max_len:
    values.append(max_len)    # the full length always exists (training's and the API's)
  return values


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


def export_model(model, output: str, text_lengths: Optional[str] = None,
                 audio_frames: Optional[str] = None,
                 platforms: Optional[Sequence[str]] = None, overwrite: bool = False) -> dict:
  """Writes the export folder for `model` (an `nlmm_jax.api.Model`); returns the manifest."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from nlmm_jax.data import features  # pylint: disable=g-import-not-at-top
  from nlmm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from nlmm_jax.models import encoders  # pylint: disable=g-import-not-at-top
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
  sub = int(m.audio_subsample)
  text_buckets = _parse_buckets(text_lengths, int(m.max_text_len), "--text_lengths")
  audio_buckets = _parse_buckets(audio_frames, int(m.max_frames), "--audio_frames", sub)
  platforms = tuple(platforms) if platforms else (jax.default_backend(),)

  leaves, treedef = _flat_params(model.params)
  module = model.module
  abstract_leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]

  def embed_fn(modality, keys):
    def fn(flat, *arrays):
      params = jax.tree.unflatten(treedef, list(flat))
      return module.apply({"params": params}, dict(zip(keys, arrays)), modality,
                          method=nlmm.NLMM.embed)
    return jax.jit(fn)

  def export_one(modality, keys, shapes_dtypes):
    exported = jax_export.export(embed_fn(modality, keys), platforms=platforms)(
        abstract_leaves, *[jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes])
    return exported.serialize()

  tmp = f"{output}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    files = {"text": [], "image": [], "audio": []}
    for length in text_buckets:
      (b,) = jax_export.symbolic_shape("b")
      blob = export_one("text", ("text", "text_mask"),
                        [((b, length), jnp.int32), ((b, length), jnp.bool_)])
      name = f"text_L{length}.jaxexport"
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(blob)
      files["text"].append({"length": length, "file": name})
    (b,) = jax_export.symbolic_shape("b")
    size = int(m.image_size)
    blob = export_one("image", ("image",), [((b, size, size, 3), jnp.float32)])
    with open(os.path.join(tmp, "image.jaxexport"), "wb") as f:
      f.write(blob)
    files["image"].append({"size": size, "file": "image.jaxexport"})
    for frames in audio_buckets:
      (b,) = jax_export.symbolic_shape("b")
      blob = export_one("audio", ("audio", "audio_mask"),
                        [((b, frames, int(m.n_mels)), jnp.float32),
                         ((b, frames), jnp.bool_)])
      name = f"audio_F{frames}.jaxexport"
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(blob)
      files["audio"].append({"frames": frames, "file": name})

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
        "audio_subsample": sub,
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
        "text": {"inputs": ["text int32 [b, L]", "text_mask bool [b, L]"],
                 "buckets": files["text"]},
        "image": {"inputs": [f"image float32 [b, {size}, {size}, 3]"],
                  "buckets": files["image"]},
        "audio": {"inputs": [f"audio float32 [b, F, {int(m.n_mels)}]",
                             "audio_mask bool [b, F]"],
                  "buckets": files["audio"]},
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
  # Sanity: the subsampled audio lengths fit the learned table (the exporter traced them).
  assert encoders.subsampled_length(audio_buckets[-1], sub) <= encoders.subsampled_length(
      int(m.max_frames), sub)
  return manifest


def _readme(manifest: dict, settings: dict) -> str:
  text = ", ".join(str(b["length"]) for b in manifest["text"]["buckets"])
  audio = ", ".join(str(b["frames"]) for b in manifest["audio"]["buckets"])
  s = settings
  return f"""NL-MM embedding functions exported with jax.export (jax {manifest['jax_version']},
platforms {', '.join(manifest['platforms'])}) from {manifest['source']['path']}
step {manifest['source']['step']}. Each returns L2-normalised float32 embeddings [b, {manifest['embed_dim']}];
the batch size b is symbolic (any b >= 1), the sequence lengths are fixed per file.

With nlmm_jax installed (or just its nlmm_jax/export.py next to your code):
  from nlmm_jax import export
  m = export.load("THIS_FOLDER")
  ids, mask = m.encode_text(["a dog runs on the grass"])
  text_emb = m.embed_text(ids, mask)      # any length <= {s['max_text_len']}: padded to a bucket
  image_emb = m.embed_image(images)       # float32 [b, {s['image_size']}, {s['image_size']}, 3]
  audio_emb = m.embed_audio(mels, mask)   # float32 [b, F, {s['n_mels']}], bool [b, F], F <= {s['max_frames']}
  scores = text_emb @ image_emb.T         # cosine similarities

With jax + numpy only:
  import jax, numpy as np
  z = np.load("THIS_FOLDER/params.npz")
  params = [z[f"arr_{{i:06d}}"] for i in range({manifest['params']['count']})]   # a list, in this order
  f = jax.export.deserialize(open("THIS_FOLDER/text_L{s['max_text_len']}.jaxexport", "rb").read())
  emb = f.call(params, ids, mask)         # ids int32 [b, {s['max_text_len']}], mask bool [b, {s['max_text_len']}]
  (image.jaxexport: f.call(params, images); audio_F<F>.jaxexport: f.call(params, mels, mask))
Parameters of a non-numpy dtype (manifest params.dtypes, e.g. bfloat16) are stored as
unsigned integers of the same width: view them back with .view(jax.numpy.dtype(name)).

Files: text_L<L> for L in [{text}] tokens; audio_F<F> for F in [{audio}] log-mel frames.
Positions with mask False are padding: they do not change the embedding, so pad an input
up to the next bucket (ids 0, mask False; mel frames 0, mask False). The lengths are fixed
because the model's chunked fast-weight memory plans its chunks with Python integers
from the sequence length, and bounded by the learned positional tables.

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
    self._functions = functions     # modality -> [(length or None, jitted call)]
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
    b = arrays[0].shape[0]
    if b == 0:
      return np.zeros((0, self.embed_dim), np.float32)
    fns = self._functions[modality]
    if length_axis is None:
      return np.asarray(fns[0][1](self.params, *arrays))
    n = arrays[0].shape[1]
    mask = arrays[-1]
    longest = fns[-1][0]
    if n > longest:
      if mask[:, longest:].any():
        raise ValueError(f"{modality} inputs have real (mask True) positions beyond "
                         f"{longest}, the longest the model has learned positions for")
      arrays = [a[:, :longest] for a in arrays]
      n = longest
    length, fn = next((l, f) for l, f in fns if l >= n)
    if length > n:   # masked-out padding up to the bucket
      arrays = [np.pad(a, [(0, 0), (0, length - n)] + [(0, 0)] * (a.ndim - 2))
                for a in arrays]
    return np.asarray(fn(self.params, *arrays))

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
    raise ExportError(f"{path}: format {manifest.get('format')!r}, this loader reads {FORMAT}")
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
    fns = []
    for bucket in manifest[modality]["buckets"]:
      with open(os.path.join(path, bucket["file"]), "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
      fns.append((bucket.get("length", bucket.get("frames")), jax.jit(exported.call)))
    fns.sort(key=lambda lf: -1 if lf[0] is None else lf[0])
    functions[modality] = fns
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
  parser.add_argument("--text_lengths", default="auto",
                      help="token-count buckets, e.g. 8,16,32 (auto: max/4, max/2, max)")
  parser.add_argument("--audio_frames", default="auto",
                      help="log-mel frame buckets (auto: max/4, max/2, max)")
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
    manifest = export_model(model, args.output, args.text_lengths, args.audio_frames,
                            platforms, args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  n = sum(len(manifest[m]["buckets"]) for m in ("text", "image", "audio"))
  print(f"exported step {manifest['source']['step']} of {args.workdir} to "
        f"{os.path.abspath(args.output)}: {n} functions "
        f"(text lengths {[b['length'] for b in manifest['text']['buckets']]}, "
        f"audio frames {[b['frames'] for b in manifest['audio']['buckets']]})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
