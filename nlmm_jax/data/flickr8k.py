"""Flickr8k + FACC index: which images, captions and spoken captions each split has.

Accepted layouts under a root (design section 5):

  images   Flicker8k_Dataset/ (sic), Flickr8k_Dataset/ or Images/, or one of these nested
           one level inside another (Flickr8k_Dataset/Flicker8k_Dataset/, as the official
           zip unpacks);
  text     Flickr8k.token.txt (`<image>.jpg#<k>\\t<caption>`) and
           Flickr_8k.{train,dev,test}Images.txt, in the root or in Flickr8k_text/;
  audio    flickr_audio/wav2capt.txt (`<wav> <image>.jpg #<k>`) and flickr_audio/wavs/
           (optional: without it the corpus is image-text only).

Lines that name no image, files that are missing and files that do not decode are counted,
listed in a report and excluded; nothing is ever replaced by zeros. Too many losses in a
split raise `DataError`.

CLI (used by `scripts/download_flickr8k.sh --check`):
  python -m nlmm_jax.data.flickr8k --root=DIR [--no_audio] [--report=FILE]
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import struct
import sys
from typing import Optional

from absl import logging
from PIL import Image
import soundfile as sf

SPLITS = ("train", "dev", "test")
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_DIRS = ("", "Flickr8k_text")
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
AUDIO_DIR = "flickr_audio"
WAV2CAPT = "wav2capt.txt"
REPORT_NAME = "flickr8k_report.json"
DOWNLOAD_HINT = "scripts/download_flickr8k.sh DIR"


class DataError(ValueError):
  """The corpus on disk is missing, unrecognisable or loses too much to quirks."""

  def __init__(self, message: str, report: Optional[dict] = None):
    super().__init__(message)
    self.report = report  # the loss report, when the corpus was parsed


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with its captions; wav_paths[k] speaks captions[k] (None: no recording)."""
  image_id: str                          # file stem, e.g. "1000268201_693b08cb0e"
  image_path: str
  captions: tuple[str, ...]              # normally 5
  wav_paths: tuple[Optional[str], ...]   # aligned with captions


@dataclasses.dataclass
class SplitIndex:
  name: str                              # "train" | "dev" | "test"
  examples: list[Example]


@dataclasses.dataclass
class Flickr8kIndex:
  root: str
  splits: dict[str, SplitIndex]
  has_audio: bool
  # What was found, lost and why (see `load_index`); JSON-serialisable.
  report: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Layout:
  image_dir: str
  text_dir: str          # holds the token file
  split_paths: dict      # split -> path of its list file
  audio_dir: Optional[str]


def _layouts_help(root: str) -> str:
  return (
      f"looked under {root!r} for images in "
      + ", ".join(f"{d}/" for d in IMAGE_DIRS)
      + " (or one of them nested in another, e.g. Flickr8k_Dataset/Flicker8k_Dataset/), "
      f"for {TOKEN_FILE} and " + ", ".join(SPLIT_FILES.values())
      + " in the root or in Flickr8k_text/, and (optional) for "
      f"{AUDIO_DIR}/{WAV2CAPT} with {AUDIO_DIR}/wavs/. "
      f"Download the corpus with `{DOWNLOAD_HINT}`, or generate the demo corpus with "
      "`python -m nlmm_jax.data.demo --output_dir=DIR`.")


def _has_jpeg(path: str) -> bool:
  try:
    with os.scandir(path) as it:
      return any(e.name.lower().endswith(".jpg") for e in it)
  except OSError:
    return False


def _find_image_dir(root: str) -> Optional[str]:
  for name in IMAGE_DIRS:
    path = os.path.join(root, name)
    if not os.path.isdir(path):
      continue
    if _has_jpeg(path):
      return path
    for inner in IMAGE_DIRS:
      nested = os.path.join(path, inner)
      if os.path.isdir(nested) and _has_jpeg(nested):
        return nested
  return None


