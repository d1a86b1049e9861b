"""Demo corpus generator: layout, captions, speech, determinism."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from nlmm_jax.data import demo
from nlmm_jax.data import flickr8k

N = 10


def _hashes(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _cli(out_dir, seed=0):
  subprocess.run([sys.executable, "-m", "nlmm_jax.data.demo", f"--output_dir={out_dir}",
                  f"--num_images={N}", f"--seed={seed}", "--quiet"], check=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  demo.generate(root, num_images=N, seed=0, progress=False)
  return str(root)


def test_layout_accepted_by_index(corpus):
  index = flickr8k.load_index(corpus, max_lost_fraction=0.0)
  assert index.has_audio
  sizes = {s: len(index.splits[s].examples) for s in ("train", "dev", "test")}
  assert sizes == {"train": 8, "dev": 1, "test": 1}
  assert index.report["removed_files"] == []
  assert os.path.isdir(os.path.join(corpus, "Flicker8k_Dataset"))
  assert demo.is_complete(corpus, N, 0) and not demo.is_complete(corpus, N, 1)
  examples = [e for s in index.splits.values() for e in s.examples]
  captions = [c for e in examples for c in e.captions]
  assert all(len(e.captions) == 5 and len(e.wav_paths) == 5 for e in examples)
  assert len(set(captions)) == len(captions) == 5 * N
  for e in examples:
    for k, wav in enumerate(e.wav_paths):
      assert wav.endswith(f"{e.image_id}_{k}.wav")
      info = sf.info(wav)
      assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
      assert 0.8 < info.duration < 4.0
      x, _ = sf.read(wav, dtype="int16")
      assert np.abs(x).max() > 1000  # speech, not silence


def test_speech_differs_per_caption(corpus):
  index = flickr8k.load_index(corpus)
  wavs = [w for e in index.splits["train"].examples[:2] for w in e.wav_paths]
  with_hashes = {hashlib.sha256(open(w, "rb").read()).hexdigest() for w in wavs}
  assert len(with_hashes) == len(wavs)


def test_captions_state_the_whole_key():
  keys = demo.all_keys()
  assert len(keys) >= 1000 and len(set(keys)) == len(keys)
  rng = np.random.default_rng(0)
  seen = set()
  for key in keys:
    size, colour, shape, pos, bg = key
    caps = demo.captions_for(key, rng)
    assert len(set(caps)) == 5
    for c in caps:
      words = c.replace(",", "").split()
      assert colour in words and shape in words
      assert any(w in words for w in demo.SIZES[size])
      assert any(p in c for p in demo.POSITIONS[pos][1])
      assert any(w in words for w in demo.BACKGROUNDS[bg])
    assert not seen & set(caps)
    seen.update(caps)


def test_same_seed_byte_identical_in_fresh_processes(tmp_path, corpus):
  _cli(tmp_path / "a")
  _cli(tmp_path / "b")
  a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
  assert len(a) == 1 + 4 + 2 + 6 * N  # marker, token + 3 split files, 2 FACC lists, media
  assert a == b
  # generate() in this process (speech in a fresh subprocess) gives the same bytes.
  assert _hashes(corpus) == a
  _cli(tmp_path / "c", seed=1)
  c = _hashes(tmp_path / "c")
  assert sum(a[k] != c[k] for k in a) > N


def test_corpus_independent_of_core_count(tmp_path, corpus, monkeypatch):
  """Speech shards are fixed: one process at a time gives the bytes of several."""
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  demo.generate(tmp_path / "one", num_images=N, seed=0, progress=False)
  assert _hashes(tmp_path / "one") == _hashes(corpus)


def test_regenerate_and_refuse(tmp_path):
  out = tmp_path / "d"
  out.mkdir()
  (out / "mine.txt").write_text("user data")
  with pytest.raises(ValueError, match="refusing"):
    demo.generate(out, num_images=N, progress=False)
  os.remove(out / "mine.txt")
  demo.generate(out, num_images=4, progress=False)
  demo.generate(out, num_images=3, progress=False)  # over its own corpus: replaced
  assert len(os.listdir(out / "Flicker8k_Dataset")) == 3
  assert demo.is_complete(out, 3, 0)
  with pytest.raises(ValueError, match="num_images"):
    demo.generate(tmp_path / "e", num_images=len(demo.all_keys()) + 1, progress=False)
