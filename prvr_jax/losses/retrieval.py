"""Retrieval losses on (Q, B) query-video score matrices: NCE and triplet (hinge) losses.

Batches are padded to static shapes: `query_valid` (Q,) and `video_valid` (B,) mark real rows and
columns; padded entries never influence a loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def _masked_lse(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """logsumexp over entries where mask (at least one per slice assumed where it matters)."""
  return jax.nn.logsumexp(jnp.where(mask, x, NEG_INF), axis=axis)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def positive_mask(labels: jax.Array, num_videos: int) -> jax.Array:
  """(Q,) video index of each query -> (Q, B) bool, True at the query's own video."""
  return labels[:, None] == jnp.arange(num_videos)[None, :]


def nce_loss(scores: jax.Array, labels: jax.Array, query_valid: jax.Array,
             video_valid: jax.Array) -> jax.Array:
  """Bidirectional InfoNCE of the reference (`clip_nce`).

  text->video: mean over queries of lse_b S[q, b] - S[q, y_q];
  video->text: mean over videos of lse_q S[q, b] - lse_{q of b} S[q, b].

  Args:
    scores: (Q, B) unnormalised scores.
    labels: (Q,) int video index of each query.
    query_valid: (Q,) bool.
    video_valid: (B,) bool.

  Returns:
    scalar loss.
  """
  pos = positive_mask(labels, scores.shape[1])
  valid = query_valid[:, None] & video_valid[None, :]
  t2v = _masked_lse(scores, valid, axis=1) - jnp.sum(jnp.where(pos, scores, 0.0), axis=1)
  has_query = jnp.any(pos & valid, axis=0)
  v2t = _masked_lse(scores, valid, axis=0) - _masked_lse(scores, pos & valid, axis=0)
  return _masked_mean(t2v, query_valid) + _masked_mean(v2t, video_valid & has_query)


def _random_rank(key: jax.Array, shape: tuple[int, ...], count: jax.Array) -> jax.Array:
  """Uniform integer in [0, count) per entry (count (N,) int >= 1)."""
  u = jax.random.uniform(key, shape)
  return jnp.minimum((u * count).astype(jnp.int32), count - 1)


def _pick_ranked(scores: jax.Array, candidates: jax.Array, rank: jax.Array) -> jax.Array:
  """Per row, the score of the candidate at descending position `rank` (stable order).

  scores: (N, M); candidates: (N, M) bool; rank: (N,) int -> (N,) scores.
  """
  keyed = jnp.where(candidates, scores, -jnp.inf)
  order = jnp.argsort(-keyed, axis=1, stable=True)
  idx = jnp.take_along_axis(order, rank[:, None], axis=1)
  return jnp.take_along_axis(scores, idx, axis=1)[:, 0]


def triplet_loss(scores: jax.Array, labels: jax.Array, query_valid: jax.Array, video_valid: jax.Array,
                 *, margin: float, hard_negatives: jax.Array, hard_pool_size: int,
                 key: jax.Array) -> jax.Array:
  """The reference's triplet ranking loss on cosine scores, both directions.

  text->video: one negative video per query, uniform among its negatives, or among the
  `hard_pool_size` hardest when `hard_negatives`; video->text: positive = mean score of the
  video's queries, negative = the hardest negative query when `hard_negatives`, else uniform.
  Hinges are summed and divided by the number of valid queries and videos respectively.

  Args:
    scores: (Q, B) cosine scores.
    labels: (Q,) int.
    query_valid: (Q,) bool; video_valid: (B,) bool.
    margin: hinge margin.
    hard_negatives: traced bool scalar.
    hard_pool_size: static pool of hardest negatives.
    key: PRNG key of the random picks.

  Returns:
    scalar loss.
  """
  num_q, num_v = scores.shape
  pos = positive_mask(labels, num_v)
  valid = query_valid[:, None] & video_valid[None, :]
  t2v_key, v2t_key = jax.random.split(key)
  hard_negatives = jnp.asarray(hard_negatives, bool)

  neg_v = valid & ~pos  # (Q, B) negative videos of each query
  num_neg_v = jnp.maximum(jnp.sum(neg_v, axis=1), 1)
  pool = jnp.where(hard_negatives, jnp.minimum(hard_pool_size, num_neg_v), num_neg_v)
  neg_t2v = _pick_ranked(scores, neg_v, _random_rank(t2v_key, (num_q,), pool))
  pos_t2v = jnp.sum(jnp.where(pos, scores, 0.0), axis=1)
  t2v = jax.nn.relu(margin + neg_t2v - pos_t2v)

  st = scores.T  # (B, Q)
  pos_q = (pos & valid).T
  neg_q = (valid & ~pos).T
  num_pos_q = jnp.maximum(jnp.sum(pos_q, axis=1), 1)
  num_neg_q = jnp.maximum(jnp.sum(neg_q, axis=1), 1)
  pos_v2t = jnp.sum(jnp.where(pos_q, st, 0.0), axis=1) / num_pos_q
  rank = jnp.where(hard_negatives, 0, _random_rank(v2t_key, (num_v,), num_neg_q))
  neg_v2t = _pick_ranked(st, neg_q, rank)
  v2t = jax.nn.relu(margin + neg_v2t - pos_v2t)
  has_neg_q = jnp.any(neg_q, axis=1)
  has_neg_v = jnp.any(neg_v, axis=1)
  n_q = jnp.maximum(jnp.sum(query_valid), 1)
  n_v = jnp.maximum(jnp.sum(video_valid), 1)
  return (jnp.sum(jnp.where(query_valid & has_neg_v, t2v, 0.0)) / n_q
          + jnp.sum(jnp.where(video_valid & has_neg_q & jnp.any(pos_q, axis=1), v2t, 0.0)) / n_v)