def find_layout(root: str, use_audio: bool = True) -> Layout:
  """Locates the image folder, text files and FACC folder; `DataError` if not found."""
  if not os.path.isdir(root):
    raise DataError(f"Flickr8k root {root!r} does not exist; " + _layouts_help(root))
  image_dir = _find_image_dir(root)
  text_dirs = [os.path.join(root, d) if d else root for d in TEXT_DIRS]
  text_dir = next((d for d in text_dirs if os.path.isfile(os.path.join(d, TOKEN_FILE))), None)
  split_paths, missing = {}, []
  for split, name in SPLIT_FILES.items():
    # Prefer the token file's folder, then the others.
    for d in ([text_dir] if text_dir else []) + text_dirs:
      if os.path.isfile(os.path.join(d, name)):
        split_paths[split] = os.path.join(d, name)
        break
    else:
      missing.append(name)
  if image_dir is None:
    missing.insert(0, "an image folder with .jpg files")
  if text_dir is None:
    missing.insert(0, TOKEN_FILE)
  if missing:
    raise DataError(f"No Flickr8k layout recognised (missing: {', '.join(missing)}); "
                    + _layouts_help(root))
  audio_dir = None
  facc = os.path.join(root, AUDIO_DIR)
  if use_audio and os.path.isdir(facc):
    lacks = [n for n, ok in ((WAV2CAPT, os.path.isfile(os.path.join(facc, WAV2CAPT))),
                             ("wavs/", os.path.isdir(os.path.join(facc, "wavs")))) if not ok]
    if lacks:
      raise DataError(f"{facc!r} exists but lacks {' and '.join(lacks)}: unpack "
                      f"flickr_audio.tar.gz there (see `{DOWNLOAD_HINT}`), or remove the "
                      "folder / set data.use_audio=False to train image-text only.")
    audio_dir = facc
  return Layout(image_dir, text_dir, split_paths, audio_dir)


def _read_lines(path: str) -> list[tuple[int, str]]:
  """(1-based line number, line without line ending) for non-blank lines."""
  with open(path, encoding="utf-8", errors="replace") as f:
    return [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]


def _image_stem(name: str) -> Optional[str]:
  """`<id>.jpg` -> `<id>`; None for anything else (e.g. the real `....jpg.1`)."""
  name = name.strip()
  if not name.lower().endswith(".jpg") or len(name) <= 4 or "/" in name:
    return None
  return name[:-4]


def _parse_tokens(path: str, unmatched: list) -> dict[str, dict[int, str]]:
  """Token file -> {image id: {k: caption}}; bad lines go to `unmatched`."""
  captions: dict[str, dict[int, str]] = {}
  for n, line in _read_lines(path):
    key, sep, caption = line.partition("\t")
    if not sep:  # tolerate a space instead of the tab
      key, _, caption = line.strip().partition(" ")
    name, hash_, k = key.strip().rpartition("#")
    stem = _image_stem(name) if hash_ else None
    caption = caption.strip()
    if stem is None or not k.isdigit() or not caption:
      unmatched.append(dict(file=path, line_no=n, line=line,
                            reason="id names no image (malformed) or empty caption"))
      continue
    per_image = captions.setdefault(stem, {})
    if int(k) in per_image:
      unmatched.append(dict(file=path, line_no=n, line=line, reason=f"duplicate #{k}"))
      continue
    per_image[int(k)] = caption
  return captions


def _parse_wav2capt(path: str, unmatched: list) -> dict[tuple[str, int], tuple[str, int, str]]:
  """wav2capt.txt -> {(image id, k): (wav name, line number, line)}."""
  wavs = {}
  for n, line in _read_lines(path):
    parts = line.split()
    ok = len(parts) == 3 and parts[2].startswith("#") and parts[2][1:].isdigit()
    stem = _image_stem(parts[1]) if ok else None
    if stem is None or not parts[0].lower().endswith(".wav") or "/" in parts[0]:
      unmatched.append(dict(file=path, line_no=n, line=line, reason="malformed line"))
      continue
    key = (stem, int(parts[2][1:]))
    if key in wavs:
      unmatched.append(dict(file=path, line_no=n, line=line, reason="duplicate caption"))
      continue
    wavs[key] = (parts[0], n, line)
  return wavs


def _list_dir(path: str) -> set[str]:
  with os.scandir(path) as it:
    return {e.name for e in it}


