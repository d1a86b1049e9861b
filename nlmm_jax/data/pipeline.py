"""grain input pipelines over the cache: training batches and ordered eval batches.

Batches are numpy dicts (shapes for B rows):
  image       float32 [B, H, W, 3]   ImageNet-normalised, H = W = model.image_size
  text        int32   [B, L]         token ids (0 = pad), L = model.max_text_len
  text_mask   bool    [B, L]
  audio       float32 [B, F, M]      log-mel, F = model.max_frames, M = model.n_mels
  audio_mask  bool    [B, F]
  image_index int32   [B]            position of the row's image in its split
Audio keys only when the handle has audio. Eval batches add `valid` bool [B] (False on
the padding rows of a split's last batch, whose image_index is -1).

Training: one example per image per epoch, with one of its captions drawn at random
(among the captions that have a recording when audio is used) and a random crop/flip.
Every random choice comes from numpy's Generator seeded by (seed, epoch, image_index), so
a stream is reproducible, independent of worker count, and resumable from the grain
iterator state (`get_state()` / `set_state()`, or orbax with
`grain.checkpoint.CheckpointSave/CheckpointRestore`).
"""

import dataclasses
import os
from typing import Iterator

from absl import flags
from absl import logging
import grain
import numpy as np

from nlmm_jax.data import cache as cache_lib
from nlmm_jax.data import corpus
from nlmm_jax.data import features
from nlmm_jax.data import flickr8k
from nlmm_jax.data import tfds_source
from nlmm_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass
class DataHandle:
  """What `prepare` found and built."""
  index: flickr8k.Flickr8kIndex
  cache: cache_lib.CacheHandle
  tokenizer: tokenizer_lib.Tokenizer
  has_audio: bool                    # batches carry audio keys
  num_images: dict                   # {split: images}
  # {split: record ids usable for training (all, or those with >= 1 recording)}
  train_records: dict = dataclasses.field(default_factory=dict)

  def source(self, split: str):
    return self.cache.data_source(split)


def _corpus_present(root: str, use_audio: bool) -> bool:
  try:
    flickr8k.find_layout(os.path.abspath(root), use_audio)
  except flickr8k.DataError:
    return False
  return True


def prepare(config):
  """Generates the demo corpus if needed, indexes the corpus (`corpus.load_index`: a
  Flickr8k root or a manifest, by data.name), builds or reuses the cache. A TFDS corpus
  (data.name="tfds:<name>") is indexed by `tfds_source`, a mixture (data.mixture) by
  `mixture.prepare` (a `MixtureHandle`)."""
  d = config.data
  if d.get("mixture"):
    from nlmm_jax.data import mixture  # pylint: disable=g-import-not-at-top  (imports us)
    return mixture.prepare(config)
  cache_lib.check_verify(d.get("cache_verify", "stat"))  # before the slow steps
  if tfds_source.is_tfds(d.name):
    return _prepare_tfds(config)
  root = corpus.corpus_path(d)  # checks data.name (and data.manifest)
  if d.name == "demo":
    from nlmm_jax.data import demo  # pylint: disable=g-import-not-at-top
    made_by_demo = os.path.isfile(os.path.join(root, demo.MARKER))
    if not (demo.is_complete(root, d.demo_num_images, d.demo_seed)
            or (not made_by_demo and _corpus_present(root, d.use_audio))):
      # Missing, unfinished, or generated with another size/seed: (re)generate.
      logging.info("Generating the demo corpus (%d images, seed %d) in %s",
                   d.demo_num_images, d.demo_seed, root)
      demo.generate(root, d.demo_num_images, d.demo_seed)
  report_path = cache_lib.index_report_path(d.cache_dir, root)
  os.makedirs(os.path.dirname(report_path), exist_ok=True)
  index = corpus.load_index(d, root, report_path=report_path)
  handle = cache_lib.build_cache(index, config)
  has_audio = bool(d.use_audio) and handle.has_audio
  train_records = {}
  for name, split in index.splits.items():
    if has_audio:
      train_records[name] = [i for i, ex in enumerate(split.examples)
                             if any(w is not None for w in ex.wav_paths)]
    else:
      train_records[name] = list(range(len(split.examples)))
  return DataHandle(index=index, cache=handle, tokenizer=handle.tokenizer,
                    has_audio=has_audio, num_images=dict(handle.counts),
                    train_records=train_records)


def every_image(num_images: dict) -> dict:
  """{split: record ids} training on every image (no recording needed: image-text)."""
  return {name: list(range(n)) for name, n in num_images.items()}


def _prepare_tfds(config) -> DataHandle:
  d = config.data
  report_path = os.path.join(os.path.abspath(d.cache_dir), "index_reports",
                             d.name.replace("/", "_").replace(":", "_") + ".json")
  handle = tfds_source.prepare(config, report_path=report_path)
  logging.info("%s is image-text only: the audio losses and the audio retrieval "
               "directions are off. Images: %s.", d.name, handle.counts)
  return DataHandle(index=handle.index, cache=handle, tokenizer=handle.tokenizer,
                    has_audio=False, num_images=dict(handle.counts),
                    train_records=every_image(handle.counts))


