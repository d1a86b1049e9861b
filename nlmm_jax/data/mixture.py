"""Mixtures of corpora (`data.mixture`): weighted training across corpora, evaluation per
corpus.

  config.data.mixture = (
      dict(name="demo", root="data/demo_corpus", weight=1.0),
      dict(name="manifest", manifest="data/mine/manifest.jsonl", weight=2.0, label="mine"),
      dict(name="tfds:coco_captions", weight=1.0),
  )

Each entry is one corpus: the config's data section with the entry's keys replaced (the
keys that say which corpus and how to index it, CORPUS_KEYS; a dict-valued key such as
`tfds_splits` is merged key by key), plus `weight` (> 0, its share of the training
examples; normalised) and an optional `label` (default: the name with "/" as "_",
"manifest:<file stem>" for a manifest; unique). Keys that shape the features or the
pipeline (image and audio settings, workers, batch sizes) are the mixture's, set once in
config.data. Every entry is checked before any corpus is prepared; then every corpus is
prepared as on its own (index, cache, report), and:
  - one tokenizer is fitted on the train captions of all corpora together and replaces
    each corpus's own (it is what checkpoints save);
  - audio is used only if every corpus has it; otherwise the mixture is image-text only
    (logged, naming the corpora without audio);
  - training interleaves the corpora's example streams in proportion to their weights
    (`pipeline.train_iterator`, `grain.MapDataset.mix`) and resumes exactly from the
    iterator's state;
  - evaluation runs on each corpus's split separately (`train.Evaluator`): the eval JSON
    holds every corpus's metrics under "per_corpus" and, at top level, their unweighted
    mean (which picks the best checkpoint).
"""

import dataclasses
import os

from absl import logging
import ml_collections

from nlmm_jax import config_lib
from nlmm_jax.data import flickr8k
from nlmm_jax.data import pipeline
from nlmm_jax.data import tfds_source
from nlmm_jax.data import tokenizer as tokenizer_lib

ENTRY_KEYS = ("weight", "label")     # the entry's own keys (the rest override config.data)
# The data keys an entry may set: which corpus, and how to find and index it.
CORPUS_KEYS = ("name", "root", "manifest", "cache_dir", "cache_verify", "use_audio",
               "max_lost_fraction", "demo_num_images", "demo_seed", "build_workers",
               "tfds_data_dir", "tfds_splits", "tfds_image_key", "tfds_caption_key",
               "tfds_id_key")


def _entries(data) -> list[dict]:
  raw = data.mixture
  if isinstance(raw, (dict, ml_collections.ConfigDict)) or not hasattr(raw, "__len__"):
    raise ValueError("data.mixture must be a sequence of dicts, one per corpus, e.g. "
                     "(dict(name='demo', weight=1.0), dict(name='manifest', "
                     "manifest='m.jsonl', weight=1.0))")
  entries = [e.to_dict() if isinstance(e, ml_collections.ConfigDict) else e for e in raw]
  if len(entries) < 2:
    raise ValueError(f"data.mixture lists {len(entries)} corpus: a mixture needs at least "
                     "two (for one corpus set data.name and its keys directly)")
  return entries


def _label(entry: dict) -> str:
  if entry.get("label"):
    return str(entry["label"])
  name = str(entry.get("name", ""))
  if name == "manifest" and entry.get("manifest"):
    return f"manifest:{os.path.splitext(os.path.basename(str(entry['manifest'])))[0]}"
  return name.replace("/", "_")  # "/" would nest TensorBoard tags


def _merged(base: dict, entry: dict) -> dict:
  """`base` with the entry's corpus keys replaced; dict values merged key by key."""
  out = dict(base)
  for k, v in entry.items():
    if k in ENTRY_KEYS:
      continue
    out[k] = dict(base[k], **dict(v)) if isinstance(base.get(k), dict) else v
  return out


