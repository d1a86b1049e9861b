"""Image/audio features and the tokenizer: known tones, masks, bad files, train-only vocab."""

import os

import librosa
import numpy as np
from PIL import Image
import pytest
import soundfile as sf

from nlmm_jax.data import features
from nlmm_jax.data import tokenizer as tokenizer_lib

import data_fixtures  # pylint: disable=g-bad-import-order


def _tone(path, freq, sr, seconds=0.5, amp=0.3):
  t = np.arange(int(sr * seconds)) / sr
  sf.write(path, (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr,
           subtype="PCM_16")


# ----------------------------------------------------------------------------- audio


@pytest.mark.parametrize("file_rate", [16000, 22050])
@pytest.mark.parametrize("n_mels,bin_", [(80, 37), (40, 11)])
def test_tone_energy_lands_in_its_mel_bin(tmp_path, file_rate, n_mels, bin_):
  settings = features.AudioSettings(n_mels=n_mels)
  # Filter i of librosa's mel bank peaks at the (i+1)-th of n_mels + 2 mel-spaced edges.
  centres = librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=settings.fmax)[1:-1]
  freq = float(centres[bin_])
  path = os.path.join(tmp_path, "tone.wav")
  _tone(path, freq, file_rate)
  mel = features.audio_features(path, settings)
  assert mel.dtype == np.float16 and mel.shape[1] == n_mels
  # 0.5 s at a 10 ms hop (centred frames): 51 frames, whatever the file's rate.
  assert mel.shape[0] == 1 + int(0.5 * settings.sample_rate) // settings.hop_length
  profile = mel.astype(np.float32).mean(0)
  assert int(np.argmax(profile)) == bin_
  # Per-utterance normalisation.
  m32 = mel.astype(np.float32)
  assert abs(m32.mean()) < 1e-2 and abs(m32.std() - 1) < 1e-2


def test_resampling_only_when_the_rate_differs(tmp_path, monkeypatch):
  calls = []
  real = librosa.resample
  monkeypatch.setattr(librosa, "resample", lambda *a, **k: calls.append(k) or real(*a, **k))
  for rate in (16000, 8000):
    _tone(os.path.join(tmp_path, f"t{rate}.wav"), 440.0, rate, seconds=0.25)
  w16 = features.load_audio(os.path.join(tmp_path, "t16000.wav"))
  assert not calls and w16.shape == (4000,)
  w8 = features.load_audio(os.path.join(tmp_path, "t8000.wav"))
  assert len(calls) == 1 and calls[0]["orig_sr"] == 8000 and w8.shape == (4000,)


def test_stereo_is_mixed_to_mono(tmp_path):
  path = os.path.join(tmp_path, "st.wav")
  x = np.stack([np.full(1600, 0.5), np.full(1600, -0.1)], 1).astype(np.float32)
  sf.write(path, x, 16000, subtype="FLOAT")
  np.testing.assert_allclose(features.load_audio(path), 0.2, atol=1e-6)


def test_crop_or_pad_masks_match_true_lengths():
  rng = np.random.default_rng(0)
  mel = rng.standard_normal((30, 4)).astype(np.float16)
  for t in (1, 7, 20, 30):
    out, mask = features.crop_or_pad_frames(mel[:t], 20)
    n = min(t, 20)
    assert out.shape == (20, 4) and out.dtype == np.float32 and mask.dtype == bool
    assert mask.sum() == n and mask[:n].all()
    np.testing.assert_array_equal(out[:n], mel[:n].astype(np.float32))  # eval: first frames
    assert not out[n:].any()
  # Train: a random window of the longer clip, covering different starts.
  starts = set()
  for seed in range(30):
    out, mask = features.crop_or_pad_frames(mel, 20, np.random.default_rng(seed))
    assert mask.all()
    s = [s for s in range(11) if np.array_equal(out, mel[s:s + 20].astype(np.float32))]
    assert len(s) == 1
    starts.add(s[0])
  assert len(starts) > 3


