"""Search a split with a trained model from the command line: one query, its top k, a grid.

  python -m nlmm_jax.retrieve --workdir=runs/demo --text "a small red circle at the top"
  python -m nlmm_jax.retrieve --workdir=runs/demo --audio caption.wav --target text
  python -m nlmm_jax.retrieve --workdir=runs/demo --image photo.jpg --k 8 --output grid.png

  --workdir     a training workdir (or its checkpoints/ folder, or one step folder)
  --text | --audio | --image   the query: a caption, a WAV file or an image file (one)
  --target      image | text | audio: what to search (default: image for text and audio
                queries, text for image queries). The query's own modality is allowed
                (similar images, other phrasings, other recordings); then the items
                identical to the query (the same file, the same caption) are left out.
  --split       train | dev | test (default test): the gallery is this split's images,
                all their captions, or all their recordings
  --k           how many results (default 5)
  --step        best (by dev rsum_all, the default) | latest | a step number
  --output      the PNG grid (default retrieval.png; --output "" writes none)
  --data_root   the corpus, when it is no longer where the checkpoint's config says (a
                Flickr8k root, or for data.name=manifest the manifest file)
  --corpus      for a model trained on a mixture (data.mixture): the label of the corpus
                to search (required then; the error lists the labels)
TFDS corpora (data.name="tfds:<name>") hold no image files to show: search them from
Python (`nlmm_jax.api`).

Output: the top k with rank, cosine score and the item (an image path, a caption with its
image id, or a WAV path with its transcript), `[correct]` after the items that show the
query's image (evaluation relevance: same image) when the query comes from the split: an
image file of the split, a caption of the split (compared ignoring case and spacing) or
one of its recordings. The grid shows the query (its image, its caption, or its log-mel
spectrogram) and then the results with their scores, correct ones framed in green with a
check mark.

The gallery's embeddings are cached in <workdir>/retrieval_cache/<split>-<target>-step<N>.npz
with its item list and a key (checkpoint step and a digest of its parameters, the split
and its item list with file sizes and modification times, the data root), so a second
query reuses them and a different checkpoint, split or corpus rebuilds them.

Bad input (a missing file, two queries, an unknown split or step, a corpus that is not
there) prints one line `error: ...` on stderr and exits with status 1.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import textwrap
from typing import Optional, Sequence

import numpy as np

from nlmm_jax import config_lib
from nlmm_jax.data import corpus
from nlmm_jax.data import features
from nlmm_jax.data import flickr8k

MODALITIES = ("image", "text", "audio")
DEFAULT_TARGET = {"text": "image", "audio": "image", "image": "text"}
CACHE_DIR = "retrieval_cache"
CACHE_VERSION = 1
PLURAL = {"image": "images", "text": "captions", "audio": "recordings"}


class RetrievalError(ValueError):
  """Bad input for the retrieval tool; its message is the one-line error shown."""


# ----------------------------------------------------------------------------- gallery


def gallery_items(examples: Sequence[flickr8k.Example], target: str) -> list[dict]:
  """A split's gallery of `target` items, in evaluation order (each knows its image).

  image: one per image; text: every caption; audio: every caption with a recording.
  """
  items = []
  for i, ex in enumerate(examples):
    if target == "image":
      items.append(dict(image_index=i, image_id=ex.image_id, path=ex.image_path))
    elif target == "text":
      items += [dict(image_index=i, image_id=ex.image_id, k=k, caption=c)
                for k, c in enumerate(ex.captions)]
    elif target == "audio":
      items += [dict(image_index=i, image_id=ex.image_id, k=k, caption=c, path=w)
                for k, (c, w) in enumerate(zip(ex.captions, ex.wav_paths)) if w is not None]
    else:
      raise RetrievalError(f"unknown target {target!r}: one of {', '.join(MODALITIES)}")
  return items


def items_digest(items: Sequence[dict]) -> str:
  """sha256 of the item list, with each file's size and modification time."""
  h = hashlib.sha256()
  for item in items:
    entry = dict(item)
    if "path" in entry:
      st = os.stat(entry["path"])
      entry["stat"] = [st.st_size, st.st_mtime_ns]
    h.update(json.dumps(entry, sort_keys=True).encode())
    h.update(b"\n")
  return h.hexdigest()


