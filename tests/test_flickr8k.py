"""Flickr8k + FACC index: layouts, quirks, losses, bad roots, the CLI."""

import json
import logging
import os
import random

import pytest

from nlmm_jax.data import flickr8k
import data_fixtures


def _ids(index, split):
  return [e.image_id for e in index.splits[split].examples]


def _assert_matches(index, tree):
  assert set(index.splits) == {"train", "dev", "test"}
  for split in ("train", "dev", "test"):
    assert _ids(index, split) == tree["expected"][split]
    for e in index.splits[split].examples:
      assert list(e.captions) == tree["captions"][e.image_id]
      assert os.path.samefile(e.image_path, os.path.join(tree["image_dir"], e.image_id + ".jpg"))
      if tree["audio_dir"]:
        assert list(e.wav_paths) == tree["wav_paths"][e.image_id]
      else:
        assert e.wav_paths == (None,) * len(e.captions)


@pytest.mark.parametrize("layout", data_fixtures.LAYOUTS)
def test_layouts(tmp_path, layout):
  tree = data_fixtures.make_flickr8k_tree(tmp_path, layout=layout)
  index = flickr8k.load_index(tmp_path, max_lost_fraction=0.0)
  assert index.has_audio
  assert index.root == str(tmp_path)
  _assert_matches(index, tree)
  assert index.report["removed_files"] == []
  counts = index.report["counts"]
  assert [counts[s]["images"] for s in ("train", "dev", "test")] == [8, 2, 2]
  assert counts["train"]["clips"] == 40


def test_lines_out_of_order_keep_k_alignment(tmp_path):
  tree = data_fixtures.make_flickr8k_tree(tmp_path)
  rng = random.Random(0)
  for path in (os.path.join(tree["text_dir"], "Flickr8k.token.txt"),
               os.path.join(tree["audio_dir"], "wav2capt.txt")):
    with open(path) as f:
      lines = f.read().splitlines()
    rng.shuffle(lines)
    with open(path, "w") as f:  # also CRLF endings and a blank line
      f.write("\r\n".join(lines) + "\r\n\r\n")
  index = flickr8k.load_index(tmp_path, max_lost_fraction=0.0)
  _assert_matches(index, tree)
  e = index.splits["test"].examples[1]
  for k, wav in enumerate(e.wav_paths):
    assert wav.endswith(f"{e.image_id}_{k}.wav")
    assert e.captions[k].endswith(f"version {k}")


def test_quirks_reported_and_excluded(tmp_path):
  tree = data_fixtures.make_flickr8k_tree(tmp_path, layout="nested", quirks=True)
  report_file = tmp_path / "cache" / "report.json"
  index = flickr8k.load_index(tmp_path, max_lost_fraction=0.5, report_path=report_file)
  _assert_matches(index, tree)
  report = index.report
  assert report["removed_files"] == tree["removed_files"]
  token_lines = [d["line"] for d in report["unmatched_lines"]["token"]]
  assert token_lines == tree["quirk_lines"]["token"]
  lost = report["lost_images"]["train"]
  assert [(d["image_id"], d["reason"]) for d in lost] == [
      (tree["lost_images"]["train"][0], "missing image file")]
  clips = report["lost_clips"]["train"]
  assert [d["path"] for d in clips] == tree["missing_wavs"]
  assert report["counts"]["train"]["lost_clips"] == 1
  assert report["counts"]["train"]["clips"] == 39
  with open(report_file) as f:
    on_disk = json.load(f)
  assert on_disk["removed_files"] == tree["removed_files"]
  assert report["report_file"] == str(report_file)


def test_too_many_losses_raise(tmp_path):
  data_fixtures.make_flickr8k_tree(tmp_path, quirks=True)
  with pytest.raises(flickr8k.DataError, match=r"train: 1/9 images, 1/40 clips") as info:
    flickr8k.load_index(tmp_path, report_path=tmp_path / "cache")
  assert os.path.isfile(tmp_path / "cache" / flickr8k.REPORT_NAME)
  assert info.value.report["counts"]["train"]["lost_images"] == 1
  # Clip losses alone count too: 1 of 40 clips is above 2 %, within 3 %.
  data_fixtures.make_flickr8k_tree(tmp_path / "b", quirks=False)
  os.remove(os.path.join(tmp_path / "b", "flickr_audio", "wavs",
                         os.listdir(tmp_path / "b" / "flickr_audio" / "wavs")[0]))
  with pytest.raises(flickr8k.DataError, match="clips"):
    flickr8k.load_index(tmp_path / "b", max_lost_fraction=0.02)
  flickr8k.load_index(tmp_path / "b", max_lost_fraction=0.03)


