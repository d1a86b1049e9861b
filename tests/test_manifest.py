"""Manifest corpora (data.name="manifest"): the reader, make_manifest.py, training, README.

The reference for the reader is the Flickr8k index of the same fake root
(tests/data_fixtures.py): a root converted by scripts/make_manifest.py must index to the
same items, captions, splits and recordings.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nlmm_jax import config_lib
from nlmm_jax.data import corpus
from nlmm_jax.data import flickr8k
from nlmm_jax.data import manifest

import data_fixtures  # pylint: disable=g-bad-import-order
from script_loader import load_script  # pylint: disable=g-bad-import-order
from tiny_run import TINY_OVERRIDES, tiny_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
make_manifest = load_script("make_manifest")
IT_KEYS = {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
AUDIO_KEYS = {f"{d}_R@{k}" for d in ("i2a", "a2i", "t2a", "a2t") for k in (1, 5, 10)}


def _convert(root, output, *flags):
  assert make_manifest.main(["--root", str(root), "--output", str(output), *flags]) == 0


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return str(path)


def _line(image, split="train", n=2, audio=None, **extra):
  item = {"image": image, "captions": [f"caption {k} of {image}" for k in range(n)],
          "split": split, **extra}
  if audio is not None:
    item["audio"] = audio
  return item


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
  """A Flickr8k + FACC root with the real corpus' quirks (a missing image, a missing
  wav, token lines naming no image) in the nested layout."""
  base = tmp_path_factory.mktemp("quirky")
  return data_fixtures.make_flickr8k_tree(base / "root", layout="nested", quirks=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """Good and bad media files: {name: path} (jpg0..jpg3, bad_jpg, wav0..wav3,
  short_wav) from one fake root."""
  base = tmp_path_factory.mktemp("media")
  tree = data_fixtures.make_flickr8k_tree(base / "src", n_images=5, splits=(3, 1, 1),
                                          corrupt_jpeg=4, truncated_wav=(2, 1))
  ids = tree["ids"]
  out = {f"jpg{i}": os.path.join(tree["image_dir"], ids[i] + ".jpg") for i in range(4)}
  out["bad_jpg"] = tree["corrupt_images"][0]
  out.update({f"wav{k}": tree["wav_paths"][ids[0]][k] for k in range(4)})
  out["short_wav"] = tree["truncated_wavs"][0]
  return out


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("with_audio", [True, False])
def test_converted_root_indexes_like_flickr8k(quirky, tmp_path, with_audio):
  """make_manifest.py then the manifest reader == the Flickr8k reader, item for item."""
  root = quirky["root"]
  if not with_audio:
    root = tmp_path / "noaudio"
    data_fixtures.make_flickr8k_tree(root, layout="text_dir", with_audio=False)
  out = os.path.join(root, "manifest.jsonl")
  _convert(root, out, "--max_lost_fraction", "0.5")
  want = flickr8k.load_index(root, max_lost_fraction=0.5)
  got = manifest.load_index(out, max_lost_fraction=0.0)
  assert got.has_audio == want.has_audio == with_audio
  assert got.root == want.root == str(root)
  for split in flickr8k.SPLITS:
    g, w = got.splits[split].examples, want.splits[split].examples
    assert [e.image_id for e in g] == [e.image_id for e in w]
    assert [e.captions for e in g] == [e.captions for e in w]
    assert [e.image_path for e in g] == [e.image_path for e in w]
    assert [e.wav_paths for e in g] == [e.wav_paths for e in w]
  assert got == want  # the whole structure (the reports are not compared)
  if with_audio:
    # Also against the fixture's own truth: the missing wav is a null, not a path.
    assert [e.image_id for e in got.splits["train"].examples] == quirky["expected"]["train"]
    first = got.splits["train"].examples[0]
    assert list(first.wav_paths) == quirky["wav_paths"][first.image_id]
    assert first.wav_paths[3] is None
    assert got.report["counts"]["train"]["unspoken_captions"] == 1
    with open(out) as f:
      assert json.loads(f.readline())["audio"][3] is None
  else:
    with open(out) as f:
      assert all("audio" not in json.loads(l) for l in f)


def test_absolute_paths_and_a_moved_corpus(quirky, tmp_path):
  """--absolute writes absolute paths; relative ones follow the corpus when it moves."""
  want = flickr8k.load_index(quirky["root"], max_lost_fraction=0.5)
  _convert(quirky["root"], tmp_path / "lists" / "abs.jsonl", "--absolute",
           "--max_lost_fraction", "0.5")
  with open(tmp_path / "lists" / "abs.jsonl") as f:
    assert os.path.isabs(json.loads(f.readline())["image"])
  assert manifest.load_index(tmp_path / "lists" / "abs.jsonl").splits == want.splits

  moved = tmp_path / "moved"
  shutil.copytree(quirky["root"], moved)
  _convert(moved, moved / "m.jsonl", "--max_lost_fraction", "0.5")
  shutil.move(moved, tmp_path / "moved_again")
  got = manifest.load_index(tmp_path / "moved_again" / "m.jsonl")
  paths = [e.image_path for s in got.splits.values() for e in s.examples]
  assert paths and all(p.startswith(str(tmp_path / "moved_again") + os.sep) for p in paths)
  assert all(os.path.isfile(p) for p in paths)


def test_relative_paths_resolve_against_the_manifest_folder(media, tmp_path, monkeypatch):
  corpus_dir = tmp_path / "corpus"
  os.makedirs(corpus_dir / "images")
  os.makedirs(corpus_dir / "lists")
  shutil.copy(media["jpg0"], corpus_dir / "images" / "a.jpg")
  shutil.copy(media["wav0"], corpus_dir / "a0.wav")
  path = _write(corpus_dir / "lists" / "m.jsonl", [
      _line("../images/a.jpg", audio=["../a0.wav", None]),
      _line(media["jpg1"], "dev", audio=[media["wav1"], media["wav2"]]),  # absolute
      _line("../images/../images/a.jpg", "test", id="again")])
  # Line 3 names line 1's image by another path: one image, one line.
  with pytest.raises(flickr8k.DataError, match=r"line 3: image .*a\.jpg is already listed "
                                               r"on line 1"):
    manifest.load_index(path)
  shutil.copy(media["jpg2"], corpus_dir / "b.jpg")
  _write(path, [_line("../images/a.jpg", audio=["../a0.wav", None]),
                _line(media["jpg1"], "dev", audio=[media["wav1"], media["wav2"]]),
                _line("./../b.jpg", "test")])
  monkeypatch.chdir(tmp_path / "corpus" / "images")  # not where the manifest is
  index = manifest.load_index("../lists/m.jsonl")
  assert index.root == str(corpus_dir / "lists")
  a = index.splits["train"].examples[0]
  assert (a.image_id, a.image_path) == ("a", str(corpus_dir / "images" / "a.jpg"))
  assert a.wav_paths == (str(corpus_dir / "a0.wav"), None)
  assert index.splits["dev"].examples[0].image_path == media["jpg1"]
  assert index.splits["test"].examples[0].image_path == str(corpus_dir / "b.jpg")
  assert index.has_audio
  assert index.splits["test"].examples[0].wav_paths == (None, None)  # no "audio" key


# ----------------------------------------------------------------------------- losses


def _lossy(media, tmp_path):
  """Train: 4 images, one missing and one undecodable; 8 recordings on the 2 kept, one
  missing, one truncated, one null."""
  return _write(tmp_path / "lossy.jsonl", [
      _line(media["jpg0"], n=4, audio=[media["wav0"], media["short_wav"], None,
                                       str(tmp_path / "gone.wav")]),
      _line(str(tmp_path / "no_such.jpg"), audio=[media["wav1"], media["wav2"]]),
      _line(media["bad_jpg"], audio=[media["wav1"], media["wav2"]]),
      _line(media["jpg1"], n=4, audio=[media["wav1"], media["wav2"], media["wav3"],
                                       media["wav0"]]),
      _line(media["jpg2"], "dev", audio=[media["wav3"], media["wav0"]]),
      _line(media["jpg3"], "test", audio=[media["wav3"], media["wav0"]]),
  ])


def test_lost_items_are_counted_reported_and_excluded(media, tmp_path, caplog, capsys):
  path = _lossy(media, tmp_path)
  with caplog.at_level(logging.WARNING):
    index = manifest.load_index(path, max_lost_fraction=1.0, report_path=tmp_path / "rep")
  assert "excluded 4 files" in caplog.text
  train = index.splits["train"].examples
  assert [e.image_path for e in train] == [media["jpg0"], media["jpg1"]]
  assert train[0].wav_paths == (media["wav0"], None, None, None)
  assert len(train[0].captions) == 4
  report = index.report
  c = report["counts"]["train"]
  assert (c["listed_images"], c["images"], c["lost_images"]) == (4, 2, 2)
  assert (c["captions"], c["clips"], c["lost_clips"]) == (8, 5, 2)
  assert c["unspoken_captions"] == 1
  assert c["lost_clip_fraction"] == 2 / 8 and c["lost_image_fraction"] == 0.5
  lost = {d["path"]: (d["line_no"], d["reason"]) for d in report["lost_images"]["train"]}
  assert lost[str(tmp_path / "no_such.jpg")] == (2, "missing image file")
  assert lost[media["bad_jpg"]][0] == 3
  assert lost[media["bad_jpg"]][1].startswith("unreadable image")
  clips = {d["path"]: (d["line_no"], d["k"], d["reason"])
           for d in report["lost_clips"]["train"]}
  assert clips[str(tmp_path / "gone.wav")] == (1, 3, "missing wav file")
  assert clips[media["short_wav"]][:2] == (1, 1)
  assert clips[media["short_wav"]][2].startswith("truncated wav")
  assert report["removed_files"] == sorted(
      [str(tmp_path / "no_such.jpg"), media["bad_jpg"], str(tmp_path / "gone.wav"),
       media["short_wav"]])
  on_disk = json.load(open(tmp_path / "rep" / manifest.REPORT_NAME))
  assert on_disk["counts"] == report["counts"] and on_disk["manifest"] == path

  assert manifest.main(["--manifest", path, "--max_lost_fraction", "1"]) == 0
  out = capsys.readouterr().out
  assert "train: 2 images (2 lost of 4 listed), 8 captions, 5 clips (2 lost)" in out
  assert "unspoken captions" in out and "missing wav file" in out


def test_max_lost_fraction_is_an_error_naming_the_files(media, tmp_path, capsys):
  path = _write(tmp_path / "m.jsonl", [
      _line(media["jpg0"]), _line(media["jpg1"]), _line(str(tmp_path / "gone.jpg")),
      _line(media["jpg2"], "dev"), _line(str(tmp_path / "t.jpg"), "test")])
  shutil.copy(media["jpg2"], tmp_path / "t.jpg")
  with pytest.raises(flickr8k.DataError) as info:
    manifest.load_index(path, max_lost_fraction=0.3, report_path=tmp_path / "r.json")
  msg = str(info.value)
  assert "max_lost_fraction=0.3" in msg and "train: 1/3 images" in msg
  assert f"line 3: {tmp_path / 'gone.jpg'} (missing image file)" in msg
  assert "r.json" in msg and os.path.isfile(tmp_path / "r.json")
  assert info.value.report["counts"]["train"]["lost_images"] == 1
  assert manifest.load_index(path, max_lost_fraction=0.34).splits["train"].examples
  # Clip losses alone count too (1 of 4 recordings of the kept train captions).
  path2 = _write(tmp_path / "m2.jsonl", [
      _line(media["jpg0"], audio=[media["wav0"], media["short_wav"]]),
      _line(media["jpg1"], audio=[media["wav1"], media["wav2"]]),
      _line(media["jpg2"], "dev", audio=[media["wav3"], None]),
      _line(str(tmp_path / "t.jpg"), "test", audio=[media["wav3"], media["wav0"]])])
  with pytest.raises(flickr8k.DataError, match=r"train: 0/2 images, 1/4 clips"):
    manifest.load_index(path2, max_lost_fraction=0.2)
  manifest.load_index(path2, max_lost_fraction=0.25)
  # A split whose every image is lost is an error whatever the fraction.
  path3 = _write(tmp_path / "m3.jsonl", [_line(media["jpg0"]), _line(media["jpg1"], "dev"),
                                         _line(media["bad_jpg"], "test")])
  with pytest.raises(flickr8k.DataError, match=r"test: 1/1 images"):
    manifest.load_index(path3, max_lost_fraction=1.0)
  assert manifest.main(["--manifest", path3]) == 1
  assert "unreadable image" in capsys.readouterr().out


# ----------------------------------------------------------------------------- malformed


GOOD = {"image": "a.jpg", "captions": ["x", "y"], "split": "train"}
MALFORMED = [
    ('{"image": "b.jpg", "captions": ["x"], "split": "train"', "not valid JSON"),
    ('["b.jpg", ["x"], "train"]', "a JSON object {...} is expected, got a JSON list"),
    (dict(image="b.jpg", split="train"), "missing key(s) ['captions']"),
    (dict(GOOD, image="b.jpg", caption="x"), "unknown key(s) ['caption']"),
    (dict(GOOD, image=3), '"image" must be a non-empty path string, got int'),
    (dict(GOOD, image="b.jpg", captions="a dog"), '"captions" must be a non-empty list'),
    (dict(GOOD, image="b.jpg", captions=[]), '"captions" must be a non-empty list'),
    (dict(GOOD, image="b.jpg", captions=["x", " "]), '"captions" must be a non-empty list'),
    (dict(GOOD, image="b.jpg", split="val"), '"split" must be one of'),
    (dict(GOOD, image="b.jpg", audio=["a.wav"]),
     '"audio" has 1 entries for 2 captions: give one per caption'),
    (dict(GOOD, image="b.jpg", audio="a.wav"),
     '"audio" must be a list of WAV paths or nulls'),
    (dict(GOOD, image="b.jpg", audio=["a.wav", 1]), '"audio" must be a list of WAV paths'),
    (dict(GOOD, image="b.jpg", id=7), '"id" must be a non-empty string'),
    (dict(GOOD, image="sub/a.jpg"), "id 'a' is already used on line 1"),
    (dict(GOOD, image="./a.jpg", id="b"), "already listed on line 1"),
]


@pytest.mark.parametrize("bad,fragment", MALFORMED, ids=[f[1][:28] for f in MALFORMED])
def test_malformed_line_names_file_line_and_fix(tmp_path, bad, fragment):
  path = _write(tmp_path / "m.jsonl", [
      GOOD, "", bad if isinstance(bad, str) else json.dumps(bad),
      dict(GOOD, image="c.jpg", split="dev"), dict(GOOD, image="d.jpg", split="test")])
  with pytest.raises(flickr8k.DataError) as info:
    manifest.load_index(path)
  msg = str(info.value)
  assert msg.startswith(f"manifest {path}: 1 malformed line(s); fix them"), msg
  # Line numbers count the blank line 2.
  assert re.search(rf"\n  line 3: [^\n]*{re.escape(fragment)}", msg), msg


def test_every_malformed_line_is_listed_and_empty_splits_named(tmp_path):
  path = _write(tmp_path / "m.jsonl", ["{", dict(GOOD, split="dev"), "nope", "[]"])
  with pytest.raises(flickr8k.DataError, match=r"3 malformed line\(s\)") as info:
    manifest.load_index(path)
  assert all(f"line {n}:" in str(info.value) for n in (1, 3, 4))
  path = _write(tmp_path / "m.jsonl", [GOOD, dict(GOOD, image="b.jpg", split="test")])
  with pytest.raises(flickr8k.DataError, match=r"no line has split 'dev'"):
    manifest.load_index(path)
  with pytest.raises(flickr8k.DataError, match=r"does not exist"):
    manifest.load_index(tmp_path / "none.jsonl")


# ----------------------------------------------------------------------------- audio


def test_without_audio_lists_the_corpus_is_image_text(media, tmp_path, caplog):
  path = _write(tmp_path / "m.jsonl", [_line(media["jpg0"]), _line(media["jpg1"], "dev"),
                                       _line(media["jpg2"], "test")])
  with caplog.at_level(logging.WARNING):
    index = manifest.load_index(path, max_lost_fraction=0.0)
  assert not index.has_audio and "image-text only" in caplog.text
  assert all(e.wav_paths == (None, None) for s in index.splits.values() for e in s.examples)
  # use_audio=False ignores audio lists, even ones naming missing files.
  path = _write(tmp_path / "a.jsonl", [
      _line(media["jpg0"], audio=[str(tmp_path / "gone.wav"), None]),
      _line(media["jpg1"], "dev"), _line(media["jpg2"], "test")])
  index = manifest.load_index(path, use_audio=False, max_lost_fraction=0.0)
  assert not index.has_audio and index.report["removed_files"] == []
  assert index.splits["train"].examples[0].wav_paths == (None, None)


def test_config_names_and_checks_data_manifest(tmp_path, monkeypatch):
  c = config_lib.load_config("demo", ["data.name=manifest"])
  assert c.data.manifest == ""
  with pytest.raises(ValueError, match=r"data\.manifest, which is unset.*"
                                       r"--config\.data\.manifest=PATH"):
    config_lib.check_data(c.data)
  c.data.manifest = "nowhere/m.jsonl"
  with pytest.raises(ValueError, match=r"data\.manifest='nowhere/m\.jsonl' is not a file"):
    config_lib.check_data(c.data)
  from nlmm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"data\.manifest="):
    pipeline.prepare(c)  # before any slow step
  c.data.name = "flikr8k"
  with pytest.raises(ValueError, match=r"data\.name must be one of .*'flikr8k'"):
    pipeline.prepare(c)
  _write(tmp_path / "m.jsonl", [GOOD])
  monkeypatch.chdir(tmp_path)
  c.data.name, c.data.manifest = "manifest", "m.jsonl"  # relative to the working directory
  config_lib.check_data(c.data)
  assert corpus.corpus_path(c.data) == str(tmp_path / "m.jsonl")


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def no_audio_manifest(tmp_path_factory):
  """A manifest without audio, in its own folder, naming a fake root's images."""
  base = tmp_path_factory.mktemp("own")
  data_fixtures.make_flickr8k_tree(base / "root", n_images=12, with_audio=False)
  out = base / "lists" / "own.jsonl"
  _convert(base / "root", out)
  return base, out


