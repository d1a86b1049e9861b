"""Image and audio features: decoding once (for the cache) and per-batch augmentation.

Stored (cache) forms:
  image:   uint8 [S, S, 3], S = image_size + crop_margin (shorter side resized to S, centre crop)
  log-mel: float16 [frames, n_mels], per-utterance normalised (zero mean, unit variance)
Model inputs (per example):
  image:   float32 [H, W, 3] ImageNet-normalised; train: random H x W crop + horizontal flip,
           eval: centre crop
  audio:   float32 [max_frames, n_mels] + bool mask [max_frames]; train: random window when
           longer, eval: the first max_frames frames; zero padding after the true length.
Unreadable files raise `FeatureError`; nothing is ever replaced by zeros.
"""

import dataclasses
import functools
from typing import Optional

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class FeatureError(RuntimeError):
  """A source file (image or audio) could not be decoded."""


@dataclasses.dataclass(frozen=True)
class AudioSettings:
  sample_rate: int = 16000
  n_fft: int = 400
  hop_length: int = 160
  n_mels: int = 80
  fmax: float = 8000.0
  top_db: float = 80.0         # log floor: max power * 10^(-top_db / 10)
  amin: float = 1e-10          # absolute power floor (digital silence)


# ----------------------------------------------------------------------------- images


def _resize_centre_crop(im, stored_size: int) -> np.ndarray:
  """PIL image -> RGB, shorter side resized to `stored_size`, centre crop, uint8 [S, S, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = im.convert("RGB")
  w, h = im.size
  scale = stored_size / min(w, h)
  nw, nh = max(stored_size, round(w * scale)), max(stored_size, round(h * scale))
  im = im.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - stored_size) // 2, (nh - stored_size) // 2
  out = np.asarray(im.crop((left, top, left + stored_size, top + stored_size)), np.uint8)
  assert out.shape == (stored_size, stored_size, 3), out.shape
  return out


def load_image(path: str, stored_size: int) -> np.ndarray:
  """RGB, shorter side resized to `stored_size`, centre crop -> uint8 [S, S, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.load()
      return _resize_centre_crop(im, stored_size)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
    raise FeatureError(f"cannot decode image {path!r}: {type(e).__name__}: {e}") from e


def image_from_array(image: np.ndarray, stored_size: int) -> np.ndarray:
  """uint8 [H, W, 3] (or [H, W] grey) -> uint8 [S, S, 3], exactly as `load_image` would."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
      image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise FeatureError(f"an image array must be uint8 [H, W, 3] (or [H, W], [H, W, 4]); "
                       f"got {image.dtype} {image.shape}")
  return _resize_centre_crop(Image.fromarray(image), stored_size)


def normalize_image(image_u8: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 ImageNet-normalised."""
  x = image_u8.astype(np.float32) * (1.0 / 255.0)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def train_image(stored: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Random `image_size` crop + random horizontal flip -> float32 [H, W, 3]."""
  s = stored.shape[0]
  top = int(rng.integers(0, s - image_size + 1))
  left = int(rng.integers(0, s - image_size + 1))
  crop = stored[top:top + image_size, left:left + image_size]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  return normalize_image(crop)


def eval_image(stored: np.ndarray, image_size: int) -> np.ndarray:
  """Centre `image_size` crop -> float32 [H, W, 3]."""
  off = (stored.shape[0] - image_size) // 2
  return normalize_image(stored[off:off + image_size, off:off + image_size])


# ----------------------------------------------------------------------------- audio


def _riff_declared_frames(path: str) -> Optional[int]:
  """Frames a RIFF/WAVE header declares (None: not a WAV, or a streaming size)."""
  import struct  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
      return None
    block_align = None
    while True:
      chunk = f.read(8)
      if len(chunk) < 8:
        return None
      cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
      if cid == b"fmt ":
        fmt = f.read(size + (size & 1))
        if len(fmt) >= 14:
          block_align = struct.unpack("<H", fmt[12:14])[0]
      elif cid == b"data":
        if not block_align or size in (0, 0xFFFFFFFF):
          return None
        return size // block_align
      else:
        f.seek(size + (size & 1), 1)


def load_audio(path: str, sample_rate: int = 16000) -> np.ndarray:
  """Mono float32 waveform at `sample_rate` (resampled with librosa only if needed).

  Raises FeatureError when the file cannot be decoded, is empty, or is a WAV whose data
  is shorter than its header declares (libsndfile would silently return the remainder).
  """
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  try:
    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    declared = _riff_declared_frames(path)
  except Exception as e:  # soundfile.LibsndfileError, RuntimeError, OSError
    raise FeatureError(f"cannot decode audio {path!r}: {type(e).__name__}: {e}") from e
  if wave.shape[0] == 0:
    raise FeatureError(f"audio {path!r} has no samples")
  if declared is not None and wave.shape[0] < declared:
    raise FeatureError(f"audio {path!r} is truncated: its header declares {declared} "
                       f"frames, the file holds {wave.shape[0]}")
  wave = wave.mean(axis=1)
  if not np.all(np.isfinite(wave)):
    raise FeatureError(f"audio {path!r} contains non-finite samples")
  if sr != sample_rate:
    import librosa  # pylint: disable=g-import-not-at-top
    wave = librosa.resample(wave, orig_sr=sr, target_sr=sample_rate)
  return np.ascontiguousarray(wave, np.float32)


@functools.lru_cache(maxsize=8)
def _mel_basis(settings: AudioSettings) -> np.ndarray:
  import librosa  # pylint: disable=g-import-not-at-top
  return librosa.filters.mel(sr=settings.sample_rate, n_fft=settings.n_fft,
                             n_mels=settings.n_mels, fmax=settings.fmax)  # [n_mels, 1+n_fft/2]


def log_mel(wave: np.ndarray, settings: AudioSettings) -> np.ndarray:
  """Waveform [N] -> normalised log-mel float32 [frames, n_mels] (time-major)."""
  import librosa  # pylint: disable=g-import-not-at-top
  # librosa.feature.melspectrogram's einsum is ~20x slower than this BLAS product of the
  # same STFT power and filter bank.
  spec = librosa.stft(np.asarray(wave, np.float32), n_fft=settings.n_fft,
                      hop_length=settings.hop_length)  # [1 + n_fft/2, frames]
  power = _mel_basis(settings) @ (spec.real ** 2 + spec.imag ** 2)  # [n_mels, frames]
  floor = max(settings.amin, float(power.max()) * 10.0 ** (-settings.top_db / 10.0))
  logmel = np.log(np.maximum(power, floor)).T  # [frames, n_mels]
  logmel = (logmel - logmel.mean()) / max(float(logmel.std()), 1e-5)
  return logmel.astype(np.float32)


def audio_features(path: str, settings: AudioSettings) -> np.ndarray:
  """File -> float16 [frames, n_mels] (the cached form)."""
  return log_mel(load_audio(path, settings.sample_rate), settings).astype(np.float16)


def crop_or_pad_frames(mel: np.ndarray, max_frames: int,
                       rng: Optional[np.random.Generator] = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """[T, M] -> (float32 [max_frames, M], mask bool [max_frames]).

  Longer than max_frames: a random window when `rng` is given (train), else the first
  max_frames frames (eval). Shorter: zero padding after the true length.
  """
  t, m = mel.shape
  start = 0
  if t > max_frames and rng is not None:
    start = int(rng.integers(0, t - max_frames + 1))
  n = min(t, max_frames)
  out = np.zeros((max_frames, m), np.float32)
  out[:n] = mel[start:start + n]
  mask = np.zeros((max_frames,), bool)
  mask[:n] = True
  return out, mask
