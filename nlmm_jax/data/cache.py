"""On-disk cache of decoded images and log-mels: a TFDS builder writing ArrayRecord files.

One record per image (records are written in image order; shuffling on write is disabled,
and `image_index` is stored in the record anyway):
  image        uint8 [S, S, 3]         S = image_size + crop_margin
  captions     string [C]              the image's captions (normally C = 5)
  has_audio    bool [C]                captions[k] has a spoken recording
  mel_lengths  int32 [C]               frames of each clip (0 where has_audio is False)
  mel          float16 [sum(mel_lengths), n_mels]   the clips' log-mels, concatenated
  image_index  int32                   position of the image in its split
  image_id     string                  file stem of the image

Layout under `data.cache_dir`:
  <corpus>-<fingerprint>/                       one folder per corpus state (see "Key")
    tokenizer_vocab<V>.json                     fitted on the corpus' train captions only
    nlmm_flickr8k/<config>/1.0.0/*.array_record  the TFDS dataset
  index_reports/<corpus>-<hash>.json            what load_index counted and dropped
  media_stamps/<corpus>-<hash>.json             the stamps of the root's last prepare

Key. A cached dataset is reused only when all of these are unchanged:
  - the preprocessing settings (stored image size, sample rate, n_fft, hop, n_mels, fmax,
    log floor): they name the TFDS config, so other settings build a new dataset next to
    the old one in the same corpus folder;
  - the index (`index_fingerprint`): root, image ids, paths, captions, WAV paths;
  - a stamp of every JPEG and WAV the index names (`media_stamps`): with
    `data.cache_verify="stat"` (default) its size and mtime_ns (one os.stat per file), with
    "hash" the sha256 of its bytes (reads the whole corpus at every prepare). A file
    rewritten in place under the same name thus gets a new corpus folder and a rebuild.
    "stat" also rebuilds after a copy or re-unpack that only renews mtimes; "hash" does
    not, and it sees content changes that kept size and mtime (e.g. `cp -p`, `rsync -t`).
The index and the stamps name the corpus folder. `media_stamps/` keeps, per root, the
stamps of its last prepare (relative paths, one file per line), so that a rebuild logs
which files changed since then; folders of older corpus states are left in place (they
are reused if the files come back; delete them to free the space).

Standalone build with TFDS's own tooling (the manual dir is a Flickr8k + FACC root; the
builder then indexes it with `flickr8k.load_index` and the default settings):
  tfds build nlmm_jax/data/cache.py --manual_dir=data/flickr8k --data_dir=DIR \
      --file_format=array_record
(tensorflow-datasets 4.9.10's `tfds` script imports apache_beam at start-up; without it,
run the same command through `tensorflow_datasets.scripts.cli.build.Args`.)
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from typing import Any, Iterator, Optional

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from nlmm_jax.data import features
from nlmm_jax.data import flickr8k
from nlmm_jax.data import tokenizer as tokenizer_lib

BUILDER_VERSION = "1.0.0"
_BYTES = tfds.features.Encoding.BYTES
AUTO_IMAGES_PER_WORKER = 100       # data.build_workers=-1: at most one worker per 100 images
VERIFY_MODES = ("stat", "hash")    # data.cache_verify
STAMPS_DIR = "media_stamps"        # per root: the stamps of its last prepare
LOGGED_PATHS = 5                   # changed files named in the rebuild log


@dataclasses.dataclass(frozen=True)
class CacheSettings:
  """Everything that changes the bytes of a cached record."""
  stored_size: int = 72              # image_size + crop_margin
  use_audio: bool = True
  sample_rate: int = 16000
  n_fft: int = 400
  hop_length: int = 160
  n_mels: int = 80
  fmax: float = 8000.0
  top_db: float = 80.0

  @classmethod
  def from_config(cls, config) -> "CacheSettings":
    d, m = config.data, config.model
    return cls(stored_size=int(m.image_size + d.crop_margin), use_audio=bool(d.use_audio),
               sample_rate=int(d.sample_rate), n_fft=int(d.n_fft),
               hop_length=int(d.hop_length), n_mels=int(m.n_mels), fmax=float(d.fmax),
               top_db=float(d.log_mel_top_db))

  @property
  def audio(self) -> features.AudioSettings:
    return features.AudioSettings(
        sample_rate=self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length,
        n_mels=self.n_mels, fmax=self.fmax, top_db=self.top_db)

  def config_name(self) -> str:
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:10]
    return f"img{self.stored_size}_mel{self.n_mels if self.use_audio else 0}_{digest}"


class CacheConfig(tfds.core.BuilderConfig):
  """A TFDS builder config carrying the preprocessing settings (named by their hash)."""

  def __init__(self, settings: CacheSettings = CacheSettings(), **kwargs):
    kwargs.setdefault("name", settings.config_name())
    kwargs.setdefault("description", json.dumps(dataclasses.asdict(settings), sort_keys=True))
    super().__init__(**kwargs)
    self.settings = settings


def check_verify(verify: str) -> str:
  """`data.cache_verify`, checked."""
  if verify not in VERIFY_MODES:
    raise ValueError(f"data.cache_verify must be one of {VERIFY_MODES} (\"stat\": size + "
                     f"mtime of each media file; \"hash\": sha256 of its bytes), got "
                     f"{verify!r}")
  return verify


def media_paths(index: flickr8k.Flickr8kIndex) -> list[str]:
  """Every JPEG and WAV the index names, sorted."""
  paths = set()
  for split in index.splits.values():
    for ex in split.examples:
      paths.add(ex.image_path)
      paths.update(w for w in ex.wav_paths if w is not None)
  return sorted(paths)


def file_stamp(path: str, verify: str = "stat"):
  """"stat": [size, mtime_ns]; "hash": the sha256 hex digest of the file's bytes."""
  if check_verify(verify) == "stat":
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def media_stamps(index: flickr8k.Flickr8kIndex, verify: str = "stat",
                 num_threads: Optional[int] = None) -> dict:
  """{path relative to the root: file_stamp} for every media file of the index."""
  check_verify(verify)
  paths = media_paths(index)
  num_threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    stamps = list(pool.map(lambda p: file_stamp(p, verify), paths))
  root = os.path.abspath(index.root)
  return {os.path.relpath(p, root): s for p, s in zip(paths, stamps)}