@pytest.mark.slow  # train and resume (32 s): the slow tier (CI runs it)
def test_training_and_resume_on_a_manifest_without_audio(no_audio_manifest, caplog):
  """Through train.train_and_evaluate: 2 steps, then the same workdir continued to 4
  from the step-2 checkpoint. Image-text only: the loss has no audio pair and the eval
  files hold I->T and T->I only; data.root is never read."""
  from nlmm_jax import train  # pylint: disable=g-import-not-at-top
  base, path = no_audio_manifest
  workdir = base / "run"

  def config(total_steps):
    c = tiny_config(base / "unused_root", base / "cache", total_steps=total_steps)
    c.data.name, c.data.manifest = "manifest", str(path)
    return c

  train.train_and_evaluate(config(2), str(workdir))
  first = [json.loads(l) for l in open(workdir / "train_metrics.jsonl")]
  assert [r["step"] for r in first] == [1, 2]
  assert json.load(open(workdir / "eval_test.json"))["step"] == 2
  with caplog.at_level(logging.INFO, logger="absl"):
    test_metrics = train.train_and_evaluate(config(4), str(workdir))
  assert re.search(r"Resumed from \S*checkpoints step 2", caplog.text)
  lines = [json.loads(l) for l in open(workdir / "train_metrics.jsonl")]
  assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[:2] == first
  assert all(np.isfinite(r["train/loss"]) for r in lines)
  assert all("train/loss/image_text" in r for r in lines)
  assert not [k for r in lines for k in r if k.startswith("train/loss/") and "audio" in k]
  assert not os.path.exists(base / "unused_root")
  evals = [(r["step"], r["split"])
           for r in map(json.loads, open(workdir / "metrics.jsonl"))]
  assert evals == [(2, "dev"), (2, "test"), (4, "dev"), (4, "test")], evals
  for name in ("eval_dev.json", "eval_test.json"):
    metrics = json.load(open(workdir / name))
    recalls = {k for k in metrics if "_R@" in k and not k.startswith("mean")}
    assert recalls == IT_KEYS, (name, sorted(recalls))
    assert metrics["step"] == 4 and metrics["rsum_all"] == pytest.approx(metrics["rsum_it"])
  assert IT_KEYS <= set(test_metrics) and not AUDIO_KEYS & set(test_metrics)
  reports = os.listdir(base / "cache" / "index_reports")
  assert [n for n in reports if n.startswith("own.jsonl-")], reports


