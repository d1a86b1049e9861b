"""Cache and grain pipelines on a tiny real Flickr8k + FACC tree (with the corpus' quirks)."""

import logging
import os
import shutil

import grain
import numpy as np
import pytest

from nlmm_jax import config_lib
from nlmm_jax.data import cache as cache_lib
from nlmm_jax.data import features
from nlmm_jax.data import pipeline
from nlmm_jax.data import tokenizer as tokenizer_lib

import data_fixtures  # pylint: disable=g-bad-import-order

IMAGE, MARGIN, MELS, FRAMES, TEXT_LEN = 32, 4, 16, 20, 16


def make_config(root, cache_dir, **overrides):
  c = config_lib.load_config("demo")
  c.data.name = "flickr8k"
  c.data.root = str(root)
  c.data.cache_dir = str(cache_dir)
  c.data.max_lost_fraction = 0.3     # the quirky tree loses 1 of 9 train images
  c.data.build_workers = 0
  c.data.num_workers = 0
  c.data.eval_batch_size = 7
  c.model.image_size = IMAGE
  c.data.crop_margin = MARGIN
  c.model.n_mels = MELS
  c.model.max_frames = FRAMES
  c.model.max_text_len = TEXT_LEN
  c.model.vocab_size = 200
  c.train.batch_size = 4
  for key, value in overrides.items():
    section, name = key.split("__")
    setattr(getattr(c, section), name, value)
  return c


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  base = tmp_path_factory.mktemp("flickr")
  info = data_fixtures.make_flickr8k_tree(os.path.join(base, "root"), n_images=12,
                                          quirks=True)
  return base, info


@pytest.fixture(scope="module")
def handle(tree):
  base, info = tree
  return pipeline.prepare(make_config(info["root"], os.path.join(base, "cache")))


@pytest.fixture(scope="module")
def config(tree):
  base, info = tree
  return make_config(info["root"], os.path.join(base, "cache"))


def _listing(path):
  out = {}
  for dirpath, _, names in os.walk(path):
    for n in names:
      p = os.path.join(dirpath, n)
      out[p] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
  return out


def _take(it, n):
  return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- cache


def test_cache_records_match_index_and_features(handle, tree):
  _, info = tree
  assert handle.has_audio and handle.num_images == {"train": 8, "dev": 2, "test": 2}
  for split, expected_ids in info["expected"].items():
    src = handle.source(split)
    examples = handle.index.splits[split].examples
    assert len(src) == len(examples) == len(expected_ids)
    for i, ex in enumerate(examples):
      r = src[i]
      assert int(r["image_index"]) == i
      assert r["image_id"].decode() == ex.image_id == expected_ids[i]
      assert [c.decode() for c in r["captions"]] == list(ex.captions)
      assert r["image"].dtype == np.uint8 and r["image"].shape == (36, 36, 3)
      np.testing.assert_array_equal(r["image"], features.load_image(ex.image_path, 36))
      np.testing.assert_array_equal(r["has_audio"], [w is not None for w in ex.wav_paths])
      assert r["mel"].dtype == np.float16 and r["mel"].shape[1] == MELS
      offset = 0
      for k, wav in enumerate(ex.wav_paths):
        n = int(r["mel_lengths"][k])
        if wav is None:
          assert n == 0  # the missing recording is explicit, not zeros
          continue
        ref = features.audio_features(wav, features.AudioSettings(n_mels=MELS))
        np.testing.assert_array_equal(r["mel"][offset:offset + n], ref)
        offset += n
      assert offset == r["mel"].shape[0]
  # The quirk: the first train image has no recording for caption 3.
  first = handle.source("train")[0]
  assert list(first["has_audio"]) == [True, True, True, False, True]
  assert handle.cache.clip_counts == {"train": 39, "dev": 10, "test": 10}


