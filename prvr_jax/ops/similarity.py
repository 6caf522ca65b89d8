"""Query-to-video scores: max over a video's tokens of a query-token similarity."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# F.normalize's epsilon: x / max(||x||, eps).
NORMALIZE_EPS = 1e-12


def _clamped_norm(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """max(|x|, eps) over the last axis. (..., D) -> (...,)."""
  return jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1)), eps)


def l2_normalize(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """x / max(||x||, eps) over the last axis (torch F.normalize semantics). (..., D) -> (..., D)."""
  return x / _clamped_norm(x, eps)[..., None]


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




def _max_and_index(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Max over the last axis and its first index. (..., L) -> (...,) f32, (...,) int32."""
  index = jnp.argmax(x, axis=-1).astype(jnp.int32)
  return jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0], index


@jax.custom_vjp
def _raw_and_cosine_scores(queries: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`max_token_scores` with normalize False and True from one product.

  cos(q, t) = (q . t) / (max(|q|, eps) max(|t|, eps)) is exactly F.normalize-then-dot up to
  rounding, so the (Q, B, L) dot products are computed once for both matrices. The gradient is
  written by hand (`_scores_bwd`): it goes to the maximising token only, as torch's `max(dim)`
  routes it, so no (Q, B, L) array but the product itself and the cotangent it receives is
  ever formed (autodiff built five more: broadcast norms, the cosine, two tie masks).

  Args:
    queries: (Q, D); tokens: (B, L, D), masked tokens zero.

  Returns:
    (raw (Q, B), cosine (Q, B)).
  """
  return _scores_fwd(queries, tokens)[0]


def _scores_fwd(queries: jax.Array, tokens: jax.Array):
  flat = tokens.reshape(-1, tokens.shape[-1])
  dots = jnp.dot(queries, flat.T).reshape(queries.shape[0], *tokens.shape[:2])  # (Q, B, L)
  q_norm, t_norm = _clamped_norm(queries), _clamped_norm(tokens)
  raw, raw_index = _max_and_index(dots)
  # |q| is the same for every token of a row: the cosine's argmax is that of dots / |t|.
  scaled, cos_index = _max_and_index(dots / t_norm[None])
  cosine = scaled / q_norm[:, None]
  residuals = (queries, tokens, q_norm, t_norm, raw_index, cos_index, cosine)
  return (raw, cosine), residuals


def _scores_bwd(residuals, cotangents):
  queries, tokens, q_norm, t_norm, raw_index, cos_index, cosine = residuals
  g_raw, g_cos = cotangents
  num_tokens = tokens.shape[1]
  positions = jnp.arange(num_tokens, dtype=jnp.int32)
  at_raw = raw_index[..., None] == positions  # (Q, B, L)
  at_cos = cos_index[..., None] == positions
  # cos = dot / (|q|' |t|'): d/d dot = 1 / (|q|' |t|'), d/d |q|' = -cos / |q|', d/d |t|' likewise.
  d_dots = (jnp.where(at_raw, g_raw[..., None], 0.0)
            + jnp.where(at_cos, (g_cos / q_norm[:, None])[..., None] / t_norm[None], 0.0))
  g_cos_scaled = g_cos * cosine
  d_q_norm = -jnp.sum(g_cos_scaled, axis=1) / q_norm  # (Q,)
  d_t_norm = -jnp.sum(jnp.where(at_cos, g_cos_scaled[..., None], 0.0), axis=0) / t_norm  # (B, L)
  flat = tokens.reshape(-1, tokens.shape[-1])
  d_flat = d_dots.reshape(d_dots.shape[0], -1)  # (Q, B*L)
  d_queries = jnp.dot(d_flat, flat)
  d_tokens = jnp.dot(d_flat.T, queries).reshape(tokens.shape)
  # max(|x|, eps) passes the gradient on only where |x| > eps (there it equals |x|), and
  # d|x|/dx = x / |x|.
  q_scale = jnp.where(q_norm > NORMALIZE_EPS, d_q_norm / q_norm, 0.0)
  t_scale = jnp.where(t_norm > NORMALIZE_EPS, d_t_norm / t_norm, 0.0)
  return (d_queries + q_scale[:, None] * queries, d_tokens + t_scale[..., None] * tokens)


_raw_and_cosine_scores.defvjp(_scores_fwd, _scores_bwd)


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