@dataclasses.dataclass
class Component:
  """One corpus of a mixture."""
  label: str                         # names it in logs, metrics and eval files
  weight: float                      # its share of the training examples (normalised)
  handle: DataHandle


@dataclasses.dataclass
class MixtureHandle:
  """Several prepared corpora sharing one tokenizer (`mixture.prepare`)."""
  components: list                   # [Component]
  tokenizer: tokenizer_lib.Tokenizer
  has_audio: bool                    # all components have audio (else none uses it)


# ----------------------------------------------------------------------------- training


class _Records:
  """Random access to the records `ids` of a source (picklable for grain workers)."""

  def __init__(self, source, ids):
    self._source = source
    self._ids = np.asarray(ids, np.int64)

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, i):
    return self._source[int(self._ids[i])]


def _clip(record: dict, k: int) -> np.ndarray:
  """The k-th caption's log-mel [T_k, M] from a record's concatenated mels."""
  lengths = np.asarray(record["mel_lengths"])
  start = int(lengths[:k].sum())
  return np.asarray(record["mel"])[start:start + int(lengths[k])]


def _text(caption) -> str:
  return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainExample(grain.transforms.MapWithIndex):
  """Record -> one training example (image, one caption, its recording)."""
  tokenizer: tokenizer_lib.Tokenizer
  image_size: int
  max_text_len: int
  max_frames: int
  use_audio: bool
  seed: int
  epoch_length: int                  # records per epoch of this process's stream

  def map_with_index(self, i: int, record: dict) -> dict:
    epoch = i // self.epoch_length
    image_index = int(record["image_index"])
    rng = np.random.default_rng([self.seed, epoch, image_index])
    has_audio = np.asarray(record["has_audio"], bool)
    candidates = np.flatnonzero(has_audio) if self.use_audio else np.arange(len(has_audio))
    if len(candidates) == 0:
      raise ValueError(f"image {record['image_id']!r} has no caption with audio")
    k = int(candidates[rng.integers(len(candidates))])
    text, text_mask = self.tokenizer.encode(_text(record["captions"][k]), self.max_text_len)
    out = dict(image=features.train_image(np.asarray(record["image"]), self.image_size, rng),
               text=text, text_mask=text_mask)
    if self.use_audio:
      out["audio"], out["audio_mask"] = features.crop_or_pad_frames(
          _clip(record, k), self.max_frames, rng)
    out["image_index"] = np.int32(image_index)
    return out


def _read_options(config) -> grain.ReadOptions:
  # grain's default (16 threads, 500 prefetched elements) is far too much for a laptop.
  return grain.ReadOptions(num_threads=max(1, min(4, os.cpu_count() or 1)),
                           prefetch_buffer_size=max(1, int(config.data.prefetch)))


def steps_per_epoch(handle, config) -> int:
  """Training steps that see each usable training image once (at least 1; a mixture's
  epoch is as many examples as its corpora's training images together)."""
  handles = ([c.handle for c in handle.components] if isinstance(handle, MixtureHandle)
             else [handle])
  images = sum(len(h.train_records["train"]) for h in handles)
  return max(1, images // int(config.train.batch_size))


def train_iterator(handle, config, *, seed: int, process_index: int = 0,
                   process_count: int = 1, split: str = "train"):
  """Infinite iterator of this process's local batches (a grain DatasetIterator).

  The global batch (train.batch_size) is split evenly over processes; each epoch is a
  fresh permutation (from `seed` and the epoch) cut into `process_count` disjoint,
  equal shards (the n % process_count images left over change from epoch to epoch).
  A mixture (`MixtureHandle`) interleaves its corpora's streams in proportion to their
  weights (`grain.MapDataset.mix`, a fixed pattern), each corpus with its own seed; the
  iterator's state (one position) resumes it exactly.
  """
  global_bs = int(config.train.batch_size)
  if global_bs % process_count:
    raise ValueError(f"train.batch_size={global_bs} is not divisible by the "
                     f"{process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  local_bs = global_bs // process_count
  if isinstance(handle, MixtureHandle):
    parts = [_train_examples(c.handle, config, seed=int(seed) + 7919 * i,
                             process_index=process_index, process_count=process_count,
                             split=split, use_audio=handle.has_audio)
             for i, c in enumerate(handle.components)]
    ds = grain.MapDataset.mix(parts, [c.weight for c in handle.components])
  else:
    ds = _train_examples(handle, config, seed=seed, process_index=process_index,
                         process_count=process_count, split=split,
                         use_audio=handle.has_audio)
  ds = ds.batch(local_bs, drop_remainder=True)
  it_ds = ds.to_iter_dataset(_read_options(config))
  if int(config.data.num_workers) > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain 0.2.18 workers read absl flags (grain #1355)
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.data.num_workers),
        per_worker_buffer_size=max(1, int(config.data.prefetch))))
  return iter(it_ds)


