"""Tiny but real Flickr8k + FACC trees on disk, for the data tests.

`make_flickr8k_tree` writes small JPEGs (PIL), short 16 kHz PCM-16 WAVs (soundfile) and the
text files in the formats of the real corpus:

  Flickr8k.token.txt           `<image>.jpg#<k>\t<caption>`, k = 0..4
  Flickr_8k.{train,dev,test}Images.txt   one `<image>.jpg` per line
  flickr_audio/wav2capt.txt    `<image>_<k>.wav <image>.jpg #<k>`
  flickr_audio/wavs/<image>_<k>.wav

and returns what it wrote, including what a correct index must keep and drop.
"""

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image
import soundfile as sf

LAYOUTS = ("flat", "nested", "images_dir", "text_dir")
SPLIT_NAMES = ("train", "dev", "test")
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
SAMPLE_RATE = 16000

_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
_THINGS = ("dog", "child", "bicycle", "ball", "boat", "horse", "tree")
_PLACES = ("on the grass", "in the water", "near a wall", "on a street", "in the snow")

# The real token file names an image that is not in the image folder, with a bad suffix
# (`2258277193_586949ec62.jpg.1#k`); this fixture's stand-in:
BAD_TOKEN_ID = "2258277193_586949ec62.jpg.1"


def _image_id(i: int) -> str:
  """Ids shaped like Flickr's: `<digits>_<10 hex>`."""
  return f"{1000268201 + 7919 * i}_{(0x693b08cb0e + 104729 * i) % 16**10:010x}"


def _caption(i: int, k: int) -> str:
  return (f"a {_COLOURS[(i + k) % len(_COLOURS)]} {_THINGS[i % len(_THINGS)]} "
          f"{_PLACES[k % len(_PLACES)]} number {i} version {k}")


def _write_jpeg(path: str, rng: np.random.Generator) -> None:
  h, w = int(rng.integers(20, 33)), int(rng.integers(20, 33))
  pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=85)


def _write_wav(path: str, rng: np.random.Generator) -> None:
  n = int(SAMPLE_RATE * rng.uniform(0.15, 0.3))
  t = np.arange(n) / SAMPLE_RATE
  wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t)
  wave += 0.02 * rng.standard_normal(n)
  sf.write(path, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")


def _truncate(path: str, fraction: float) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:max(1, int(len(data) * fraction))])


