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
  return dict(
      clip_scale_scores=max_token_scores(video_query, clip_tokens, normalize=True),
      clip_scale_scores_=max_token_scores(video_query, clip_tokens, normalize=False),
      frame_scale_scores=max_token_scores(video_query, frame_tokens, normalize=True),
      frame_scale_scores_=max_token_scores(video_query, frame_tokens, normalize=False),
  )
