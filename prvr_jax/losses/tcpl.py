"""Text-CLIP Relation Preservation (TCPL): relational distillation from CLIP sentence embeddings.

Student: the pooled query vectors; teacher: the captions' CLIP EOS features (no gradient).
Distance term: normalised pairwise distances (RKD-D); angle term: cosines of the angles at every
anchor of every triple (RKD-A). The angle term is computed from Gram matrices in blocks of anchors
(O(block * Q^2) memory, forward and backward) instead of the reference's (Q, Q, D) difference
tensors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

PDIST_EPS = 1e-12
NORMALIZE_EPS = 1e-12
# A difference vector whose squared norm is below this fraction of |x_i|^2 + |x_j|^2 is treated
# as zero (the reference normalises an exactly-zero difference to zero; in float32 anything this
# small is rounding noise of the Gram formulation).
_DUPLICATE_RTOL = 1e-10


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise smooth L1 (Huber, beta 1)."""
  d = jnp.abs(a - b)
  return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def _pdist(e: jax.Array) -> jax.Array:
  """Reference pdist: sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)), zero diagonal. (Q, D) -> (Q, Q)."""
  sq = jnp.sum(e * e, axis=-1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * (e @ e.T)
  d = jnp.sqrt(jnp.maximum(d2, PDIST_EPS))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def rkd_distance(student: jax.Array, teacher: jax.Array, query_valid: jax.Array) -> jax.Array:
  """RKD distance term.

  Args:
    student: (Q, D) query vectors.
    teacher: (Q, D_t) CLIP sentence embeddings (gradient stopped).
    query_valid: (Q,) bool.

  Returns:
    scalar: mean over valid (i, j) of smooth_l1(d_s / mean d_s, d_t / mean d_t), means over the
    positive entries.
  """
  pair = query_valid[:, None] & query_valid[None, :]

  def normalised(e):
    d = _pdist(e)
    positive = pair & (d > 0)
    mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
    return d / mean

  t = lax.stop_gradient(normalised(lax.stop_gradient(teacher)))
  s = normalised(student)
  n = jnp.maximum(jnp.sum(query_valid), 1).astype(jnp.float32)
  return jnp.sum(jnp.where(pair, smooth_l1(s, t), 0.0)) / (n * n)


def _centred_gram(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gram matrix of the rows centred on their valid mean (differences are translation-invariant,
  and centring shrinks the float32 cancellation in G_jk - G_ij - G_ik + G_ii)."""
  w = valid.astype(x.dtype)[:, None]
  mean = jnp.sum(x * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)
  xc = (x - mean) * w
  g = jnp.dot(xc, xc.T, precision=lax.Precision.HIGHEST)
  return g, jnp.diagonal(g)


def _angles(g: jax.Array, diag: jax.Array, anchors: jax.Array) -> jax.Array:
  """A[a, j, k] = unit(x_j - x_a) . unit(x_k - x_a) for the anchor rows `anchors` (b,) -> (b, Q, Q)."""
  g_a = g[anchors]  # (b, Q)
  d_a = diag[anchors]  # (b,)
  dots = g[None, :, :] - g_a[:, :, None] - g_a[:, None, :] + d_a[:, None, None]
  sq = d_a[:, None] + diag[None, :] - 2.0 * g_a  # (b, Q) |x_j - x_a|^2
  zero = sq <= _DUPLICATE_RTOL * (d_a[:, None] + diag[None, :])
  zero = zero | (jnp.arange(g.shape[0])[None, :] == anchors[:, None])
  inv = jnp.where(zero, 0.0, 1.0 / jnp.maximum(jnp.sqrt(jnp.where(zero, 1.0, sq)), NORMALIZE_EPS))
  return dots * inv[:, :, None] * inv[:, None, :]


def rkd_angle(student: jax.Array, teacher: jax.Array, query_valid: jax.Array,
              block_size: int = 64) -> jax.Array:
  """RKD angle term, blocked over anchors.

  Args:
    student: (Q, D) query vectors.
    teacher: (Q, D_t) CLIP sentence embeddings (gradient stopped).
    query_valid: (Q,) bool.
    block_size: anchors per block; memory is O(block_size * Q^2) in forward and backward.

  Returns:
    scalar: mean over valid (i, j, k) of smooth_l1(A_s[i, j, k], A_t[i, j, k]).
  """
  q = student.shape[0]
  block = max(1, min(block_size, q))
  num_blocks = -(-q // block)
  g_s, d_s = _centred_gram(student, query_valid)
  g_t, d_t = _centred_gram(lax.stop_gradient(teacher), query_valid)
  g_t, d_t = lax.stop_gradient(g_t), lax.stop_gradient(d_t)
  pair = (query_valid[:, None] & query_valid[None, :]).astype(student.dtype)
  anchors = jnp.arange(num_blocks * block, dtype=jnp.int32).reshape(num_blocks, block)

  @jax.checkpoint
  def block_loss(idx):
    live = (idx < q)
    safe = jnp.minimum(idx, q - 1)
    w = (live & query_valid[safe]).astype(student.dtype)
    diff = smooth_l1(_angles(g_s, d_s, safe), _angles(g_t, d_t, safe))
    return jnp.sum(jnp.sum(diff * pair[None], axis=(1, 2)) * w)

  total = jnp.sum(lax.map(block_loss, anchors))
  n = jnp.maximum(jnp.sum(query_valid), 1).astype(student.dtype)
  return total / (n * n * n)
