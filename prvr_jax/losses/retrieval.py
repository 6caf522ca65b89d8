"""Retrieval losses on (Q, B) query-video score matrices: bidirectional NCE and triplet hinge.

Batches are padded to static shapes: `query_valid` (Q,) and `video_valid` (B,) mark the real rows
and columns, and padded entries never influence a loss or its gradient. `labels` (Q,) holds the
video index of each query.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class TripletRanks(NamedTuple):
  """Given negative draws of one triplet loss: positions in the descending-sorted candidates.

  Attributes:
    text_to_video: (Q,) int, rank of each query's negative among the non-positive videos.
    video_to_text: (B,) int, rank of each video's negative among the other videos' queries.
  """

  text_to_video: jax.Array
  video_to_text: jax.Array


def positive_mask(labels: jax.Array, num_videos: int) -> jax.Array:
  """Marks each query's own video.

  Args:
    labels: (Q,) int video index of each query.
    num_videos: B.

  Returns:
    (Q, B) bool, True at (q, labels[q]).
  """
  labels = jnp.asarray(labels)
  return labels[:, None] == jnp.arange(num_videos, dtype=labels.dtype)[None, :]


def _masked_lse(x: jax.Array, mask: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """logsumexp over the entries where `mask`, and whether a slice had any.

  Empty slices give 0 rather than -inf so that neither the value nor the gradient of a masked-out
  term can turn into inf/NaN downstream.

  Args:
    x: (..., N, ...) values.
    mask: bool, same shape as x.
    axis: reduction axis.

  Returns:
    (lse, nonempty), both x's shape without `axis`.
  """
  nonempty = jnp.any(mask, axis=axis)
  # Empty slices are filled with zeros (not -inf) so that their lse, and its gradient, are finite.
  fill = jnp.where(jnp.expand_dims(nonempty, axis), -jnp.inf, 0.0)
  lse = jax.nn.logsumexp(jnp.where(mask, x, fill), axis=axis)
  return jnp.where(nonempty, lse, 0.0), nonempty


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of x over `mask` (where-selected, so masked garbage cannot leak in)."""
  return jnp.sum(jnp.where(mask, x, 0.0))


def _count(mask: jax.Array) -> jax.Array:
  """Number of True entries as float32, at least 1 (an all-padding batch gives loss 0, not NaN)."""
  return jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def nce_loss(scores: jax.Array, labels: jax.Array, query_valid: jax.Array,
             video_valid: jax.Array) -> jax.Array:
  """Bidirectional InfoNCE of the reference (`clip_nce`, used for both scales).

  text->video: mean over valid q of lse_b S[q, b] - S[q, labels[q]];
  video->text: mean over valid b of lse_q S[q, b] - lse_{q: labels[q] = b} S[q, b].
  Every lse runs over valid entries only. A valid video without any valid query adds 0 but still
  counts in the video->text mean, as in the reference (its zero-initialised per-video terms).

  Args:
    scores: (Q, B) unnormalised query-video scores.
    labels: (Q,) int video index of each query.
    query_valid: (Q,) bool.
    video_valid: (B,) bool.

  Returns:
    scalar float32 loss.
  """
  pos = positive_mask(labels, scores.shape[1])
  valid = query_valid[:, None] & video_valid[None, :]
  t2v_all, _ = _masked_lse(scores, valid, axis=1)
  t2v = t2v_all - jnp.sum(jnp.where(pos & valid, scores, 0.0), axis=1)
  v2t_all, _ = _masked_lse(scores, valid, axis=0)
  v2t_pos, has_query = _masked_lse(scores, pos & valid, axis=0)
  v2t = jnp.where(has_query, v2t_all - v2t_pos, 0.0)
  return (_masked_sum(t2v, query_valid) / _count(query_valid)
          + _masked_sum(v2t, video_valid) / _count(video_valid))


def _sample_ranked(scores: jax.Array, candidates: jax.Array, pool: jax.Array,
                   key: jax.Array, rank: Optional[jax.Array] = None) -> jax.Array:
  """Per row, the index of a candidate drawn uniformly from the `pool` highest-scoring ones.

  Mirrors the reference's "sort descending, take a random position" (stable order on ties).

  Args:
    scores: (N, M) scores.
    candidates: (N, M) bool, allowed picks.
    pool: (N,) int >= 1, how many of the best candidates to draw from (clipped to the count).
    key: PRNG key.
    rank: optional (N,) int, the drawn positions themselves (0 = the best candidate), in place of
      drawing them from `key`; clipped to the pool (a replay of another code's draws).

  Returns:
    (N,) int32 column index; arbitrary (and unused by callers) for rows without candidates.
  """
  pool = jnp.clip(pool, 1, jnp.maximum(jnp.sum(candidates, axis=1), 1))
  if rank is None:
    # floor(u * pool) is uniform on 0..pool-1 (to float32 resolution, pool << 2^24) and
    # compiles to less code than randint with per-row bounds.
    rank = (jax.random.uniform(key, pool.shape) * pool).astype(jnp.int32)
  rank = jnp.clip(rank.astype(jnp.int32), 0, pool - 1)
  order = jnp.argsort(jnp.where(candidates, -scores, jnp.inf), axis=1, stable=True)
  return jnp.take_along_axis(order, rank[:, None], axis=1)[:, 0].astype(jnp.int32)