def test_second_build_does_no_work_and_settings_key_the_cache(handle, tree):
  base, info = tree
  corpus_dir = handle.cache.data_dir  # dataset + tokenizer (index reports are rewritten)
  before = _listing(corpus_dir)
  again = pipeline.prepare(make_config(info["root"], os.path.join(base, "cache")))
  assert handle.cache.report["built"] is True  # the fixture built it
  assert again.cache.report["built"] is False
  assert again.cache.dataset_dir == handle.cache.dataset_dir
  assert _listing(corpus_dir) == before  # nothing written or touched
  # Another n_mels: a new dataset next to the old one (built with 2 worker processes).
  other = pipeline.prepare(make_config(info["root"], os.path.join(base, "cache"),
                                       model__n_mels=12, data__build_workers=2))
  assert other.cache.report["built"] is True and other.cache.report["workers"] == 2
  assert other.cache.dataset_dir != handle.cache.dataset_dir
  assert os.path.dirname(os.path.dirname(other.cache.dataset_dir)) == os.path.dirname(
      os.path.dirname(handle.cache.dataset_dir))
  assert _listing(handle.cache.dataset_dir) == {
      p: v for p, v in before.items() if p.startswith(handle.cache.dataset_dir)}
  r = other.source("dev")[1]
  ex = other.index.splits["dev"].examples[1]
  np.testing.assert_array_equal(
      r["mel"][:r["mel_lengths"][0]],
      features.audio_features(ex.wav_paths[0], features.AudioSettings(n_mels=12)))
  assert pipeline.prepare(make_config(info["root"], os.path.join(base, "cache"),
                                      model__n_mels=12)).cache.report["built"] is False
  # Every preprocessing setting changes the key; training-only settings do not.
  c = make_config(info["root"], "x")
  key = cache_lib.CacheSettings.from_config(c).config_name()
  for section, name, value in [("model", "image_size", 40), ("data", "crop_margin", 0),
                               ("data", "hop_length", 80), ("data", "fmax", 7000.0),
                               ("data", "n_fft", 512), ("data", "sample_rate", 8000),
                               ("data", "log_mel_top_db", 60.0)]:
    c2 = make_config(info["root"], "x", **{f"{section}__{name}": value})
    assert cache_lib.CacheSettings.from_config(c2).config_name() != key, name
  c3 = make_config(info["root"], "x", model__max_frames=7, train__batch_size=2)
  assert cache_lib.CacheSettings.from_config(c3).config_name() == key


def test_tokenizer_is_fitted_on_train_captions_only(handle):
  tok = handle.tokenizer
  assert os.path.isfile(handle.cache.tokenizer_path)
  assert tokenizer_lib.Tokenizer.load(handle.cache.tokenizer_path) == tok
  # Captions say "number <i>": 0-7 are train images, 8-9 dev, 10-11 test.
  dev_caption = handle.index.splits["dev"].examples[0].captions[0]
  assert "number 8" in dev_caption
  assert tok.token_ids("number 7") == [tok.token_ids("number")[0], tok.token_ids("7")[0]]
  assert tok.token_ids("7") != [tokenizer_lib.UNK]
  for word in ("8", "9", "10", "11"):
    assert tok.token_ids(word) == [tokenizer_lib.UNK], word
  train_words = {w for ex in handle.index.splits["train"].examples for c in ex.captions
                 for w in tokenizer_lib.split_words(c)}
  assert set(tok.words) == train_words  # vocab_size 200 holds them all


def test_vocab_size_keys_the_tokenizer(handle, tree):
  base, info = tree
  small = pipeline.prepare(make_config(info["root"], os.path.join(base, "cache"),
                                       model__vocab_size=10))
  assert small.cache.report["built"] is False  # same records, another tokenizer
  assert small.cache.tokenizer_path != handle.cache.tokenizer_path
  assert small.tokenizer.vocab_size == 10 and handle.tokenizer.vocab_size > 10
  assert small.tokenizer.words == handle.tokenizer.words[:6]  # the 6 most frequent
  again = pipeline.prepare(make_config(info["root"], os.path.join(base, "cache")))
  assert again.tokenizer == handle.tokenizer


# ----------------------------------------------------------------------------- media changes


def _copy_corpus(tree, tmp_path):
  """A private copy of the module's corpus (copytree keeps mtimes) and an empty cache."""
  _, info = tree
  root = os.path.join(tmp_path, "root")
  shutil.copytree(info["root"], root)
  return root, os.path.join(tmp_path, "cache")


def _example(h, split, i):
  """(record, index example) of image i of a split."""
  return h.source(split)[i], h.index.splits[split].examples[i]


def _first_mel(record):
  return record["mel"][:int(record["mel_lengths"][0])]


