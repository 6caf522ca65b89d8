"""Token merging of MSC, batched and jit-compiled with static shapes.

Two merges exist in the method:

* `op_tome` (data side, OP-ToMe): 128 resampled frames -> 80 -> 52 -> 32 tokens by merging the
  best-scoring disjoint neighbour pairs (2p, 2p+1); order is preserved, so every token covers a
  contiguous span of frames.
* `greedy_merge_levels` (loss side, CBVA step 2): encoded clip tokens 32 -> 20 -> 12 -> 8 -> 5 by
  greedy bipartite matching of even against odd positions, stopping at a per-video clip count that
  is only known at run time.

Both keep the reference's exact discrete decisions (see shared/golden/README.md, sections 3 and 5),
with fixed array shapes so a whole batch is one XLA program: per level the output length is static
and a video's choices only change which rows are gathered.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# F.normalize's epsilon, used for the loss-side similarity metric.
_METRIC_EPS = 1e-12
OP_TOME_TARGETS: tuple[int, ...] = (80, 52, 32)
CBVA_LEVELS: tuple[int, ...] = (20, 12, 8, 5)
# Lanes of the partial sums of an OP-ToMe pair score (see `_pair_dots`); D = 768 and D = 96 are
# multiples. Chosen by measurement on XLA:CPU: with 48 lanes the third round compiles to a loop
# twice as slow.
_DOT_LANES = 96


class OpTomeResult(NamedTuple):
  """Output of `op_tome` (B videos, N0 input frames, T = last target).

  Attributes:
    tokens: (B, T, D) merged tokens (size-weighted means of their frames), in time order.
    sizes: (B, T) float32 number of frames of each token (sums to N0).
    labels: (B, N0) int32 token of each frame; non-decreasing, values 0..T-1.
    spans: (B, T, 2) int32 [start, end) frame range of each token.
    level_sizes: per target, (B, target) float32 sizes after that round.
    level_labels: per target, (B, N0) int32 frame labels after that round.
  """

  tokens: jax.Array
  sizes: jax.Array
  labels: jax.Array
  spans: jax.Array
  level_sizes: tuple[jax.Array, ...]
  level_labels: tuple[jax.Array, ...]


class GreedyMergeResult(NamedTuple):
  """Output of `greedy_merge_levels` (B videos, N = 32 input tokens, F = 128 frames, 4 levels).

  Attributes:
    segments: (B, N, D) merged encoded tokens; rows >= the video's clip count are zero.
    raw: (B, N, Dv) the raw (similarity) tokens merged alongside, zero-padded likewise.
    sizes: (B, N) float32 merged sizes, zero-padded.
    labels: (B, F) int32 segment of each frame after the video's last level (input labels when no
      level ran).
    valid: (B, N) bool, True for the rows that hold a segment.
    labels_per_level: (B, 4, F) int32 frame labels after each level, -1 where it did not run.
  """

  segments: jax.Array
  raw: jax.Array
  sizes: jax.Array
  labels: jax.Array
  valid: jax.Array
  labels_per_level: jax.Array


def _check_schedule(n: int, targets: tuple[int, ...], name: str) -> None:
  """Static validation of a merge schedule (trace time, plain Python)."""
  for t in targets:
    if n % 2:
      raise ValueError(f"{name}: a merge round needs an even token count, got {n} before target {t}")
    if not n // 2 <= t < n:
      raise ValueError(f"{name}: target {t} must satisfy N/2 <= target < N for N = {n} (schedule {targets})")
    n = t


def _merge_rows(values: jax.Array, partner: jax.Array, w_self: jax.Array, w_partner: jax.Array,
                merged: jax.Array) -> jax.Array:
  """Size-weighted mean of each row with its partner row, where `merged`.

  Args:
    values: (B, P, D) anchor rows.
    partner: (B, P, D) partner rows.
    w_self: (B, P) anchor sizes.
    w_partner: (B, P) partner sizes.
    merged: (B, P) bool.

  Returns:
    (B, P, D): (v w1 + u w2) / (w1 + w2) where merged, else the anchor row.
  """
  w1, w2 = w_self[..., None], w_partner[..., None]
  # Same operation order as the reference, so results agree to the last bit in most cases.
  mean = (values * w1 + partner * w2) / (w1 + w2)
  return jnp.where(merged[..., None], mean, values)


def _first_of_each_output(keep: jax.Array, num_out: int) -> jax.Array:
  """Index of the input row that opens each output row.

  Args:
    keep: (B, N) bool, exactly `num_out` True per row: inputs that start an output row.
    num_out: static number of outputs.

  Returns:
    (B, num_out) int32, the positions of the True entries in increasing order.
  """
  rank = jnp.cumsum(keep.astype(jnp.int32), axis=-1)  # 1-based output index of each kept row
  targets = jnp.arange(1, num_out + 1, dtype=jnp.int32)
  # Output t opens at the first row whose rank reaches t + 1, i.e. after every row ranked <= t.
  # An O(N * num_out) compare-and-count (N <= 128 here) fuses into one reduction and compiles far
  # faster than a vmapped searchsorted.
  return jnp.sum(rank[:, None, :] < targets[None, :, None], axis=-1, dtype=jnp.int32)


def _gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """Rows of each video's frames.

  Args:
    x: (B, N, D) frames.
    rows: (B, ...) int32 row indices, each in [0, N).

  Returns:
    (B, ..., D). One gather on the flattened frames with in-bounds indices: take_along_axis would
    also normalise negative indices and fill out-of-range ones for every gathered element, which
    costs more than the load itself inside the fusions below.
  """
  bsz, n, d = x.shape
  offsets = (jnp.arange(bsz, dtype=rows.dtype) * n).reshape((bsz,) + (1,) * (rows.ndim - 1))
  dims = lax.GatherDimensionNumbers(offset_dims=(rows.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,))
  return lax.gather(x.reshape(bsz * n, d), (rows + offsets)[..., None], dims, (1, d),
                    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _span_sums(x: jax.Array, start: jax.Array, length: jax.Array, max_len: int) -> jax.Array:
  """Sum of the frames of each span, gathered straight from the frames.

  Args:
    x: (B, N0, D) frames.
    start: (B, T) int32 first frame of each span.
    length: (B, T) int32 frames per span, 1 <= length <= max_len.
    max_len: static upper bound of `length`.

  Returns:
    (B, T, D) sums, frames added in time order (then zeros up to max_len). XLA fuses the gathers
    into their consumer, so only the consumer's result is written.
  """
  n0 = x.shape[1]
  total = None
  for m in range(max_len):  # trace-time unroll over the (<= 8) offsets inside a span
    rows = _gather_rows(x, jnp.minimum(start + m, n0 - 1))
    rows = jnp.where((m < length)[..., None], rows, 0.0)
    total = rows if total is None else total + rows
  return total


def _add_in_loop(a: jax.Array, b: jax.Array) -> jax.Array:
  """a + b as a reducer that XLA:CPU keeps in the fusion of its operand.

  XLA:CPU hands every reduce whose reducer is exactly `a + b` to YNNPACK, which needs the operand
  written to memory first: for the pair products that is a (B, P, D) array written and read back
  per round. This reducer computes the same sum but does not match that pattern (the two adds are
  deliberate: a select of one value with itself is simplified back to the plain add), so the
  partial sums are computed while the frames are read. Only speed depends on this.
  """
  return jnp.where(a == a, a + b, a + b)


def _pair_dots(a: jax.Array, b: jax.Array) -> jax.Array:
  """Dot products of matching rows of a and b.

  The D products are first summed lane-wise over the D / _DOT_LANES chunks (in chunk order), then
  the _DOT_LANES partial sums are added. The first step runs inside the fusion that reads or
  gathers the rows, so no (B, P, D) array is written. The result is the same float32 dot product
  as a plain sum over D up to rounding (the summation order differs; for D <= _DOT_LANES it is
  the plain sum).

  Args:
    a: (B, P, D) float32.
    b: (B, P, D) float32.

  Returns:
    (B, P) float32.
  """
  prod = a * b
  d = prod.shape[-1]
  lanes = _DOT_LANES if d % _DOT_LANES == 0 else d
  chunks = prod.reshape(prod.shape[:-1] + (d // lanes, lanes))
  partial = lax.reduce(chunks, jnp.float32(0), _add_in_loop, (chunks.ndim - 2,))
  return jnp.sum(partial, axis=-1)


def _compact(keep: jax.Array, values: tuple[jax.Array, ...],
             num_out: int) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Keeps the rows where `keep`, in order.

  Args:
    keep: (B, N) bool, exactly `num_out` True per row.
    values: int32 arrays (B, N), compacted together.
    num_out: static output length.

  Returns:
    (the values at the kept rows, each (B, num_out); dest (B, N) int32, the output row of each
    input row, i.e. of the last kept row at or before it).
  """
  n = keep.shape[1]
  dest = jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1
  # A scatter to the kept rows' own slots (each written once) is far cheaper on CPU than finding
  # each output's source row by an (N x num_out) compare-and-count. Dropped rows get distinct
  # out-of-range slots so that every index stays unique.
  slot = jnp.where(keep, dest, num_out + jnp.arange(n, dtype=jnp.int32))

  def one(video_slot, video_values):
    # Zeros taken from the values, so they carry the same varying axes inside shard_map.
    out = jnp.zeros_like(video_values[:num_out])
    return out.at[video_slot].set(video_values, mode="drop", unique_indices=True)

  out = jax.vmap(one)(slot, jnp.stack(values, axis=-1))
  return tuple(out[..., i] for i in range(len(values))), dest


