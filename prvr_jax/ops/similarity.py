"""Query-to-video scores: max over a video's tokens of a query-token similarity."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# F.normalize's epsilon: x / max(||x||, eps).
NORMALIZE_EPS = 1e-12


def l2_normalize(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """x / max(||x||, eps) over the last axis (torch F.normalize semantics). (..., D) -> (..., D)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def max_token_scores(queries: jax.Array, tokens: jax.Array, normalize: bool) -> jax.Array:
  """Score of every query against every video: max over the video's tokens.

  Args:
    queries: (Q, D) query vectors.
    tokens: (B, L, D) video tokens (masked tokens must already be zero, as the reference does).
    normalize: cosine similarity when True, raw dot product when False.

  Returns:
    (Q, B) scores.
  """
  if normalize:
    queries, tokens = l2_normalize(queries), l2_normalize(tokens)
  return jnp.max(jnp.einsum("qd,bld->qbl", queries, tokens), axis=-1)


def fused_scores(clip_scores: jax.Array, frame_scores: jax.Array, clip_weight: float = 0.4,
                 frame_weight: float = 0.6) -> jax.Array:
  """Retrieval score: clip_weight * clip + frame_weight * frame. (Q, B) x 2 -> (Q, B)."""
  return clip_weight * clip_scores + frame_weight * frame_scores


def _raw_and_cosine_scores(queries: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`max_token_scores` with normalize False and True from one product.

  cos(q, t) = (q . t) / (max(|q|, eps) max(|t|, eps)) is exactly F.normalize-then-dot up to
  rounding, so the (Q, B, L) dot products (and, in the backward pass, their two matmuls) are
  computed once for both matrices instead of twice: the score matmuls were most of the backbone
  losses' cost at B = 128 (640 queries x 128 videos x 128 frames).

  Args:
    queries: (Q, D); tokens: (B, L, D), masked tokens zero.

  Returns:
    (raw (Q, B), cosine (Q, B)).
  """
  dots = jnp.einsum("qd,bld->qbl", queries, tokens)
  q_norm = jnp.maximum(jnp.sqrt(jnp.sum(queries * queries, axis=-1)), NORMALIZE_EPS)
  t_norm = jnp.maximum(jnp.sqrt(jnp.sum(tokens * tokens, axis=-1)), NORMALIZE_EPS)
  cosine = dots / (q_norm[:, None, None] * t_norm[None])
  return jnp.max(dots, axis=-1), jnp.max(cosine, axis=-1)


def training_scores(video_query: jax.Array, clip_tokens: jax.Array,
                    frame_tokens: jax.Array) -> dict[str, jax.Array]:
  """The four (Q, B) score matrices of the training losses.

  Args:
    video_query: (Q, D) pooled queries.
    clip_tokens: (B, K, D) clip-branch tokens.
    frame_tokens: (B, F, D) frame-branch tokens (zero where masked).

  Returns:
    `clip_scale_scores` / `frame_scale_scores` (cosine, for the triplet losses) and
    `clip_scale_scores_` / `frame_scale_scores_` (raw dot products, for the NCE losses).
  """
  clip_raw, clip_cos = _raw_and_cosine_scores(video_query, clip_tokens)
  frame_raw, frame_cos = _raw_and_cosine_scores(video_query, frame_tokens)
  return dict(clip_scale_scores=clip_cos, clip_scale_scores_=clip_raw,
              frame_scale_scores=frame_cos, frame_scale_scores_=frame_raw)