def _rewrite(path, data):
  """Rewrites a file in place with `data` and moves its mtime 2 s on (coarse clocks)."""
  st = os.stat(path)
  with open(path, "wb") as f:
    f.write(data)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _new_file(tmp_path, name, write, seed):
  """Bytes of a fresh fixture file (another random tone or picture)."""
  path = os.path.join(tmp_path, name)
  write(path, np.random.default_rng(seed))
  return _read(path)


def test_wav_replaced_in_place_rebuilds_the_cache_and_logs_it(tree, tmp_path, caplog):
  root, cache = _copy_corpus(tree, tmp_path)
  c = make_config(root, cache)
  h0 = pipeline.prepare(c)
  assert h0.cache.report["built"] is True
  r0, ex = _example(h0, "dev", 1)
  wav = ex.wav_paths[0]
  _rewrite(wav, _new_file(tmp_path, "new.wav", data_fixtures._write_wav, 123))  # pylint: disable=protected-access
  caplog.set_level(logging.INFO)
  h1 = pipeline.prepare(c)
  assert h1.cache.report["built"] is True
  assert h1.cache.data_dir != h0.cache.data_dir
  r1, _ = _example(h1, "dev", 1)
  new_mel = features.audio_features(wav, features.AudioSettings(n_mels=MELS))
  assert not np.array_equal(new_mel, _first_mel(r0))
  np.testing.assert_array_equal(_first_mel(r1), new_mel)
  # The log names the file (relative to the root), the count and the stale cache.
  rel = os.path.relpath(wav, root)
  rebuilt = [r.getMessage() for r in caplog.records if "Rebuilding" in r.getMessage()]
  n = h1.cache.report["media_files"]
  assert len(rebuilt) == 1 and f"1 of {n} media files changed (stat): {rel}" in rebuilt[0]
  assert h0.cache.data_dir in rebuilt[0]
  # The record of the last prepare, read by the next one.
  record = cache_lib.read_stamps_record(h1.cache.report["stamps_record"])
  st = os.stat(wav)
  assert record["corpus_dir"] == h1.cache.data_dir and record["verify"] == "stat"
  assert record["stamps"][rel] == [st.st_size, st.st_mtime_ns] and len(record["stamps"]) == n
  assert pipeline.prepare(c).cache.report["built"] is False


def test_jpeg_replaced_in_place_rebuilds_the_cache(tree, tmp_path):
  root, cache = _copy_corpus(tree, tmp_path)
  c = make_config(root, cache)
  h0 = pipeline.prepare(c)
  jpg = h0.index.splits["train"].examples[2].image_path
  _rewrite(jpg, _new_file(tmp_path, "new.jpg", data_fixtures._write_jpeg, 7))  # pylint: disable=protected-access
  h1 = pipeline.prepare(c)
  assert h1.cache.report["built"] is True
  r0, r1 = h0.source("train")[2], h1.source("train")[2]
  assert not np.array_equal(r1["image"], r0["image"])
  np.testing.assert_array_equal(r1["image"], features.load_image(jpg, IMAGE + MARGIN))


def test_stat_verify_rebuilds_on_a_new_mtime_alone(tree, tmp_path):
  root, cache = _copy_corpus(tree, tmp_path)
  c = make_config(root, cache)
  h0 = pipeline.prepare(c)
  wav = h0.index.splits["train"].examples[5].wav_paths[1]
  _rewrite(wav, _read(wav))  # same bytes
  assert pipeline.prepare(c).cache.report["built"] is True


def test_hash_verify_sees_content_not_mtime(tree, tmp_path):
  root, cache = _copy_corpus(tree, tmp_path)
  c = make_config(root, cache, data__cache_verify="hash")
  h0 = pipeline.prepare(c)
  assert h0.cache.report["built"] is True
  wav = h0.index.splits["test"].examples[0].wav_paths[2]
  _rewrite(wav, _read(wav))  # same bytes, new mtime: reused
  assert pipeline.prepare(c).cache.report["built"] is False
  data = bytearray(_read(wav))
  data[-2:] = bytes([data[-2] ^ 0x55, data[-1] ^ 0x55])  # the last sample; same size
  _rewrite(wav, bytes(data))
  h1 = pipeline.prepare(c)
  assert h1.cache.report["built"] is True
  np.testing.assert_array_equal(
      h1.source("test")[0]["mel"], np.concatenate(
          [features.audio_features(w, features.AudioSettings(n_mels=MELS))
           for w in h1.index.splits["test"].examples[0].wav_paths]))


