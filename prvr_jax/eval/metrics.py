"""Text-to-video retrieval metrics: ranks by counting better-scored videos, R@k and SumR."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

RECALL_KS: tuple[int, ...] = (1, 5, 10, 100)


def best_gt_score(scores: jax.Array, gt_mask: jax.Array) -> jax.Array:
  """Best score among a query's ground-truth videos (-inf when none is in `scores`).

  The max over video chunks of this is the corpus-wide best ground-truth score.

  Args:
    scores: (..., Q, B) query-video scores.
    gt_mask: (..., Q, B) True where the video is a ground truth of the query (broadcastable).

  Returns:
    (..., Q) float.
  """
  return jnp.max(jnp.where(gt_mask, scores, -jnp.inf), axis=-1)


def count_above(scores: jax.Array, threshold: jax.Array, counted: jax.Array | None = None) -> jax.Array:
  """Number of videos scored strictly above `threshold` (ties are not counted).

  Args:
    scores: (..., Q, B) query-video scores.
    threshold: (..., Q, 1) per-query threshold, usually the best ground-truth score.
    counted: (..., Q, B) or (B,) bool, False for videos that never count (padding), or None.

  Returns:
    (..., Q) int32.
  """
  better = scores > threshold
  if counted is not None:
    better = better & counted
  return jnp.sum(better, axis=-1, dtype=jnp.int32)


def count_better(scores: jax.Array, gt_mask: jax.Array, video_valid: jax.Array | None = None) -> jax.Array:
  """Number of videos scored strictly above the query's best ground-truth video.

  Summing this over video chunks gives the count over the whole corpus, so no full sort and no
  (Q, N) matrix is ever needed. Padded videos (video_valid False) are never counted.

  Args:
    scores: (Q, B) query-video scores of one chunk of videos.
    gt_mask: (Q, B) True where the video is a ground truth of the query.
    video_valid: (B,) or None.

  Returns:
    (Q,) int32 counts; when the corpus is chunked, count each chunk against the best
    ground-truth score of the whole corpus (`best_gt_score`, maxed over chunks) with
    `count_above` instead.
  """
  best = best_gt_score(scores, gt_mask)[..., None]
  return count_above(scores, best, None if video_valid is None else video_valid[None, :])


def gt_ranks(scores: jax.Array, gt_mask: jax.Array, video_valid: jax.Array | None = None) -> jax.Array:
  """1-based rank of each query's best-ranked ground-truth video. (Q, B), (Q, B) -> (Q,) int32."""
  return 1 + count_better(scores, gt_mask, video_valid)


def recall_at_k(ranks: np.ndarray | jax.Array, query_valid: np.ndarray | None = None,
                ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
  """R@k in percent over valid queries, plus SumR (sum of the R@k).

  Args:
    ranks: (Q,) 1-based ranks.
    query_valid: (Q,) bool or None (all valid).
    ks: cut-offs.

  Returns:
    {'R@1': ..., 'R@5': ..., 'R@10': ..., 'R@100': ..., 'SumR': ...}.
  """
  ranks = np.asarray(ranks)
  valid = np.ones(ranks.shape, bool) if query_valid is None else np.asarray(query_valid, bool)
  n = int(valid.sum())
  if n == 0:
    raise ValueError("recall_at_k needs at least one valid query")
  out = {f"R@{k}": 100.0 * float(np.sum((ranks <= k) & valid)) / n for k in ks}
  out["SumR"] = float(sum(out[f"R@{k}"] for k in ks))
  return out


def rank_statistics(ranks: np.ndarray | jax.Array, query_valid: np.ndarray | None = None) -> dict[str, float]:
  """Median and mean rank of the ground truth (1 = top) over valid queries.

  The ranks are the counts R@k is read from (1 + videos scored strictly above the ground truth),
  so the three agree: R@k = the fraction of queries with rank <= k.

  Args:
    ranks: (Q,) 1-based ranks.
    query_valid: (Q,) bool or None (all valid).

  Returns:
    {'MedR': median rank, 'MnR': mean rank} (floats; a median of an even count can be x.5).
  """
  ranks = np.asarray(ranks)
  valid = np.ones(ranks.shape, bool) if query_valid is None else np.asarray(query_valid, bool)
  if not valid.any():
    raise ValueError("rank_statistics needs at least one valid query")
  kept = ranks[valid].astype(np.float64)
  return {"MedR": float(np.median(kept)), "MnR": float(np.mean(kept))}