def test_retrieve_finds_a_manifest_corpus(no_audio_manifest):
  """The search CLI reads the corpus of a manifest-trained config (or --data_root)."""
  from nlmm_jax import retrieve  # pylint: disable=g-import-not-at-top
  base, path = no_audio_manifest
  c = config_lib.load_config("demo", ["data.name=manifest", f"data.manifest={path}"])
  root, index = retrieve._load_split(c, None, "test")  # pylint: disable=protected-access
  assert root == str(path) and len(index.splits["test"].examples) == 2
  c.data.manifest = str(base / "moved.jsonl")
  with pytest.raises(retrieve.RetrievalError, match=r"\(data\.manifest\).*--data_root"):
    retrieve._load_split(c, None, "test")  # pylint: disable=protected-access
  root, _ = retrieve._load_split(c, str(path), "test")  # pylint: disable=protected-access
  assert root == str(path)


# ----------------------------------------------------------------------------- README


def _readme_section():
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  return readme.split("## Your own data\n", 1)[1].split("\n## ", 1)[0]


def test_readme_format_example_parses():
  block = re.search(r"```json\n(.*?)```", _readme_section(), re.S).group(1)
  items = [manifest.parse_line(l) for l in block.splitlines() if l.strip()]
  assert len(items) == 2 and items[0]["audio"][1] is None and items[1]["id"] == "beach"


