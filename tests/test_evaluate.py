"""Retrieval protocol: R@K against a brute-force sort, ties, 5 relevant items per query."""

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
  assert m["mean_R@1"] == 0.0 and m["rsum"] < 1800
  onehot = {m_: np.eye(n, dtype=np.float32)[v] for m_, v in ids.items()}
  m = evaluate.retrieval_metrics(onehot, ids)
  keys = [k for k in m if "_R@" in k and not k.startswith("mean")]
  assert len(keys) == 18
  assert all(m[k] == 100.0 for k in keys)
  assert m["rsum"] == 1800.0 and m["mean"] == 100.0


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
