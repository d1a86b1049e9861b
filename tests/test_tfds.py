"""TFDS image-text corpora (`data.name="tfds:<name>"`), against mocked TFDS data:
`tfds.testing.mock_data` generates coco_captions examples from its real feature spec
(random images of random sizes, random caption strings), or serves a list we write."""

import json
import logging
import os
import pickle
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nlmm_jax import config_lib
from nlmm_jax.data import pipeline
from nlmm_jax.data import tfds_source
from nlmm_jax.data import tokenizer as tokenizer_lib
from tiny_run import tiny_config, train_two_then_four  # pylint: disable=g-bad-import-order

IT_KEYS = {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def _config(base, **data):
  c = tiny_config(base / "unused_root", base / "cache")
  c.data.name = "tfds:coco_captions"
  for k, v in data.items():
    c.data[k] = v
  return c


def _mock(n=8):
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def test_records_follow_the_mocked_dataset(tmp_path, caplog):
  """Every example becomes one record: the image resized to the stored size, the
  example's captions in order, no audio; the index is built once and then reused."""
  c = _config(tmp_path)
  with _mock(), caplog.at_level(logging.INFO, logger="absl"):
    handle = pipeline.prepare(c)
    truth = tfds.data_source("coco_captions", split="val")
    assert handle.num_images == {"train": 8, "dev": 8, "test": 8}
    assert not handle.has_audio and handle.train_records["train"] == list(range(8))
    assert re.search(r"tfds:coco_captions is image-text only", caplog.text)
    s = int(c.model.image_size + c.data.crop_margin)
    src = handle.source("dev")
    for i in (0, 5):
      record, example = src[i], truth[i]
      assert record["image"].shape == (s, s, 3) and record["image"].dtype == np.uint8
      want = [" ".join(t.split()) for t in example["captions"]["text"]]
      assert list(record["captions"]) == [t for t in want if t]
      assert int(record["image_index"]) == i and record["image_id"] == f"val[{i}]"
      assert not record["has_audio"].any() and record["mel"].shape == (0, c.model.n_mels)
    # The image is the example's own, resized (not zeros, not another example's).
    from nlmm_jax.data import features  # pylint: disable=g-import-not-at-top
    np.testing.assert_array_equal(src[3]["image"],
                                  features.image_from_array(truth[3]["image"], s))
    # Picklable for grain's worker processes: the copy reopens the source itself.
    copy = pickle.loads(pickle.dumps(src))
    assert copy._source is None  # pylint: disable=protected-access
    np.testing.assert_array_equal(copy[3]["image"], src[3]["image"])
    caplog.clear()
    again = pipeline.prepare(c)
  assert "TFDS index of coco_captions" in caplog.text and "reused" in caplog.text
  assert again.tokenizer == handle.tokenizer
  assert set(handle.tokenizer.words) & set(" ".join(want).split())


@pytest.mark.slow  # train, resume, evaluate (42 s): the slow tier (CI runs it)
def test_trains_and_resumes_image_text_only(tmp_path, caplog):
  """Two steps, then the same workdir continued to four; the eval files list only the
  image-text directions and the tokenizer is the one fitted on the TFDS captions."""
  from nlmm_jax import api  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  c = _config(tmp_path)
  with _mock():
    test_metrics, lines = train_two_then_four(c, workdir, caplog)
  assert not [k for r in lines for k in r if k.startswith("train/loss/") and "audio" in k]
  for name in ("eval_dev.json", "eval_test.json"):
    metrics = json.load(open(workdir / name))
    assert {k for k in metrics if "_R@" in k and not k.startswith("mean")} == IT_KEYS
  assert IT_KEYS <= set(test_metrics)
  cache = tmp_path / "cache" / "tfds"
  (folder,) = os.listdir(cache)
  fitted = tokenizer_lib.Tokenizer.load(
      str(cache / folder / f"tokenizer_vocab{c.model.vocab_size}.json"))
  model = api.load(str(workdir))
  assert model.tokenizer == fitted
  # Saved as trained without audio: the API refuses to embed speech with its untrained
  # audio tower.
  assert json.load(open(workdir / "config.json"))["data"]["use_audio"] is False
  with pytest.raises(ValueError, match="trained without audio"):
    model.embed_audio([(np.zeros(1600, np.float32), 16000)])
  assert model.embed_text(["a caption"]).shape == (1, c.model.embed_dim)


def test_not_prepared_names_the_build_command(tmp_path):
  c = _config(tmp_path, tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(tfds_source.DataError) as e:
    pipeline.prepare(c)
  msg = str(e.value)
  assert "not prepared" in msg and (
      f"tfds build coco_captions --data_dir={tmp_path / 'tfds'} --file_format=array_record"
      in msg), msg


def test_unknown_dataset_and_feature_are_named(tmp_path):
  with pytest.raises(tfds_source.DataError, match="no dataset named 'no_such_set_xyz'"):
    pipeline.prepare(_config(tmp_path, name="tfds:no_such_set_xyz"))
  with _mock(), pytest.raises(tfds_source.DataError,
                              match=r"no feature 'caption'.*data\.tfds_caption_key"):
    pipeline.prepare(_config(tmp_path, tfds_caption_key="caption"))
  with _mock(), pytest.raises(tfds_source.DataError, match=r"'captions' is a dict of "
                              r"\['id', 'text'\]: set data\.tfds_caption_key .*captions/text"):
    pipeline.prepare(_config(tmp_path, tfds_caption_key="captions"))
  with pytest.raises(ValueError, match=r"data\.name must be one of"):
    config_lib.check_data_name("tfds:")
  c = _config(tmp_path)
  c.data.tfds_splits.dev = ""
  with pytest.raises(ValueError, match=r"tfds_splits needs a TFDS split for \['dev'\]"):
    pipeline.prepare(c)


def _listed(examples):
  """as_data_source_fn serving `examples` (one list for every split)."""
  def as_data_source(self, split, **kwargs):
    del self, split, kwargs
    return list(examples)
  return as_data_source


def test_examples_without_caption_or_image_are_counted_and_left_out(tmp_path):
  rng = np.random.default_rng(0)

  def ex(i, captions, image=None):
    image = rng.integers(0, 256, (30, 40, 3), np.uint8) if image is None else image
    return {"image": image, "image/id": i, "captions": {"text": np.asarray(captions)}}

  examples = [ex(i, [f"a dog {i}", f"a cat {i}"]) for i in range(40)]
  examples[3] = ex(3, ["   ", ""])                        # no usable caption
  examples[7] = ex(7, ["fine text"], image=np.zeros((4, 4), np.float32))  # not an image
  examples[9] = ex(9, ["grey"], image=np.full((6, 8, 1), 9, np.uint8))  # grey: kept
  examples[11] = ex(11, ["two"], image=np.zeros((6, 8, 2), np.uint8))  # 2 channels: lost
  c = _config(tmp_path, max_lost_fraction=0.1, tfds_id_key="image/id")
  with tfds.testing.mock_data(as_data_source_fn=_listed(examples)):
    handle = pipeline.prepare(c)
    ids = [ex.image_id for ex in handle.index.splits["train"].examples]
    assert len(ids) == 37 and not {"3", "7", "11"} & set(ids) and "9" in ids
    report = json.load(open(handle.cache.report["report_file"]))
    r = report["splits"]["train"]
    assert (r["examples"], r["kept"], r["no_caption"], r["bad_image"]) == (40, 37, 1, 2)
    assert r["no_caption_keys"] == [3] and [b["key"] for b in r["bad_images"]] == [7, 11]
    grey = handle.source("train")[ids.index("9")]["image"]
    assert grey.shape[-1] == 3 and (grey == 9).all()
    c.data.max_lost_fraction = 0.05
    with pytest.raises(tfds_source.DataError, match=r"1 without a caption.*2 whose image"):
      pipeline.prepare(c)


# ----------------------------------------------------------------------------- a real one


class NlmmTinyCaptions(tfds.core.GeneratorBasedBuilder):
  """A small image-text TFDS dataset, prepared for real (one caption string each)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "caption": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12, 0),
            "validation": self._generate_examples(3, 1),
            "test": self._generate_examples(3, 2)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      yield i, {"image": rng.integers(0, 256, (20 + i, 24, 3), np.uint8),
                "caption": f"a {('red', 'blue', 'green')[i % 3]} thing number {i}"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """{file format: TFDS data dir holding NlmmTinyCaptions prepared in that format}."""
  out = {}
  for fmt in ("array_record", "tfrecord"):
    out[fmt] = tmp_path_factory.mktemp(fmt)
    NlmmTinyCaptions(data_dir=str(out[fmt]), file_format=fmt).download_and_prepare()
  return out


def test_a_prepared_dataset_reads_in_worker_processes(prepared, tmp_path):
  """No mock: the dataset as `tfds build` leaves it. Two grain worker processes (which
  open the source from its files) deliver the batches that in-process reading does."""
  c = _config(tmp_path, name="tfds:nlmm_tiny_captions", tfds_caption_key="caption",
              tfds_data_dir=str(prepared["array_record"]))
  c.data.tfds_splits.dev = "validation"
  handle = pipeline.prepare(c)
  assert handle.num_images == {"train": 12, "dev": 3, "test": 3}
  assert all(len(ex.captions) == 1 for ex in handle.index.splits["train"].examples)
  batches = {}
  for workers in (0, 2):
    c.data.num_workers = workers
    it = pipeline.train_iterator(handle, c, seed=3)
    batches[workers] = [next(it) for _ in range(2)]
  for want, got in zip(batches[0], batches[2]):
    assert set(want) == {"image", "text", "text_mask", "image_index"}
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_tfrecord_and_non_text_captions_are_named(prepared, tmp_path):
  c = _config(tmp_path, name="tfds:nlmm_tiny_captions", tfds_caption_key="caption",
              tfds_data_dir=str(prepared["tfrecord"]))
  c.data.tfds_splits.dev = "validation"
  with pytest.raises(tfds_source.DataError, match=r"prepared as .*TFRECORD.*tfds "
                     r"convert_format --dataset_dir=\S+ --out_file_format=array_record"):
    pipeline.prepare(c)
  c.data.tfds_data_dir = str(prepared["array_record"])
  c.data.tfds_caption_key = "image"
  with pytest.raises(tfds_source.DataError, match=r"'image' holds uint8 values .*, not "
                     r"text: set data\.tfds_caption_key"):
    pipeline.prepare(c)


def test_the_search_cli_points_tfds_corpora_to_the_api(tmp_path):
  from nlmm_jax import retrieve  # pylint: disable=g-import-not-at-top
  c = _config(tmp_path)
  with pytest.raises(retrieve.RetrievalError, match=r"TFDS dataset 'coco_captions', which "
                     r"holds no image files.*nlmm_jax\.api"):
    retrieve._corpus_config(c, None)  # pylint: disable=protected-access
  c.data.name = "demo"
  c.data.mixture = (dict(name="demo"), dict(name="tfds:coco_captions", label="coco"))
  with pytest.raises(retrieve.RetrievalError, match=r"nlmm_jax\.api.*another --corpus"):
    retrieve._corpus_config(c, "coco")  # pylint: disable=protected-access
  assert retrieve._corpus_config(c, "demo").data.name == "demo"  # pylint: disable=protected-access
