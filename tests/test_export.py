"""`python -m nlmm_jax.export`: serialized embed functions that run with jax + numpy only."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nlmm_jax
from nlmm_jax import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (batch size, length) pairs: two batch sizes and two lengths of each modality through one
# exported function with symbolic batch and length (each pair compiles once on each side,
# ~3 s on a busy 2-core machine, hence not all four). 6 tokens and 20 frames are lengths
# no export-time shape named; 16 and 48 are max_text_len and max_frames.
TEXT_CASES = ((2, 6), (3, 16))
AUDIO_CASES = ((2, 20), (3, 48))
IMAGE_BATCHES = (2, 3)
CAPTIONS = ["A dog's ball.", "a small red circle at the top", "zzz unknown words here " * 3]

# Runs in a fresh interpreter that cannot import flax or the model code: the loader and
# the exported functions must need jax + numpy only.
LOADER = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = ("flax", "nlmm_jax.models", "nlmm_jax.api", "nlmm_jax.data", "orbax", "optax",
               "ml_collections")
    class Blocker(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
          raise ImportError(f"blocked import: {name}")
        return None
    sys.meta_path.insert(0, Blocker())
    import numpy as np
    from nlmm_jax import export
    folder, inputs, outputs = sys.argv[1:4]
    m = export.load(folder)
    x = np.load(inputs)
    out = {}
    for key in x.files:
      modality, _, tag = key.partition(":")
      if modality == "text_ids":
        out["text:" + tag] = m.embed_text(x[key], x["text_mask:" + tag])
      elif modality == "image":
        out["image:" + tag] = m.embed_image(x[key])
      elif modality == "audio":
        out["audio:" + tag] = m.embed_audio(x[key], x["audio_mask:" + tag])
    ids, mask = m.encode_text(json.loads(sys.argv[4]))
    out["encoded_ids"], out["encoded_mask"] = ids, mask
    np.savez(outputs, **out)
    loaded = sorted(k for k in sys.modules if k.startswith("nlmm_jax"))
    assert loaded == ["nlmm_jax", "nlmm_jax.export"], loaded
    print("settings", json.dumps(m.settings))
""")


@pytest.fixture(scope="module")
def exported(tiny_trained, tmp_path_factory):
  workdir, _ = tiny_trained
  out = tmp_path_factory.mktemp("export") / "model"
  assert export.main([f"--workdir={workdir}", "--output", str(out), "--step", "latest"]) == 0
  return out, nlmm_jax.load(str(workdir), step="latest")


def _inputs(model, rng):
  """Random inputs (prefix masks of varied length) for each modality, batch and length."""
  m = model.config.model
  x = {}
  for b, length in TEXT_CASES:
    real = rng.integers(1, length + 1, size=b)
    real[0] = length
    mask = np.arange(length)[None] < real[:, None]
    x[f"text_ids:{b}x{length}"] = np.where(
        mask, rng.integers(1, m.vocab_size, size=(b, length)), 0).astype(np.int32)
    x[f"text_mask:{b}x{length}"] = mask
  for b in IMAGE_BATCHES:
    x[f"image:{b}"] = rng.normal(size=(b, m.image_size, m.image_size, 3)).astype(np.float32)
  for b, frames in AUDIO_CASES:
    real = rng.integers(1, frames + 1, size=b)
    real[0] = frames
    mask = np.arange(frames)[None] < real[:, None]
    mel = rng.normal(size=(b, frames, m.n_mels)).astype(np.float32)
    x[f"audio:{b}x{frames}"] = np.where(mask[..., None], mel, 0.0).astype(np.float32)
    x[f"audio_mask:{b}x{frames}"] = mask
  return x


def test_export_reproduces_the_model_without_project_code(exported, tmp_path):
  folder, model = exported
  x = _inputs(model, np.random.default_rng(0))
  np.savez(tmp_path / "in.npz", **x)
  # XLA's backend optimisation level 0 compiles ~40% faster; the results stay within 1e-5.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  r = subprocess.run([sys.executable, "-c", LOADER, str(folder), str(tmp_path / "in.npz"),
                      str(tmp_path / "out.npz"), json.dumps(CAPTIONS)],
                     capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = dict(np.load(tmp_path / "out.npz"))
  # The reference: the module on the same arrays at their own length (Model._embed jits
  # module.apply(..., method=NLMM.embed)) in the form the model trained with (chunked).
  ref = lambda inputs, modality: np.asarray(model._embed(model.params, inputs, modality))
  checked = 0
  for key, value in got.items():
    modality, _, tag = key.partition(":")
    if modality == "text":
      want = ref({"text": x["text_ids:" + tag], "text_mask": x["text_mask:" + tag]}, "text")
    elif modality == "image":
      want = ref({"image": x["image:" + tag]}, "image")
    elif modality == "audio":
      want = ref({"audio": x["audio:" + tag], "audio_mask": x["audio_mask:" + tag]}, "audio")
    else:
      continue
    assert value.shape == want.shape, (key, value.shape, want.shape)
    np.testing.assert_allclose(value, want, atol=1e-5, err_msg=key)
    checked += 1
  assert checked == len(TEXT_CASES) + len(IMAGE_BATCHES) + len(AUDIO_CASES)
  # The loader's tokenizer is the training's.
  rows = model.text_inputs(CAPTIONS)
  np.testing.assert_array_equal(got["encoded_ids"], np.stack([r["text"] for r in rows]))
  np.testing.assert_array_equal(got["encoded_mask"], np.stack([r["text_mask"] for r in rows]))


