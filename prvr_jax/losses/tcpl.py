"""Text-CLIP Relation Preservation (TCPL): relational distillation from CLIP sentence embeddings.

Student: the pooled query vectors; teacher: the captions' CLIP EOS features (no gradient).
Distance term: normalised pairwise distances (RKD-D); angle term: cosines of the angles at every
anchor of every triple (RKD-A). The angle term is computed from Gram matrices in blocks of anchors
(O(block * Q * max(Q, D)) memory, forward and backward) instead of the reference's (Q, Q, D) difference
tensors: everything follows from the (Q, Q) squared-distance matrices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

PDIST_EPS = 1e-12
NORMALIZE_EPS = 1e-12


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


def _squared_distances(x: jax.Array, block: int) -> jax.Array:
  """|x_i - x_j|^2 from the differences themselves, in row blocks. (Q, D) -> (Q, Q).

  The Gram form |x_i|^2 + |x_j|^2 - 2 x_i.x_j loses most digits for near-duplicate rows; the
  angle term divides by these lengths, so they are computed exactly (O(Q^2 D) work, O(block Q D)
  memory; the block is rematerialised in the backward pass).
  """
  q = x.shape[0]
  num_blocks = -(-q // block)
  rows = jnp.minimum(jnp.arange(num_blocks * block).reshape(num_blocks, block), q - 1)

  @jax.checkpoint
  def rows_block(idx):
    diff = x[idx][:, None, :] - x[None, :, :]
    return jnp.sum(diff * diff, axis=-1)

  return lax.map(rows_block, rows).reshape(num_blocks * block, q)[:q]


def _angles(sq: jax.Array, anchors: jax.Array) -> jax.Array:
  """A[a, j, k] = unit(x_j - x_a) . unit(x_k - x_a) for the anchors (b,), from squared distances.

  (x_j - x_a).(x_k - x_a) = (|x_j - x_a|^2 + |x_k - x_a|^2 - |x_j - x_k|^2) / 2, so the whole
  term needs only the (Q, Q) matrix `sq`: O(b Q^2) per block. An exactly zero difference (j = a,
  or a duplicate row) normalises to zero, as in the reference's F.normalize.
  """
  sq_a = sq[anchors]  # (b, Q)
  dots = 0.5 * (sq_a[:, :, None] + sq_a[:, None, :] - sq[None, :, :])
  zero = sq_a <= 0.0
  inv = jnp.where(zero, 0.0, 1.0 / jnp.maximum(jnp.sqrt(jnp.where(zero, 1.0, sq_a)), NORMALIZE_EPS))
  return dots * inv[:, :, None] * inv[:, None, :]


def rkd_angle(student: jax.Array, teacher: jax.Array, query_valid: jax.Array,
              block_size: int = 64) -> jax.Array:
  """RKD angle term, blocked over anchors.

  Args:
    student: (Q, D) query vectors.
    teacher: (Q, D_t) CLIP sentence embeddings (gradient stopped).
    query_valid: (Q,) bool.
    block_size: rows per block; memory is O(block_size * Q * max(Q, D)) in forward and backward.

  Returns:
    scalar: mean over valid (i, j, k) of smooth_l1(A_s[i, j, k], A_t[i, j, k]).
  """
  q = student.shape[0]
  block = max(1, min(block_size, q))
  num_blocks = -(-q // block)
  sq_s = _squared_distances(student, block)
  sq_t = lax.stop_gradient(_squared_distances(lax.stop_gradient(teacher), block))
  pair = (query_valid[:, None] & query_valid[None, :]).astype(student.dtype)
  anchors = jnp.arange(num_blocks * block, dtype=jnp.int32).reshape(num_blocks, block)

  @jax.checkpoint
  def block_loss(idx):
    live = idx < q
    safe = jnp.minimum(idx, q - 1)
    w = (live & query_valid[safe]).astype(student.dtype)
    diff = smooth_l1(_angles(sq_s, safe), _angles(sq_t, safe))
    return jnp.sum(jnp.sum(diff * pair[None], axis=(1, 2)) * w)

  total = jnp.sum(lax.map(block_loss, anchors))
  n = jnp.maximum(jnp.sum(query_valid), 1).astype(student.dtype)
  return total / (n * n * n)