def _train_examples(handle: DataHandle, config, *, seed: int, process_index: int,
                    process_count: int, split: str, use_audio: bool) -> grain.MapDataset:
  """This process's infinite stream of single training examples of one corpus."""
  records = handle.train_records[split]
  per_process = len(records) // process_count
  if per_process == 0:
    raise ValueError(f"{len(records)} usable {split} images cannot be shared by "
                     f"{process_count} processes")
  seed = int(seed) % 2**32
  m = config.model
  ds = grain.MapDataset.source(_Records(handle.source(split), records))
  ds = ds.shuffle(seed=seed)
  ds = ds[:per_process * process_count][process_index::process_count]
  ds = ds.repeat(None)  # the shuffle is reseeded each epoch
  return ds.map_with_index(TrainExample(
      tokenizer=handle.tokenizer, image_size=int(m.image_size),
      max_text_len=int(m.max_text_len), max_frames=int(m.max_frames),
      use_audio=use_audio, seed=seed, epoch_length=per_process))


# ----------------------------------------------------------------------------- eval


class EvalIterators:
  """Ordered, padded eval batches of one split: every image, caption and clip once."""

  def __init__(self, handle: DataHandle, config, split: str):
    if split not in handle.num_images:
      raise KeyError(f"split {split!r} not available (have {sorted(handle.num_images)})")
    self._handle = handle
    self._split = split
    self._bs = int(config.data.eval_batch_size)
    m = config.model
    self._image_size = int(m.image_size)
    self._max_text_len = int(m.max_text_len)
    self._max_frames = int(m.max_frames)
    self._n_mels = int(m.n_mels)
    examples = handle.index.splits[split].examples
    self.num_images = len(examples)
    self.num_captions = sum(len(ex.captions) for ex in examples)
    self.num_clips = (sum(w is not None for ex in examples for w in ex.wav_paths)
                      if handle.has_audio else 0)

  def _records(self) -> Iterator[dict]:
    src = self._handle.source(self._split)
    for i in range(self.num_images):
      record = src[i]
      if int(record["image_index"]) != i:
        raise RuntimeError(f"cache record {i} of {self._split!r} holds image_index "
                           f"{int(record['image_index'])}: the cache is out of order")
      yield record

  def _batches(self, rows: Iterator[dict], template: dict) -> Iterator[dict]:
    """Groups rows into batches of eval_batch_size, padding the last with valid=False."""
    buf = []
    for row in rows:
      buf.append(row)
      if len(buf) == self._bs:
        yield self._stack(buf, template)
        buf = []
    if buf:
      yield self._stack(buf, template)

  def _stack(self, rows: list, template: dict) -> dict:
    n = len(rows)
    out = {k: np.zeros((self._bs,) + shape, dtype) for k, (shape, dtype) in template.items()}
    out["image_index"] = np.full((self._bs,), -1, np.int32)
    out["valid"] = np.zeros((self._bs,), bool)
    for j, row in enumerate(rows):
      for k, v in row.items():
        out[k][j] = v
    out["valid"][:n] = True
    return out

  def images(self) -> Iterator[dict]:
    """{image [B, H, W, 3], image_index, valid} for every image of the split."""
    s = self._image_size
    template = {"image": ((s, s, 3), np.float32)}

    def rows():
      for i, r in enumerate(self._records()):
        yield dict(image=features.eval_image(np.asarray(r["image"]), s), image_index=i)
    return self._batches(rows(), template)

  def captions(self) -> Iterator[dict]:
    """{text, text_mask, image_index, valid} for every caption (image order, then k).

    From the index, whose captions the records hold too (the cache writes them from it;
    `TfdsRecords` serves them from it), so no image is read or decoded for text."""
    L = self._max_text_len
    tok = self._handle.tokenizer
    template = {"text": ((L,), np.int32), "text_mask": ((L,), bool)}
    examples = self._handle.index.splits[self._split].examples

    def rows():
      for i, ex in enumerate(examples):
        for c in ex.captions:
          ids, mask = tok.encode(c, L)
          yield dict(text=ids, text_mask=mask, image_index=i)
    return self._batches(rows(), template)

  def audio(self) -> Iterator[dict]:
    """{audio, audio_mask, image_index, valid} for every present recording."""
    if not self._handle.has_audio:
      raise ValueError("this data handle has no audio (corpus without FACC, or "
                       "data.use_audio=False)")
    F, M = self._max_frames, self._n_mels
    template = {"audio": ((F, M), np.float32), "audio_mask": ((F,), bool)}

    def rows():
      for i, r in enumerate(self._records()):
        for k in np.flatnonzero(np.asarray(r["has_audio"], bool)):
          mel, mask = features.crop_or_pad_frames(_clip(r, int(k)), F)
          yield dict(audio=mel, audio_mask=mask, image_index=i)
    return self._batches(rows(), template)


def eval_iterators(handle: DataHandle, config, split: str) -> EvalIterators:
  return EvalIterators(handle, config, split)
