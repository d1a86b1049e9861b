"""`python -m nlmm_jax.retrieve`: gallery cache, ranking, printing, the grid, bad input.

main() runs in-process; loaded models are shared between the calls of this module (one per
step) so that each modality compiles once.
"""

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from nlmm_jax import retrieve
from nlmm_jax.data import flickr8k

LINE = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d{4})\s+(.*?)(  \[correct\])?$")
GREEN = np.array([0x18, 0xA4, 0x18])


@pytest.fixture(scope="module")
def env(tiny_trained, tmp_path_factory):
  """(workdir, config, index, load): a fresh workdir sharing the tiny checkpoints."""
  src, config = tiny_trained
  workdir = tmp_path_factory.mktemp("retrieve_run")
  os.symlink(src / "checkpoints", workdir / "checkpoints")
  models = {}

  def load(path, step):
    if step not in models:
      models[step] = real_load(path, step)
    return models[step]

  real_load = retrieve.load_model
  mp = pytest.MonkeyPatch()
  mp.setattr(retrieve, "load_model", load)
  index = flickr8k.load_index(config.data.root)
  yield str(workdir), config, index, load
  mp.undo()


def _run(env, capsys, *argv):
  workdir = env[0]
  rc = retrieve.main(["--workdir", workdir, "--step", "latest", *argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _results(out):
  return [LINE.match(line).groups() for line in out.splitlines() if LINE.match(line)]


def _green_pixels(path):
  a = np.asarray(Image.open(path).convert("RGB")).astype(int)
  return int((np.abs(a - GREEN).sum(-1) < 30).sum())


def test_text_query_prints_model_rank_and_draws_a_grid(env, capsys, tmp_path):
  workdir, _, index, load = env
  png = tmp_path / "grid.png"
  query = "a small red circle at the top"
  rc, out, err = _run(env, capsys, "--text", query, "--split", "train", "--k", "5",
                      "--output", str(png))
  assert rc == 0, err
  assert "not from the train split" in out
  rows = _results(out)
  assert len(rows) == 5 and not any(r[3] for r in rows)
  model = load(workdir, "latest")
  paths = [ex.image_path for ex in index.splits["train"].examples]
  idx, scores = model.rank(model.embed_text([query]), model.embed_images(paths), k=5)
  assert [r[2] for r in rows] == [paths[i] for i in idx[0]]
  np.testing.assert_allclose([float(r[1]) for r in rows], scores[0], atol=6e-5)
  assert png.stat().st_size > 20_000
  with Image.open(png) as im:
    assert im.width > 600 and im.height > 200
  assert _green_pixels(png) == 0                       # nothing is marked correct


def test_gallery_cache_is_reused_and_rebuilt(env, capsys, tmp_path):
  workdir, config, index, load = env
  args = ("--text", "a tree", "--split", "dev", "--output", "")
  rc, _, err = _run(env, capsys, *args)
  assert rc == 0 and "gallery: built 2 dev images (step 4)" in err, err
  cached = os.path.join(workdir, "retrieval_cache", "dev-image-step4.npz")
  assert os.path.isfile(cached)
  rc, _, err = _run(env, capsys, *args)
  assert rc == 0 and "gallery: reused 2 dev images (step 4)" in err, err
  # The cached embeddings are the model's.
  model = load(workdir, "latest")
  items = retrieve.gallery_items(index.splits["dev"].examples, "image")
  emb, reused, _ = retrieve.load_or_build_gallery(model, workdir, "dev", "image", items,
                                                  config.data.root)
  assert reused
  np.testing.assert_allclose(emb, model.embed_images([it["path"] for it in items]),
                             atol=1e-6)
  # Another checkpoint step, another split: built again.
  rc, _, err = _run(env, capsys, *args[:-4], "--step", "2", "--split", "dev", "--output", "")
  assert rc == 0 and "gallery: built 2 dev images (step 2)" in err, err
  rc, _, err = _run(env, capsys, "--text", "a tree", "--split", "test", "--output", "")
  assert rc == 0 and "gallery: built 2 test images (step 4)" in err, err
  # A damaged cache file is rebuilt, not trusted.
  with open(cached, "wb") as f:
    f.write(b"not an npz")
  rc, _, err = _run(env, capsys, *args)
  assert rc == 0 and "gallery: built" in err, err
  # The corpus moved: --data_root, and the key (paths, root) changes.
  moved = tmp_path / "moved"
  shutil.copytree(config.data.root, moved)
  rc, out, err = _run(env, capsys, *args, "--data_root", str(moved))
  assert rc == 0 and "gallery: built" in err, err
  assert all(r[2].startswith(str(moved)) for r in _results(out))


def test_cache_key_parts(env, tmp_path):
  f = tmp_path / "a.jpg"
  f.write_bytes(b"x")
  items = [dict(image_index=0, path=str(f))]
  before = retrieve.items_digest(items)
  os.utime(f, ns=(1, 1))                               # replaced in place: new mtime
  assert retrieve.items_digest(items) != before
  key = retrieve.cache_key(4, "p", "test", "image", "h", "/data")
  assert key != retrieve.cache_key(2, "p", "test", "image", "h", "/data")
  assert key != retrieve.cache_key(4, "q", "test", "image", "h", "/data")
  assert key != retrieve.cache_key(4, "p", "test", "image", "h", "/elsewhere")
  assert key != retrieve.cache_key(4, "p", "dev", "image", "h", "/data")
  assert retrieve.cache_path("w", "dev", "text", 2) == os.path.join(
      "w", "retrieval_cache", "dev-text-step2.npz")


def test_a_corpus_caption_marks_its_image(env, capsys, tmp_path):
  _, _, index, _ = env
  examples = index.splits["train"].examples
  target = examples[3]
  png = tmp_path / "marked.png"
  # All 16 train images: the caption's own image is among them exactly once.
  rc, out, err = _run(env, capsys, "--text", "  " + target.captions[1].upper(), "--split",
                      "train", "--k", "16", "--output", str(png))
  assert rc == 0, err
  assert f"from the train split (image {target.image_id})" in out
  rows = _results(out)
  assert len(rows) == 16
  assert [r[2] for r in rows if r[3]] == [target.image_path]
  assert _green_pixels(png) > 500                      # its green frame


def test_audio_queries(env, capsys, tmp_path):
  _, _, index, _ = env
  examples = index.splits["train"].examples
  wav = examples[5].wav_paths[2]
  png = tmp_path / "audio.png"
  rc, out, err = _run(env, capsys, "--audio", wav, "--split", "train", "--k", "16",
                      "--output", str(png))
  assert rc == 0, err
  rows = _results(out)
  assert [r[2] for r in rows if r[3]] == [examples[5].image_path]
  assert png.stat().st_size > 20_000 and _green_pixels(png) > 500
  # Same modality: the recording itself is left out, the other four of its image count.
  rc, out, err = _run(env, capsys, "--audio", wav, "--target", "audio", "--split", "train",
                      "--k", "79", "--output", str(tmp_path / "a2a.png"))
  assert rc == 0, err
  assert "1 identical to the query left out" in out
  rows = _results(out)
  assert len(rows) == 79 and not any(r[2].startswith(wav + " ") for r in rows)
  assert sorted(r[2].split()[0] for r in rows if r[3]) == sorted(
      w for w in examples[5].wav_paths if w != wav)


def test_image_queries(env, capsys, tmp_path):
  _, _, index, _ = env
  ex = index.splits["train"].examples[7]
  png = tmp_path / "image.png"
  rc, out, err = _run(env, capsys, "--image", ex.image_path, "--split", "train", "--k",
                      "80", "--output", "")
  assert rc == 0, err
  rows = _results(out)
  assert len(rows) == 80                               # default target: captions
  assert sorted(r[2] for r in rows if r[3]) == sorted(
      f"{c!r} (image {ex.image_id})" for c in ex.captions)
  rc, out, err = _run(env, capsys, "--image", ex.image_path, "--split", "test", "--k", "3",
                      "--output", str(png))
  assert rc == 0 and "not from the test split" in out, err
  assert png.stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["--text", "x", "--audio", "y.wav"], "not allowed with argument --text"),
    (["--text", "x", "--split", "val"], "invalid choice: 'val'"),
    (["--image", "/no/such.jpg"], "no such file"),
    (["--audio", "/no/such.wav"], "no such file"),
    (["--text", " "], "--text is empty"),
    (["--text", "x", "--k", "0"], "--k must be at least 1"),
    (["--text", "x", "--step", "soon"], "--step must be"),
    (["--text", "x", "--step", "3"], "no checkpoint of step 3"),
    (["--text", "x", "--data_root", "/no/corpus"], "the corpus from --data_root"),
    (["--text", "x", "--target", "video"], "invalid choice: 'video'"),
    ([], "one of the arguments --text --audio --image is required"),
    (["--image", "BROKEN"], "cannot decode image"),
])
def test_bad_input_is_one_line_and_status_1(env, capsys, tmp_path, argv, message):
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"not a jpeg")
  argv = [str(broken) if a == "BROKEN" else a for a in argv]
  rc, out, err = _run(env, capsys, *argv)
  assert rc == 1
  lines = err.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], err
  assert "Traceback" not in err and "Traceback" not in out
  assert retrieve.main(["--workdir", str(tmp_path / "none"), "--text", "x"]) == 1
  assert "does not exist" in capsys.readouterr().err