def test_unreadable_audio_raises_never_zeros(tmp_path):
  rng = np.random.default_rng(0)
  good = os.path.join(tmp_path, "good.wav")
  data_fixtures._write_wav(good, rng)  # pylint: disable=protected-access
  assert features.audio_features(good, features.AudioSettings(n_mels=16)).shape[1] == 16
  truncated = os.path.join(tmp_path, "trunc.wav")
  data_fixtures._write_wav(truncated, rng)  # pylint: disable=protected-access
  data_fixtures._truncate(truncated, 0.6)  # pylint: disable=protected-access
  garbage = os.path.join(tmp_path, "garbage.wav")
  with open(garbage, "wb") as f:
    f.write(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
  text = os.path.join(tmp_path, "text.wav")
  with open(text, "w") as f:
    f.write("not audio")
  empty = os.path.join(tmp_path, "empty.wav")
  sf.write(empty, np.zeros((0,), np.float32), 16000)
  for path in (truncated, garbage, text, empty, os.path.join(tmp_path, "absent.wav")):
    with pytest.raises(features.FeatureError, match=os.path.basename(path)):
      features.audio_features(path, features.AudioSettings(n_mels=16))


# ----------------------------------------------------------------------------- images


def test_image_store_crop_flip_and_normalise(tmp_path):
  rng = np.random.default_rng(0)
  path = os.path.join(tmp_path, "im.png")
  pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  stored = features.load_image(path, 20)
  assert stored.shape == (20, 20, 3) and stored.dtype == np.uint8
  # Shorter side -> 20 (30x50 -> 20x33), centre crop of the width.
  ref = np.asarray(Image.fromarray(pixels).resize((33, 20), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(stored, ref[:, 6:26])
  ev = features.eval_image(stored, 16)
  assert ev.shape == (16, 16, 3) and ev.dtype == np.float32
  np.testing.assert_allclose(ev, (stored[2:18, 2:18] / 255.0 - features.IMAGENET_MEAN)
                             / features.IMAGENET_STD, rtol=1e-5, atol=1e-5)
  # Train crops: deterministic per seed, every one is a (possibly flipped) 16x16 window.
  a = features.train_image(stored, 16, np.random.default_rng(3))
  np.testing.assert_array_equal(a, features.train_image(stored, 16, np.random.default_rng(3)))
  seen = set()
  for seed in range(40):
    x = features.train_image(stored, 16, np.random.default_rng(seed))
    hit = [(t, l, f) for t in range(5) for l in range(5) for f in (0, 1)
           if np.allclose(x, features.normalize_image(
               stored[t:t + 16, l:l + 16][:, ::-1] if f else stored[t:t + 16, l:l + 16]))]
    assert hit
    seen.update(hit)
  assert {f for _, _, f in seen} == {0, 1} and len({(t, l) for t, l, _ in seen}) > 4


def test_unreadable_image_raises(tmp_path):
  rng = np.random.default_rng(0)
  path = os.path.join(tmp_path, "cut.jpg")
  data_fixtures._write_jpeg(path, rng)  # pylint: disable=protected-access
  assert features.load_image(path, 16).shape == (16, 16, 3)
  data_fixtures._truncate_jpeg(path)  # pylint: disable=protected-access
  text = os.path.join(tmp_path, "text.jpg")
  with open(text, "w") as f:
    f.write("not an image")
  for p in (path, text, os.path.join(tmp_path, "absent.jpg")):
    with pytest.raises(features.FeatureError, match=os.path.basename(p)):
      features.load_image(p, 16)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_ids_and_masks(tmp_path):
  train = ["A dog runs.", "a dog sits", "The cat, the dog!", "zebra yak"]
  tok = tokenizer_lib.Tokenizer.fit(train, vocab_size=4 + 5)
  # counts: dog 3, a 2, the 2, then ties at 1 broken alphabetically: ! , . cat runs ...
  assert tok.words == ("dog", "a", "the", "!", ",")
  assert tok.vocab_size == 9
  assert tokenizer_lib.split_words("The cat's toy, OK?") == [
      "the", "cat", "'", "s", "toy", ",", "ok", "?"]
  ids, mask = tok.encode("The dog saw a zebra!", 10)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (10,)
  w = {x: i + 4 for i, x in enumerate(tok.words)}
  expected = [tokenizer_lib.BOS, w["the"], w["dog"], tokenizer_lib.UNK, w["a"],
              tokenizer_lib.UNK, w["!"], tokenizer_lib.EOS]
  np.testing.assert_array_equal(ids[:8], expected)
  assert not ids[8:].any() and mask.sum() == 8 and mask[:8].all()
  # Truncation keeps BOS ... EOS.
  ids, mask = tok.encode("dog " * 20, 6)
  np.testing.assert_array_equal(ids, [2, 4, 4, 4, 4, 3])
  assert mask.all()
  # Deterministic (order of captions does not matter), and a JSON round trip.
  assert tokenizer_lib.Tokenizer.fit(train[::-1], 9) == tok
  path = os.path.join(tmp_path, "tok.json")
  tok.save(path)
  again = tokenizer_lib.Tokenizer.load(path)
  assert again == tok
  np.testing.assert_array_equal(again.encode("the dog", 5)[0], tok.encode("the dog", 5)[0])
