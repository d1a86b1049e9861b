"""Cross-modal retrieval evaluation (design section 5).

Protocol: a split's unique images x their captions x their spoken captions. Each modality
is embedded on its own (`NLMM.embed`), so nothing about one modality reaches another's
embedding. For each of the six directions (I->T, T->I, I->A, A->I, T->A, A->T) a query
hits at K when any relevant gallery item (same image) is among its top K. Ties count
against the query: the rank of a query is the number of irrelevant gallery items scoring
at least as high as its best relevant item, so a collapsed model (all scores equal)
scores 0, never 100%. Non-finite embeddings are an error (`NonFiniteEmbeddingError`,
naming the modality and the bad rows); at the rank level a NaN score never helps: a NaN
relevant item counts as missing and a NaN irrelevant item as outranking the query.

Reported (all in percent): `<dir>_R@<K>` for the 18 direction x K pairs, `mean_R@<K>`
over the six directions, `mean` over all 18, and two recall sums:
  `rsum_it`   the literature's RSUM for Flickr8k / COCO: I->T and T->I at R@1/5/10
              (six recalls, at most 600);
  `rsum_all`  all 18 recalls of the six directions (at most 1800; equal to `rsum_it`
              without audio). The best checkpoint is chosen by `rsum_all`.
"""

from typing import Callable, Iterable, Mapping, Optional

import numpy as np

MODALITY_SHORT = {"image": "i", "text": "t", "audio": "a"}
DIRECTIONS = (("image", "text"), ("text", "image"), ("image", "audio"),
              ("audio", "image"), ("text", "audio"), ("audio", "text"))
KS = (1, 5, 10)


def direction_name(query: str, gallery: str) -> str:
  return f"{MODALITY_SHORT[query]}2{MODALITY_SHORT[gallery]}"


class NonFiniteEmbeddingError(FloatingPointError):
  """Some embeddings are NaN or infinite: any recall computed from them would be a lie."""


def check_finite(embeddings: Mapping[str, np.ndarray]) -> None:
  """Raises NonFiniteEmbeddingError naming each modality with non-finite rows."""
  bad = []
  for modality, e in embeddings.items():
    rows = ~np.isfinite(np.asarray(e)).reshape(len(e), -1).all(axis=1)
    if rows.any():
      first = np.flatnonzero(rows)[:5].tolist()
      bad.append(f"{modality}: {int(rows.sum())} of {len(e)} rows (first rows {first})")
  if bad:
    raise NonFiniteEmbeddingError(
        "non-finite embeddings, no retrieval metric can be computed: " + "; ".join(bad)
        + ". The parameters or the inputs hold NaN/inf: evaluate an earlier checkpoint, "
        "or check the data of these items.")


