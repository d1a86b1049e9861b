"""Retrieval protocol: R@K against a brute-force sort, ties, 5 relevant items per query."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nlmm_jax import evaluate


def brute_force_hit(scores, relevant, k):
  """Sorts the gallery by score, placing irrelevant items first among equals."""
  order = sorted(range(len(scores)), key=lambda j: (-scores[j], relevant[j]))
  return any(relevant[j] for j in order[:k])


def test_hand_made_matrix_with_ties():
  # 2 images, 10 captions (5 each). Query 0 (image 0): its best caption ties with an
  # irrelevant one at the top -> rank 1 (not 0). Query 1: its best caption is 3rd.
  sim = np.array([
      [0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.5, 0.2, 0.2, 0.2],
      [0.8, 0.7, 0.6, 0.1, 0.1, 0.65, 0.1, 0.1, 0.1, 0.1],
  ])
  q_ids = np.array([0, 1])
  g_ids = np.repeat([0, 1], 5)
  ranks = evaluate.ranks_of_best_relevant(sim, q_ids, g_ids)
  assert ranks.tolist() == [1, 2]
  r = evaluate.recall_at_k(ranks, (1, 2, 3))
  assert r == {1: 0.0, 2: 50.0, 3: 100.0}


def test_matches_brute_force_random_with_ties():
  rng = np.random.default_rng(0)
  n_img = 13
  q_ids = np.repeat(np.arange(n_img), 5)               # 5 captions per image as queries
  g_ids = np.arange(n_img)                             # images as gallery
  # Quantised scores create many ties.
  sim = np.round(rng.normal(size=(len(q_ids), n_img)), 1)
  ranks = evaluate.ranks_of_best_relevant(sim, q_ids, g_ids, chunk=7)
  for k in (1, 5, 10):
    expected = np.mean([brute_force_hit(sim[i], g_ids == q_ids[i], k)
                        for i in range(len(q_ids))]) * 100
    assert evaluate.recall_at_k(ranks, (k,))[k] == pytest.approx(expected)
  # And the other direction: image queries, 5 relevant captions each.
  sim_t = sim.T
  ranks_t = evaluate.ranks_of_best_relevant(sim_t, g_ids, q_ids)
  for k in (1, 5, 10):
    expected = np.mean([brute_force_hit(sim_t[i], q_ids == g_ids[i], k)
                        for i in range(n_img)]) * 100
    assert evaluate.recall_at_k(ranks_t, (k,))[k] == pytest.approx(expected)


def test_collapsed_embeddings_score_zero_and_perfect_score_full():
  n = 20
  ids = {"image": np.arange(n), "text": np.repeat(np.arange(n), 5),
         "audio": np.repeat(np.arange(n), 5)}
  same = {m: np.ones((len(v), 4), np.float32) / 2 for m, v in ids.items()}
  m = evaluate.retrieval_metrics(same, ids)
  assert m["mean_R@1"] == 0.0 and m["rsum_all"] < 1800
  onehot = {m_: np.eye(n, dtype=np.float32)[v] for m_, v in ids.items()}
  m = evaluate.retrieval_metrics(onehot, ids)
  keys = [k for k in m if "_R@" in k and not k.startswith("mean")]
  assert len(keys) == 18
  assert all(m[k] == 100.0 for k in keys)
  assert m["rsum_all"] == 1800.0 and m["mean"] == 100.0
  assert m["rsum_it"] == 600.0


def test_queries_without_relevant_items_are_excluded():
  # Image 2 has no audio clip: it is not an I->A query, and the count says so.
  ids = {"image": np.arange(3), "audio": np.array([0, 0, 1, 1])}
  emb = {"image": np.eye(3, dtype=np.float32), "audio": np.eye(3, dtype=np.float32)[ids["audio"]]}
  m = evaluate.retrieval_metrics(emb, ids)
  assert m["i2a_num_queries"] == 2 and m["i2a_R@1"] == 100.0
  assert m["a2i_num_queries"] == 4


def test_embed_all_keeps_valid_rows_in_order():
  def batches():
    yield {"image_index": np.array([0, 1]), "valid": np.array([True, True])}
    yield {"image_index": np.array([2, 0]), "valid": np.array([True, False])}
  embs, ids = evaluate.embed_all(
      lambda m, b: np.asarray(b["image_index"], np.float32)[:, None], {"image": batches})
  assert ids["image"].tolist() == [0, 1, 2]
  assert embs["image"][:, 0].tolist() == [0.0, 1.0, 2.0]


def _ids(n=10):
  return {"image": np.arange(n), "text": np.repeat(np.arange(n), 5),
          "audio": np.repeat(np.arange(n), 5)}


def _random_embeddings(ids, seed=0):
  rng = np.random.default_rng(seed)
  return {m: rng.normal(size=(len(v), 8)).astype(np.float32) for m, v in ids.items()}


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_non_finite_embeddings_fail_with_modality_and_count(modality):
  ids = _ids()
  embs = _random_embeddings(ids)
  embs[modality][[1, 3]] = np.nan
  embs[modality][4, 0] = np.inf
  with pytest.raises(evaluate.NonFiniteEmbeddingError,
                     match=rf"{modality}: 3 of {len(ids[modality])} rows \(first rows \[1, 3, 4\]\)"):
    evaluate.retrieval_metrics(embs, ids)
  all_nan = {m: np.full_like(e, np.nan) for m, e in embs.items()}
  with pytest.raises(evaluate.NonFiniteEmbeddingError):
    evaluate.retrieval_metrics(all_nan, ids)


def test_nan_similarities_never_improve_a_rank():
  """All-NaN scores rank last (they used to rank first: NaN >= best is False)."""
  ids = _ids()
  sim = np.full((len(ids["text"]), len(ids["image"])), np.nan, np.float32)
  ranks = evaluate.ranks_of_best_relevant(sim, ids["text"], ids["image"])
  assert ranks.tolist() == [9] * len(ids["text"])  # every irrelevant image outranks it
  # One NaN image column (gallery) or one NaN query row: no recall may go up.
  rng = np.random.default_rng(1)
  for trial in range(20):
    sim = rng.normal(size=(len(ids["text"]), len(ids["image"]))).astype(np.float32)
    base = evaluate.ranks_of_best_relevant(sim, ids["text"], ids["image"])
    col, row = sim.copy(), sim.copy()
    col[:, trial % 10] = np.nan
    row[trial % 50, :] = np.nan
    for broken in (col, row):
      r = evaluate.ranks_of_best_relevant(broken, ids["text"], ids["image"])
      assert np.all(r >= base)
      for k in (1, 5, 10):
        assert evaluate.recall_at_k(r, (k,))[k] <= evaluate.recall_at_k(base, (k,))[k]


def test_rsum_it_is_the_image_text_sum_and_rsum_all_the_total():
  ids = _ids()
  m = evaluate.retrieval_metrics(_random_embeddings(ids, seed=2), ids)
  it = sum(m[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  total = sum(m[f"{d}_R@{k}"] for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")
              for k in (1, 5, 10))
  assert m["rsum_it"] == pytest.approx(it) and m["rsum_all"] == pytest.approx(total)
  assert m["rsum_all"] > m["rsum_it"] and "rsum" not in m
  no_audio = {k: v for k, v in ids.items() if k != "audio"}
  m2 = evaluate.retrieval_metrics(_random_embeddings(no_audio, seed=2), no_audio)
  assert m2["rsum_it"] == m2["rsum_all"]


def test_show_results_prints_both_recall_sums(tmp_path):
  ids = _ids()
  m = evaluate.retrieval_metrics(_random_embeddings(ids, seed=3), ids)
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 5, "split": "dev", **m}) + "\n")
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "show_results.py")
  out = subprocess.run([sys.executable, script, str(tmp_path), "--no-plot"], cwd=tmp_path,
                       capture_output=True, text=True, check=True).stdout.splitlines()
  header, row = out[0].split(), out[1].split()
  assert header[-2:] == ["rsum_it", "rsum_all"]
  assert float(row[-2]) == pytest.approx(m["rsum_it"], abs=0.05)
  assert float(row[-1]) == pytest.approx(m["rsum_all"], abs=0.05)