def component_configs(config) -> list[tuple[str, float, ml_collections.ConfigDict]]:
  """[(label, weight, the full config of that corpus)] of config.data.mixture, checked."""
  base = config.data.to_dict()
  out, labels = [], set()
  for i, entry in enumerate(_entries(config.data)):
    if not isinstance(entry, dict):
      raise ValueError(f"data.mixture[{i}] is a {type(entry).__name__}, not a dict")
    shared = sorted(set(entry) & (set(base) - set(CORPUS_KEYS)))
    if shared:
      raise ValueError(f"data.mixture[{i}] sets {shared}, which the mixture's corpora "
                       "share (features, pipeline): set them once in config.data")
    unknown = sorted(set(entry) - set(CORPUS_KEYS) - set(ENTRY_KEYS))
    if unknown:
      raise ValueError(f"data.mixture[{i}] has unknown key(s) {unknown}: an entry holds "
                       f"corpus keys of config.data {list(CORPUS_KEYS)} plus "
                       f"{list(ENTRY_KEYS)}")
    if "name" not in entry:
      raise ValueError(f"data.mixture[{i}] has no 'name' (demo, flickr8k, manifest or "
                       "tfds:<name>)")
    try:
      weight = float(entry.get("weight", 1.0))
    except (TypeError, ValueError):
      weight = float("nan")
    if not weight > 0 or weight == float("inf"):
      raise ValueError(f"data.mixture[{i}] weight={entry.get('weight')!r}: a weight is a "
                       "positive number (its share of the training examples)")
    label = _label(entry)
    if label in labels:
      raise ValueError(f"data.mixture[{i}]: label {label!r} is taken by an earlier entry; "
                       "give one of them a distinct 'label'")
    labels.add(label)
    data = _merged(base, entry)
    data["mixture"] = ()
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.data = ml_collections.ConfigDict(data)
    out.append((label, weight, sub))
  return out


def _check(label: str, data) -> None:
  """The checks that need no corpus on disk, so that a bad entry fails before the first
  corpus is indexed (which can take long)."""
  try:
    if tfds_source.is_tfds(data.name):
      tfds_source.spec_from_config(data)
    else:
      config_lib.check_data(data)
  except ValueError as e:
    raise ValueError(f"data.mixture corpus {label!r}: {e}") from e


def _without_audio(handle: pipeline.DataHandle) -> pipeline.DataHandle:
  """The handle as image-text only: every image trains, no audio in its batches."""
  return dataclasses.replace(
      handle, has_audio=False,
      train_records=pipeline.every_image(handle.num_images))


def prepare(config) -> pipeline.MixtureHandle:
  """Prepares every corpus of config.data.mixture and joins them (module docstring)."""
  configs = component_configs(config)
  for label, _, sub in configs:
    _check(label, sub.data)
  parts = []
  for label, weight, sub in configs:
    logging.info("Mixture: preparing %s (weight %g)", label, weight)
    try:
      parts.append((label, weight, pipeline.prepare(sub)))
    except flickr8k.DataError as e:  # say which corpus; keep the loss report
      raise flickr8k.DataError(f"data.mixture corpus {label!r}: {e}", report=e.report) from e
  no_audio = [label for label, _, h in parts if not h.has_audio]
  has_audio = not no_audio
  if no_audio and len(no_audio) < len(parts):
    logging.warning("Mixture is image-text only: %s %s no spoken captions, so no corpus "
                    "trains or evaluates on audio.", ", ".join(no_audio),
                    "has" if len(no_audio) == 1 else "have")
  captions = (c for _, _, h in parts for ex in h.index.splits["train"].examples
              for c in ex.captions)
  tok = tokenizer_lib.Tokenizer.fit(captions, int(config.model.vocab_size))
  total = sum(w for _, w, _ in parts)
  components = []
  for label, weight, h in parts:
    h = h if has_audio else _without_audio(h)
    components.append(pipeline.Component(label=label, weight=weight / total,
                                         handle=dataclasses.replace(h, tokenizer=tok)))
  logging.info("Mixture of %d corpora: %s; shared tokenizer of %d ids.", len(components),
               ", ".join(f"{c.label} {c.weight:.3f} ({c.handle.num_images})"
                         for c in components), tok.vocab_size)
  return pipeline.MixtureHandle(components=components, tokenizer=tok, has_audio=has_audio)
