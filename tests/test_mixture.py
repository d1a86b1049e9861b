"""Mixtures of corpora (`data.mixture`): the entries are checked, the stream follows the
weights and resumes exactly, training resumes, and evaluation runs per corpus."""

import json
import re
import types

import numpy as np
import pytest

from nlmm_jax import evaluate
from nlmm_jax.data import mixture
from nlmm_jax.data import pipeline
from nlmm_jax.data import tokenizer as tokenizer_lib
import data_fixtures  # pylint: disable=g-bad-import-order
from tiny_run import tiny_config, train_two_then_four  # pylint: disable=g-bad-import-order

IT_KEYS = {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def _config(tiny_corpus, *entries, cache=None):
  c = tiny_config(tiny_corpus / "corpus", cache or tiny_corpus / "cache")
  c.data.mixture = tuple(entries)
  return c


def _demo(tiny_corpus, **kw):
  return dict(name="demo", root=str(tiny_corpus / "corpus"), **kw)


@pytest.mark.parametrize("entries, match", [
    ([{"name": "demo"}], r"lists 1 corpus: a mixture needs at least two"),
    ([{"name": "demo"}, {"name": "flickr8k", "colour": 1}],
     r"mixture\[1\] has unknown key\(s\) \['colour'\]"),
    ([{"name": "demo"}, {"name": "flickr8k", "mixture": ()}],
     r"mixture\[1\] sets \['mixture'\], which the mixture's corpora share"),
    ([{"name": "demo", "num_workers": 2, "crop_margin": 4}, {"name": "flickr8k"}],
     r"mixture\[0\] sets \['crop_margin', 'num_workers'\].*set them once in config\.data"),
    ([{"name": "demo", "weight": 0}, {"name": "flickr8k"}], r"weight=0: a weight is a posit"),
    ([{"name": "demo", "weight": "x"}, {"name": "flickr8k"}], r"weight='x'"),
    ([{"name": "demo"}, {"name": "demo"}], r"label 'demo' is taken by an earlier entry"),
    ([{"name": "demo"}, {"root": "x"}], r"mixture\[1\] has no 'name'"),
    ([{"name": "demo"}, {"name": "cifar"}], r"corpus 'cifar': data\.name must be one of"),
    ([{"name": "demo"}, {"name": "manifest", "manifest": "nowhere.jsonl"}],
     r"corpus 'manifest:nowhere': data\.manifest='nowhere\.jsonl' is not a file"),
    ([{"name": "demo"}, {"name": "tfds:coco_captions", "tfds_splits": {"dev": ""}}],
     r"corpus 'tfds:coco_captions': data\.tfds_splits needs a TFDS split for \['dev'\]"),
])
def test_entries_are_checked(tmp_path, entries, match):
  """Every entry is checked before any corpus is prepared (the demo corpus of entry 0
  is never generated)."""
  c = tiny_config(tmp_path / "corpus", tmp_path / "cache")
  c.data.mixture = tuple(entries)
  with pytest.raises(ValueError, match=match):
    pipeline.prepare(c)
  assert not (tmp_path / "corpus").exists()


def test_entries_override_the_data_section(tmp_path):
  c = tiny_config(tmp_path / "corpus", tmp_path / "cache")
  c.data.mixture = (dict(name="demo", weight=3), dict(name="manifest", manifest="a/m.jsonl",
                                                      use_audio=False),
                    dict(name="tfds:coco_captions", label="coco", tfds_splits={"dev": "x"}))
  (l0, w0, c0), (l1, w1, c1), (l2, _, c2) = mixture.component_configs(c)
  assert (l0, w0, l1, w1, l2) == ("demo", 3.0, "manifest:m", 1.0, "coco")
  assert c0.data.root == c.data.root and c0.data.mixture == () and c0.model == c.model
  assert c1.data.manifest == "a/m.jsonl" and not c1.data.use_audio and c0.data.use_audio
  assert c2.data.tfds_splits.to_dict() == {"train": "train", "dev": "x", "test": "test"}


@pytest.fixture(scope="module")
def second_root(tmp_path_factory):
  """A Flickr8k-layout tree (12 images with recordings) beside the tiny demo corpus."""
  root = tmp_path_factory.mktemp("second") / "flickr8k"
  data_fixtures.make_flickr8k_tree(root, n_images=12)
  return root


def test_stream_follows_weights_and_resumes_exactly(tiny_corpus, second_root, tmp_path):
  c = _config(tiny_corpus, _demo(tiny_corpus, weight=3.0),
              dict(name="flickr8k", root=str(second_root), weight=1.0),
              cache=tmp_path / "cache")
  handle = pipeline.prepare(c)
  assert [x.label for x in handle.components] == ["demo", "flickr8k"]
  assert [x.weight for x in handle.components] == [0.75, 0.25]
  assert handle.has_audio  # both corpora have recordings
  tok = handle.tokenizer
  assert all(x.handle.tokenizer is tok for x in handle.components)
  (version,) = tok.token_ids("version")  # a word only the second corpus's captions use
  assert version != tok.token_ids("zzz")[0]  # in the shared vocabulary (not <unk>)

  it = pipeline.train_iterator(handle, c, seed=5)
  batches = [next(it) for _ in range(8)]
  assert {"image", "text", "audio", "audio_mask"} <= set(batches[0])
  rows = np.concatenate([b["text"] for b in batches])
  second = int(sum(version in r for r in rows))
  assert second == 8, second  # 32 examples at 3:1

  it = pipeline.train_iterator(handle, c, seed=5)
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = pipeline.train_iterator(handle, c, seed=5)
  resumed.set_state(json.loads(json.dumps(state)))
  for want in batches[3:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  other = next(pipeline.train_iterator(handle, c, seed=6))
  assert not np.array_equal(other["text"], batches[0]["text"])


@pytest.mark.slow  # train, resume, evaluate (32 s): the slow tier (CI runs it)
def test_trains_resumes_and_evaluates_per_corpus(tiny_corpus, tmp_path, caplog, capsys):
  """demo (with audio) + a Flickr8k tree without: image-text only, logged; 2 steps, then
  resumed to 4; the eval files hold each corpus's metrics and their mean."""
  from nlmm_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path / "mute"
  data_fixtures.make_flickr8k_tree(root, n_images=12, with_audio=False)
  c = _config(tiny_corpus, _demo(tiny_corpus), dict(name="flickr8k", root=str(root),
                                                    label="mute"),
              cache=tmp_path / "cache")
  workdir = tmp_path / "run"
  test_metrics, lines = train_two_then_four(c, workdir, caplog)
  assert re.search(r"Mixture is image-text only: mute has no spoken captions", caplog.text)
  assert not [k for r in lines for k in r if "audio" in k]
  for name in ("eval_dev.json", "eval_test.json"):
    metrics = json.load(open(workdir / name))
    per = metrics["per_corpus"]
    assert set(per) == {"demo", "mute"}
    for m in per.values():
      assert {k for k in m if "_R@" in k and not k.startswith("mean")} == IT_KEYS
    assert metrics["mean_R@1"] == pytest.approx(
        (per["demo"]["mean_R@1"] + per["mute"]["mean_R@1"]) / 2)
    assert metrics["rsum_all"] == pytest.approx(
        (per["demo"]["rsum_all"] + per["mute"]["rsum_all"]) / 2)
  assert per["demo"]["i2t_num_queries"] == 2 and per["mute"]["i2t_num_queries"] == 2
  assert test_metrics["per_corpus"].keys() == per.keys()

  # Resuming with other data is refused: other weights (another stream), another
  # tokenizer (other word ids for the trained embeddings).
  c.train.total_steps = 6
  c.data.mixture[1]["weight"] = 3.0
  with pytest.raises(ValueError, match=r"data\.mixture differs from the checkpoint's.*"
                     r"--config\.init_from="):
    train.train_and_evaluate(c, str(workdir))
  c.data.mixture[1]["weight"] = 1.0
  other = types.SimpleNamespace(tokenizer=tokenizer_lib.Tokenizer(["a", "dog"]))
  with pytest.raises(ValueError, match=r"tokenizer fitted on today's data \(6 ids\) "
                     r"differs from the checkpoint's"):
    train.check_same_data(str(workdir), 4, c, other)
  assert [json.loads(l)["step"] for l in open(workdir / "train_metrics.jsonl")][-1] == 4

  # Searching the trained model: the mixture's corpus is named by its label.
  from nlmm_jax import retrieve  # pylint: disable=g-import-not-at-top
  query = ["--workdir", str(workdir), "--text", "a red dog", "--output", ""]
  assert retrieve.main(query) == 1
  assert "trained on a mixture of ['demo', 'mute']: pass --corpus LABEL" in (
      capsys.readouterr().err)
  assert retrieve.main(query + ["--corpus", "mute", "--k", "2"]) == 0
  out = capsys.readouterr().out
  assert "top 2 of 2 test images" in out and str(root) in out


def test_mean_over_corpora_keeps_only_shared_metrics():
  per = {"a": {"i2t_R@1": 10.0, "a2i_R@1": 50.0, "i2t_num_queries": 3},
         "b": {"i2t_R@1": 30.0, "i2t_num_queries": 5}}
  out = evaluate.mean_over_corpora(per)
  assert out["i2t_R@1"] == 20.0 and "a2i_R@1" not in out and "i2t_num_queries" not in out
  assert out["per_corpus"] == per  # per-corpus metrics kept whole