def test_unknown_cache_verify_is_an_error(tmp_path):
  c = make_config(os.path.join(tmp_path, "root"), os.path.join(tmp_path, "cache"),
                  data__cache_verify="sha256")
  with pytest.raises(ValueError, match=r"cache_verify must be one of \('stat', 'hash'\)"):
    pipeline.prepare(c)


# ----------------------------------------------------------------------------- training


def test_train_batches_follow_the_contract(handle, config):
  it = pipeline.train_iterator(handle, config, seed=0)
  batch = next(it)
  spec = dict(image=((4, IMAGE, IMAGE, 3), np.float32), text=((4, TEXT_LEN), np.int32),
              text_mask=((4, TEXT_LEN), np.bool_), audio=((4, FRAMES, MELS), np.float32),
              audio_mask=((4, FRAMES), np.bool_), image_index=((4,), np.int32))
  assert set(batch) == set(spec)
  for k, (shape, dtype) in spec.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k
  tok = handle.tokenizer
  src = handle.source("train")
  rows = _take(it, 3) + [batch]
  for b in rows:
    for j in range(4):
      i = int(b["image_index"][j])
      r = src[i]
      caps = [c.decode() for c in r["captions"]]
      ks = [k for k, c in enumerate(caps)
            if np.array_equal(tok.encode(c, TEXT_LEN)[0], b["text"][j])]
      assert ks, "text is not one of the image's captions"
      k = ks[0]
      assert r["has_audio"][k]  # only captions that have a recording are drawn
      assert b["text_mask"][j].sum() == len(tok.token_ids(caps[k])) + 2
      assert (b["text"][j] != 0).sum() == b["text_mask"][j].sum()
      start = int(np.sum(r["mel_lengths"][:k]))
      clip = r["mel"][start:start + int(r["mel_lengths"][k])].astype(np.float32)
      n = min(len(clip), FRAMES)
      assert b["audio_mask"][j].sum() == n and b["audio_mask"][j][:n].all()
      assert not b["audio"][j][n:].any()
      assert any(np.array_equal(b["audio"][j][:n], clip[s:s + n])
                 for s in range(len(clip) - n + 1))


def test_same_seed_same_batches_and_epochs_cover_the_split(handle, config):
  assert pipeline.steps_per_epoch(handle, config) == 2
  a = _take(pipeline.train_iterator(handle, config, seed=5), 6)
  b = _take(pipeline.train_iterator(handle, config, seed=5), 6)
  c = _take(pipeline.train_iterator(handle, config, seed=6), 6)
  _assert_same(a, b)
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  epochs = [np.concatenate([x["image_index"] for x in a[e * 2:e * 2 + 2]]) for e in range(3)]
  for e in epochs:
    assert sorted(e.tolist()) == list(range(8))
  assert len({tuple(e) for e in epochs}) > 1  # a new order each epoch
  # Augmentation differs between epochs for the same image.
  def by_image(batches):
    return {int(i): x["image"][j] for x in batches for j, i in enumerate(x["image_index"])}
  e0, e1 = by_image(a[:2]), by_image(a[2:4])
  assert any(not np.array_equal(e0[i], e1[i]) for i in range(8))


def test_restored_iterator_yields_the_next_batch(handle, config, tmp_path):
  it = pipeline.train_iterator(handle, config, seed=1)
  _take(it, 3)  # into the second epoch
  state = it.get_state()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(tmp_path, "ckpt"))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 3)

  fresh = pipeline.train_iterator(handle, config, seed=1)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), expected)

  restored = mngr.restore(3, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(pipeline.train_iterator(handle, config,
                                                                      seed=1))))["data"]
  _assert_same(_take(restored, 3), expected)
  mngr.close()


def test_process_shards_are_disjoint_and_cover_each_epoch(handle, config):
  its = [pipeline.train_iterator(handle, config, seed=2, process_index=p, process_count=2)
         for p in range(2)]
  batches = [_take(it, 4) for it in its]  # 2 epochs of 2 local batches of 2
  for p in range(2):
    assert all(b["image"].shape[0] == 2 for b in batches[p])
  for e in range(2):
    shards = [np.concatenate([b["image_index"] for b in batches[p][2 * e:2 * e + 2]])
              for p in range(2)]
    assert len(set(shards[0]) & set(shards[1])) == 0
    assert sorted(np.concatenate(shards).tolist()) == list(range(8))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_iterator(handle, config, seed=2, process_index=0, process_count=3)