def sample_negative_videos(scores: jax.Array, labels: jax.Array, query_valid: jax.Array,
                           video_valid: jax.Array, *, hard_negatives: jax.Array,
                           hard_pool_size: int, key: jax.Array,
                           rank: Optional[jax.Array] = None) -> jax.Array:
  """text->video negative of each query: one non-positive valid video.

  Uniform over all of them, or over the `hard_pool_size` highest-scoring ones when
  `hard_negatives` (the reference's randint(1, 1 + pool) position in the sorted row).

  Args:
    scores: (Q, B) cosine scores (only their order matters).
    labels: (Q,) int.
    query_valid: (Q,) bool.
    video_valid: (B,) bool.
    hard_negatives: traced bool scalar.
    hard_pool_size: pool size (>= 1); a Python int in training, but may be traced.
    key: PRNG key.
    rank: optional (Q,) given draws (see `_sample_ranked`).

  Returns:
    (Q,) int32 video index (meaningless for invalid queries or queries without a negative).
  """
  del query_valid  # rows are independent; invalid ones are dropped by the caller
  neg = video_valid[None, :] & ~positive_mask(labels, scores.shape[1])
  num_neg = jnp.sum(neg, axis=1)
  pool = jnp.where(jnp.asarray(hard_negatives, bool), hard_pool_size, num_neg)
  return _sample_ranked(scores, neg, pool, key, rank)


def sample_negative_queries(scores: jax.Array, labels: jax.Array, query_valid: jax.Array,
                            video_valid: jax.Array, *, hard_negatives: jax.Array,
                            key: jax.Array, rank: Optional[jax.Array] = None) -> jax.Array:
  """video->text negative of each video: one valid query of another video.

  The hardest (highest-scoring) one when `hard_negatives`, else a uniform one, as in the reference.

  Args:
    scores: (Q, B) cosine scores.
    labels: (Q,) int.
    query_valid: (Q,) bool.
    video_valid: (B,) bool.
    hard_negatives: traced bool scalar.
    key: PRNG key.
    rank: optional (B,) given draws (see `_sample_ranked`).

  Returns:
    (B,) int32 query index (meaningless for invalid videos or videos without a negative).
  """
  del video_valid
  neg = query_valid[None, :] & ~positive_mask(labels, scores.shape[1]).T  # (B, Q)
  pool = jnp.where(jnp.asarray(hard_negatives, bool), 1, jnp.sum(neg, axis=1))
  return _sample_ranked(scores.T, neg, pool, key, rank)


def triplet_loss(scores: jax.Array, labels: jax.Array, query_valid: jax.Array, video_valid: jax.Array,
                 *, margin: float, hard_negatives: jax.Array, hard_pool_size: int,
                 key: jax.Array, ranks: Optional[TripletRanks] = None) -> jax.Array:
  """The reference's triplet ranking loss (`get_clip_triplet_loss`), both directions.

  text->video: relu(margin + S[q, neg_q] - S[q, labels[q]]) summed over valid queries / #valid
  queries, neg_q from `sample_negative_videos`. video->text: positive = mean score of the video's
  valid queries, negative from `sample_negative_queries`; relu(margin + neg - pos) summed over
  valid videos / #valid videos. Queries without a negative video and videos without a positive
  or a negative query add 0 (the reference fails or gives NaN there).

  Args:
    scores: (Q, B) cosine scores.
    labels: (Q,) int video index of each query.
    query_valid: (Q,) bool.
    video_valid: (B,) bool.
    margin: hinge margin.
    hard_negatives: traced bool scalar (epoch-dependent; no recompilation when it flips).
    hard_pool_size: static size of the text->video hard-negative pool.
    key: PRNG key; the only source of randomness unless `ranks` gives the draws.
    ranks: optional given negative draws (replaying another code's random negatives).

  Returns:
    scalar float32 loss.
  """
  num_v = scores.shape[1]
  pos = positive_mask(labels, num_v) & query_valid[:, None] & video_valid[None, :]
  t2v_key, v2t_key = jax.random.split(key)

  neg_video = sample_negative_videos(scores, labels, query_valid, video_valid,
                                     hard_negatives=hard_negatives, hard_pool_size=hard_pool_size,
                                     key=t2v_key, rank=None if ranks is None else ranks.text_to_video)
  has_neg_video = jnp.any(video_valid[None, :] & ~positive_mask(labels, num_v), axis=1)
  t2v_neg = jnp.take_along_axis(scores, neg_video[:, None], axis=1)[:, 0]
  t2v_pos = jnp.sum(jnp.where(pos, scores, 0.0), axis=1)
  t2v = jax.nn.relu(margin + t2v_neg - t2v_pos)
  t2v_ok = query_valid & has_neg_video & jnp.any(pos, axis=1)

  neg_query = sample_negative_queries(scores, labels, query_valid, video_valid,
                                      hard_negatives=hard_negatives, key=v2t_key,
                                      rank=None if ranks is None else ranks.video_to_text)
  neg_q_mask = query_valid[None, :] & ~positive_mask(labels, num_v).T  # (B, Q)
  v2t_neg = jnp.take_along_axis(scores.T, neg_query[:, None], axis=1)[:, 0]
  num_pos = jnp.sum(pos, axis=0)
  v2t_pos = jnp.sum(jnp.where(pos, scores, 0.0), axis=0) / jnp.maximum(num_pos, 1)
  v2t = jax.nn.relu(margin + v2t_neg - v2t_pos)
  v2t_ok = video_valid & (num_pos > 0) & jnp.any(neg_q_mask, axis=1)

  return (_masked_sum(t2v, t2v_ok) / _count(query_valid)
          + _masked_sum(v2t, v2t_ok) / _count(video_valid))
