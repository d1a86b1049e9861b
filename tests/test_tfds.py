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
  assert api.load(str(workdir)).tokenizer == fitted


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
  c = _config(tmp_path, max_lost_fraction=0.1, tfds_id_key="image/id")
  with tfds.testing.mock_data(as_data_source_fn=_listed(examples)):
    handle = pipeline.prepare(c)
    ids = [ex.image_id for ex in handle.index.splits["train"].examples]
    assert len(ids) == 38 and "3" not in ids and "7" not in ids and "9" in ids
    report = json.load(open(handle.cache.report["report_file"]))
    r = report["splits"]["train"]
    assert (r["examples"], r["kept"], r["no_caption"], r["bad_image"]) == (40, 38, 1, 1)
    assert r["no_caption_keys"] == [3] and r["bad_images"][0]["key"] == 7
    grey = handle.source("train")[ids.index("9")]["image"]
    assert grey.shape[-1] == 3 and (grey == 9).all()
    c.data.max_lost_fraction = 0.04
    with pytest.raises(tfds_source.DataError, match=r"1 without a caption.*1 whose image"):
      pipeline.prepare(c)