def index_fingerprint(index: flickr8k.Flickr8kIndex, stamps: Optional[dict] = None) -> str:
  """Hash of what the index selected (ids, paths, captions, recordings) per split, and of
  the media files' stamps (`media_stamps`) when given."""
  h = hashlib.sha256()
  h.update(f"{os.path.abspath(index.root)}|audio={index.has_audio}".encode())
  for name in sorted(index.splits):
    h.update(f"\n#{name}".encode())
    for ex in index.splits[name].examples:
      h.update(json.dumps([ex.image_id, ex.image_path, list(ex.captions),
                           list(ex.wav_paths)]).encode())
  if stamps is not None:
    h.update(b"\n#stamps")
    for path in sorted(stamps):
      h.update(json.dumps([path, stamps[path]]).encode())
  return h.hexdigest()


def corpus_dir(cache_dir: str, index: flickr8k.Flickr8kIndex,
               stamps: Optional[dict] = None) -> str:
  """The folder of the corpus state (index + media stamps) under `cache_dir`."""
  name = os.path.basename(os.path.abspath(index.root).rstrip("/")) or "corpus"
  return os.path.join(os.path.abspath(cache_dir),
                      f"{name}-{index_fingerprint(index, stamps)[:12]}")


def _per_root_path(cache_dir: str, root: str, folder: str) -> str:
  root = os.path.abspath(root)
  digest = hashlib.sha256(root.encode()).hexdigest()[:8]
  name = os.path.basename(root.rstrip("/")) or "corpus"
  return os.path.join(os.path.abspath(cache_dir), folder, f"{name}-{digest}.json")


def index_report_path(cache_dir: str, root: str) -> str:
  return _per_root_path(cache_dir, root, "index_reports")


def stamps_record_path(cache_dir: str, root: str) -> str:
  return _per_root_path(cache_dir, root, STAMPS_DIR)


# ----------------------------------------------------------------------------- stamps record


def stamps_record(index: flickr8k.Flickr8kIndex, verify: str, data_dir: str,
                  stamps: dict) -> dict:
  """What `media_stamps/<corpus>-<hash>.json` holds for the prepare of `index`."""
  return dict(root=os.path.abspath(index.root), has_audio=bool(index.has_audio),
              verify=verify, corpus_dir=data_dir, stamps=stamps)