def test_worker_process_gives_the_in_process_batches(handle, config):
  expected = _take(pipeline.train_iterator(handle, config, seed=3), 3)
  c = make_config(config.data.root, config.data.cache_dir, data__num_workers=1)
  it = pipeline.train_iterator(handle, c, seed=3)
  got = _take(it, 3)  # copies out of shared memory
  it.close()
  _assert_same(got, expected)


def test_without_audio(tree):
  base, info = tree
  c = make_config(info["root"], os.path.join(base, "cache"), data__use_audio=False)
  h = pipeline.prepare(c)
  assert not h.has_audio
  assert h.num_images["train"] == 8
  b = next(pipeline.train_iterator(h, c, seed=0))
  assert set(b) == {"image", "text", "text_mask", "image_index"}
  ev = pipeline.eval_iterators(h, c, "dev")
  assert ev.num_clips == 0
  with pytest.raises(ValueError, match="no audio"):
    ev.audio()


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("split", ["train", "dev"])
def test_eval_iterators_yield_every_item_once_in_order(handle, config, split):
  ev = pipeline.eval_iterators(handle, config, split)
  examples = handle.index.splits[split].examples
  src = handle.source(split)
  tok = handle.tokenizer
  bs = config.data.eval_batch_size
  assert ev.num_images == len(examples)

  def collect(batches, keys):
    out = {k: [] for k in keys + ("image_index",)}
    n = 0
    for b in batches:
      assert b["valid"].shape == (bs,) and b["image_index"].dtype == np.int32
      v = b["valid"]
      assert v[:v.sum()].all() and (b["image_index"][~v] == -1).all()
      for k in out:
        out[k].append(b[k][v])
        if k != "image_index":
          assert not b[k][~v].any()  # padding rows are empty
      n += 1
    return {k: np.concatenate(x) for k, x in out.items()}, n

  imgs, n = collect(ev.images(), ("image",))
  assert n == -(-len(examples) // bs)
  np.testing.assert_array_equal(imgs["image_index"], np.arange(len(examples)))
  for i in range(len(examples)):
    np.testing.assert_array_equal(imgs["image"][i], features.eval_image(src[i]["image"], IMAGE))

  caps, _ = collect(ev.captions(), ("text", "text_mask"))
  want_ids = [i for i, ex in enumerate(examples) for _ in ex.captions]
  np.testing.assert_array_equal(caps["image_index"], want_ids)
  want = tok.encode_batch([c for ex in examples for c in ex.captions], TEXT_LEN)
  np.testing.assert_array_equal(caps["text"], want[0])
  np.testing.assert_array_equal(caps["text_mask"], want[1])
  assert ev.num_captions == len(want_ids)

  aud, _ = collect(ev.audio(), ("audio", "audio_mask"))
  clips = [(i, w) for i, ex in enumerate(examples) for w in ex.wav_paths if w is not None]
  assert ev.num_clips == len(clips) == len(aud["image_index"])
  np.testing.assert_array_equal(aud["image_index"], [i for i, _ in clips])
  settings = features.AudioSettings(n_mels=MELS)
  for j, (_, wav) in enumerate(clips):
    ref = features.audio_features(wav, settings).astype(np.float32)
    n = min(len(ref), FRAMES)
    assert aud["audio_mask"][j].sum() == n
    np.testing.assert_array_equal(aud["audio"][j][:n], ref[:n])  # eval: the first frames


def test_demo_corpus_is_generated_when_missing(tmp_path):
  c = make_config(os.path.join(tmp_path, "demo"), os.path.join(tmp_path, "cache"))
  c.data.name = "demo"
  c.data.demo_num_images = 4
  c.data.max_lost_fraction = 0.01
  c.train.batch_size = 2
  h = pipeline.prepare(c)
  assert sum(h.num_images.values()) == 4 and h.has_audio
  assert h.cache.report["built"] is True
  assert pipeline.prepare(c).cache.report["built"] is False
  assert next(pipeline.train_iterator(h, c, seed=0))["audio"].shape == (2, FRAMES, MELS)