def test_corrupt_jpeg_and_truncated_wav(tmp_path):
  tree = data_fixtures.make_flickr8k_tree(tmp_path, corrupt_jpeg=[3, 10],
                                          truncated_wav=[(0, 2), (9, 4)])
  index = flickr8k.load_index(tmp_path, max_lost_fraction=1.0, report_path=tmp_path / "c")
  _assert_matches(index, tree)
  bad_ids = {tree["ids"][3], tree["ids"][10]}
  assert not bad_ids & {e.image_id for s in index.splits.values() for e in s.examples}
  assert index.report["removed_files"] == tree["removed_files"]
  assert sorted(tree["removed_files"]) == sorted(tree["corrupt_images"] + tree["truncated_wavs"])
  first = index.splits["train"].examples[0]
  assert first.wav_paths[2] is None and all(first.wav_paths[k] for k in (0, 1, 3, 4))
  reasons = {d["path"]: d["reason"] for s in ("train", "dev", "test")
             for d in index.report["lost_images"][s] + index.report["lost_clips"][s]}
  assert all(reasons[p].startswith("unreadable image") for p in tree["corrupt_images"])
  assert all(reasons[p].startswith("truncated wav") for p in tree["truncated_wavs"])


def test_garbage_files(tmp_path):
  tree = data_fixtures.make_flickr8k_tree(tmp_path)
  jpg = os.path.join(tree["image_dir"], tree["ids"][0] + ".jpg")
  wav = tree["wav_paths"][tree["ids"][1]][0]
  for path in (jpg, wav):
    with open(path, "wb") as f:
      f.write(b"not a media file")
  index = flickr8k.load_index(tmp_path, max_lost_fraction=1.0)
  assert index.report["removed_files"] == sorted([jpg, wav])
  assert tree["ids"][0] not in _ids(index, "train")
  assert index.splits["train"].examples[0].wav_paths[0] is None


def test_no_audio(tmp_path, caplog):
  tree = data_fixtures.make_flickr8k_tree(tmp_path, with_audio=False)
  with caplog.at_level(logging.WARNING):
    index = flickr8k.load_index(tmp_path, max_lost_fraction=0.0)
  assert not index.has_audio
  _assert_matches(index, tree)
  assert "image-text only" in caplog.text
  assert index.report["counts"]["train"]["clips"] == 0


def test_use_audio_false_ignores_facc(tmp_path):
  tree = data_fixtures.make_flickr8k_tree(tmp_path, truncated_wav=0)
  index = flickr8k.load_index(tmp_path, use_audio=False, max_lost_fraction=0.0)
  assert not index.has_audio
  assert all(w is None for s in index.splits.values() for e in s.examples for w in e.wav_paths)
  assert [e.image_id for e in index.splits["train"].examples] == tree["expected"]["train"]


@pytest.mark.parametrize("case", ["missing", "empty", "no_text", "no_images", "no_split"])
def test_bad_roots(tmp_path, case):
  root = tmp_path / "root"
  if case != "missing":
    root.mkdir()
  if case in ("no_text", "no_images", "no_split"):
    tree = data_fixtures.make_flickr8k_tree(root)
    if case == "no_text":
      os.remove(os.path.join(tree["text_dir"], "Flickr8k.token.txt"))
    elif case == "no_images":
      os.rename(tree["image_dir"], root / "pictures")
    else:
      os.remove(os.path.join(tree["text_dir"], "Flickr_8k.devImages.txt"))
  with pytest.raises(flickr8k.DataError) as info:
    flickr8k.load_index(root)
  msg = str(info.value)
  assert "scripts/download_flickr8k.sh" in msg
  for name in ("Flicker8k_Dataset/", "Flickr8k_Dataset/", "Images/", "Flickr8k_text/",
               "Flickr8k.token.txt", "wav2capt.txt"):
    assert name in msg
  if case == "no_split":
    assert "missing: Flickr_8k.devImages.txt" in msg


def test_incomplete_facc_folder(tmp_path):
  tree = data_fixtures.make_flickr8k_tree(tmp_path)
  os.remove(os.path.join(tree["audio_dir"], "wav2capt.txt"))
  with pytest.raises(flickr8k.DataError, match="lacks wav2capt.txt"):
    flickr8k.load_index(tmp_path)
  assert not flickr8k.load_index(tmp_path, use_audio=False).has_audio


def test_cli(tmp_path, capsys):
  data_fixtures.make_flickr8k_tree(tmp_path / "ok", quirks=True)
  assert flickr8k.main(["--root", str(tmp_path / "ok"), "--max_lost_fraction", "0.2"]) == 0
  out = capsys.readouterr().out
  assert "train: 8 images (1 lost of 9 listed), 40 captions, 39 clips (1 lost)" in out
  assert data_fixtures.BAD_TOKEN_ID in out
  assert flickr8k.main(["--root", str(tmp_path / "ok")]) == 1
  captured = capsys.readouterr()
  assert "max_lost_fraction" in captured.err and "missing image file" in captured.out
  assert flickr8k.main(["--root", str(tmp_path / "nothing")]) == 1
  assert "download_flickr8k.sh" in capsys.readouterr().err
