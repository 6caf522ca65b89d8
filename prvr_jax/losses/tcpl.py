"""Text-CLIP Relation Preservation (TCPL): relational distillation from CLIP sentence embeddings.

Student: the pooled query vectors (Q, D); teacher: the captions' CLIP EOS features (Q, D_t), which
get no gradient. Distance term: normalised pairwise distances (RKD-D). Angle term: cosines of the
angle at every anchor of every triple (RKD-A).

The reference builds (Q, Q, D) difference tensors and a (Q, Q, Q) angle tensor. Here the angle
term needs only the (Q, Q) matrix of exact squared distances: with d_ab = |x_a - x_b|^2,
(x_j - x_i).(x_k - x_i) = (d_ij + d_ik - d_jk) / 2 (polarisation). One scan step per anchor
computes that anchor's (j, k) plane of cosines, only its upper tiles (the plane is symmetric), and
from it both the term and its gradient w.r.t. the squared distances (a custom VJP: the backward
neither recomputes nor differentiates through the cosines), so forward and backward memory is
O(Q^2 + rows * Q * D). The squared distances' own backward is two matrix products. At Q = 640
on a 2-core CPU the term with its gradient takes 0.26 s, against 1.2 s for blocks of 4 anchors
over full planes and about 3 s for rematerialised autodiff.

Why exact squared distances rather than a Gram matrix G = X X^T (d_ij = G_ii + G_jj - 2 G_ij):
the Gram form loses most significant digits of d_ij for near-duplicate rows (duplicate
captions are common in PRVR data), and the angle term divides by sqrt(d_ij); that cost 0.3% of
the term's value on a test with one near-duplicate pair. Differences are exact to rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PDIST_EPS = 1e-12  # the reference pdist's clamp on squared distances
NORMALIZE_EPS = 1e-12  # F.normalize's eps
# Rows per step of the exact squared distances: (rows, Q, D) differences at a time.
_DISTANCE_ROWS = 4


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise smooth L1 (Huber with beta 1), as F.smooth_l1_loss(reduction='none').

  Args:
    a: any shape.
    b: same shape as a.

  Returns:
    array of a's shape.
  """
  d = jnp.abs(a - b)
  return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def _zero_padding(x: jax.Array, query_valid: jax.Array) -> jax.Array:
  """Zeroes padded rows so padding garbage (even inf) cannot reach values or gradients. (Q, D)."""
  return jnp.where(query_valid[:, None], x, 0.0)