def _op_tome_round(x: jax.Array, start: jax.Array, length: jax.Array, max_len: int,
                   target: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One OP-ToMe round N -> target on tokens described by their frame spans.

  A token after any round is the mean of the frames it covers (a size-weighted mean of means is
  the mean of the union), so a pair's score a.b is (sum_a . sum_b) / (n_a n_b), computed from the
  frames directly. Only (B, N) integers are carried between rounds: no token array is written
  until the end, and each round reads the frames once, writing only (B, P, _DOT_LANES) partial
  sums.

  Args:
    x: (B, N0, D) frames.
    start: (B, N) int32 first frame of each current token.
    length: (B, N) int32 frames of each current token (<= max_len).
    max_len: static bound of `length`.
    target: static output length.

  Returns:
    (start (B, target), length (B, target)) of the merged tokens, and (B, N) int32 the merged token
    of each current token.
  """
  bsz, n = start.shape
  p = n // 2
  d = x.shape[-1]
  # The scores only choose which pairs merge: no gradient flows through them.
  x = lax.stop_gradient(x)
  if max_len == 1:  # first round: the tokens are the frames (the slices fuse into the dot's loop)
    pairs = x.reshape(bsz, p, 2, d)
    sum_a, sum_b = pairs[:, :, 0], pairs[:, :, 1]
  else:
    sum_a = _span_sums(x, start[:, 0::2], length[:, 0::2], max_len)
    sum_b = _span_sums(x, start[:, 1::2], length[:, 1::2], max_len)
  n_a, n_b = length[:, 0::2], length[:, 1::2]
  score = _pair_dots(sum_a, sum_b) / (n_a * n_b).astype(x.dtype)  # (B, P)
  # Rank of each pair in a stable descending sort: strictly better pairs, plus equal ones to the
  # left. The reference merges the N - target best pairs; stable ties are the natural choice
  # (its own torch.argsort is unstable, the golden data has no ties).
  better = score[:, None, :] > score[:, :, None]  # [b, p, q]: q beats p
  tie_left = (score[:, None, :] == score[:, :, None]) & (jnp.arange(p)[None, :] < jnp.arange(p)[:, None])
  merged = jnp.sum(better | tie_left, axis=-1) < (n - target)  # (B, P)
  # Per input token: the span it opens if it starts an output token (a merged pair's second
  # token never does).
  row_len = jnp.stack([jnp.where(merged, n_a + n_b, n_a), n_b], axis=2).reshape(bsz, n)
  keep = jnp.stack([jnp.ones_like(merged), ~merged], axis=2).reshape(bsz, n)
  (new_start, new_length), dest = _compact(keep, (start, row_len), target)
  return new_start, new_length, dest


def op_tome(x: jax.Array, targets: tuple[int, ...] = OP_TOME_TARGETS) -> OpTomeResult:
  """Order-preserving token merging (data side), batched.

  Per round on N tokens: pairs (2p, 2p+1) are scored by their raw dot product, the N - target
  best pairs (stable descending order) become the size-weighted mean of the pair, other pairs
  keep both tokens, order is preserved.

  Args:
    x: (B, N, D) un-normalised resampled frames (N even, N = 128 in MSC), finite (a NaN score
      would make the number of merged pairs ill-defined; the host-side resampling rejects them).
    targets: static, strictly decreasing token counts with N_prev / 2 <= target < N_prev.

  Returns:
    `OpTomeResult` with tokens (B, T, D), sizes (B, T), labels (B, N), spans (B, T, 2) and
    per-level sizes / labels, T = targets[-1].
  """
  targets = tuple(int(t) for t in targets)
  if x.ndim != 3:
    raise ValueError(f"op_tome: expected (B, N, D) input, got shape {x.shape}")
  bsz, n0, _ = x.shape
  if not targets:
    raise ValueError("op_tome: empty target schedule")
  _check_schedule(n0, targets, "op_tome")
  x = jnp.asarray(x, jnp.float32)
  start = jnp.broadcast_to(jnp.arange(n0, dtype=jnp.int32), (bsz, n0))
  length = jnp.ones((bsz, n0), jnp.int32)
  max_len = 1
  level_sizes, level_labels = [], []
  labels = None
  for target in targets:  # trace-time loop: the shapes change per level
    start, length, dest = _op_tome_round(x, start, length, max_len, target)
    max_len *= 2
    level_sizes.append(length.astype(jnp.float32))
    # A frame's token after this round is the merged token of its token before it.
    labels = dest if labels is None else jnp.take_along_axis(dest, labels, axis=1)
    level_labels.append(labels)
  tokens = _span_sums(x, start, length, max_len) / length[..., None].astype(jnp.float32)
  spans = jnp.stack([start, start + length], axis=-1)
  return OpTomeResult(tokens, level_sizes[-1], level_labels[-1], spans, tuple(level_sizes),
                      tuple(level_labels))


def _greedy_pairs(sim: jax.Array, num_pairs: int) -> tuple[jax.Array, jax.Array]:
  """Greedy bipartite matching: repeatedly the best (a, b) with both unused.

  Ties go to the first entry in row-major order (argmax semantics), which is what the reference's
  stable descending sort of the (score, a, b) list followed by a scan does.

  Args:
    sim: (B, P, P) similarities of even (rows) against odd (columns) tokens.
    num_pairs: static number of pairs to take (<= P).

  Returns:
    (partner_of_a (B, P) int32 odd index matched to each even token or -1,
     owner_of_b (B, P) int32 even index matched to each odd token or -1).
  """
  bsz, p, _ = sim.shape
  sim = lax.stop_gradient(sim)
  ar = jnp.arange(p, dtype=jnp.int32)

  def step(_, carry):
    used_a, used_b, partner, owner = carry
    masked = jnp.where(used_a[:, :, None] | used_b[:, None, :], -jnp.inf, sim)
    flat = jnp.argmax(masked.reshape(bsz, p * p), axis=-1).astype(jnp.int32)
    a, b = flat // p, flat % p
    hit_a = ar[None, :] == a[:, None]
    hit_b = ar[None, :] == b[:, None]
    return (used_a | hit_a, used_b | hit_b, jnp.where(hit_a, b[:, None], partner),
            jnp.where(hit_b, a[:, None], owner))

  # The carry is derived from `sim` (all False / -1) rather than built from constants so that it
  # has `sim`'s varying-axes type inside shard_map (x > inf is False for every x, NaN included).
  unused = sim[:, :, 0] > jnp.inf
  unmatched = jnp.where(unused, 0, -1).astype(jnp.int32)
  init = (unused, unused, unmatched, unmatched)
  _, _, partner, owner = lax.fori_loop(0, num_pairs, step, init)
  return partner, owner


def _greedy_round(x: jax.Array, raw: jax.Array, sizes: jax.Array, labels: jax.Array,
                  target: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One loss-side merge round N -> target.

  Args:
    x: (B, N, D) encoded tokens (differentiable).
    raw: (B, N, Dv) similarity tokens, merged alongside.
    sizes: (B, N) float32 sizes.
    labels: (B, F) int32 frame labels in [0, N).
    target: static output length.

  Returns:
    (x (B, target, D), raw (B, target, Dv), sizes (B, target), labels (B, F)).
  """
  bsz, n, d = x.shape
  norm = jnp.sqrt(jnp.sum(raw * raw, axis=-1, keepdims=True))
  metric = raw / jnp.maximum(norm, _METRIC_EPS)
  # HIGHEST: the greedy order depends on these values; TF32/bf16 matmuls would move near-ties.
  sim = jnp.einsum("bad,bcd->bac", metric[:, 0::2], metric[:, 1::2], precision=lax.Precision.HIGHEST)
  partner, owner = _greedy_pairs(sim, n - target)
  merged = partner >= 0  # (B, P) per even token
  odd_taken = owner >= 0

  # x and raw are merged as one array: half the ops, so a faster compile.
  feats = jnp.concatenate([x, raw], axis=-1)  # promotes to the wider dtype
  even, odd = feats[:, 0::2], feats[:, 1::2]
  s_even, s_odd = sizes[:, 0::2], sizes[:, 1::2]
  safe = jnp.maximum(partner, 0)
  s_partner = jnp.take_along_axis(s_odd, safe, axis=1)
  even = _merge_rows(even, jnp.take_along_axis(odd, safe[..., None], axis=1), s_even, s_partner, merged)

  def interleave(a, b):
    return jnp.stack([a, b], axis=2).reshape((bsz, n) + a.shape[2:])

  row_feats = interleave(even, odd)
  row_size = interleave(jnp.where(merged, s_even + s_partner, s_even), s_odd)
  keep = interleave(jnp.ones_like(odd_taken), ~odd_taken)

  # Output position of each kept row; a taken odd row lands where its even partner does.
  pos = jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1
  pos_even = pos[:, 0::2]
  pos_odd = jnp.where(odd_taken, jnp.take_along_axis(pos_even, jnp.maximum(owner, 0), axis=1), pos[:, 1::2])
  dest = interleave(pos_even, pos_odd)

  src = _first_of_each_output(keep, target)
  new_feats = jnp.take_along_axis(row_feats, src[..., None], axis=1)
  new_sizes = jnp.take_along_axis(row_size, src, axis=1)
  new_labels = jnp.take_along_axis(dest, labels, axis=1)
  return new_feats[..., :d].astype(x.dtype), new_feats[..., d:].astype(raw.dtype), new_sizes, new_labels


def _pad_rows(v: jax.Array, n: int) -> jax.Array:
  """Zero-pads axis 1 to length n. (B, M, ...) -> (B, n, ...)."""
  pad = [(0, 0)] * v.ndim
  pad[1] = (0, n - v.shape[1])
  return jnp.pad(v, pad)


def greedy_merge_levels(x: jax.Array, raw: jax.Array, sizes: jax.Array, labels: jax.Array,
                        num_clips: jax.Array,
                        levels: tuple[int, ...] = CBVA_LEVELS) -> GreedyMergeResult:
  """Loss-side token merge of CBVA down to a per-video clip count chosen at run time.

  Per level on N tokens: similarities of the F.normalize'd raw tokens, even rows against odd
  rows; greedily the most similar unused (even, odd) pair is merged into a size-weighted mean at
  the even row's position until N - target pairs are taken; frames of both rows take the merged
  row's new index. Levels run in order and stop after the level whose target equals the video's
  `num_clips` (as the reference's loop with `break`): a count of N or more runs none, a count that
  is not a level target runs them all. Every level is computed for every video (static shapes);
  the result is selected per video by mask.

  Args:
    x: (B, N, D) encoded clip features; gradients flow to `segments`.
    raw: (B, N, Dv) un-normalised (or normalised, as in the reference batch) OP-ToMe tokens used
      for the similarity and merged alongside.
    sizes: (B, N) or (B, N, 1) merge sizes of the tokens.
    labels: (B, F) int frame -> token labels in [0, N).
    num_clips: (B,) int, traced, normally one of {N} + levels.
    levels: static decreasing targets, N_prev / 2 <= target < N_prev.

  Returns:
    `GreedyMergeResult` with segments (B, N, D), raw (B, N, Dv), sizes (B, N), labels (B, F),
    valid (B, N) and labels_per_level (B, len(levels), F).
  """
  if x.ndim != 3 or raw.ndim != 3 or x.shape[:2] != raw.shape[:2]:
    raise ValueError(f"greedy_merge_levels: x {x.shape} and raw {raw.shape} must be (B, N, D) with one B, N")
  bsz, n, _ = x.shape
  if sizes.ndim == 3:
    sizes = sizes[..., 0]
  if sizes.shape != (bsz, n):
    raise ValueError(f"greedy_merge_levels: sizes {sizes.shape} must be ({bsz}, {n})")
  if labels.ndim != 2 or labels.shape[0] != bsz:
    raise ValueError(f"greedy_merge_levels: labels {labels.shape} must be ({bsz}, F)")
  levels = tuple(int(t) for t in levels)
  _check_schedule(n, levels, "greedy_merge_levels")
  num_clips = jnp.asarray(num_clips, jnp.int32).reshape(bsz)
  sizes = sizes.astype(jnp.float32)
  labels = labels.astype(jnp.int32)

  # Outputs of "no level": the inputs themselves.
  out_x, out_raw, out_sizes, out_labels = x, raw, sizes, labels
  out_count = jnp.full((bsz,), n, jnp.int32)
  cur = (x, raw, sizes, labels)
  stopped = num_clips >= n  # a video stops before any level when no merge is wanted
  per_level = []
  for target in levels:  # trace-time loop: the shapes change per level
    cur = _greedy_round(*cur, target)
    ran = ~stopped
    sel = ran[:, None]
    out_x = jnp.where(sel[..., None], _pad_rows(cur[0], n), out_x)
    out_raw = jnp.where(sel[..., None], _pad_rows(cur[1], n), out_raw)
    out_sizes = jnp.where(sel, _pad_rows(cur[2], n), out_sizes)
    out_labels = jnp.where(sel, cur[3], out_labels)
    out_count = jnp.where(ran, target, out_count)
    per_level.append(jnp.where(sel, cur[3], -1))
    stopped = stopped | (num_clips == target)
  valid = jnp.arange(n)[None, :] < out_count[:, None]
  return GreedyMergeResult(out_x, out_raw, out_sizes, out_labels, valid, jnp.stack(per_level, axis=1))