@pytest.mark.slow  # three processes, one training run: the slow tier (CI runs it)
def test_readme_worked_example_runs_as_written(tmp_path):
  """The README's commands, verbatim, in a folder holding a fake data/flickr8k (with
  FACC) and a link to the clone's scripts/. The training command gets the tiny test
  model's overrides appended (TINY_OVERRIDES: 4 steps in seconds, not hours); nothing
  else is changed."""
  commands = re.search(r"```bash\n(.*?)```", _readme_section(), re.S).group(1)
  commands = [c.strip() for c in commands.replace("\\\n", " ").splitlines() if c.strip()]
  assert len(commands) == 3 and commands[2].startswith("python -m nlmm_jax.main ")
  tree = data_fixtures.make_flickr8k_tree(tmp_path / "data" / "flickr8k", n_images=12)
  os.symlink(os.path.join(REPO, "scripts"), tmp_path / "scripts")
  commands[2] += "".join(f" --config.{o}" for o in TINY_OVERRIDES)
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
             + os.environ.get("PATH", ""))
  results = []
  for command in commands:
    r = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-3000:])
    results.append(r)
  assert "wrote 12 images (train 8, dev 2, test 2; with audio)" in results[0].stdout
  assert "train: 8 images (0 lost of 8 listed), 40 captions, 40 clips" in results[1].stdout
  images = [json.loads(l)["image"] for l in open(tmp_path / "data/flickr8k/manifest.jsonl")]
  assert images[0] == os.path.join("Flicker8k_Dataset", tree["ids"][0] + ".jpg")
  run = tmp_path / "runs" / "mine"
  config = json.load(open(run / "config.json"))
  assert config["data"]["name"] == "manifest" and config["model"]["width"] == 32
  assert config["data"]["manifest"] == "data/flickr8k/manifest.jsonl"
  steps = [json.loads(l)["step"] for l in open(run / "train_metrics.jsonl")]
  assert steps == [1, 2, 3, 4]
  metrics = json.load(open(run / "eval_test.json"))
  recalls = {k for k in metrics if "_R@" in k and not k.startswith("mean")}
  assert recalls == IT_KEYS | AUDIO_KEYS and metrics["step"] == 4
  assert all(0 <= metrics[k] <= 100 for k in recalls)