def _pdist(e: jax.Array) -> jax.Array:
  """The reference pdist: sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)) with a zero diagonal.

  Args:
    e: (Q, D).

  Returns:
    (Q, Q) distances.
  """
  sq = jnp.sum(e * e, axis=-1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(e, e.T, precision=lax.Precision.HIGHEST)
  d = jnp.sqrt(jnp.maximum(d2, PDIST_EPS))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def rkd_distance(student: jax.Array, teacher: jax.Array, query_valid: jax.Array) -> jax.Array:
  """RKD distance term of TCPL (the reference's `RkdDistance`).

  Each pdist matrix is divided by the mean of its positive entries over valid pairs (the
  student's mean keeps its gradient, as in the reference); the loss is the smooth L1 between the
  two, averaged over the n^2 valid pairs (diagonal included), n = #valid queries.

  Args:
    student: (Q, D) query vectors.
    teacher: (Q, D_t) CLIP sentence embeddings (gradient stopped).
    query_valid: (Q,) bool.

  Returns:
    scalar float32 loss.
  """
  query_valid = jnp.asarray(query_valid)
  pair = query_valid[:, None] & query_valid[None, :]

  def normalised(e):
    d = _pdist(_zero_padding(e, query_valid))
    positive = pair & (d > 0)
    mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
    # An all-duplicate (or single-query) batch has no positive distance: leave d (all zero) as is.
    return d / jnp.where(mean > 0, mean, 1.0)

  t = lax.stop_gradient(normalised(lax.stop_gradient(teacher)))
  s = normalised(student)
  n = jnp.maximum(jnp.sum(query_valid), 1).astype(jnp.float32)
  return jnp.sum(jnp.where(pair, smooth_l1(s, t), 0.0)) / (n * n)


def _blocks(q: int, block: int) -> jax.Array:
  """Row indices 0..Q-1 padded up to a multiple of `block` (padding marked by index >= Q).

  Returns:
    (num_blocks, block) int32.
  """
  num_blocks = -(-q // block)
  return jnp.arange(num_blocks * block, dtype=jnp.int32).reshape(num_blocks, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _squared_distances(x: jax.Array, block: int) -> jax.Array:
  """Exact |x_i - x_j|^2 from the differences themselves, in row blocks.

  O(Q^2 D) work and O(block Q D) memory. The backward pass is two matrix products: for a
  cotangent G, d/dx_i sum_jk G_jk |x_j - x_k|^2 = 2 (r_i x_i - (S x)_i) with S = G + G^T and r its
  row sums (autodiff through the (block, Q, D) differences costs ~20x more on CPU).

  Args:
    x: (Q, D).
    block: rows per block.

  Returns:
    (Q, Q), exactly 0 on the diagonal and for identical rows.
  """
  q = x.shape[0]

  def rows_block(idx):
    diff = x[jnp.minimum(idx, q - 1)][:, None, :] - x[None, :, :]
    return jnp.sum(diff * diff, axis=-1)

  return lax.map(rows_block, _blocks(q, block)).reshape(-1, q)[:q]


def _squared_distances_fwd(x, block):
  return _squared_distances(x, block), x


def _squared_distances_bwd(block, x, cotangent):
  del block
  sym = cotangent + cotangent.T
  pull = jnp.matmul(sym, x, precision=lax.Precision.HIGHEST)
  return (2.0 * (jnp.sum(sym, axis=1)[:, None] * x - pull),)


_squared_distances.defvjp(_squared_distances_fwd, _squared_distances_bwd)


def _inverse_norms(sq_a: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(u = 1 / |x_j - x_a|, (d u / d |x_j - x_a|^2) / u) for one anchor a.

  A zero difference (j = a, or an exact duplicate row) has unit vector 0, like F.normalize in the
  reference; the `where`s keep sqrt's infinite slope at 0 out of the picture. Rows that are not
  `valid` also get u = 0, which zeroes every cosine (and so every loss and gradient entry) they
  take part in: no separate triple mask is needed.

  Args:
    sq_a: (Q,) squared distances of the anchor to every row.
    valid: (Q,) bool.

  Returns:
    inv (Q,) and the relative slope (Q,): -inv^2 / 2, 0 where inv is constant (zero
    differences, invalid rows, or the epsilon clamp).
  """
  zero = (sq_a <= 0.0) | ~valid
  root = jnp.sqrt(jnp.where(zero, 1.0, sq_a))
  inv = jnp.where(zero, 0.0, 1.0 / jnp.maximum(root, NORMALIZE_EPS))
  slope = jnp.where(zero | (root <= NORMALIZE_EPS), 0.0, -0.5 * inv * inv)
  return inv, slope


class _TilePlan:
  """Static layout of the (j, k) plane cut into tile x tile squares, upper triangle only.

  The angle tensor A[a, j, k] is symmetric in (j, k) (exactly, in floating point too: every
  operation that builds it is symmetric), so only the n (n + 1) / 2 tiles (p, q) with p <= q are
  computed: off-diagonal tiles count twice in the loss, and their column sums stand in for the
  row sums of the mirrored tile. This halves the O(Q^3) work.

  Attributes:
    tile, n: tile edge and tiles per side (Q padded up to n * tile).
    row_tile, col_tile: (m,) tile indices p, q of the m computed tiles.
    weight: (m,) 1 for diagonal tiles, 2 for off-diagonal ones.
    to_rows: (n, m) 0/1: tile i's row sums belong to row block row_tile[i].
    to_cols: (n, m) 0/1: tile i's column sums belong to row block col_tile[i] (off-diagonal only).
  """

  def __init__(self, q: int, tile: int):
    self.tile = tile
    self.n = -(-q // tile)
    self.row_tile, self.col_tile = np.triu_indices(self.n)
    off = self.row_tile != self.col_tile
    self.off_diagonal = off
    self.weight = np.where(off, 2.0, 1.0).astype(np.float32)
    eye = np.eye(self.n, dtype=np.float32)
    self.to_rows = eye[:, self.row_tile]
    self.to_cols = eye[:, self.col_tile] * off

  def tiles(self, matrix: jax.Array) -> jax.Array:
    """(n t, n t) -> (m, t, t): the upper-triangle tiles."""
    n, t = self.n, self.tile
    return matrix.reshape(n, t, n, t).transpose(0, 2, 1, 3)[self.row_tile, self.col_tile]

  def untile(self, tiles: jax.Array) -> jax.Array:
    """(m, t, t) -> (n t, n t), each off-diagonal tile mirrored (transposed) below the diagonal."""
    n, t = self.n, self.tile
    full = jnp.zeros((n, n, t, t), tiles.dtype).at[self.row_tile, self.col_tile].set(tiles)
    mirrored = jnp.where(self.off_diagonal[:, None, None], jnp.swapaxes(tiles, 1, 2), 0.0)
    full = full.at[self.col_tile, self.row_tile].add(mirrored)
    return full.transpose(0, 2, 1, 3).reshape(n * t, n * t)

  def split(self, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(n t,) -> the (m, t) slices of v along each computed tile's rows and columns."""
    v = v.reshape(self.n, self.tile)
    return v[self.row_tile], v[self.col_tile]

  def line_sums(self, tiles: jax.Array) -> jax.Array:
    """Sum over k of the full symmetric (j, k) plane, from its upper tiles. (m, t, t) -> (n t,)."""
    rows = jnp.matmul(self.to_rows, jnp.sum(tiles, axis=2), precision=lax.Precision.HIGHEST)
    cols = jnp.matmul(self.to_cols, jnp.sum(tiles, axis=1), precision=lax.Precision.HIGHEST)
    return (rows + cols).reshape(-1)


def _angle_sum_and_grad(sq_s: jax.Array, sq_t: jax.Array, query_valid: jax.Array,
                        tile: int) -> tuple[jax.Array, jax.Array]:
  """Sum over valid triples of smooth_l1(A_s - A_t) and its gradient w.r.t. sq_s, in one pass.

  One scan step per anchor a computes the (j, k) plane's contribution to the value and,
  analytically, to the gradient, so the backward pass neither recomputes the cosines (as
  rematerialisation would) nor differentiates through them. With G = smooth_l1'(A_s - A_t)
  (symmetric in j, k; zero for invalid rows) and u = inv:
    d/d sq[j, k] (the opposite side)  = -1/2 sum_a G[a, j, k] u_aj u_ak
    d/d sq[a, j] (the anchor's sides) = sum_k G[a, j, k] u_aj u_ak + u'_aj / u_aj sum_k 2 G A
  (u' / u = -u^2 / 2 from `_inverse_norms`, zero where u is constant). Only the upper tiles of
  each plane are computed (`_TilePlan`). One anchor per step keeps the step's (m, t, t) arrays,
  about Q^2 / 2 floats each, cache-sized: on a 2-core CPU at Q = 640 this ran 4.7x faster than
  blocks of 4 anchors over the full plane, and the tile edge (32 to 160) hardly mattered.

  Args:
    sq_s, sq_t: (Q, Q) student / teacher squared distances (symmetric).
    query_valid: (Q,) bool.
    tile: static tile edge.

  Returns:
    (scalar sum, (Q, Q) gradient w.r.t. sq_s).
  """
  q = sq_s.shape[0]
  plan = _TilePlan(q, tile)
  pad = plan.n * plan.tile - q
  valid = jnp.pad(query_valid, (0, pad))
  sq_s = jnp.pad(sq_s, ((0, pad), (0, pad)))
  sq_t = jnp.pad(sq_t, ((0, pad), (0, pad)))
  opposite_s, opposite_t = plan.tiles(sq_s), plan.tiles(sq_t)  # (m, t, t)
  weight = jnp.asarray(plan.weight)

  def cosines(sq_a, u, opposite):
    (s_j, s_k), (u_j, u_k) = plan.split(sq_a), plan.split(u)
    uu = u_j[:, :, None] * u_k[:, None, :]
    return 0.5 * (s_j[:, :, None] + s_k[:, None, :] - opposite) * uu, uu

  def body(carry, a):
    total, opposite_grad, anchor_grad = carry
    live = valid & valid[a]
    u, slope = _inverse_norms(sq_s[a], live)
    v, _ = _inverse_norms(sq_t[a], live)
    a_s, uu = cosines(sq_s[a], u, opposite_s)
    a_t, _ = cosines(sq_t[a], v, opposite_t)
    diff = a_s - a_t
    g = jnp.clip(diff, -1.0, 1.0)  # smooth_l1' (beta 1)
    # smooth_l1(d) = g (d - g / 2) with g = clip(d, -1, 1), in both branches.
    total = total + jnp.sum(jnp.sum(g * (diff - 0.5 * g), axis=(1, 2)) * weight)
    h = g * uu
    opposite_grad = opposite_grad - 0.5 * h
    row = plan.line_sums(h) + 2.0 * slope * plan.line_sums(g * a_s)
    anchor_grad = anchor_grad.at[a].add(row)
    return (total, opposite_grad, anchor_grad), None

  # The carry must carry every input's varying-ness inside shard_map (per-device TCPL scope),
  # hence zeros derived from the inputs rather than constants.
  seed = 0.0 * (sq_s[0, 0] + sq_t[0, 0] + valid[0].astype(sq_s.dtype))
  init = (seed, jnp.zeros(opposite_s.shape, sq_s.dtype) + seed, jnp.zeros(sq_s.shape, sq_s.dtype) + seed)
  (total, opposite_grad, anchor_grad), _ = lax.scan(body, init, jnp.arange(q))
  return total, (plan.untile(opposite_grad) + anchor_grad)[:q, :q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _angle_sum(sq_s: jax.Array, sq_t: jax.Array, query_valid: jax.Array, tile: int) -> jax.Array:
  """Sum over valid triples of smooth_l1(A_s - A_t); differentiable w.r.t. sq_s only."""
  return _angle_sum_and_grad(sq_s, sq_t, query_valid, tile)[0]


def _angle_sum_fwd(sq_s, sq_t, query_valid, tile):
  return _angle_sum_and_grad(sq_s, sq_t, query_valid, tile)


def _angle_sum_bwd(tile, grad, cotangent):
  del tile
  return cotangent * grad, None, None


_angle_sum.defvjp(_angle_sum_fwd, _angle_sum_bwd)


def rkd_angle(student: jax.Array, teacher: jax.Array, query_valid: jax.Array,
              tile_size: int = 64) -> jax.Array:
  """RKD angle term of TCPL (the reference's `RKdAngle`), tiled over the (j, k) plane.

  Mean over the n^3 valid triples (i, j, k) of smooth_l1(A_s[i, j, k], A_t[i, j, k]) with
  A[i, j, k] = unit(e_j - e_i) . unit(e_k - e_i), n = #valid queries. The teacher gets no
  gradient.

  Args:
    student: (Q, D) query vectors.
    teacher: (Q, D_t) CLIP sentence embeddings (gradient stopped).
    query_valid: (Q,) bool.
    tile_size: static edge of the (j, k) tiles (clipped to Q); memory is O(Q^2 + rows * Q * D)
      in the forward and the backward pass, never O(Q^3).

  Returns:
    scalar float32 loss.
  """
  query_valid = jnp.asarray(query_valid, bool)
  q = student.shape[0]
  tile = max(1, min(tile_size, q))
  sq_s = _squared_distances(_zero_padding(student, query_valid), _DISTANCE_ROWS)
  sq_t = lax.stop_gradient(
      _squared_distances(_zero_padding(lax.stop_gradient(teacher), query_valid), _DISTANCE_ROWS))
  total = _angle_sum(sq_s, sq_t, query_valid, tile)
  n = jnp.maximum(jnp.sum(query_valid), 1).astype(jnp.float32)
  return total / (n * n * n)