def check_image(path: str) -> Optional[str]:
  """None when the file decodes (at 1/8 scale: fast, but reads every byte); else why not."""
  try:
    with Image.open(path) as im:
      im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
      im.load()
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f"unreadable image ({type(e).__name__}: {e})"


def _riff_data_shortfall(path: str) -> Optional[str]:
  """Compares the RIFF `data` chunk size in the header with the bytes on disk."""
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
      return None  # not RIFF/WAVE: left to libsndfile
    size = os.fstat(f.fileno()).st_size
    pos = 12
    while pos + 8 <= size:
      f.seek(pos)
      chunk = f.read(8)
      if len(chunk) < 8:
        break
      cid, clen = chunk[:4], struct.unpack("<I", chunk[4:])[0]
      if cid == b"data":
        if clen in (0, 0xFFFFFFFF):  # streamed writers leave a placeholder
          return None
        have = size - pos - 8
        if have < clen:
          return f"truncated wav (data chunk holds {have} of {clen} bytes)"
        return None
      pos += 8 + clen + (clen & 1)
    return "wav has no data chunk"


def check_wav(path: str) -> Optional[str]:
  """None when the WAV header reads and its data is all there; else why not."""
  try:
    info = sf.info(path)
    if info.frames <= 0:
      return "empty wav"
    return _riff_data_shortfall(path)
  except Exception as e:  # pylint: disable=broad-except
    return f"unreadable wav ({type(e).__name__}: {e})"


def check_files(fn, paths: list[str], num_threads: int) -> dict[str, Optional[str]]:
  """{path: fn(path)} over `num_threads` threads (fn: `check_image` or `check_wav`)."""
  if not paths:
    return {}
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return dict(zip(paths, pool.map(fn, paths)))


def _report_file(report_path, default_name: str) -> Optional[str]:
  if report_path is None:
    return None
  report_path = os.fspath(report_path)
  if os.path.isdir(report_path) or not report_path.endswith(".json"):
    return os.path.join(report_path, default_name)
  return report_path


def write_report(report: dict, report_path, default_name: str = REPORT_NAME
                 ) -> Optional[str]:
  """Writes the loss report as JSON to `report_path` (a file ending in .json, or a folder
  to hold `default_name`) and records it as `report["report_file"]`; None writes none.
  Returns the file written (or None)."""
  report_file = _report_file(report_path, default_name)
  if report_file:
    os.makedirs(os.path.dirname(report_file) or ".", exist_ok=True)
    # Written whole, then renamed: processes of one job index the same root at once.
    tmp = f"{report_file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, report_file)
    report["report_file"] = report_file
  return report_file


