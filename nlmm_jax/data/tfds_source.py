"""TFDS image-text corpora (`data.name = "tfds:<name>"`), read with `tfds.data_source`.

A dataset the user has prepared in their TFDS data directory (COCO Captions, or any set
with an image and one or more captions per example) feeds the same pipeline and
retrieval protocol as Flickr8k, image-text only: the audio losses and the audio
retrieval directions are off (`prepare` logs it).

  data.name             "tfds:coco_captions" (a TFDS name; config/version allowed:
                        "tfds:coco_captions/2014:1.1.0")
  data.tfds_data_dir    the TFDS data directory ("": TFDS's default, $TFDS_DATA_DIR or
                        ~/tensorflow_datasets)
  data.tfds_splits      {train, dev, test} -> the TFDS split each reads (slices and sums
                        allowed: "train[:20000]", "train+restval"); default train / val /
                        test (coco_captions' val and test are Karpathy's 5000 + 5000; his
                        training set is "train+restval")
  data.tfds_image_key   the image feature ("image")
  data.tfds_caption_key the caption feature ("captions/text": a key with "/" is a flat
                        feature if there is one, else a path into nested features); a
                        string or a sequence of strings per example
  data.tfds_id_key      a feature naming the image ("image/id"), or "" for "<split>[<i>]"

The dataset must be prepared in the ArrayRecord format (random access):
  tfds build coco_captions --data_dir=DIR --file_format=array_record
Anything else (not prepared, TFRecord only, unknown name, a missing split or feature)
raises `DataError` saying which command or key fixes it.

Preparing reads every example once (threads, images decoded by TFDS) to index the
captions; the index and the tokenizer fitted on the train captions are kept under
`data.cache_dir/tfds/<name>-<hash>/`, keyed by the dataset's full name, data directory,
splits, keys and sizes. Images are not copied: `TfdsRecords` decodes and resizes each one
when the pipeline reads it (grain workers, `data.num_workers`, share that cost), to the
record layout of the feature cache (`data/cache.py`). Examples without a non-empty caption,
or whose image does not decode, are counted in the report and left out, as for Flickr8k
(`data.max_lost_fraction`).
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Optional

from absl import logging
import numpy as np

from nlmm_jax.data import features
from nlmm_jax.data import flickr8k
from nlmm_jax.data import tokenizer as tokenizer_lib

DataError = flickr8k.DataError
PREFIX = "tfds:"
INDEX_VERSION = 1                    # bump when the index JSON changes meaning
INDEX_CHUNK = 256                    # records per task of the index pass
REPORT_NAME = "tfds_report.json"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """Which TFDS dataset, where, and how its features map onto ours."""
  name: str                          # "coco_captions" (with config / version if given)
  data_dir: Optional[str]            # None: TFDS's default
  splits: tuple                      # ((our split, TFDS split), ...) in SPLITS order
  image_key: str
  caption_key: str
  id_key: str                        # "" -> positional ids

  @property
  def build_command(self) -> str:
    where = f" --data_dir={self.data_dir}" if self.data_dir else ""
    return f"tfds build {self.name.split(':')[0]}{where} --file_format=array_record"


def is_tfds(name: str) -> bool:
  return isinstance(name, str) and name.startswith(PREFIX)


def spec_from_config(data) -> TfdsSpec:
  """The `TfdsSpec` of a config's data section (data.name = "tfds:<name>")."""
  name = data.name[len(PREFIX):].strip()
  if not name:
    raise ValueError(f'data.name={data.name!r}: name the TFDS dataset, e.g. '
                     '"tfds:coco_captions"')
  splits = data.tfds_splits
  unknown = sorted(set(splits) - set(flickr8k.SPLITS))
  if unknown:
    raise ValueError(f"data.tfds_splits has unknown key(s) {unknown}: its keys are "
                     f"{list(flickr8k.SPLITS)} (each names the TFDS split it reads)")
  missing = [s for s in flickr8k.SPLITS if not str(splits.get(s) or "").strip()]
  if missing:
    raise ValueError(f"data.tfds_splits needs a TFDS split for {missing} (training "
                     "evaluates on dev and test), e.g. --config.data.tfds_splits.dev=val")
  data_dir = str(data.tfds_data_dir or "").strip()
  return TfdsSpec(
      name=name,
      data_dir=os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None,
      splits=tuple((s, str(splits[s]).strip()) for s in flickr8k.SPLITS),
      image_key=str(data.tfds_image_key), caption_key=str(data.tfds_caption_key),
      id_key=str(data.tfds_id_key or ""))


