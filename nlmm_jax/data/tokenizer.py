"""Word-level caption tokenizer, fitted on the training captions only.

Normalisation: lower-case, then split into runs of letters/digits and single
punctuation marks ("A dog's ball." -> ["a", "dog", "'", "s", "ball", "."]).

Ids:
  0 = PAD (padding; never produced inside a caption)
  1 = UNK (a word outside the vocabulary)
  2 = BOS (first token of every encoded caption)
  3 = EOS (last real token of every encoded caption, also after truncation)
  4.. = words, most frequent first; ties broken alphabetically (deterministic).

`vocab_size` counts the four special ids, so at most `vocab_size - 4` words are kept.
"""

import collections
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_TOKEN_RE = re.compile(r"[^\W_]+|[^\w\s]|_", re.UNICODE)


def split_words(text: str) -> list[str]:
  """Lower-cased words and single punctuation marks."""
  return _TOKEN_RE.findall(text.lower())


class Tokenizer:
  """Maps captions to fixed-length id arrays with a padding mask."""

  def __init__(self, words: Sequence[str]):
    self.words = tuple(words)
    self._ids = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}

  @classmethod
  def fit(cls, captions: Iterable[str], vocab_size: int) -> "Tokenizer":
    """Keeps the `vocab_size - 4` most frequent words of `captions`."""
    if vocab_size <= len(SPECIALS):
      raise ValueError(f"vocab_size must exceed {len(SPECIALS)} (special ids), got {vocab_size}")
    counts = collections.Counter()
    for c in captions:
      counts.update(split_words(c))
    ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
    return cls([w for w, _ in ranked[:vocab_size - len(SPECIALS)]])

  @property
  def vocab_size(self) -> int:
    return len(SPECIALS) + len(self.words)

  def token_ids(self, text: str) -> list[int]:
    """Word ids without BOS/EOS or padding."""
    return [self._ids.get(w, UNK) for w in split_words(text)]

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [max_len], mask bool [max_len]); BOS w_1..w_n EOS, then PAD.

    Captions longer than `max_len - 2` words keep their first words and still end in EOS.
    """
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 (BOS + EOS), got {max_len}")
    body = self.token_ids(text)[:max_len - 2]
    seq = [BOS] + body + [EOS]
    ids = np.zeros((max_len,), np.int32)
    ids[:len(seq)] = seq
    mask = np.zeros((max_len,), bool)
    mask[:len(seq)] = True
    return ids, mask

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [N, max_len], mask bool [N, max_len])."""
    ids = np.zeros((len(texts), max_len), np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for i, t in enumerate(texts):
      ids[i], mask[i] = self.encode(t, max_len)
    return ids, mask

  def decode(self, ids: Sequence[int]) -> str:
    """Words of `ids` (specials other than UNK dropped), joined by spaces."""
    out = []
    for i in ids:
      i = int(i)
      if i == UNK:
        out.append(SPECIALS[UNK])
      elif i >= len(SPECIALS):
        out.append(self.words[i - len(SPECIALS)])
    return " ".join(out)

  def to_json(self) -> dict:
    return {"specials": list(SPECIALS), "words": list(self.words)}

  @classmethod
  def from_json(cls, d: dict, where: str = "tokenizer") -> "Tokenizer":
    if not isinstance(d, dict) or tuple(d.get("specials", ())) != SPECIALS:
      raise ValueError(f"{where}: special tokens {d.get('specials') if isinstance(d, dict) else d}"
                       f" differ from {SPECIALS}")
    return cls(d["words"])

  def save(self, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # several processes may save the same file
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.to_json(), f, ensure_ascii=False, indent=0)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, encoding="utf-8") as f:
      return cls.from_json(json.load(f), path)

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and self.words == other.words