def load_index(root, use_audio: bool = True, max_lost_fraction: float = 0.01,
               report_path=None, num_threads: Optional[int] = None) -> Flickr8kIndex:
  """Parses and checks a Flickr8k (+ FACC) root.

  Args:
    root: corpus root in any accepted layout (module docstring).
    use_audio: False ignores flickr_audio/ (wav_paths all None, has_audio False).
    max_lost_fraction: `DataError` when a split loses more than this fraction of its
      listed images, or of the recordings of its kept captions.
    report_path: where to write the JSON loss report (a file ending in .json, or a folder
      to hold `flickr8k_report.json`); None writes none. Always on `index.report`.
    num_threads: file-check threads (default: 4 x CPUs, at most 32).

  Returns:
    Flickr8kIndex; each split's examples in the order of its list file, captions sorted by
    k, wav_paths aligned with captions (None where no usable recording).
  """
  root = os.path.abspath(os.fspath(root))
  layout = find_layout(root, use_audio)
  num_threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
  unmatched = {"token": [], "wav2capt": [], "split": []}
  captions = _parse_tokens(os.path.join(layout.text_dir, TOKEN_FILE), unmatched["token"])
  image_names = _list_dir(layout.image_dir)

  listed: dict[str, list[str]] = {}
  owner: dict[str, str] = {}
  for split in SPLITS:
    path = layout.split_paths[split]
    listed[split] = []
    for n, line in _read_lines(path):
      stem = _image_stem(line)
      if stem is None:
        unmatched["split"].append(dict(file=path, line_no=n, line=line, reason="malformed"))
      elif stem in owner:
        unmatched["split"].append(dict(file=path, line_no=n, line=line,
                                       reason=f"already listed in {owner[stem]}"))
      else:
        owner[stem] = split
        listed[split].append(stem)

  # Token lines whose image is neither on disk nor in a split are reported once per image.
  for stem in sorted(set(captions) - set(owner)):
    if stem + ".jpg" not in image_names:
      unmatched["token"].append(dict(image_id=stem, captions=len(captions[stem]),
                                     reason="names no image"))

  lost_images = {s: [] for s in SPLITS}
  to_check = []
  for split in SPLITS:
    for stem in listed[split]:
      path = os.path.join(layout.image_dir, stem + ".jpg")
      if stem not in captions:
        lost_images[split].append(dict(image_id=stem, path=path, reason="no captions"))
      elif stem + ".jpg" not in image_names:
        lost_images[split].append(dict(image_id=stem, path=path, reason="missing image file"))
      else:
        to_check.append(path)
  image_errors = check_files(check_image, to_check, num_threads)
  bad_images = set()
  for split in SPLITS:
    for stem in listed[split]:
      path = os.path.join(layout.image_dir, stem + ".jpg")
      if image_errors.get(path):
        lost_images[split].append(dict(image_id=stem, path=path, reason=image_errors[path]))
        bad_images.add(stem)
  lost_ids = {d["image_id"] for s in SPLITS for d in lost_images[s]}

  wav_of = {}
  wav_errors = {}
  if layout.audio_dir:
    wav_dir = os.path.join(layout.audio_dir, "wavs")
    entries = _parse_wav2capt(os.path.join(layout.audio_dir, WAV2CAPT), unmatched["wav2capt"])
    wav_names = _list_dir(wav_dir)
    for (stem, k), (name, n, line) in entries.items():
      if stem not in owner or k not in captions.get(stem, {}):
        unmatched["wav2capt"].append(dict(file=os.path.join(layout.audio_dir, WAV2CAPT),
                                          line_no=n, line=line,
                                          reason="names no listed image caption"))
        continue
      if stem in lost_ids:
        continue
      path = os.path.join(wav_dir, name)
      wav_of[(stem, k)] = path
      if name not in wav_names:
        wav_errors[path] = "missing wav file"
    wav_errors.update({p: e for p, e in check_files(
        check_wav, [p for p in wav_of.values() if p not in wav_errors], num_threads).items()
                       if e})

  splits, counts, lost_clips = {}, {}, {s: [] for s in SPLITS}
  for split in SPLITS:
    examples = []
    for stem in listed[split]:
      if stem in lost_ids:
        continue
      ks = sorted(captions[stem])
      wavs = []
      for k in ks:
        path = wav_of.get((stem, k))
        if layout.audio_dir and path is None:
          lost_clips[split].append(dict(image_id=stem, k=k, path=None, reason="no recording"))
        elif path is not None and path in wav_errors:
          lost_clips[split].append(dict(image_id=stem, k=k, path=path,
                                        reason=wav_errors[path]))
          path = None
        wavs.append(path)
      examples.append(Example(
          image_id=stem, image_path=os.path.join(layout.image_dir, stem + ".jpg"),
          captions=tuple(captions[stem][k] for k in ks), wav_paths=tuple(wavs)))
    splits[split] = SplitIndex(split, examples)
    n_caps = sum(len(e.captions) for e in examples)
    counts[split] = dict(
        listed_images=len(listed[split]), images=len(examples), captions=n_caps,
        clips=sum(w is not None for e in examples for w in e.wav_paths),
        lost_images=len(lost_images[split]), lost_clips=len(lost_clips[split]),
        images_with_fewer_than_5_captions=sum(len(e.captions) < 5 for e in examples),
        lost_image_fraction=len(lost_images[split]) / max(1, len(listed[split])),
        lost_clip_fraction=(len(lost_clips[split]) / max(1, n_caps)
                            if layout.audio_dir else 0.0))

  removed = sorted({d["path"] for s in SPLITS for d in lost_images[s]
                    if d["reason"] != "no captions"}
                   | {d["path"] for s in SPLITS for d in lost_clips[s] if d["path"]})
  report = dict(
      root=root,
      layout=dict(images=layout.image_dir, text=layout.text_dir, splits=layout.split_paths,
                  audio=layout.audio_dir),
      has_audio=layout.audio_dir is not None, max_lost_fraction=max_lost_fraction,
      counts=counts, lost_images=lost_images, lost_clips=lost_clips,
      unmatched_lines=unmatched, removed_files=removed)
  report_file = write_report(report, report_path)

  n_unmatched = sum(len(v) for v in unmatched.values())
  if removed or n_unmatched:
    logging.warning("Flickr8k index: excluded %d files (missing or unreadable) and %d "
                    "unmatched lines%s.", len(removed), n_unmatched,
                    f"; details in {report_file}" if report_file else "")
  if use_audio and layout.audio_dir is None:
    logging.warning("No %s/ under %s: no spoken captions, training will be image-text "
                    "only.", AUDIO_DIR, root)
  too_many = [f"{s}: {c['lost_images']}/{c['listed_images']} images, "
              f"{c['lost_clips']}/{c['captions']} clips"
              for s, c in counts.items()
              if c["lost_image_fraction"] > max_lost_fraction
              or c["lost_clip_fraction"] > max_lost_fraction or c["images"] == 0]
  if too_many:
    raise DataError(
        f"Flickr8k root {root!r} loses more than max_lost_fraction={max_lost_fraction} "
        f"(or all) of a split ({'; '.join(too_many)}). "
        + (f"See {report_file}. " if report_file else "")
        + f"Re-download or re-unpack the corpus (`{DOWNLOAD_HINT}`).", report)
  return Flickr8kIndex(root=root, splits=splits, has_audio=layout.audio_dir is not None,
                       report=report)


