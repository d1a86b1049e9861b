"""Use a trained model from Python: load a checkpoint, embed, rank.

  import nlmm_jax
  model = nlmm_jax.load("runs/demo")                  # best checkpoint by dev rsum_all
  texts = model.embed_text(["a small red circle at the top"])          # [1, E]
  images = model.embed_images(["photo.jpg", uint8_array])              # [2, E]
  speech = model.embed_audio(["caption.wav", (waveform, 22050)])       # [2, E]
  idx, scores = model.rank(texts, images, k=2)                         # [1, 2] each

Everything a checkpoint needs is inside it: the config (model shapes and preprocessing
settings), the parameters and the caption vocabulary, so no data root is needed. The
preprocessing is the evaluation's: images are resized (shorter side) to image_size +
crop_margin and centre-cropped to image_size; audio is resampled to data.sample_rate,
turned into the normalised log-mel of the cache (rounded to float16 as stored there) and
cut to model.max_frames; captions are tokenised and padded to model.max_text_len. Each
modality is embedded on its own (`NLMM.embed`) in fixed-size batches, so an embedding
never depends on the other items of a call.

Test-time training (`models/ttt.py`): `nlmm_jax.load(path, ttt_steps=3)` (or
`model.embed_text(captions, ttt_steps=3)` for one call) fits per-item low-rank key
adapters to each item's own tokens before embedding it; the parameters never change.
The default is the checkpoint config's `ttt.steps` (0: off).
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np

from nlmm_jax import checkpointing
from nlmm_jax import config_lib
from nlmm_jax.data import cache as cache_lib
from nlmm_jax.data import features
from nlmm_jax.data import tokenizer as tokenizer_lib
from nlmm_jax.models import nlmm
from nlmm_jax.models import ttt as ttt_lib

ImageInput = Union[str, np.ndarray]                  # a path, or uint8 [H, W, 3]
AudioInput = Union[str, tuple]                       # a path, or (waveform [N], rate)


@dataclasses.dataclass
class Model:
  """A trained NL-MM: `embed_text`, `embed_images`, `embed_audio` and `rank`."""
  config: ml_collections.ConfigDict
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  step: int
  path: str
  batch_size: int = 32

  def __post_init__(self):
    self.module = nlmm.build_model(self.config.model, self.config.loss)
    self._settings = cache_lib.CacheSettings.from_config(self.config)

  @functools.cached_property
  def _jitted(self):
    def fn(params, inputs, modality, ttt):
      steps, lr, rank = ttt
      return ttt_lib.embed(self.module, params, inputs, modality, steps=steps, lr=lr,
                           rank=rank)
    return jax.jit(fn, static_argnums=(2, 3))

  def ttt_settings(self, ttt_steps=None) -> tuple[int, float, int]:
    """(steps, lr, rank) of test-time training: `config.ttt`, steps overridden if given."""
    t = self.config.ttt
    return ttt_lib.check_settings(t.steps if ttt_steps is None else ttt_steps, t.lr, t.rank)

  def _embed(self, params, inputs, modality: str, ttt_steps=None):
    """One batch -> [B, E] (jitted; test-time training per `ttt_settings`)."""
    return self._jitted(params, inputs, modality, self.ttt_settings(ttt_steps))

  def _run(self, modality: str, rows: list, ttt_steps=None) -> np.ndarray:
    """Embeds `rows` (dicts of one item's arrays) in batches of `batch_size` -> [N, E]."""
    if not rows:
      raise ValueError(f"nothing to embed: the list of {modality} inputs is empty")
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      batch = {k: np.stack([r[k] for r in chunk] + [np.zeros_like(chunk[0][k])] *
                           (self.batch_size - len(chunk))) for k in chunk[0]}
      out.append(np.asarray(self._embed(self.params, batch, modality, ttt_steps))
                 [:len(chunk)])
    emb = np.concatenate(out)
    if not np.all(np.isfinite(emb)):
      raise FloatingPointError(f"non-finite {modality} embeddings from {self.path} step "
                               f"{self.step}: its parameters hold NaN/inf")
    return emb

  def text_inputs(self, captions: Sequence[str]) -> list:
    if isinstance(captions, str):
      raise TypeError("embed_text takes a list of captions, not one string")
    length = int(self.config.model.max_text_len)
    return [dict(zip(("text", "text_mask"), self.tokenizer.encode(str(c), length)))
            for c in captions]

  def image_inputs(self, images: Sequence[ImageInput]) -> list:
    if isinstance(images, (str, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.ndim == 4):
      raise TypeError("embed_images takes a list of paths or uint8 arrays, not one item")
    size = int(self.config.model.image_size)
    rows = []
    for item in images:
      stored = (features.load_image(item, self._settings.stored_size) if isinstance(item, str)
                else features.image_from_array(item, self._settings.stored_size))
      rows.append({"image": features.eval_image(stored, size)})
    return rows

  def audio_inputs(self, clips: Sequence[AudioInput]) -> list:
    if isinstance(clips, str):
      raise TypeError("embed_audio takes a list of WAV paths or (waveform, rate) pairs")
    s = self._settings.audio
    rows = []
    for item in clips:
      if isinstance(item, str):
        wave = features.load_audio(item, s.sample_rate)
      else:
        wave, rate = item
        wave = np.asarray(wave, np.float32)
        if wave.ndim == 2:
          wave = wave.mean(axis=1)
        if int(rate) != s.sample_rate:
          import librosa  # pylint: disable=g-import-not-at-top
          wave = librosa.resample(wave, orig_sr=int(rate), target_sr=s.sample_rate)
      mel = features.log_mel(wave, s).astype(np.float16).astype(np.float32)  # as cached
      audio, mask = features.crop_or_pad_frames(mel, int(self.config.model.max_frames))
      rows.append({"audio": audio, "audio_mask": mask})
    return rows

  def embed_text(self, captions: Sequence[str], ttt_steps=None) -> np.ndarray:
    """Captions -> L2-normalised embeddings [N, E] (float32).

    ttt_steps: test-time training steps for this call (default: `config.ttt.steps`).
    """
    return self._run("text", self.text_inputs(captions), ttt_steps)

  def embed_images(self, images: Sequence[ImageInput], ttt_steps=None) -> np.ndarray:
    """Image paths or uint8 [H, W, 3] arrays -> L2-normalised embeddings [N, E]."""
    return self._run("image", self.image_inputs(images), ttt_steps)

  def embed_audio(self, clips: Sequence[AudioInput], ttt_steps=None) -> np.ndarray:
    """WAV paths or (waveform, sample rate) pairs -> L2-normalised embeddings [N, E].
    A model trained without audio (its config's data.use_audio is False: no spoken
    captions in its corpus, or turned off) has an untrained audio tower and refuses."""
    if not self.config.data.get("use_audio", True):
      raise ValueError(f"{self.path} was trained without audio (data.use_audio=False in "
                       "its config: its corpus had no spoken captions, or audio was off), "
                       "so its audio embeddings mean nothing; use text or images")
    return self._run("audio", self.audio_inputs(clips), ttt_steps)

  @staticmethod
  def rank(queries: np.ndarray, gallery: np.ndarray, k: int = 5
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows per query by cosine similarity: (indices [Q, k], scores [Q, k]).

    Ties keep the gallery order (stable sort); a NaN similarity is an error.
    """
    q, g = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
      raise ValueError(f"rank needs [Q, E] queries and [G, E] gallery, got {q.shape} and "
                       f"{g.shape}")
    sim = q @ g.T                                       # [Q, G]
    if not np.all(np.isfinite(sim)):
      raise FloatingPointError("non-finite similarities: check the embeddings")
    k = min(int(k), g.shape[0])
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1)


def load(path: str, step: Union[str, int] = "best", batch_size: int = 32, *,
         ttt_steps: Optional[int] = None, ttt_lr: Optional[float] = None,
         ttt_rank: Optional[int] = None) -> Model:
  """Loads a trained model from a workdir, its checkpoints/ folder or a step folder.

  step: "best" (by dev rsum_all), "latest" or a step number (ignored for a step folder).
  ttt_steps, ttt_lr, ttt_rank: test-time training settings (`config.ttt`; default: the
  checkpoint config's, i.e. off for a model trained without them). Any checkpoint can
  be embedded with test-time training: the adapters are not parameters.
  Raises FileNotFoundError when there is no such checkpoint, ValueError when it is
  damaged, incomplete, or from a config this version does not know.
  """
  what = "nlmm_jax.load"
  restored, step = checkpointing.restore_items(path, step, ("config", "tokenizer"), what)
  config = config_lib.config_from_dict(restored["config"],
                                       f"the config saved in {path} (step {step})")
  tokenizer = tokenizer_lib.Tokenizer.from_json(restored["tokenizer"],
                                                f"the tokenizer saved in {path}")
  for key, value in (("steps", ttt_steps), ("lr", ttt_lr), ("rank", ttt_rank)):
    if value is not None:
      config.ttt[key] = value
  ttt_lib.settings(config)
  params, step = checkpointing.restore_params(path, nlmm.abstract_params(config), step, what)
  return Model(config=config, params=params, tokenizer=tokenizer, step=step, path=str(path),
               batch_size=batch_size)