def params_digest(params) -> str:
  """sha256 of the parameter values (a retrained workdir can reuse a step number)."""
  import jax  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def cache_key(step: int, params_hash: str, split: str, target: str, items_hash: str,
              data_root: str) -> str:
  """What a cached gallery depends on, as a canonical JSON string."""
  return json.dumps(dict(version=CACHE_VERSION, step=int(step), params=params_hash,
                         split=split, target=target, items=items_hash,
                         data_root=os.path.abspath(data_root)), sort_keys=True)


def cache_path(workdir: str, split: str, target: str, step: int) -> str:
  return os.path.join(workdir, CACHE_DIR, f"{split}-{target}-step{int(step)}.npz")


def read_cache(path: str, key: str, num_items: int) -> Optional[np.ndarray]:
  """The cached embeddings when `path` holds them under `key`; else None."""
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["key"]) != key:
        return None
      emb = np.asarray(z["embeddings"], np.float32)
  except (OSError, ValueError, KeyError, EOFError):   # absent, truncated, foreign
    return None
  if emb.ndim != 2 or emb.shape[0] != num_items or not np.all(np.isfinite(emb)):
    return None
  return emb


def write_cache(path: str, key: str, items: Sequence[dict], embeddings: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, key=np.array(key), items=np.array(json.dumps(list(items))),
             embeddings=np.asarray(embeddings, np.float32))
  os.replace(tmp, path)


def embed_items(model, target: str, items: Sequence[dict]) -> np.ndarray:
  if target == "image":
    return model.embed_images([it["path"] for it in items])
  if target == "text":
    return model.embed_text([it["caption"] for it in items])
  return model.embed_audio([it["path"] for it in items])


def load_or_build_gallery(model, workdir: str, split: str, target: str,
                          items: Sequence[dict], data_root: str
                          ) -> tuple[np.ndarray, bool, str]:
  """(embeddings [G, E], reused from the cache?, cache file) for `items`."""
  if not items:
    raise RetrievalError(f"the {split} split has no {PLURAL[target]} to search")
  key = cache_key(model.step, params_digest(model.params), split, target,
                  items_digest(items), data_root)
  path = cache_path(workdir, split, target, model.step)
  emb = read_cache(path, key, len(items))
  if emb is not None:
    return emb, True, path
  emb = embed_items(model, target, items)
  try:
    write_cache(path, key, items, emb)
  except OSError as e:                     # a read-only workdir still answers the query
    print(f"warning: cannot write the gallery cache {path}: {e}", file=sys.stderr)
  return emb, False, path


# ----------------------------------------------------------------------------- query


def normalize_caption(text: str) -> str:
  return " ".join(str(text).split()).lower()


def _same_file(a: str, b: str) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def query_matches(items: Sequence[dict], modality: str, query: str) -> list[int]:
  """Positions of the gallery `items` (of `modality`) that are the query itself."""
  if modality == "text":
    q = normalize_caption(query)
    return [j for j, it in enumerate(items) if normalize_caption(it["caption"]) == q]
  real = os.path.realpath(query)
  return [j for j, it in enumerate(items)
          if os.path.realpath(it["path"]) == real or _same_file(it["path"], query)]


def relevant_images(examples: Sequence[flickr8k.Example], modality: str,
                    query: str) -> set[int]:
  """The split's images the query comes from (empty when it is not from the split)."""
  return {items[j]["image_index"] for items in [gallery_items(examples, modality)]
          for j in query_matches(items, modality, query)}


def embed_query(model, modality: str, query: str) -> np.ndarray:
  """[1, E] embedding of one query."""
  return embed_items(model, modality, [dict(caption=query, path=query)])


