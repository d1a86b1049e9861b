"""Converts a Flickr8k (+ FACC) root into a manifest corpus (JSONL), the worked example.

  python scripts/make_manifest.py --root=data/flickr8k --output=data/flickr8k/manifest.jsonl
      [--no_audio] [--max_lost_fraction=0.01] [--absolute]

The root is indexed exactly as training indexes it (`nlmm_jax.data.flickr8k.load_index`:
any accepted layout, the split files, wav2capt.txt), then written one image per line in
the manifest format (`nlmm_jax/data/manifest.py`):

  {"image": PATH, "captions": [5 captions, k order], "audio": [WAV PATH or null, ...],
   "split": "train" | "dev" | "test"}

train lines first, then dev, then test, each in its split file's order. "audio" is
written when the root has spoken captions (flickr_audio/) and --no_audio is not given;
null where a caption's recording is missing or broken. What the index drops (missing or
undecodable files, lines naming no image) is printed as its report and not written; more
than --max_lost_fraction of a split lost is an error (exit status 1), as in training.
Paths are relative to the output file's folder (so the corpus and its manifest move
together), or absolute with --absolute. The image id is the file stem, the manifest's
default, so no "id" is written. Training on the result:

  python -m nlmm_jax.main --config=tiny --workdir=runs/mine \\
      --config.data.name=manifest --config.data.manifest=data/flickr8k/manifest.jsonl
"""

import argparse
import json
import os
import sys

from nlmm_jax.data import flickr8k


def manifest_lines(index: flickr8k.Flickr8kIndex, out_dir: str,
                   absolute: bool = False) -> list[str]:
  """The manifest's lines (JSON text, no newline) for every kept image of `index`:
  splits in flickr8k.SPLITS order, images in index order; paths relative to `out_dir`
  unless `absolute`."""
  def where(path: str) -> str:
    return os.path.abspath(path) if absolute else os.path.relpath(path, out_dir)

  lines = []
  for split in flickr8k.SPLITS:
    for ex in index.splits[split].examples:
      item = {"image": where(ex.image_path), "captions": list(ex.captions)}
      if index.has_audio:
        item["audio"] = [None if w is None else where(w) for w in ex.wav_paths]
      item["split"] = split
      lines.append(json.dumps(item, ensure_ascii=False))
  return lines


def write_lines(path: str, lines: list[str]) -> None:
  """Writes UTF-8 text, one line each, atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
  os.replace(tmp, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="a Flickr8k (+ FACC) root")
  parser.add_argument("--output", required=True, help="the manifest file to write (JSONL)")
  parser.add_argument("--no_audio", action="store_true",
                      help="ignore flickr_audio/: an image-text manifest")
  parser.add_argument("--max_lost_fraction", type=float, default=0.01,
                      help="error when a split loses more than this "
                      "(as data.max_lost_fraction)")
  parser.add_argument("--absolute", action="store_true",
                      help="absolute paths (default: relative to the output's folder)")
  args = parser.parse_args(argv)
  try:
    index = flickr8k.load_index(args.root, use_audio=not args.no_audio,
                                max_lost_fraction=args.max_lost_fraction)
  except flickr8k.DataError as e:
    if e.report:
      print(flickr8k.format_report(e.report))
    print(f"ERROR: {e}", file=sys.stderr)
    return 1
  print(flickr8k.format_report(index.report))
  output = os.path.abspath(args.output)
  lines = manifest_lines(index, os.path.dirname(output), args.absolute)
  write_lines(output, lines)
  per_split = ", ".join(f"{s} {len(index.splits[s].examples)}" for s in flickr8k.SPLITS)
  print(f"wrote {len(lines)} images ({per_split}; "
        f"{'with' if index.has_audio else 'without'} audio) to {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
