"""Demo corpus: drawn scenes, templated captions and their speech, in the Flickr8k + FACC layout.

Each image shows one shape on a patterned background. Its *content key* is
(size, colour, shape, vertical position, background); keys are drawn without replacement, so
no two images share one, and every caption states the whole key (in one of five phrasings,
with synonyms), so each caption singles out its image. Positions are vertical only (top,
middle, bottom) and all shapes are left-right symmetric, so horizontal flips at training
time keep captions true. Everything else (horizontal place, exact size, tilt, tints,
pattern spacing, pixel noise) varies freely.

Each caption is spoken by espeak-ng (the `espeakng-loader` wheel, driven through ctypes)
with a voice, variant, rate and pitch drawn per caption, resampled to 16 kHz mono PCM-16.
espeak-ng output depends on its internal state, so all speech is synthesised in one fresh
subprocess, in a fixed order: the same seed gives byte-identical files, also when
`generate` runs twice in one process.

  python -m nlmm_jax.data.demo --output_dir=DIR [--num_images=1000] [--seed=0]
"""

import argparse
import ctypes
import ctypes.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_DIR = "Flicker8k_Dataset"    # (sic), as in the official archive
MARKER = "DEMO_CORPUS.json"        # written first ("complete": false) and last (true)
VERSION = 2                        # 2: speech in SPEECH_SHARDS independent processes
SPEECH_SHARDS = 4                  # fixed, so the corpus is the same on every machine
IMAGE_SIZE = 128
SAMPLE_RATE = 16000
SPLIT_FRACTIONS = (0.8, 0.1)       # train, dev; test gets the rest

# Content-key vocabulary: small, acoustically distinct words; synonym sets are disjoint.
SIZES = {"small": ("small", "little"), "big": ("big", "large")}
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 170), "orange": (250, 130, 0),
    "white": (250, 250, 250), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
POSITIONS = {  # vertical centre (fraction of height), phrasings
    "top": (0.29, ("at the top", "near the top")),
    "middle": (0.50, ("in the middle", "in the centre")),
    "bottom": (0.71, ("at the bottom", "near the bottom")),
}
BACKGROUNDS = {  # adjective, noun
    "stripes": ("striped", "stripes"), "dots": ("dotted", "dots"),
    "checks": ("checkered", "checks"), "waves": ("wavy", "waves"),
    "bricks": ("brick", "bricks"),
}
TEMPLATES = (
    "a {size} {colour} {shape} {pos} on a {bg_adj} background",
    "{pos} a {size} {colour} {shape} over {bg_noun}",
    "{bg_noun} behind a {size} {colour} {shape} {pos}",
    "a {size} {shape} in {colour} {pos} with {bg_noun}",
    "one {size} {colour} {shape} {pos} on {bg_noun}",
)
# Speakers: English voices x variants; rate (words per minute) and pitch (0-99) per caption.
VOICES = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc")
# No variants with "breath" (f2, f3, f5): their noise is seeded differently in every
# process, which would make the corpus irreproducible.
VARIANTS = ("", "+m1", "+m3", "+m6", "+f1", "+f4")
RATE_RANGE = (170, 210)
PITCH_RANGE = (30, 70)


def all_keys() -> list[tuple[str, str, str, str, str]]:
  """Every content key (size, colour, shape, position, background), in a fixed order."""
  return list(itertools.product(SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS))


def captions_for(key, rng: np.random.Generator) -> list[str]:
  """Five captions, each in a different template, all stating the full key."""
  size, colour, shape, pos, bg = key
  out = []
  for t in rng.permutation(len(TEMPLATES)):
    text = TEMPLATES[t].format(
        size=rng.choice(SIZES[size]), colour=colour, shape=shape,
        pos=rng.choice(POSITIONS[pos][1]), bg_adj=BACKGROUNDS[bg][0],
        bg_noun=BACKGROUNDS[bg][1])
    out.append(re.sub(r"\ba (?=[aeiou])", "an ", text))
  return out


# ----------------------------------------------------------------------------- images


def _shape_polygon(shape: str, cx: float, cy: float, r: float, tilt: float):
  """Vertices of a left-right symmetric shape of radius r (None for a circle)."""
  if shape == "circle":
    return None
  if shape == "square":
    pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    pts = [(0.8 * x, 0.8 * y) for x, y in pts]
  elif shape == "triangle":
    pts = [(0, -1), (0.95, 0.7), (-0.95, 0.7)]
  elif shape == "star":
    pts = []
    for i in range(10):
      a = -np.pi / 2 + i * np.pi / 5
      rr = 1.0 if i % 2 == 0 else 0.42
      pts.append((rr * np.cos(a), rr * np.sin(a)))
  elif shape == "cross":
    w = 0.32
    pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
           (-1, w), (-1, -w), (-w, -w)]
  elif shape == "heart":
    ts = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    pts = list(zip(xs / 17, (ys + 2) / 17))
  else:
    raise ValueError(shape)
  c, s = np.cos(tilt), np.sin(tilt)
  return [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in pts]