def top_k(query: np.ndarray, gallery: np.ndarray, k: int,
          exclude: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery positions and cosine scores for one query [1, E], skipping `exclude`."""
  from nlmm_jax import api  # pylint: disable=g-import-not-at-top
  keep = np.setdiff1d(np.arange(len(gallery)), np.asarray(exclude, np.int64))
  if len(keep) == 0:
    raise RetrievalError("nothing left to search once the query itself is left out")
  idx, scores = api.Model.rank(query, gallery[keep], k=k)
  return keep[idx[0]], scores[0]


# ----------------------------------------------------------------------------- output


def describe_item(target: str, item: dict) -> str:
  if target == "image":
    return item["path"]
  if target == "text":
    return f"{item['caption']!r} (image {item['image_id']})"
  return f"{item['path']} {item['caption']!r}"


def format_results(target: str, items: Sequence[dict], idx: Sequence[int],
                   scores: Sequence[float], relevant: set) -> list[str]:
  """One line per result: rank, score, the item, and [correct] when it shows the query's
  image."""
  lines = []
  for rank, (j, s) in enumerate(zip(idx, scores), 1):
    mark = "  [correct]" if items[j]["image_index"] in relevant else ""
    lines.append(f"{rank:3d}  {float(s):.4f}  {describe_item(target, items[j])}{mark}")
  return lines


def _log_mel(model, path: str) -> np.ndarray:
  from nlmm_jax.data import cache as cache_lib  # pylint: disable=g-import-not-at-top
  settings = cache_lib.CacheSettings.from_config(model.config).audio
  return features.log_mel(features.load_audio(path, settings.sample_rate), settings)


def _frame(ax, colour: str, width: float) -> None:
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_visible(True)
    spine.set_edgecolor(colour)
    spine.set_linewidth(width)


def _panel(ax, model, modality: str, item: dict, title: str, colour: str, width: float,
           title_colour: str = "black") -> None:
  """Draws one image, caption or spectrogram in `ax`."""
  if modality == "image":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(item["path"]) as im:
      ax.imshow(np.asarray(im.convert("RGB")))
    ax.set_xlabel(textwrap.shorten(os.path.basename(item["path"]), 30), fontsize=7)
  elif modality == "text":
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_facecolor("#f7f7f7")
    ax.text(0.5, 0.5, textwrap.fill(item["caption"], 24), ha="center", va="center",
            fontsize=9, wrap=True)
    if item.get("image_id"):
      ax.set_xlabel(textwrap.shorten(f"image {item['image_id']}", 30), fontsize=7)
  else:
    mel = _log_mel(model, item["path"])
    ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma")
    label = os.path.basename(item["path"])
    if item.get("caption"):
      label += "\n" + textwrap.fill(textwrap.shorten(item["caption"], 70), 30)
    ax.set_xlabel(label, fontsize=7)
  ax.set_title(title, fontsize=9, color=title_colour)
  _frame(ax, colour, width)


def draw_grid(path: str, model, query_modality: str, query: dict, target: str,
              items: Sequence[dict], idx: Sequence[int], scores: Sequence[float],
              relevant: set, title: str = "") -> None:
  """PNG: the query, then the top k with scores; correct ones framed green with a ✓."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(idx) + 1
  cols = min(n, 6)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 3.0 * rows + 0.4), squeeze=False)
  try:
    flat = axes.ravel()
    _panel(flat[0], model, query_modality, query, f"query ({query_modality})", "#1f5fbf", 3)
    for pos, (j, s) in enumerate(zip(idx, scores), 1):
      good = items[j]["image_index"] in relevant
      _panel(flat[pos], model, target, items[j],
             f"#{pos}  {float(s):.3f}" + ("  \u2713" if good else ""),
             "#18a418" if good else "#bbbbbb", 5 if good else 1,
             "#127012" if good else "black")
    for ax in flat[n:]:
      ax.axis("off")
    if title:
      fig.suptitle(title, fontsize=10)
    fig.tight_layout(h_pad=1.5)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)