def test_folder_contents_and_settings(exported):
  folder, model = exported
  m, d = model.config.model, model.config.data
  manifest = json.loads((folder / "manifest.json").read_text())
  settings = json.loads((folder / "settings.json").read_text())
  assert model.config.model.memory.form == "chunked"
  from jax import export as jax_export
  for modality in ("text", "image", "audio"):
    f = jax_export.deserialize(bytearray((folder / manifest[modality]["file"]).read_bytes()))
    shapes = [str(a.shape) for a in f.in_avals[-(1 if modality == "image" else 2):]]
    assert all("b" in sh for sh in shapes), (modality, shapes)   # symbolic batch
    if modality != "image":                                       # and symbolic length
      assert all(("L" if modality == "text" else "F") in sh for sh in shapes), shapes
  assert manifest["text"]["max_length"] == m.max_text_len
  assert manifest["audio"]["max_length"] == m.max_frames
  assert settings["image_size"] == m.image_size
  assert settings["stored_size"] == m.image_size + d.crop_margin
  assert (settings["sample_rate"], settings["n_fft"], settings["hop_length"],
          settings["n_mels"]) == (d.sample_rate, d.n_fft, d.hop_length, m.n_mels)
  assert (settings["max_text_len"], settings["max_frames"]) == (m.max_text_len, m.max_frames)
  tok = json.loads((folder / "tokenizer.json").read_text())
  assert tok["words"] == list(model.tokenizer.words)
  readme = (folder / "README.txt").read_text()
  assert "jax.export.deserialize" in readme and "export.load" in readme


def test_loader_rejects_bad_inputs(exported):
  folder, model = exported
  loaded = export.load(str(folder))
  m = model.config.model
  too_long = np.ones((1, m.max_text_len + 2), np.int32)
  with pytest.raises(ValueError, match="beyond"):
    loaded.embed_text(too_long, too_long > 0)
  with pytest.raises(ValueError, match="embed_image needs"):
    loaded.embed_image(np.zeros((1, m.image_size + 1, m.image_size, 3), np.float32))
  assert loaded.embed_text(np.zeros((0, 4), np.int32)).shape == (0, m.embed_dim)
  # Masked-out positions past the table are dropped; the embedding does not change.
  ids = np.zeros((1, m.max_text_len + 3), np.int32)
  ids[0, :5] = [2, 7, 8, 9, 3]
  np.testing.assert_allclose(loaded.embed_text(ids), loaded.embed_text(ids[:, :5]), atol=1e-6)
  # A folder of the old per-length-bucket format is refused with what to do.
  old = json.loads((folder / "manifest.json").read_text())
  stale = folder.parent / "stale"
  shutil.copytree(folder, stale)
  (stale / "manifest.json").write_text(json.dumps({**old, "format": "nlmm-jax-export/1"}))
  with pytest.raises(export.ExportError, match="export the checkpoint again"):
    export.load(str(stale))
  with pytest.raises(FileNotFoundError):
    export.load(str(folder / "nope"))


def test_cli_errors(exported, tmp_path, capsys):
  folder, _ = exported
  # A missing workdir fails before jax is imported: one line on stderr, exit status 1.
  r = subprocess.run([sys.executable, "-m", "nlmm_jax.export", "--workdir",
                      str(tmp_path / "missing"), "--output", str(tmp_path / "out")],
                     capture_output=True, text=True, cwd=REPO, timeout=120,
                     env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 1
  assert r.stderr.strip().count("\n") == 0, r.stderr
  assert "does not exist" in r.stderr and not os.path.exists(tmp_path / "out")
  # A folder without checkpoints, and an existing non-empty output.
  (tmp_path / "empty").mkdir()
  assert export.main(["--workdir", str(tmp_path / "empty"), "--output",
                      str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("nlmm_jax.export: error:") and err.count("\n") == 1, err
  assert export.main(["--workdir", str(tmp_path / "empty"), "--output", str(folder)]) == 1
  assert "--overwrite" in capsys.readouterr().err