def _background(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
  """A muted pattern; tints are unsaturated so that every object colour stands out."""
  base = rng.integers(110, 170)
  tint = rng.integers(-15, 16, size=3)
  c0 = tuple(int(v) for v in np.clip(base + tint, 0, 255))
  delta = int(rng.choice([-1, 1]) * rng.integers(35, 55))
  c1 = tuple(int(v) for v in np.clip(np.array(c0) + delta, 0, 255))
  img = Image.new("RGB", (size, size), c0)
  d = ImageDraw.Draw(img)
  step = int(rng.integers(10, 17))
  off = int(rng.integers(0, step))
  if kind == "stripes":
    horizontal = rng.random() < 0.5
    for p in range(-step + off, size, step):
      box = ([0, p, size, p + step // 2] if horizontal else [p, 0, p + step // 2, size])
      d.rectangle(box, fill=c1)
  elif kind == "dots":
    rad = max(2, step // 4)
    for y in range(off - step, size + step, step):
      for x in range(off - step, size + step, step):
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=c1)
  elif kind == "checks":
    for y in range(-step + off, size, step):
      for x in range(-step + off, size, step):
        if ((x - off) // step + (y - off) // step) % 2 == 0:
          d.rectangle([x, y, x + step - 1, y + step - 1], fill=c1)
  elif kind == "waves":
    amp, period = rng.uniform(2, 4), rng.uniform(18, 30)
    xs = np.arange(size + 1)
    for y0 in range(-step + off, size + step, step):
      pts = [(float(x), y0 + amp * np.sin(2 * np.pi * x / period)) for x in xs]
      d.line(pts, fill=c1, width=max(2, step // 4))
  elif kind == "bricks":
    h = step
    for row, y in enumerate(range(-h + off, size, h)):
      d.line([(0, y), (size, y)], fill=c1, width=2)
      shift = (row % 2) * h
      for x in range(-2 * h + shift + off, size, 2 * h):
        d.line([(x, y), (x, y + h)], fill=c1, width=2)
  else:
    raise ValueError(kind)
  return img


def draw_scene(key, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
  """Draws the key's object on its background; everything not in the key is random."""
  obj_size, colour, shape, pos, bg = key
  img = _background(bg, rng, size)
  d = ImageDraw.Draw(img)
  frac = rng.uniform(0.12, 0.135) if obj_size == "small" else rng.uniform(0.21, 0.235)
  r = frac * size
  cx = rng.uniform(0.32, 0.68) * size
  cy = (POSITIONS[pos][0] + rng.uniform(-0.03, 0.03)) * size
  rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, size=3), 0, 255)
  fill = tuple(int(v) for v in rgb)
  outline = (0, 0, 0) if colour != "black" else (235, 235, 235)
  poly = _shape_polygon(shape, cx, cy, r, rng.uniform(-0.12, 0.12))
  if poly is None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
  else:
    d.polygon(poly, fill=fill, outline=outline, width=2)
  img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))
  noise = rng.normal(0, rng.uniform(2, 8), size=(size, size, 3))
  arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
  return Image.fromarray(arr, "RGB")


# ----------------------------------------------------------------------------- speech


def _load_espeak():
  """(ctypes library, data path or None) from the wheel, else a system libespeak-ng."""
  try:
    import espeakng_loader  # pylint: disable=g-import-not-at-top
    return (ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path()),
            espeakng_loader.get_data_path())
  except (ImportError, OSError):
    pass
  name = ctypes.util.find_library("espeak-ng")
  if name:
    return ctypes.cdll.LoadLibrary(name), None
  raise RuntimeError(
      "The demo corpus needs espeak-ng: `pip install espeakng-loader` (wheels for Linux "
      "x86_64, macOS arm64, Windows), or on other platforms the system library "
      "(Debian/Ubuntu: `apt-get install libespeak-ng1 espeak-ng-data`; macOS: "
      "`brew install espeak-ng`).")


class _Speaker:
  """espeak-ng in synchronous mode; collects int16 samples through a callback."""

  def __init__(self):
    self.lib, data = _load_espeak()
    self.rate = self.lib.espeak_Initialize(2, 0, data.encode() if data else None, 0)
    if self.rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed ({self.rate})")
    self._chunks = []
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)
    self._callback = proto(self._collect)  # keep referenced while synthesising
    self.lib.espeak_SetSynthCallback(self._callback)

  def _collect(self, wav, n, events):
    del events
    if n > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0

  def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """int16 samples at self.rate."""
    if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise RuntimeError(f"espeak-ng has no voice {voice!r}")
    self.lib.espeak_SetParameter(1, int(rate), 0)   # espeakRATE
    self.lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH
    self._chunks = []
    data = text.encode("utf-8")
    self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1, None, None)  # 1: UTF-8
    self.lib.espeak_Synchronize()
    return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _trim_and_resample(x: np.ndarray, rate: int) -> np.ndarray:
  """Trims leading/trailing silence (keeping 60 ms), resamples to 16 kHz int16."""
  from scipy import signal  # pylint: disable=g-import-not-at-top
  loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 300)
  if loud.size:
    pad = int(0.06 * rate)
    x = x[max(0, loud[0] - pad):loud[-1] + pad]
  g = np.gcd(SAMPLE_RATE, rate)
  y = signal.resample_poly(x.astype(np.float64), SAMPLE_RATE // g, rate // g)
  return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def synthesise(jobs: list[dict], progress: bool = True) -> None:
  """Speaks each job {text, voice, rate, pitch, path} in order into a 16 kHz WAV.

  Call in a fresh process for reproducible samples (espeak-ng keeps state).
  """
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  speaker = _Speaker()
  for job in tqdm(jobs, desc="speech", unit="clip", disable=not progress, mininterval=1.0):
    x = speaker.say(job["text"], job["voice"], job["rate"], job["pitch"])
    if x.size == 0:
      raise RuntimeError(f"espeak-ng produced no audio for {job['text']!r}")
    sf.write(job["path"], _trim_and_resample(x, speaker.rate), SAMPLE_RATE,
             subtype="PCM_16", format="WAV")


def synthesise_in_processes(jobs: list[dict], progress: bool = True) -> None:
  """`synthesise` in SPEECH_SHARDS fresh processes, at most one per CPU core at a time.

  espeak-ng keeps state between clips, so a clip's samples depend on the clips spoken
  before it in the same process: each shard (a fixed, contiguous part of `jobs`) is spoken
  in its own fresh process, which makes the corpus the same whatever the core count.
  """
  start = time.time()
  shards = [s.tolist() for s in np.array_split(np.arange(len(jobs)), SPEECH_SHARDS)]
  package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
  parallel = max(1, min(len(shards), os.cpu_count() or 1))
  with tempfile.TemporaryDirectory() as tmp:
    pending = []
    for i, rows in enumerate(shards):
      path = os.path.join(tmp, f"jobs_{i}.json")
      with open(path, "w") as f:
        json.dump([jobs[r] for r in rows], f)
      pending.append([sys.executable, "-m", "nlmm_jax.data.demo", f"--tts_jobs={path}",
                      "--quiet"])
    running = []
    while pending or running:
      while pending and len(running) < parallel:
        cmd = pending.pop(0)
        running.append((cmd, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE,
                                               text=True)))
      cmd, proc = running.pop(0)
      _, err = proc.communicate()
      if proc.returncode:
        for _, other in running:
          other.kill()
        raise RuntimeError(f"speech synthesis failed (exit {proc.returncode}): "
                           f"{err.strip().splitlines()[-1] if err.strip() else ''}")
  if progress:
    print(f"speech: {len(jobs)} clips in {len(shards)} processes, {parallel} at a time "
          f"({time.time() - start:.1f} s)")