# ----------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise RetrievalError(message)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = _Parser(prog="python -m nlmm_jax.retrieve",
              description="Search a split of the corpus with a trained model.")
  p.add_argument("--workdir", required=True,
                 help="training workdir (or its checkpoints/ folder, or a step folder)")
  q = p.add_mutually_exclusive_group(required=True)
  q.add_argument("--text", help="a caption to search with")
  q.add_argument("--audio", help="a WAV file to search with")
  q.add_argument("--image", help="an image file to search with")
  p.add_argument("--target", choices=MODALITIES,
                 help="what to search (default: image for text/audio, text for image)")
  p.add_argument("--split", default="test", choices=flickr8k.SPLITS)
  p.add_argument("--k", type=int, default=5)
  p.add_argument("--step", default="best", help="best | latest | a step number")
  p.add_argument("--output", default="retrieval.png", help='PNG grid ("" for none)')
  p.add_argument("--data_root", help="the corpus (default: the checkpoint config's)")
  p.add_argument("--corpus", help="a mixture's corpus (its label) to search")
  args = p.parse_args(argv)
  if args.k < 1:
    raise RetrievalError(f"--k must be at least 1, got {args.k}")
  if args.text is not None:
    args.modality, args.query = "text", args.text
    if not args.text.strip():
      raise RetrievalError("--text is empty")
  else:
    args.modality = "audio" if args.audio is not None else "image"
    args.query = args.audio if args.audio is not None else args.image
    if not os.path.isfile(args.query):
      raise RetrievalError(f"--{args.modality} {args.query!r}: no such file")
  args.target = args.target or DEFAULT_TARGET[args.modality]
  step = str(args.step)
  args.step = int(step) if step.isdigit() else step
  if args.step not in ("best", "latest") and not isinstance(args.step, int):
    raise RetrievalError(f"--step must be 'best', 'latest' or a step number, got {step!r}")
  if not os.path.exists(args.workdir):
    raise RetrievalError(f"--workdir {args.workdir!r} does not exist")
  return args


def _corpus_config(config, label: Optional[str]):
  """The config of the corpus to search: the model's own, or for a mixture the entry
  `label` names (`mixture.component_configs`)."""
  if not config.data.get("mixture"):
    if label:
      raise RetrievalError(f"--corpus {label!r}: this model was trained on one corpus "
                           f"(data.name={config.data.name!r}); leave --corpus out")
    chosen, other = config, ""
  else:
    from nlmm_jax.data import mixture  # pylint: disable=g-import-not-at-top
    parts = {l: c for l, _, c in mixture.component_configs(config)}
    if label not in parts:
      given = f"--corpus {label!r} is not one of them" if label else "pass --corpus LABEL"
      raise RetrievalError(f"this model was trained on a mixture of {sorted(parts)}: "
                           f"{given}")
    chosen, other = parts[label], ", or choose another --corpus"
  if chosen.data.name.startswith(config_lib.TFDS_PREFIX):
    raise RetrievalError(f"the corpus is the TFDS dataset {chosen.data.name[5:]!r}, which "
                         "holds no image files to list and draw: search it from Python "
                         f"(nlmm_jax.api: embed_text, embed_images, rank){other}")
  return chosen


def _load_split(config, data_root: Optional[str], split: str):
  key = "data.manifest" if config.data.name == "manifest" else "data.root"
  where = "--data_root" if data_root else f"the checkpoint's config ({key})"
  try:
    root = corpus.corpus_path(config.data, data_root)
    index = corpus.load_index(config.data, root)
  except ValueError as e:  # flickr8k.DataError, or config_lib.check_data's
    hint = "" if data_root else " Pass --data_root if the corpus has moved."
    raise RetrievalError(f"the corpus from {where} is unusable: {e}{hint}") from e
  return root, index


def load_model(workdir: str, step):
  from nlmm_jax import api  # pylint: disable=g-import-not-at-top  (jax: slow import)
  return api.load(workdir, step=step)


