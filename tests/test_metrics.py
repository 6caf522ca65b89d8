"""R@k and ranks on hand-made score matrices."""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from prvr_jax.eval.metrics import count_better, gt_ranks, rank_statistics, recall_at_k


def test_ranks_on_hand_made_scores():
  scores = jnp.array([[0.9, 0.1, 0.5, 0.2],    # gt 0: rank 1
                      [0.9, 0.1, 0.5, 0.2],    # gt 2: rank 2
                      [0.3, 0.2, 0.1, 0.0],    # gt 3: rank 4
                      [0.1, 0.8, 0.9, 0.7]])   # gts 1 and 3: best is video 1 -> rank 2
  gt = jnp.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 1]], bool)
  np.testing.assert_array_equal(gt_ranks(scores, gt), [1, 2, 4, 2])
  r = recall_at_k(gt_ranks(scores, gt), ks=(1, 2, 3))
  assert r == {"R@1": 25.0, "R@2": 75.0, "R@3": 75.0, "SumR": 175.0}


def test_chunked_counts_add_up_and_ignore_padding():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(7, 10)).astype(np.float32)
  gt = np.zeros((7, 10), bool)
  gt[np.arange(7), rng.integers(0, 10, 7)] = True
  whole = gt_ranks(jnp.asarray(scores), jnp.asarray(gt))
  best = np.where(gt, scores, -np.inf).max(1)
  # Chunked: each chunk counts videos above the corpus-wide best gt score.
  chunks = [slice(0, 4), slice(4, 10)]
  counts = sum(np.sum(scores[:, c] > best[:, None], axis=1) for c in chunks)
  np.testing.assert_array_equal(whole, 1 + counts)
  # A padded video with a huge score never counts.
  padded = np.concatenate([scores, np.full((7, 1), 99.0, np.float32)], 1)
  gt_p = np.concatenate([gt, np.zeros((7, 1), bool)], 1)
  valid = np.array([True] * 10 + [False])
  np.testing.assert_array_equal(count_better(jnp.asarray(padded), jnp.asarray(gt_p), jnp.asarray(valid)),
                                whole - 1)


def test_recall_masks_padded_queries_and_rejects_empty():
  r = recall_at_k(np.array([1, 200, 3, 1]), np.array([True, True, True, False]))
  assert r["R@1"] == pytest.approx(100 / 3) and r["R@100"] == pytest.approx(200 / 3)
  with pytest.raises(ValueError):
    recall_at_k(np.array([1]), np.array([False]))


def test_rank_statistics():
  assert rank_statistics(np.array([1, 4, 2, 10])) == {"MedR": 3.0, "MnR": 4.25}
  assert rank_statistics(np.array([1, 4, 2, 10]), np.array([True, True, True, False])) == {"MedR": 2.0,
                                                                                          "MnR": 7 / 3}
  with pytest.raises(ValueError):
    rank_statistics(np.array([3]), np.array([False]))