def write_stamps_record(path: str, record: dict) -> None:
  """Writes the record as JSON with one file per line (atomic: several processes may)."""
  head = {k: v for k, v in record.items() if k != "stamps"}
  lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
  files = [f"  {json.dumps(p)}: {json.dumps(s)}" for p, s in sorted(record["stamps"].items())]
  text = "{\n" + "\n".join(lines) + '\n "stamps": {\n' + ",\n".join(files) + "\n }\n}\n"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def read_stamps_record(path: str) -> Optional[dict]:
  """The record at `path`, or None (absent or unreadable: then there is nothing to diff)."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) and isinstance(record.get("stamps"), dict) else None


def diff_stamps(old: dict, new: dict) -> dict:
  """{"changed", "added", "removed"}: sorted paths (keys of the two stamp dicts)."""
  return dict(changed=sorted(p for p in new.keys() & old.keys() if new[p] != old[p]),
              added=sorted(new.keys() - old.keys()),
              removed=sorted(old.keys() - new.keys()))


def _some(paths: list, n: int = LOGGED_PATHS) -> str:
  more = f", ... (+{len(paths) - n} more)" if len(paths) > n else ""
  return ", ".join(paths[:n]) + more


def describe_rebuild(previous: Optional[dict], current: dict) -> tuple[Optional[str], bool]:
  """(why the corpus folder differs from that of the root's last prepare, whether media
  files changed in place); (None, False) when it is the same folder or there is no record."""
  if previous is None or previous.get("corpus_dir") == current["corpus_dir"]:
    return None, False
  if previous.get("verify") != current["verify"]:
    return (f"data.cache_verify changed from {previous.get('verify')!r} to "
            f"{current['verify']!r} since the last prepare (stamps of another kind)"), False
  d = diff_stamps(previous["stamps"], current["stamps"])
  parts = []
  if d["changed"]:
    parts.append(f"{len(d['changed'])} of {len(current['stamps'])} media files changed "
                 f"({current['verify']}): {_some(d['changed'])}")
  if previous.get("has_audio") != current["has_audio"]:
    parts.append("the index " + ("now has" if current["has_audio"] else "no longer has")
                 + " spoken captions (data.use_audio or flickr_audio/ changed)")
  elif d["added"] or d["removed"]:
    parts.append(f"the index names {len(d['added'])} media files it did not and no longer "
                 f"names {len(d['removed'])} ({_some(d['added'] + d['removed'])})")
  if not parts:
    parts.append("no media file changed; the index did (captions, or which images and "
                 "recordings it selected)")
  return "; ".join(parts), bool(d["changed"])


# ----------------------------------------------------------------------------- records


def preprocess_example(job: tuple) -> dict:
  """(Example, image_index, CacheSettings) -> one record (runs in pool workers)."""
  ex, image_index, settings = job
  image = features.load_image(ex.image_path, settings.stored_size)
  mels, lengths, has_audio = [], [], []
  for wav in ex.wav_paths if settings.use_audio else [None] * len(ex.captions):
    if wav is None:
      lengths.append(0)
      has_audio.append(False)
      continue
    mel = features.audio_features(wav, settings.audio)  # [T, M] float16
    mels.append(mel)
    lengths.append(mel.shape[0])
    has_audio.append(True)
  mel = (np.concatenate(mels, 0) if mels
         else np.zeros((0, settings.n_mels), np.float16))
  return dict(
      image=image,
      captions=np.asarray(list(ex.captions), dtype=object),
      has_audio=np.asarray(has_audio, bool),
      mel_lengths=np.asarray(lengths, np.int32),
      mel=mel,
      image_index=np.int32(image_index),
      image_id=ex.image_id,
  )


def _one_blas_thread():
  """Limits BLAS to one thread (the mel product is tiny; 2 threads on a busy machine
  ran log_mel 2-3x slower). threadpoolctl comes with librosa (via scikit-learn)."""
  try:
    import threadpoolctl  # pylint: disable=g-import-not-at-top
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(1, user_api="blas")


def _init_worker() -> None:
  _one_blas_thread()  # stays in effect for the worker's life


def _ordered_map(fn, jobs: list, pool, window: int) -> Iterator[Any]:
  """fn over jobs, results in order; in `pool` (a process pool, `window` jobs in flight)."""
  if pool is None or len(jobs) < 2:
    for job in jobs:
      yield fn(job)
    return
  pending = [pool.submit(fn, j) for j in jobs[:window]]
  nxt = len(pending)
  for i in range(len(jobs)):
    result = pending[i].result()
    pending[i] = None
    if nxt < len(jobs):
      pending.append(pool.submit(fn, jobs[nxt]))
      nxt += 1
    yield result


class NlmmFlickr8k(tfds.core.GeneratorBasedBuilder):
  """Flickr8k (+ FACC) images, captions and log-mels, decoded once."""

  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {BUILDER_VERSION: "Images, captions and log-mels per image."}
  BUILDER_CONFIGS = [CacheConfig(CacheSettings())]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  The manual dir is a Flickr8k root (images in Flicker8k_Dataset/, Flickr8k_Dataset/ or
  Images/; Flickr8k.token.txt and Flickr_8k.{train,dev,test}Images.txt flat or in
  Flickr8k_text/) with the Flickr Audio Caption Corpus in flickr_audio/ (wav2capt.txt,
  wavs/). `python -m nlmm_jax.data.demo --output_dir=DIR` writes a small one.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes package resources through `importlib_resources`, which is not
    # a dependency here; the builder's own file is what it looks for.
    return epath.Path(__file__)

  def __init__(self, *, index: Optional[flickr8k.Flickr8kIndex] = None,
               num_workers: int = 0, **kwargs):
    self._index = index
    self._num_workers = num_workers
    self._pool = None
    super().__init__(**kwargs)

  def _get_pool(self):
    """One process pool for all splits (started on first use; spawn: no fork of threads)."""
    if self._pool is None and self._num_workers > 0:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self._num_workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker)
    return self._pool

  def close_pool(self) -> None:
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.settings
    return tfds.core.DatasetInfo(
        builder=self,
        description="Flickr8k + FACC, decoded: uint8 images, captions, float16 log-mels.",
        features=tfds.features.FeaturesDict({
            # Raw bytes: the default encoding would widen to int64/float32 protobuf lists
            # (8x / 2x the size, and slow to serialise element by element).
            "image": tfds.features.Tensor(shape=(s.stored_size, s.stored_size, 3),
                                          dtype=np.uint8, encoding=_BYTES),
            "captions": tfds.features.Tensor(shape=(None,), dtype=np.str_),
            "has_audio": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "mel_lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "mel": tfds.features.Tensor(shape=(None, s.n_mels), dtype=np.float16,
                                        encoding=_BYTES),
            "image_index": tfds.features.Scalar(dtype=np.int32),
            "image_id": tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    index = self._index
    if index is None:
      index = flickr8k.load_index(os.fspath(dl_manager.manual_dir),
                                  use_audio=self.builder_config.settings.use_audio)
    return {name: self._generate_examples(split.examples)
            for name, split in index.splits.items() if split.examples}

  def _generate_examples(self, examples):
    s = self.builder_config.settings
    jobs = [(ex, i, s) for i, ex in enumerate(examples)]
    records = _ordered_map(preprocess_example, jobs, self._get_pool(),
                           window=8 * max(1, self._num_workers))
    for i, record in enumerate(records):
      yield i, record  # key = image_index; shuffling on write is disabled


# ----------------------------------------------------------------------------- public


@dataclasses.dataclass
class CacheHandle:
  """Where a built cache lives and what it holds."""
  dataset_dir: str                   # .../nlmm_flickr8k/<config>/<BUILDER_VERSION>
  data_dir: str                      # the TFDS data_dir (one per corpus)
  config_name: str
  settings: CacheSettings
  tokenizer: tokenizer_lib.Tokenizer
  tokenizer_path: str
  counts: dict                       # {split: images}
  clip_counts: dict                  # {split: spoken captions present}
  caption_counts: dict               # {split: captions}
  has_audio: bool
  report: dict                       # built (bool), seconds, bytes, files, ...

  def data_source(self, split: str):
    """Random-access source of the split's records (picklable, for grain)."""
    if split not in self.counts:
      raise KeyError(f"split {split!r} not in the cache (has {sorted(self.counts)})")
    return tfds.builder_from_directory(self.dataset_dir).as_data_source(split=split)