def run(args: argparse.Namespace, out=None, log=None) -> dict:
  """Loads the model, builds or reuses the gallery, ranks, prints, draws; returns details."""
  out = out or sys.stdout
  log = log or sys.stderr
  model = load_model(args.workdir, args.step)
  root, index = _load_split(_corpus_config(model.config, args.corpus), args.data_root,
                            args.split)
  if args.target == "audio" and not index.has_audio:
    raise RetrievalError(f"--target audio: the corpus {root} has no spoken captions "
                         f"({flickr8k.AUDIO_DIR}/, or no \"audio\" in its manifest), or "
                         "the checkpoint was trained without")
  examples = index.splits[args.split].examples
  items = gallery_items(examples, args.target)
  gallery, reused, path = load_or_build_gallery(model, args.workdir, args.split,
                                                args.target, items, root)
  print(f"gallery: {'reused' if reused else 'built'} {len(items)} {args.split} "
        f"{PLURAL[args.target]} (step {model.step}) {'from' if reused else 'in'} {path}",
        file=log)

  relevant = relevant_images(examples, args.modality, args.query)
  exclude = (query_matches(items, args.modality, args.query)
             if args.modality == args.target else [])
  query_emb = embed_query(model, args.modality, args.query)
  idx, scores = top_k(query_emb, gallery, args.k, exclude)

  shown = repr(args.query) if args.modality == "text" else args.query
  if relevant:
    ids = ", ".join(examples[i].image_id for i in sorted(relevant)[:3])
    origin = f"from the {args.split} split (image {ids}{', ...' if len(relevant) > 3 else ''})"
  else:
    origin = f"not from the {args.split} split: no [correct] marks"
  print(f"query ({args.modality}): {shown}  [{origin}]", file=out)
  left_out = f", {len(exclude)} identical to the query left out" if exclude else ""
  print(f"top {len(idx)} of {len(items)} {args.split} {PLURAL[args.target]}{left_out} "
        f"(checkpoint step {model.step}):", file=out)
  lines = format_results(args.target, items, idx, scores, relevant)
  print("\n".join(lines), file=out)

  if args.output:
    if args.modality == "text":
      query_item = dict(caption=args.query)
    else:
      query_item = dict(path=args.query)
      own = query_matches(gallery_items(examples, args.modality), args.modality, args.query)
      if args.modality == "audio" and own:     # a recording of the split: its transcript
        query_item["caption"] = gallery_items(examples, "audio")[own[0]]["caption"]
    title = (f"{args.modality} \u2192 {args.target}: {args.split} split, "
             f"{len(items)} {PLURAL[args.target]}, step {model.step}")
    draw_grid(args.output, model, args.modality, query_item, args.target, items, idx,
              scores, relevant, title)
    print(f"grid: {args.output}", file=log)
  return dict(model=model, items=items, gallery=gallery, reused=reused, cache=path,
              idx=idx, scores=scores, relevant=relevant, lines=lines)


# Bad input and unusable files get their message, not a traceback.
USER_ERRORS = (RetrievalError, ValueError, FileNotFoundError, FloatingPointError,
               features.FeatureError)


class _QuietReadOnlyCheckpoints(logging.Filter):
  """Drops orbax's warnings about opening the checkpoints read-only (as intended here)."""

  def filter(self, record):
    message = str(record.msg)
    return not ("read_only=True" in message or "Given directory is read only" in message)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (0, or 1 after a one-line error)."""
  quiet = _QuietReadOnlyCheckpoints()
  logging.getLogger("absl").addFilter(quiet)
  try:
    args = parse_args(argv)
    run(args)
  except SystemExit as e:                  # --help
    return int(e.code or 0)
  except USER_ERRORS as e:
    message = " ".join(str(e).split())
    print(f"error: {message}", file=sys.stderr)
    return 1
  finally:
    logging.getLogger("absl").removeFilter(quiet)
  return 0


if __name__ == "__main__":
  sys.exit(main())
