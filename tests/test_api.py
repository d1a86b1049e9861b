"""Python API: load a trained checkpoint, embed each modality, rank; the README snippet."""

import json
import os
import re
import shutil

import numpy as np
import pytest

import nlmm_jax
from nlmm_jax import api
from nlmm_jax.data import features
from nlmm_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def loaded(tiny_trained):
  workdir, config = tiny_trained
  return nlmm_jax.load(str(workdir), step="latest"), config


def _eval_embeddings(model, config, split="test"):
  """What the training job's evaluation embeds for a split (the reference)."""
  handle = pipeline.prepare(config)
  it = pipeline.eval_iterators(handle, config, split)
  out = {}
  for modality, batches, keys in (("image", it.images, ("image",)),
                                  ("text", it.captions, ("text", "text_mask")),
                                  ("audio", it.audio, ("audio", "audio_mask"))):
    parts = []
    for b in batches():
      e = np.asarray(model._embed(model.params, {k: b[k] for k in keys}, modality))
      parts.append(e[b["valid"]])
    out[modality] = np.concatenate(parts)
  return handle, out


def test_embeddings_equal_the_evaluation_pipeline(loaded):
  model, config = loaded
  handle, ref = _eval_embeddings(model, config)
  examples = handle.index.splits["test"].examples
  images = model.embed_images([ex.image_path for ex in examples])
  np.testing.assert_allclose(images, ref["image"], atol=2e-6)
  texts = model.embed_text([c for ex in examples for c in ex.captions])
  np.testing.assert_allclose(texts, ref["text"], atol=2e-6)
  wavs = [w for ex in examples for w in ex.wav_paths if w is not None]
  np.testing.assert_allclose(model.embed_audio(wavs), ref["audio"], atol=2e-6)
  # Arrays instead of files: a decoded JPEG and a waveform at another rate.
  from PIL import Image
  array = np.asarray(Image.open(examples[0].image_path))
  np.testing.assert_allclose(model.embed_images([array])[0], ref["image"][0], atol=2e-6)
  wave = features.load_audio(wavs[0], 16000)
  np.testing.assert_allclose(model.embed_audio([(wave, 16000)])[0], ref["audio"][0],
                             atol=2e-6)
  import librosa
  at_22k = librosa.resample(wave, orig_sr=16000, target_sr=22050)
  close = model.embed_audio([(at_22k, 22050)])[0] @ ref["audio"][0]
  assert close > 0.99, close


def test_an_embedding_does_not_depend_on_the_other_items(loaded):
  model, _ = loaded
  model_small = api.Model(model.config, model.params, model.tokenizer, model.step,
                          model.path, batch_size=3)
  captions = ["a red circle", "a large blue square at the bottom left", "x", "a tree"] * 2
  together = model_small.embed_text(captions)                  # three batches
  alone = np.concatenate([model.embed_text([c]) for c in captions[:4]])
  np.testing.assert_allclose(together[:4], alone, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)


def test_rank_returns_top_k_by_cosine():
  rng = np.random.default_rng(0)
  q, g = rng.normal(size=(3, 8)), rng.normal(size=(10, 8))
  idx, scores = api.Model.rank(q, g, k=4)
  sim = q @ g.T
  np.testing.assert_array_equal(idx, np.argsort(-sim, axis=1)[:, :4])
  np.testing.assert_allclose(scores, np.sort(sim, axis=1)[:, ::-1][:, :4], rtol=1e-6)
  assert api.Model.rank(q, g, k=50)[0].shape == (3, 10)
  g[2, 0] = np.nan
  with pytest.raises(FloatingPointError):
    api.Model.rank(q, g)
  with pytest.raises(ValueError, match="Q, E"):
    api.Model.rank(q, g[:, :4])


def test_steps_and_paths(tiny_trained):
  workdir, _ = tiny_trained
  assert nlmm_jax.load(str(workdir), step="latest").step == 4
  assert nlmm_jax.load(str(workdir), step=2).step == 2
  best = json.load(open(workdir / "eval_test.json"))["best_step"]
  assert nlmm_jax.load(str(workdir)).step == best
  assert nlmm_jax.load(str(workdir / "checkpoints" / "2")).step == 2
  assert nlmm_jax.load(str(workdir / "checkpoints"), step="latest").step == 4
  with pytest.raises(FileNotFoundError, match=r"step 3 .*steps there: \[2, 4\]"):
    nlmm_jax.load(str(workdir), step=3)
  with pytest.raises(ValueError, match="'best', 'latest' or a step number"):
    nlmm_jax.load(str(workdir), step="newest")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    nlmm_jax.load(str(workdir / "nowhere"))


def test_damaged_or_foreign_checkpoints_fail_with_a_reason(tiny_trained, tmp_path):
  workdir, _ = tiny_trained
  bad = tmp_path / "damaged"
  shutil.copytree(workdir / "checkpoints" / "4", bad / "checkpoints" / "4")
  shutil.rmtree(bad / "checkpoints" / "4" / "state" / "d")   # the array data
  with pytest.raises(ValueError, match="cannot read the checkpoint"):
    nlmm_jax.load(str(bad), step="latest")
  foreign = tmp_path / "foreign"
  shutil.copytree(workdir / "checkpoints" / "4", foreign / "checkpoints" / "4")
  meta = foreign / "checkpoints" / "4" / "config" / "metadata"
  saved = json.load(open(meta))
  saved["model"]["memory"]["hope"] = True                     # a key this version lacks
  saved["model"]["width"] = "wide"                            # a mistyped value
  json.dump(saved, open(meta, "w"))
  with pytest.raises(ValueError, match=r"model\.memory\.hope.*model\.width"):
    nlmm_jax.load(str(foreign), step="latest")


def test_readme_snippet_runs_as_written(tiny_trained, tiny_corpus, tmp_path, monkeypatch,
                                        capsys):
  workdir, _ = tiny_trained
  readme = open(os.path.join(REPO, "README.md")).read()
  section = readme.split("## Using a trained model", 1)[1]
  snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  os.makedirs(tmp_path / "runs")
  os.makedirs(tmp_path / "data")
  os.symlink(workdir, tmp_path / "runs" / "demo")
  os.symlink(tiny_corpus / "corpus", tmp_path / "data" / "demo_corpus")
  monkeypatch.chdir(tmp_path)
  exec(compile(snippet, "README.md", "exec"), {})            # pylint: disable=exec-used
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 6 and all(".jpg" in line for line in out[:5]), out


def test_loads_on_another_device_count(tiny_trained):
  """Saved from a 2-device mesh, loaded in a 1-device process (a GPU run on a laptop)."""
  import subprocess
  import sys
  workdir, _ = tiny_trained
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=2", "")
  code = ("import jax, nlmm_jax; assert jax.device_count() == 1; "
          f"m = nlmm_jax.load({str(workdir)!r}, step='latest'); "
          "print(m.step, m.embed_text(['a red circle']).shape)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split()[:1] == ["4"]
