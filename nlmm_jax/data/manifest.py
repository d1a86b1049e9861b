"""Manifest corpus: your own images, captions and spoken captions, listed in a JSONL file.

Format: UTF-8, one JSON object per line (one image), blank lines skipped:

  {"image": "images/0001.jpg",                 path of the image (any format PIL reads)
   "captions": ["a dog runs", "a brown dog"],  one or more non-empty strings
   "audio": ["wavs/0001_0.wav", null],         optional; aligned with captions: audio[k]
                                               is a WAV speaking captions[k], or null
                                               (that caption has no recording)
   "split": "train",                           "train" | "dev" | "test"
   "id": "0001"}                               optional; default: the image file's stem

Relative paths resolve against the manifest's folder; absolute paths are kept. Every split
needs at least one line (training evaluates on dev and test), ids and image paths are
unique, and no other keys are allowed (a misspelt key would otherwise be ignored).

The result is the Flickr8k index structure (`flickr8k.Flickr8kIndex`, root = the
manifest's folder, each split's examples in line order), so the feature cache, the grain
pipeline and the retrieval protocol are the same as for Flickr8k. As there: missing or
undecodable images and WAVs are counted, listed in a report (`format_report`) and
excluded, never replaced by zeros; a split losing more than `max_lost_fraction` of its
images, or of its recordings, raises `DataError`. A null in "audio" is a caption declared
unspoken, not a loss (counted as `unspoken_captions`). Without any "audio" list (or with
use_audio=False) the corpus is image-text only. A malformed line raises `DataError`
naming the file, the line number and what to fix.

CLI (check a manifest, print its report):
  python -m nlmm_jax.data.manifest --manifest=FILE [--no_audio] [--report=FILE]
"""

import json
import os
import sys
from typing import Optional

from absl import logging

from nlmm_jax.data import flickr8k

DataError = flickr8k.DataError
SPLITS = flickr8k.SPLITS
REQUIRED_KEYS = ("image", "captions", "split")
OPTIONAL_KEYS = ("audio", "id")
REPORT_NAME = "manifest_report.json"
MAX_LISTED_ERRORS = 10             # malformed lines quoted in one error
FORMAT_HINT = ('each line is {"image": PATH, "captions": [TEXT, ...], '
               '"audio": [WAV PATH or null, ...] (optional, one per caption), '
               '"split": "train" | "dev" | "test", "id": TEXT (optional)}; '
               "the format is described in nlmm_jax/data/manifest.py")


class LineError(ValueError):
  """What is wrong with one line (message only; the caller adds file and line)."""


def _type_name(value) -> str:
  return "null" if value is None else type(value).__name__