# ----------------------------------------------------------------------------- corpus


def _prepare_dir(output_dir: str) -> None:
  if os.path.isdir(output_dir) and os.listdir(output_dir):
    if not os.path.isfile(os.path.join(output_dir, MARKER)):
      raise ValueError(f"{output_dir!r} is not empty and holds no {MARKER}: refusing to "
                       "overwrite it; pass an empty or new directory.")
    for name in os.listdir(output_dir):
      path = os.path.join(output_dir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  os.makedirs(os.path.join(output_dir, IMAGE_DIR), exist_ok=True)
  os.makedirs(os.path.join(output_dir, "flickr_audio", "wavs"), exist_ok=True)


def _write_text(path: str, lines: list[str]) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write("".join(line + "\n" for line in lines))


def generate(output_dir, num_images: int = 1000, seed: int = 0,
             progress: bool = True) -> None:
  """Writes a demo corpus of `num_images` images (80/10/10 split) under `output_dir`."""
  start = time.time()
  output_dir = os.path.abspath(os.fspath(output_dir))
  keys = all_keys()
  if not 3 <= num_images <= len(keys):
    raise ValueError(f"num_images must be in [3, {len(keys)}] (distinct content keys), "
                     f"got {num_images}")
  _prepare_dir(output_dir)
  marker = dict(generator="nlmm_jax.data.demo", version=VERSION, num_images=num_images,
                seed=seed, complete=False)
  _write_text(os.path.join(output_dir, MARKER), [json.dumps(marker, sort_keys=True)])

  rng = np.random.default_rng(seed)
  chosen = [keys[i] for i in rng.choice(len(keys), size=num_images, replace=False)]
  speakers = [v + var for v in VOICES for var in VARIANTS]
  ids = [f"demo_{i:05d}" for i in range(num_images)]
  token_lines, wav_lines, spk_lines, jobs, all_captions = [], [], [], [], set()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  for iid, key in tqdm(list(zip(ids, chosen)), desc="images", unit="img",
                       disable=not progress, mininterval=1.0):
    img_rng = np.random.default_rng([seed, int(iid[5:])])
    draw_scene(key, img_rng).save(os.path.join(output_dir, IMAGE_DIR, iid + ".jpg"),
                                  format="JPEG", quality=90)
    for k, caption in enumerate(captions_for(key, img_rng)):
      if caption in all_captions:
        raise AssertionError(f"caption {caption!r} is not unique")
      all_captions.add(caption)
      wav = f"{iid}_{k}.wav"
      spk = int(img_rng.integers(len(speakers)))
      token_lines.append(f"{iid}.jpg#{k}\t{caption}")
      wav_lines.append(f"{wav} {iid}.jpg #{k}")
      spk_lines.append(f"{wav} {spk + 1}")
      jobs.append(dict(text=caption, voice=speakers[spk],
                       rate=int(img_rng.integers(*RATE_RANGE)),
                       pitch=int(img_rng.integers(*PITCH_RANGE)),
                       path=os.path.join(output_dir, "flickr_audio", "wavs", wav)))

  n_train = int(round(SPLIT_FRACTIONS[0] * num_images))
  n_dev = max(1, int(round(SPLIT_FRACTIONS[1] * num_images)))
  n_train = min(n_train, num_images - n_dev - 1)
  order = [f"{iid}.jpg" for iid in ids]
  _write_text(os.path.join(output_dir, "Flickr8k.token.txt"), token_lines)
  _write_text(os.path.join(output_dir, "Flickr_8k.trainImages.txt"), order[:n_train])
  _write_text(os.path.join(output_dir, "Flickr_8k.devImages.txt"),
              order[n_train:n_train + n_dev])
  _write_text(os.path.join(output_dir, "Flickr_8k.testImages.txt"), order[n_train + n_dev:])
  _write_text(os.path.join(output_dir, "flickr_audio", "wav2capt.txt"), wav_lines)
  _write_text(os.path.join(output_dir, "flickr_audio", "wav2spk.txt"), spk_lines)

  synthesise_in_processes(jobs, progress)
  marker["complete"] = True
  _write_text(os.path.join(output_dir, MARKER), [json.dumps(marker, sort_keys=True)])
  if progress:
    print(f"demo corpus: {num_images} images, {len(jobs)} captions and clips in "
          f"{output_dir} ({time.time() - start:.1f} s)")


def is_complete(output_dir, num_images: int, seed: int) -> bool:
  """True when `output_dir` holds a finished demo corpus made with these settings."""
  try:
    with open(os.path.join(output_dir, MARKER)) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return False
  return (m.get("complete") is True and m.get("version") == VERSION
          and m.get("num_images") == num_images and m.get("seed") == seed)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Generate the NL-MM demo corpus.")
  parser.add_argument("--output_dir")
  parser.add_argument("--num_images", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quiet", action="store_true")
  parser.add_argument("--tts_jobs", help=argparse.SUPPRESS)  # internal: speech worker
  args = parser.parse_args(argv)
  if args.tts_jobs:
    with open(args.tts_jobs) as f:
      synthesise(json.load(f), progress=not args.quiet)
    return 0
  if not args.output_dir:
    parser.error("--output_dir is required")
  generate(args.output_dir, args.num_images, args.seed, progress=not args.quiet)
  return 0


if __name__ == "__main__":
  sys.exit(main())