def _truncate_jpeg(path: str) -> None:
  """Cuts the entropy-coded data in half: the header still parses, decoding fails."""
  with open(path, "rb") as f:
    data = f.read()
  sos = data.find(b"\xff\xda")
  with open(path, "wb") as f:
    f.write(data[:sos + (len(data) - sos) // 2])


def _as_list(x) -> list:
  if x is None:
    return []
  if isinstance(x, (int, tuple)):
    return [x]
  return list(x)


def make_flickr8k_tree(
    root: Union[str, os.PathLike],
    *,
    n_images: int = 12,
    layout: str = "flat",
    with_audio: bool = True,
    splits: Sequence[int] = (8, 2, 2),
    quirks: bool = False,
    corrupt_jpeg: Union[None, int, Sequence[int]] = None,
    truncated_wav: Union[None, int, tuple, Sequence] = None,
    seed: int = 0,
) -> dict:
  """Writes a Flickr8k (+ FACC) tree under `root` and returns what it wrote.

  Args:
    root: directory to write into (created).
    n_images: number of image files written (all of them listed in the splits).
    layout: where images and text files go:
      "flat":       Flicker8k_Dataset/ (sic) and the text files in root;
      "nested":     Flickr8k_Dataset/Flicker8k_Dataset/ and Flickr8k_text/ (the official zips);
      "images_dir": Images/ and the text files in root;
      "text_dir":   Flickr8k_Dataset/ and Flickr8k_text/.
    with_audio: also write flickr_audio/ (wav2capt.txt, wav2spk.txt, wavs/).
    splits: number of images in train, dev, test (sum = n_images), in id order.
    quirks: add the real corpus's quirks: 5 token lines naming an image that does not
      exist (bad `.jpg.1` suffix, in no split); a wav2capt line whose wav file is missing
      (first train image, k = 3); a train split line naming an image with captions and
      recordings listed but no image file.
    corrupt_jpeg: image index (or indices) whose JPEG loses the second half of its
      entropy-coded data (the header still opens; decoding fails).
    truncated_wav: (image index, k) pair(s), or an image index for k = 0, whose WAV is cut
      to 60 % of its bytes (the header claims more samples than the file holds).
    seed: for pixels and tones.

  Returns:
    dict with
      root, image_dir, text_dir, audio_dir (None without audio): paths;
      ids: all image ids written, in order;
      listed: {split: ids named by the split file, in file order};
      expected: {split: ids a correct index keeps, in split-file order};
      captions: {id: [5 captions in k order]} (also for the missing-image quirk);
      wav_paths: {id: [path or None] * 5} a correct index returns (audio only);
      lost_images: {split: [ids]} listed but unusable (missing or corrupt image file);
      corrupt_images: [jpeg paths]; truncated_wavs: [wav paths];
      missing_wavs: [wav paths named by wav2capt.txt but not on disk];
      missing_images: [jpeg paths named by a split file but not on disk];
      quirk_lines: {"token": [...], "wav2capt": [...], "split": [...]} verbatim lines;
      removed_files: sorted paths of every file a correct index excludes
        (corrupt/truncated files and files named but absent).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if sum(splits) != n_images or len(splits) != 3:
    raise ValueError(f"splits {tuple(splits)} must be 3 counts summing to {n_images}")
  root = os.fspath(root)
  image_dir = {
      "flat": os.path.join(root, "Flicker8k_Dataset"),
      "nested": os.path.join(root, "Flickr8k_Dataset", "Flicker8k_Dataset"),
      "images_dir": os.path.join(root, "Images"),
      "text_dir": os.path.join(root, "Flickr8k_Dataset"),
  }[layout]
  text_dir = root if layout in ("flat", "images_dir") else os.path.join(root, "Flickr8k_text")
  audio_dir = os.path.join(root, "flickr_audio") if with_audio else None
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(text_dir, exist_ok=True)
  if audio_dir:
    os.makedirs(os.path.join(audio_dir, "wavs"), exist_ok=True)
  rng = np.random.default_rng(seed)

  ids = [_image_id(i) for i in range(n_images)]
  bounds = np.cumsum([0] + list(splits))
  listed = {s: ids[bounds[j]:bounds[j + 1]] for j, s in enumerate(SPLIT_NAMES)}
  captions = {iid: [_caption(i, k) for k in range(5)] for i, iid in enumerate(ids)}
  quirk_lines = {"token": [], "wav2capt": [], "split": []}
  missing_images, missing_wavs = [], []
  lost_images = {s: [] for s in SPLIT_NAMES}

  for iid in ids:
    _write_jpeg(os.path.join(image_dir, iid + ".jpg"), rng)

  # Images named by a split file (with captions and recordings) but with no file.
  ghost = None
  if quirks:
    ghost = _image_id(n_images + 1)
    captions[ghost] = [_caption(n_images + 1, k) for k in range(5)]
    listed["train"] = listed["train"] + [ghost]
    quirk_lines["split"].append(ghost + ".jpg")
    missing_images.append(os.path.join(image_dir, ghost + ".jpg"))
    lost_images["train"].append(ghost)

  token_lines = []
  for iid in list(ids) + ([ghost] if ghost else []):
    token_lines += [f"{iid}.jpg#{k}\t{c}" for k, c in enumerate(captions[iid])]
  if quirks:
    bad = [f"{BAD_TOKEN_ID}#{k}\tan image that is not there number {k}" for k in range(5)]
    quirk_lines["token"] += bad
    token_lines = token_lines[:10] + bad + token_lines[10:]
  with open(os.path.join(text_dir, "Flickr8k.token.txt"), "w") as f:
    f.write("\n".join(token_lines) + "\n")
  # The lemmatised twin lives next to it in the real archive; an index must not read it.
  with open(os.path.join(text_dir, "Flickr8k.lemma.token.txt"), "w") as f:
    f.write("\n".join(f"{iid}.jpg#0\tlemma" for iid in ids) + "\n")
  for s in SPLIT_NAMES:
    with open(os.path.join(text_dir, SPLIT_FILES[s]), "w") as f:
      f.write("".join(f"{iid}.jpg\n" for iid in listed[s]))

  wav_paths = {}
  if audio_dir:
    lines, spk = [], []
    for iid in list(ids) + ([ghost] if ghost else []):
      wav_paths[iid] = []
      for k in range(5):
        name = f"{iid}_{k}.wav"
        path = os.path.join(audio_dir, "wavs", name)
        line = f"{name} {iid}.jpg #{k}"
        lines.append(line)
        spk.append(f"{name} {(k % 3) + 1}")
        if iid == ghost:  # no image, so no recording either (not checked: image is lost)
          wav_paths[iid].append(None)
          continue
        if quirks and iid == listed["train"][0] and k == 3:
          quirk_lines["wav2capt"].append(line)
          missing_wavs.append(path)
          wav_paths[iid].append(None)
          continue
        _write_wav(path, rng)
        wav_paths[iid].append(path)
    with open(os.path.join(audio_dir, "wav2capt.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
    with open(os.path.join(audio_dir, "wav2spk.txt"), "w") as f:
      f.write("\n".join(spk) + "\n")

  corrupt_images = []
  for i in _as_list(corrupt_jpeg):
    path = os.path.join(image_dir, ids[i] + ".jpg")
    _truncate_jpeg(path)
    corrupt_images.append(path)
    split = next(s for s in SPLIT_NAMES if ids[i] in listed[s])
    lost_images[split].append(ids[i])

  truncated_wavs = []
  if audio_dir:
    for item in _as_list(truncated_wav):
      i, k = (item, 0) if isinstance(item, int) else item
      path = wav_paths[ids[i]][k]
      if path is None:
        raise ValueError(f"wav ({i}, {k}) is already missing")
      _truncate(path, 0.6)
      truncated_wavs.append(path)
      wav_paths[ids[i]][k] = None

  lost = {iid for s in SPLIT_NAMES for iid in lost_images[s]}
  expected = {s: [iid for iid in listed[s] if iid not in lost] for s in SPLIT_NAMES}
  if audio_dir:
    wav_paths = {iid: p for iid, p in wav_paths.items() if iid not in lost}
  # Files of images that are dropped are not "removed" for their wavs: only files that are
  # themselves bad or absent.
  removed = sorted(missing_images + missing_wavs + corrupt_images + truncated_wavs)
  return dict(
      root=root, image_dir=image_dir, text_dir=text_dir, audio_dir=audio_dir, ids=ids,
      listed=listed, expected=expected, captions=captions, wav_paths=wav_paths,
      lost_images=lost_images, corrupt_images=corrupt_images, truncated_wavs=truncated_wavs,
      missing_wavs=missing_wavs, missing_images=missing_images, quirk_lines=quirk_lines,
      removed_files=removed)