def parse_line(text: str) -> dict:
  """One manifest line -> {"image", "captions" (tuple), "audio" (tuple or None), "split",
  "id" (or None)}, paths as written. Raises `LineError` saying what to fix."""
  try:
    item = json.loads(text)
  except json.JSONDecodeError as e:
    raise LineError(f"not valid JSON ({e.msg} at column {e.colno}): write one JSON "
                     "object per line") from None
  if not isinstance(item, dict):
    raise LineError(f"a JSON object {{...}} is expected, got a JSON {_type_name(item)}")
  unknown = sorted(set(item) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
  if unknown:
    raise LineError(f"unknown key(s) {unknown}: the keys are "
                     f"{list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
  missing = [k for k in REQUIRED_KEYS if k not in item]
  if missing:
    raise LineError(f"missing key(s) {missing}: every line needs {list(REQUIRED_KEYS)}")
  image = item["image"]
  if not isinstance(image, str) or not image.strip():
    raise LineError(f'"image" must be a non-empty path string, got {_type_name(image)} '
                     f"{image!r}")
  captions = item["captions"]
  if (not isinstance(captions, list) or not captions
      or not all(isinstance(c, str) and c.strip() for c in captions)):
    raise LineError('"captions" must be a non-empty list of non-empty strings, e.g. '
                     f'["a dog runs on the grass"], got {json.dumps(captions)[:200]}')
  split = item["split"]
  if split not in SPLITS:
    raise LineError(f'"split" must be one of {list(SPLITS)}, got {json.dumps(split)}')
  audio = item.get("audio")
  if "audio" in item:
    if not isinstance(audio, list) or not all(
        a is None or (isinstance(a, str) and a.strip()) for a in audio):
      raise LineError('"audio" must be a list of WAV paths or nulls, one per caption '
                       f"(or leave the key out), got {json.dumps(audio)[:200]}")
    if len(audio) != len(captions):
      raise LineError(f'"audio" has {len(audio)} entries for {len(captions)} captions: '
                       "give one per caption, in the same order (null where a caption "
                       "has no recording)")
    audio = tuple(audio)
  image_id = item.get("id")
  if "id" in item and (not isinstance(image_id, str) or not image_id.strip()):
    raise LineError(f'"id" must be a non-empty string (or leave the key out), got '
                     f"{_type_name(image_id)} {image_id!r}")
  return dict(image=image, captions=tuple(c.strip() for c in captions), audio=audio,
              split=split, id=image_id)


def _resolve(base: str, path: str) -> str:
  return os.path.abspath(os.path.join(base, path))


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def read_manifest(path: str) -> list[tuple[int, dict]]:
  """(1-based line number, `parse_line` result with absolute paths and its id) for each
  non-blank line, in file order. `DataError` listing every malformed line, every
  duplicate id or image, and every split without lines."""
  base = os.path.dirname(path)
  try:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is allowed
      # Text mode ends lines at \n, \r\n or \r only (str.splitlines would also cut
      # at U+2028 and others, which JSON strings may hold raw).
      lines = [line.rstrip("\r\n") for line in f]
  except UnicodeDecodeError as e:
    raise DataError(f"manifest {path}: not UTF-8 text ({e}); save it as UTF-8") from None
  except OSError as e:
    raise DataError(f"manifest {path} cannot be read ({e}): check data.manifest") from None
  items, errors = [], []
  first_of_id, first_of_image = {}, {}
  for n, text in enumerate(lines, 1):
    if not text.strip():
      continue
    try:
      item = parse_line(text)
    except LineError as e:
      errors.append(f"line {n}: {e}")
      continue
    item["image"] = _resolve(base, item["image"])
    if item["audio"] is not None:
      item["audio"] = tuple(None if a is None else _resolve(base, a) for a in item["audio"])
    item["id"] = item["id"] or _stem(item["image"])
    if item["id"] in first_of_id:
      errors.append(f"line {n}: id {item['id']!r} is already used on line "
                    f"{first_of_id[item['id']]} (ids default to the image file's stem): "
                    'give each image its own "id"')
      continue
    if item["image"] in first_of_image:
      errors.append(f"line {n}: image {item['image']} is already listed on line "
                    f"{first_of_image[item['image']]}: put all captions of an image on "
                    "one line")
      continue
    first_of_id[item["id"]] = n
    first_of_image[item["image"]] = n
    items.append((n, item))
  if errors:
    shown = "\n  ".join(errors[:MAX_LISTED_ERRORS])
    more = (f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more"
            if len(errors) > MAX_LISTED_ERRORS else "")
    raise DataError(f"manifest {path}: {len(errors)} malformed line(s); fix them and "
                    f"rerun ({FORMAT_HINT}):\n  {shown}{more}")
  empty = [s for s in SPLITS if not any(item["split"] == s for _, item in items)]
  if empty:
    raise DataError(f"manifest {path}: no line has split {' or '.join(map(repr, empty))}; "
                    "training evaluates on dev and test and fits on train, so give every "
                    'split some lines ("split": "train" | "dev" | "test")')
  return items


def load_index(manifest_path, use_audio: bool = True, max_lost_fraction: float = 0.01,
               report_path=None, num_threads: Optional[int] = None
               ) -> flickr8k.Flickr8kIndex:
  """Reads and checks a manifest (module docstring) into the Flickr8k index structure.

  Args:
    manifest_path: the JSONL file.
    use_audio: False ignores every "audio" list (wav_paths all None, has_audio False;
      the lists are still checked for format).
    max_lost_fraction: `DataError` when a split loses more than this fraction of its
      listed images, or of the recordings of its kept captions.
    report_path: where to write the JSON loss report (a file ending in .json, or a folder
      to hold `manifest_report.json`); None writes none. Always on `index.report`.
    num_threads: file-check threads (default: 4 x CPUs, at most 32).

  Returns:
    Flickr8kIndex(root = the manifest's folder); per split, the kept images in line
    order, captions as listed (stripped), wav_paths aligned with them (None where a
    caption is unspoken or its recording is lost).
  """
  path = os.path.abspath(os.fspath(manifest_path))
  if not os.path.isfile(path):
    raise DataError(f"manifest {path} does not exist: set data.manifest to your JSONL "
                    "file (scripts/make_manifest.py writes one from a Flickr8k root)")
  root = os.path.dirname(path)
  num_threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
  items = read_manifest(path)
  has_audio = bool(use_audio) and any(item["audio"] is not None for _, item in items)

  image_errors = flickr8k.check_files(
      flickr8k.check_image, [it["image"] for _, it in items if os.path.isfile(it["image"])],
      num_threads)
  lost_images = {s: [] for s in SPLITS}
  kept = []
  for n, item in items:
    if not os.path.isfile(item["image"]):
      why = "missing image file"
    else:
      why = image_errors[item["image"]]
    if why:
      lost_images[item["split"]].append(dict(image_id=item["id"], path=item["image"],
                                             line_no=n, reason=why))
    else:
      kept.append((n, item))

  wav_errors = {}
  if has_audio:
    wavs = sorted({w for _, it in kept for w in it["audio"] or () if w is not None})
    wav_errors = {w: "missing wav file" for w in wavs if not os.path.isfile(w)}
    wav_errors.update({w: e for w, e in flickr8k.check_files(
        flickr8k.check_wav, [w for w in wavs if w not in wav_errors], num_threads).items()
                       if e})

  examples = {s: [] for s in SPLITS}
  lost_clips = {s: [] for s in SPLITS}
  unspoken = {s: 0 for s in SPLITS}
  for n, item in kept:
    split = item["split"]
    audio = item["audio"] if has_audio and item["audio"] is not None else (
        (None,) * len(item["captions"]))
    wavs = []
    for k, wav in enumerate(audio):
      if wav is None:
        unspoken[split] += has_audio
      elif wav in wav_errors:
        lost_clips[split].append(dict(image_id=item["id"], k=k, path=wav, line_no=n,
                                      reason=wav_errors[wav]))
        wav = None
      wavs.append(wav)
    examples[split].append(flickr8k.Example(
        image_id=item["id"], image_path=item["image"], captions=item["captions"],
        wav_paths=tuple(wavs)))

  counts = {}
  for split in SPLITS:
    ex = examples[split]
    listed = len(ex) + len(lost_images[split])
    n_caps = sum(len(e.captions) for e in ex)
    counts[split] = dict(
        listed_images=listed, images=len(ex), captions=n_caps,
        clips=sum(w is not None for e in ex for w in e.wav_paths),
        lost_images=len(lost_images[split]), lost_clips=len(lost_clips[split]),
        unspoken_captions=unspoken[split],
        images_with_fewer_than_5_captions=sum(len(e.captions) < 5 for e in ex),
        lost_image_fraction=len(lost_images[split]) / max(1, listed),
        lost_clip_fraction=len(lost_clips[split]) / max(1, n_caps) if has_audio else 0.0)

  removed = sorted({d["path"] for s in SPLITS for d in lost_images[s] + lost_clips[s]})
  report = dict(
      root=root, manifest=path, has_audio=has_audio, max_lost_fraction=max_lost_fraction,
      counts=counts, lost_images=lost_images, lost_clips=lost_clips,
      unmatched_lines={}, removed_files=removed)
  report_file = flickr8k.write_report(report, report_path, REPORT_NAME)

  if removed:
    logging.warning("Manifest index: excluded %d files (missing or unreadable)%s.",
                    len(removed), f"; details in {report_file}" if report_file else "")
  if use_audio and not has_audio:
    logging.warning("No line of %s gives \"audio\": no spoken captions, training will be "
                    "image-text only.", path)
  too_many = [f"{s}: {c['lost_images']}/{c['listed_images']} images, "
              f"{c['lost_clips']}/{c['captions']} clips"
              for s, c in counts.items()
              if c["lost_image_fraction"] > max_lost_fraction
              or c["lost_clip_fraction"] > max_lost_fraction or c["images"] == 0]
  if too_many:
    first = [f"line {d['line_no']}: {d['path']} ({d['reason']})"
             for s in SPLITS for d in lost_images[s] + lost_clips[s]][:3]
    raise DataError(
        f"manifest {path} loses more than max_lost_fraction={max_lost_fraction} (or all) "
        f"of a split ({'; '.join(too_many)}), e.g. {'; '.join(first)}. "
        + (f"See {report_file}. " if report_file else "")
        + "Restore or fix those files, or remove their lines from the manifest (or "
        "raise data.max_lost_fraction).", report)
  return flickr8k.Flickr8kIndex(root=root, splits={
      s: flickr8k.SplitIndex(s, examples[s]) for s in SPLITS}, has_audio=has_audio,
                                report=report)


def format_report(report: dict, max_items: int = 20) -> str:
  """Human-readable summary of a manifest index's report."""
  text = f"manifest: {report['manifest']}\n" + flickr8k.format_report(report, max_items)
  unspoken = {s: c["unspoken_captions"] for s, c in report["counts"].items()}
  if any(unspoken.values()):
    text += "\nunspoken captions (null in \"audio\"): " + ", ".join(
        f"{s} {n}" for s, n in unspoken.items())
  return text


def main(argv=None) -> int:
  return flickr8k.check_cli(argv, description="Check a manifest corpus (JSONL).",
                            path_flag="manifest", load=load_index, describe=format_report)


if __name__ == "__main__":
  sys.exit(main())