def _diagnose(spec: TfdsSpec, tfds_split: str, error: Exception) -> DataError:
  """A `DataError` saying what to do about `error`, raised by tfds.data_source."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(error, tfds.core.registered.DatasetNotFoundError):
    return DataError(f"data.name={PREFIX}{spec.name}: TFDS has no dataset named "
                     f"{spec.name!r} (tfds.list_builders() lists them; a dataset of your "
                     "own must be importable, or use data.name='manifest')")
  try:
    builder = tfds.builder(spec.name, data_dir=spec.data_dir)
    prepared, where = builder.is_prepared(), builder.data_dir
    file_format = str(builder.info.file_format) if prepared else ""
  except Exception:  # pylint: disable=broad-except  (the original error says more)
    prepared, where, file_format = None, spec.data_dir or "TFDS's default data dir", ""
  if prepared is False:
    return DataError(f"TFDS dataset {spec.name!r} is not prepared in {where}: run "
                     f"`{spec.build_command}` (it downloads what it can and says what to "
                     "fetch by hand), or point data.tfds_data_dir at the directory that "
                     "holds it")
  if prepared and "ARRAY_RECORD" not in file_format.upper():
    return DataError(f"TFDS dataset {spec.name!r} in {where} is prepared as {file_format}, "
                     "which has no random access: convert it with `tfds convert_format "
                     f"--dataset_dir={where} --out_file_format=array_record` (or rebuild it: "
                     f"`{spec.build_command} --overwrite`)")
  return DataError(f"TFDS dataset {spec.name!r}, split {tfds_split!r}: "
                   f"{type(error).__name__}: {error} (data.tfds_splits maps train/dev/test "
                   "to the dataset's splits)")


def open_split(spec: TfdsSpec, tfds_split: str):
  """`tfds.data_source` of one TFDS split (never downloads; errors say what to run)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(spec.name, split=tfds_split, data_dir=spec.data_dir,
                            download=False)
  except Exception as e:  # pylint: disable=broad-except  (diagnosed and re-raised)
    raise _diagnose(spec, tfds_split, e) from e


def _feature(example: dict, key: str, what: str):
  """example[key] for a flat key ("image/id" in COCO), else the nested path key."""
  if isinstance(example, dict) and key in example:
    return example[key]
  value = example
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      have = sorted(example) if isinstance(example, dict) else type(example).__name__
      raise DataError(f"the examples have no feature {key!r} ({what}; their features "
                      f"are {have}): set data.tfds_{what}_key")
    value = value[part]
  return value


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def captions_of(example: dict, key: str) -> tuple:
  """The example's non-empty captions (the feature is a string or strings); a feature
  of another kind is a `DataError` naming data.tfds_caption_key."""
  value = _feature(example, key, "caption")
  if isinstance(value, dict):
    raise DataError(f"the caption feature {key!r} is a dict of {sorted(value)}: set "
                    f"data.tfds_caption_key to its text, e.g. {key}/{sorted(value)[-1]}")
  values = [value] if isinstance(value, (str, bytes)) else list(np.asarray(value).ravel())
  bad = [v for v in values if not isinstance(v, (str, bytes))]
  if bad:
    raise DataError(f"the caption feature {key!r} holds {type(bad[0]).__name__} values "
                    f"({bad[0]!r}), not text: set data.tfds_caption_key to a text feature")
  return tuple(t for t in (" ".join(_text(v).split()) for v in values) if t)