def format_report(report: dict, max_items: int = 20) -> str:
  """Human-readable summary of `Flickr8kIndex.report`."""
  lines = [f"root: {report['root']}", f"has_audio: {report['has_audio']}"]
  for split, c in report["counts"].items():
    lines.append(f"{split:5s}: {c['images']} images ({c['lost_images']} lost of "
                 f"{c['listed_images']} listed), {c['captions']} captions, {c['clips']} clips "
                 f"({c['lost_clips']} lost)")
  items = [(s, d) for s in SPLITS for d in report["lost_images"][s]]
  items += [(s, d) for s in SPLITS for d in report["lost_clips"][s]]
  if items:
    lines.append(f"lost ({len(items)}):")
    lines += [f"  [{s}] {d.get('path') or d['image_id']}: {d['reason']}"
              for s, d in items[:max_items]]
    if len(items) > max_items:
      lines.append(f"  ... {len(items) - max_items} more")
  for kind, entries in report["unmatched_lines"].items():
    if entries:
      lines.append(f"unmatched {kind} entries ({len(entries)}):")
      lines += [f"  {d.get('line', d.get('image_id'))!r}: {d['reason']}"
                for d in entries[:max_items]]
  if report.get("report_file"):
    lines.append(f"report: {report['report_file']}")
  return "\n".join(lines)


def check_cli(argv, *, description: str, path_flag: str, load, describe) -> int:
  """The corpus-checking command line shared by the readers: index the corpus at
  --<path_flag> with `load`, print `describe(report)`; 1 (the report and the error, no
  traceback) when the index is refused."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument(f"--{path_flag}", required=True)
  parser.add_argument("--no_audio", action="store_true", help="ignore the recordings")
  parser.add_argument("--max_lost_fraction", type=float, default=0.01)
  parser.add_argument("--report", default=None, help="write the JSON report here")
  args = parser.parse_args(argv)
  try:
    index = load(getattr(args, path_flag), use_audio=not args.no_audio,
                 max_lost_fraction=args.max_lost_fraction, report_path=args.report)
  except DataError as e:
    if e.report:
      print(describe(e.report))
    print(f"ERROR: {e}", file=sys.stderr)
    return 1
  print(describe(index.report))
  return 0


def main(argv=None) -> int:
  return check_cli(argv, description="Check a Flickr8k (+ FACC) root.", path_flag="root",
                   load=load_index, describe=format_report)


if __name__ == "__main__":
  sys.exit(main())