def ranks_of_best_relevant(sim: np.ndarray, query_ids: np.ndarray,
                           gallery_ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """Rank (0 = top) of each query's best relevant item, ties counted against it.

  sim: [Q, G] similarities; query_ids [Q], gallery_ids [G]: the image each item shows
  (relevant = same image). Queries with no relevant item get rank -1. A NaN score never
  helps its query: NaN relevant items are ignored and NaN irrelevant items outrank it.
  """
  sim = np.asarray(sim, np.float32)
  ranks = np.empty(sim.shape[0], np.int64)
  for start in range(0, sim.shape[0], chunk):
    s = sim[start:start + chunk]                                   # [q, G]
    rel = query_ids[start:start + chunk, None] == gallery_ids[None, :]
    nan = np.isnan(s)
    best = np.where(rel & ~nan, s, -np.inf).max(axis=1)            # [q]
    r = (((s >= best[:, None]) | nan) & ~rel).sum(axis=1)
    ranks[start:start + chunk] = np.where(rel.any(axis=1), r, -1)
  return ranks


def recall_at_k(ranks: np.ndarray, ks: Iterable[int] = KS) -> dict[int, float]:
  """Percent of queries (with at least one relevant item) whose rank is below K."""
  valid = ranks >= 0
  if not valid.any():
    raise ValueError("no query has a relevant gallery item; cannot compute recall")
  return {k: float(100.0 * np.mean(ranks[valid] < k)) for k in ks}


def retrieval_metrics(embeddings: Mapping[str, np.ndarray],
                      image_index: Mapping[str, np.ndarray],
                      ks: Iterable[int] = KS) -> dict[str, float]:
  """All directions between the modalities present.

  embeddings: {modality: [N_m, E]} L2-normalised; image_index: {modality: [N_m]} the
  split image each row shows (for "image", usually arange(N)). Raises
  NonFiniteEmbeddingError when any embedding is NaN or infinite.
  """
  ks = tuple(ks)
  check_finite(embeddings)
  out: dict[str, float] = {}
  for query, gallery in DIRECTIONS:
    if query not in embeddings or gallery not in embeddings:
      continue
    sim = np.asarray(embeddings[query], np.float32) @ np.asarray(
        embeddings[gallery], np.float32).T
    ranks = ranks_of_best_relevant(sim, np.asarray(image_index[query]),
                                   np.asarray(image_index[gallery]))
    name = direction_name(query, gallery)
    for k, v in recall_at_k(ranks, ks).items():
      out[f"{name}_R@{k}"] = v
    out[f"{name}_num_queries"] = int((ranks >= 0).sum())
  recalls = {key: v for key, v in out.items() if "_R@" in key}
  if not recalls:
    raise ValueError(f"need at least two modalities, got {sorted(embeddings)}")
  for k in ks:
    vals = [v for key, v in recalls.items() if key.endswith(f"_R@{k}")]
    out[f"mean_R@{k}"] = float(np.mean(vals))
  out["mean"] = float(np.mean(list(recalls.values())))
  out["rsum_all"] = float(np.sum(list(recalls.values())))
  image_text = [v for key, v in recalls.items() if key.split("_R@")[0] in ("i2t", "t2i")]
  if image_text:
    out["rsum_it"] = float(np.sum(image_text))
  return out


def embed_all(embed_fn: Callable[[str, dict], np.ndarray],
              batches: Mapping[str, Callable[[], Iterable[dict]]],
              progress: Optional[Callable[[str], None]] = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Embeds every item of each modality once, keeping rows whose `valid` flag is set.

  embed_fn(modality, batch) -> [B, E] numpy; batches: {modality: () -> iterator of
  batches with `image_index` [B] and `valid` [B]}.
  """
  embs, ids = {}, {}
  for modality, make_iter in batches.items():
    e_parts, i_parts = [], []
    for batch in make_iter():
      valid = np.asarray(batch["valid"], bool)
      e = np.asarray(embed_fn(modality, batch))
      e_parts.append(e[valid])
      i_parts.append(np.asarray(batch["image_index"])[valid])
    if not e_parts:
      raise ValueError(f"the eval split has no {modality} items")
    embs[modality] = np.concatenate(e_parts)
    ids[modality] = np.concatenate(i_parts)
    if progress:
      progress(f"embedded {len(ids[modality])} {modality} items")
  return embs, ids


def mean_over_corpora(per_corpus: Mapping[str, dict]) -> dict:
  """A mixture's metrics: {metric: unweighted mean over the corpora} for every numeric
  metric all corpora report (so directions that only some have are not averaged), plus
  "per_corpus": {label: that corpus's metrics}."""
  shared = set.intersection(*(set(m) for m in per_corpus.values()))
  out = {k: float(np.mean([m[k] for m in per_corpus.values()])) for k in sorted(shared)
         if not k.endswith("_num_queries")
         and all(isinstance(m[k], (int, float)) for m in per_corpus.values())}
  out["per_corpus"] = {label: dict(m) for label, m in per_corpus.items()}
  return out