def _dir_size(path: str) -> tuple[int, int]:
  total, files = 0, 0
  for dirpath, _, names in os.walk(path):
    for n in names:
      total += os.path.getsize(os.path.join(dirpath, n))
      files += 1
  return total, files


def build_cache(index: flickr8k.Flickr8kIndex, config) -> CacheHandle:
  """Builds (or reuses) the cache of `index` at the settings of `config`."""
  verify = check_verify(config.data.get("cache_verify", "stat"))
  settings = CacheSettings.from_config(config)
  if settings.use_audio and not index.has_audio:
    settings = dataclasses.replace(settings, use_audio=False)
  t_stamps = time.perf_counter()
  stamps = media_stamps(index, verify)
  t_stamps = time.perf_counter() - t_stamps
  data_dir = corpus_dir(config.data.cache_dir, index, stamps)
  record_path = stamps_record_path(config.data.cache_dir, index.root)
  previous = read_stamps_record(record_path)
  record = stamps_record(index, verify, data_dir, stamps)
  os.makedirs(data_dir, exist_ok=True)

  workers = int(config.data.build_workers)
  if workers < 0:
    # Auto: a worker costs a few seconds to start (imports, librosa's first call) and the
    # main process keeps a core busy serialising and writing, so small corpora and
    # 2-core machines decode in-process (1000 demo images on 2 cores: 28 s in-process vs
    # 44 s with 2 workers when the cores were shared, 16.8 s vs 13.6 s when nearly idle).
    total = sum(len(s.examples) for s in index.splits.values())
    workers = min((os.cpu_count() or 1) - 1, total // AUTO_IMAGES_PER_WORKER)
    workers = workers if workers >= 2 else 0
  builder_config = CacheConfig(settings)
  if any(c.name == builder_config.name for c in NlmmFlickr8k.BUILDER_CONFIGS):
    builder_config = builder_config.name  # TFDS refuses a custom config named as a listed one
  builder = NlmmFlickr8k(index=index, num_workers=workers, config=builder_config,
                         data_dir=data_dir, file_format="array_record")
  already = builder.is_prepared()
  t0 = time.perf_counter()
  if not already:
    why, files_changed = describe_rebuild(previous, record)
    if why:
      old_dir = previous["corpus_dir"]
      kept = (f" The previous cache {old_dir} is kept: delete it if it is not needed any "
              "more." if os.path.isdir(old_dir) else "")
      (logging.warning if files_changed else logging.info)(
          "Rebuilding the feature cache of %s in %s: %s.%s", index.root, data_dir, why, kept)
    else:
      logging.info("Building the feature cache of %s in %s (config %s).", index.root,
                   data_dir, builder.builder_config.name)
    try:
      with _one_blas_thread():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=os.path.abspath(index.root)))
    except Exception:  # pylint: disable=broad-except
      # Another process (e.g. a second host on a shared disk) may have finished the same
      # build first: TFDS writes into a temporary folder and renames it when complete.
      if not NlmmFlickr8k(config=builder_config, data_dir=data_dir,
                          file_format="array_record").is_prepared():
        raise
    finally:
      builder.close_pool()
  seconds = time.perf_counter() - t0
  dataset_dir = os.fspath(builder.data_path)

  vocab = int(config.model.vocab_size)
  tok_path = os.path.join(data_dir, f"tokenizer_vocab{vocab}.json")  # keyed by vocab_size
  tok = tokenizer_lib.Tokenizer.load(tok_path) if os.path.exists(tok_path) else None
  if tok is not None and tok.vocab_size > vocab:
    logging.warning("%s holds %d ids, more than model.vocab_size=%d: refitting it.",
                    tok_path, tok.vocab_size, vocab)
    tok = None
  if tok is None:
    train = index.splits.get("train")
    if train is None or not train.examples:
      raise ValueError(f"{index.root}: no train split to fit the tokenizer on")
    tok = tokenizer_lib.Tokenizer.fit((c for ex in train.examples for c in ex.captions), vocab)
    tok.save(tok_path)

  counts, clips, caps = {}, {}, {}
  for name, split in index.splits.items():
    if not split.examples:
      continue
    counts[name] = len(split.examples)
    caps[name] = sum(len(ex.captions) for ex in split.examples)
    clips[name] = (sum(w is not None for ex in split.examples for w in ex.wav_paths)
                   if settings.use_audio else 0)
  stored = {name: int(builder.info.splits[name].num_examples) for name in counts}
  if stored != counts:
    raise RuntimeError(f"cache {dataset_dir} holds {stored} images but the index has "
                       f"{counts}; delete the folder to rebuild it")
  if previous != record:  # unchanged records are not rewritten
    write_stamps_record(record_path, record)
  size, files = _dir_size(dataset_dir)
  report = dict(built=not already, seconds=round(seconds, 3), bytes=size, files=files,
                dataset_dir=dataset_dir, workers=workers if not already else 0,
                images=counts, clips=clips, verify=verify, media_files=len(stamps),
                stamp_seconds=round(t_stamps, 3), stamps_record=record_path)
  return CacheHandle(
      dataset_dir=dataset_dir, data_dir=data_dir, config_name=builder.builder_config.name,
      settings=settings, tokenizer=tok, tokenizer_path=tok_path, counts=counts,
      clip_counts=clips, caption_counts=caps,
      has_audio=settings.use_audio and sum(clips.values()) > 0, report=report)