def _image(example: dict, key: str) -> np.ndarray:
  """The decoded image, checked as `features.image_from_array` will need it."""
  image = np.asarray(_feature(example, key, "image"))
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]  # grey [H, W, 1] -> [H, W]
  if (image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1
      or (image.ndim == 3 and image.shape[-1] not in (3, 4))):
    raise ValueError(f"feature {key!r} is {image.dtype} {image.shape}, not a decoded "
                     "uint8 image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
  return image


# ----------------------------------------------------------------------------- index


def _index_chunk(source, keys: list, spec: TfdsSpec) -> list:
  """(key, captions, image id, error) of each record (runs in a thread)."""
  out = []
  for key in keys:
    try:
      example = source[key]
      _image(example, spec.image_key)  # decodes, or raises for a broken image
      caps = captions_of(example, spec.caption_key)
      image_id = (_text(np.asarray(_feature(example, spec.id_key, "id")).item())
                  if spec.id_key else "")
      out.append((key, caps, image_id, None))
    except DataError:
      raise  # a missing feature: a config error, not a lost example
    except Exception as e:  # pylint: disable=broad-except  (counted and reported)
      out.append((key, (), "", f"{type(e).__name__}: {e}"))
  return out


def _index_split(spec: TfdsSpec, split: str, tfds_split: str, num_threads: int):
  """({"keys", "captions", "ids"}, {"examples", "no_caption", "bad_image"}) of a split."""
  source = open_split(spec, tfds_split)
  n = len(source)
  chunks = [list(range(i, min(n, i + INDEX_CHUNK))) for i in range(0, n, INDEX_CHUNK)]
  keys, caps, ids, no_caption, bad_image = [], [], [], [], []
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for rows in pool.map(lambda c: _index_chunk(source, c, spec), chunks):
      for key, c, image_id, error in rows:
        if error is not None:
          bad_image.append(dict(key=key, error=error))
        elif not c:
          no_caption.append(key)
        else:
          keys.append(key)
          caps.append(list(c))
          ids.append(image_id or f"{tfds_split}[{key}]")
  if len(set(ids)) != len(ids):
    raise DataError(f"{spec.name} {tfds_split}: data.tfds_id_key={spec.id_key!r} repeats "
                    "ids; set it to a unique feature, or to \"\" for positional ids")
  report = dict(tfds_split=tfds_split, examples=n, kept=len(keys),
                no_caption=len(no_caption), no_caption_keys=no_caption[:20],
                bad_image=len(bad_image), bad_images=bad_image[:20])
  return dict(keys=keys, captions=caps, ids=ids), report


def _identity(spec: TfdsSpec) -> dict:
  """What keys the index: the dataset's full name and sizes, and the spec."""
  sizes, full_name = {}, spec.name
  for split, tfds_split in spec.splits:
    source = open_split(spec, tfds_split)
    sizes[split] = len(source)
    info = getattr(source, "dataset_info", None)
    full_name = getattr(info, "full_name", None) or full_name
  return dict(version=INDEX_VERSION, full_name=str(full_name), spec=dataclasses.asdict(spec),
              sizes=sizes)


def index_dir(cache_dir: str, identity: dict) -> str:
  blob = json.dumps(identity, sort_keys=True).encode()
  stem = identity["spec"]["name"].replace("/", "_").replace(":", "_")
  return os.path.join(os.path.abspath(cache_dir), "tfds",
                      f"{stem}-{hashlib.sha256(blob).hexdigest()[:12]}")


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def load_index(spec: TfdsSpec, cache_dir: str, max_lost_fraction: float = 0.01,
               report_path=None, num_threads: Optional[int] = None
               ) -> tuple[flickr8k.Flickr8kIndex, dict, str]:
  """(index, {split: TFDS record keys in index order}, index folder) of the dataset.

  The index's root is the index folder under `cache_dir`; its examples have image_path
  "" and no recordings. Built by one pass over every split (see the module docstring),
  then read from `index.json` while the dataset and the spec are unchanged.
  """
  identity = _identity(spec)
  folder = index_dir(cache_dir, identity)
  path = os.path.join(folder, "index.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    logging.info("TFDS index of %s reused from %s", identity["full_name"], path)
  else:
    logging.info("Indexing TFDS %s (%s) into %s: one pass over every example", spec.name,
                 dict(spec.splits), folder)
    threads = num_threads or min(16, 2 * (os.cpu_count() or 1))
    stored = dict(identity=identity, splits={}, report={})
    for split, tfds_split in spec.splits:
      stored["splits"][split], stored["report"][split] = _index_split(
          spec, split, tfds_split, threads)
    os.makedirs(folder, exist_ok=True)
    _write_json(path, stored)
  report = dict(dataset=identity["full_name"], splits=stored["report"])
  flickr8k.write_report(report, report_path, REPORT_NAME)
  for split, r in stored["report"].items():
    lost = r["no_caption"] + r["bad_image"]
    if r["examples"] == 0 or lost > max_lost_fraction * r["examples"]:
      raise DataError(
          f"TFDS {spec.name} split {r['tfds_split']!r} ({split}): {r['examples']} examples, "
          f"{r['no_caption']} without a caption under {spec.caption_key!r} and "
          f"{r['bad_image']} whose image did not decode, more than data.max_lost_fraction="
          f"{max_lost_fraction} (first errors: {r['bad_images'][:3]}); check "
          "data.tfds_caption_key / data.tfds_image_key, or raise data.max_lost_fraction",
          report=report)
  splits, keys = {}, {}
  for split, s in stored["splits"].items():
    splits[split] = flickr8k.SplitIndex(split, [
        flickr8k.Example(image_id=i, image_path="", captions=tuple(c),
                         wav_paths=(None,) * len(c))
        for i, c in zip(s["ids"], s["captions"])])
    keys[split] = list(s["keys"])
  index = flickr8k.Flickr8kIndex(root=folder, splits=splits, has_audio=False, report=report)
  return index, keys, folder


# ----------------------------------------------------------------------------- records


class TfdsRecords:
  """Random access to one split in the feature cache's record layout (picklable).

  record i = TFDS record keys[i]: image uint8 [S, S, 3] (shorter side resized to S,
  centre crop, as `features.load_image`), captions, no audio, image_index i, image_id.
  """

  def __init__(self, spec: TfdsSpec, tfds_split: str, keys: list, examples: list,
               stored_size: int, n_mels: int):
    self._spec = spec
    self._tfds_split = tfds_split
    self._keys = np.asarray(keys, np.int64)
    self._captions = [np.asarray(ex.captions, dtype=object) for ex in examples]
    self._ids = [ex.image_id for ex in examples]
    self._stored_size = stored_size
    self._n_mels = n_mels
    self._source = None              # opened on first read (in each worker)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return len(self._keys)

  def __getitem__(self, i: int) -> dict:
    if self._source is None:
      self._source = open_split(self._spec, self._tfds_split)
    i = int(i)
    example = self._source[int(self._keys[i])]
    n = len(self._captions[i])
    return dict(
        image=features.image_from_array(_image(example, self._spec.image_key),
                                        self._stored_size),
        captions=self._captions[i], has_audio=np.zeros(n, bool),
        mel_lengths=np.zeros(n, np.int32), mel=np.zeros((0, self._n_mels), np.float16),
        image_index=np.int32(i), image_id=self._ids[i])


@dataclasses.dataclass
class TfdsHandle:
  """A TFDS corpus ready for the pipeline (the interface of `cache.CacheHandle` that the
  pipeline uses: data_source, tokenizer, counts, has_audio, report)."""
  spec: TfdsSpec
  index: flickr8k.Flickr8kIndex
  keys: dict                         # {split: TFDS record keys}
  stored_size: int
  n_mels: int
  tokenizer: tokenizer_lib.Tokenizer
  tokenizer_path: str
  counts: dict                       # {split: images}
  report: dict
  has_audio: bool = False

  def data_source(self, split: str) -> TfdsRecords:
    if split not in self.counts:
      raise KeyError(f"split {split!r} not in {self.spec.name} (has {sorted(self.counts)})")
    return TfdsRecords(self.spec, dict(self.spec.splits)[split], self.keys[split],
                       self.index.splits[split].examples, self.stored_size, self.n_mels)


def prepare(config, report_path=None) -> TfdsHandle:
  """Indexes (or reuses the index of) the config's TFDS dataset and fits its tokenizer."""
  d, m = config.data, config.model
  spec = spec_from_config(d)
  index, keys, folder = load_index(spec, d.cache_dir, float(d.max_lost_fraction),
                                   report_path=report_path)
  vocab = int(m.vocab_size)
  tok_path = os.path.join(folder, f"tokenizer_vocab{vocab}.json")
  if os.path.isfile(tok_path):
    tok = tokenizer_lib.Tokenizer.load(tok_path)
  else:
    tok = tokenizer_lib.Tokenizer.fit(
        (c for ex in index.splits["train"].examples for c in ex.captions), vocab)
    tok.save(tok_path)
  counts = {name: len(s.examples) for name, s in index.splits.items()}
  return TfdsHandle(spec=spec, index=index, keys=keys,
                    stored_size=int(m.image_size + d.crop_margin), n_mels=int(m.n_mels),
                    tokenizer=tok, tokenizer_path=tok_path, counts=counts,
                    report=index.report)
