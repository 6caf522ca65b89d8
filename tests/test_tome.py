"""Token merging: OP-ToMe (data side) and the greedy CBVA merge (loss side)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prvr_jax.data import preprocess
from prvr_jax.ops import tome

OP_TOME = jax.jit(tome.op_tome, static_argnums=1)
GREEDY = jax.jit(tome.greedy_merge_levels, static_argnames="levels")
LEVELS = (20, 12, 8, 5)


# ---------------------------------------------------------------- simple Python references


def _loop_op_tome(x: np.ndarray, targets):
  """One video, plain loops: returns (tokens, sizes, labels) after every level."""
  tokens, sizes, labels = [r for r in x], [1.0] * len(x), list(range(len(x)))
  out = []
  for target in targets:
    n = len(tokens)
    scores = [float(np.dot(tokens[2 * p], tokens[2 * p + 1])) for p in range(n // 2)]
    order = sorted(range(n // 2), key=lambda p: -scores[p])  # Python's sort is stable
    merge = set(order[:n - target])
    new_t, new_s, new_index = [], [], {}
    for p in range(n // 2):
      a, b = 2 * p, 2 * p + 1
      if p in merge:
        new_index[a] = new_index[b] = len(new_t)
        new_t.append((tokens[a] * sizes[a] + tokens[b] * sizes[b]) / (sizes[a] + sizes[b]))
        new_s.append(sizes[a] + sizes[b])
      else:
        for i in (a, b):
          new_index[i] = len(new_t)
          new_t.append(tokens[i])
          new_s.append(sizes[i])
    tokens, sizes, labels = new_t, new_s, [new_index[l] for l in labels]
    out.append((np.stack(tokens), np.array(sizes), np.array(labels)))
  return out


def _loop_greedy(x, raw, sizes, labels, num_clips, levels=LEVELS):
  """One video, plain loops of the reference semantics; returns (x, sizes, labels, per-level labels)."""
  x, raw, sizes, labels = [list(v) for v in (x, raw, sizes, labels)]
  per_level = []
  if num_clips < len(x):
    for target in levels:
      n = len(x)
      m = [r / max(np.linalg.norm(r), 1e-12) for r in raw]
      cands = [(float(np.dot(m[2 * a], m[2 * b + 1])), a, b) for a in range(n // 2) for b in range(n // 2)]
      cands.sort(key=lambda c: c[0], reverse=True)  # stable: ties stay a-major, b-minor
      partner, used_b = {}, set()
      for _, a, b in cands:
        if len(partner) == n - target:
          break
        if a not in partner and b not in used_b:
          partner[a] = b
          used_b.add(b)
      nx, nraw, ns, new_index = [], [], [], {}
      for i in range(n):
        if i % 2 == 0 and i // 2 in partner:
          j = 2 * partner[i // 2] + 1
          w1, w2 = sizes[i], sizes[j]
          nx.append((x[i] * w1 + x[j] * w2) / (w1 + w2))
          nraw.append((raw[i] * w1 + raw[j] * w2) / (w1 + w2))
          ns.append(w1 + w2)
          new_index[i] = new_index[j] = len(nx) - 1
        elif i % 2 == 1 and (i - 1) // 2 in used_b:
          continue
        else:
          nx.append(x[i])
          nraw.append(raw[i])
          ns.append(sizes[i])
          new_index[i] = len(nx) - 1
      x, raw, sizes, labels = nx, nraw, ns, [new_index[l] for l in labels]
      per_level.append(np.array(labels))
      if target == num_clips:
        break
  return np.stack(x), np.array(sizes), np.array(labels), per_level


# ---------------------------------------------------------------- helpers


# Most tests share the golden file's shapes (B = 6, D = 64, Dv = 96) so that each jitted function
# compiles once per session: compilation, not running, dominates the test time.
BSZ, D, DV = 6, 64, 96
COUNTS = np.array([32, 20, 12, 8, 5, 12])


def _random_frames(seed: int, bsz: int = BSZ, n: int = 128, d: int = DV) -> np.ndarray:
  """Smooth-ish random frames (a random walk) so merges are not uniform."""
  rng = np.random.default_rng(seed)
  walk = np.cumsum(rng.normal(size=(bsz, n, d)), axis=1) * 0.3 + rng.normal(size=(bsz, 1, d))
  return walk.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _merge_inputs(seed: int, bsz: int = BSZ, d: int = D, dv: int = DV):
  """Realistic loss-side inputs: OP-ToMe of random frames plus random encoded features."""
  rng = np.random.default_rng(seed)
  res = OP_TOME(jnp.asarray(_random_frames(seed, bsz, 128, dv)), (80, 52, 32))
  raw = preprocess.l2_normalize(np.asarray(res.tokens))
  x = rng.normal(size=(bsz, 32, d)).astype(np.float32)
  return x, raw, np.asarray(res.sizes), np.asarray(res.labels)


# ---------------------------------------------------------------- golden parity


def test_golden_op_tome(golden):
  videos = preprocess.split_concatenated(golden["input/frames"], golden["input/frame_offsets"])
  fixed = preprocess.resample_batch(videos, 128)
  res = OP_TOME(jnp.asarray(fixed), (80, 52, 32))
  for level, target in enumerate((80, 52, 32)):
    np.testing.assert_array_equal(res.level_sizes[level], golden[f"data/opt_size_{target}"])
    np.testing.assert_array_equal(res.level_labels[level], golden[f"data/opt_label_{target}"])
  np.testing.assert_array_equal(res.sizes, golden["batch/merge_size"])
  np.testing.assert_array_equal(res.labels, golden["batch/merged_frame_label"])
  clip_feat = preprocess.l2_normalize(np.asarray(res.tokens))
  np.testing.assert_allclose(clip_feat, golden["batch/clip_video_features"], atol=1e-5, rtol=0)
  # Starting from the golden resampled rows too (isolates OP-ToMe from resampling).
  res2 = OP_TOME(jnp.asarray(golden["data/fixed128"]), (80, 52, 32))
  np.testing.assert_array_equal(res2.labels, golden["batch/merged_frame_label"])


def test_golden_greedy_merge(golden):
  res = GREEDY(golden["out/encoded_clip_feat"], golden["batch/clip_video_features"], golden["batch/merge_size"],
               golden["batch/merged_frame_label"], golden["cbva/clip_count"])
  count = golden["cbva/clip_count"]
  assert sorted(set(count.tolist())) == [5, 8, 12, 20, 32]  # every branch is exercised
  np.testing.assert_array_equal(res.labels_per_level, golden["cbva/labels_per_level"])
  np.testing.assert_array_equal(res.labels, golden["cbva/final_labels"])
  np.testing.assert_array_equal(res.sizes, golden["cbva/final_sizes"])
  np.testing.assert_allclose(res.segments, golden["cbva/final_segments"], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(res.valid, np.arange(32)[None] < count[:, None])


# ---------------------------------------------------------------- OP-ToMe properties


def _check_op_tome_invariants(frames: np.ndarray, res: tome.OpTomeResult, targets) -> None:
  bsz, n, _ = frames.shape
  t = targets[-1]
  sizes, labels, spans = np.asarray(res.sizes), np.asarray(res.labels), np.asarray(res.spans)
  assert res.tokens.shape == (bsz, t, frames.shape[2]) and spans.shape == (bsz, t, 2)
  assert labels.dtype == np.int32 and spans.dtype == np.int32
  np.testing.assert_array_equal(sizes.sum(1), n)
  for lvl_sizes, target in zip(res.level_sizes, targets):
    assert lvl_sizes.shape == (bsz, target)
    np.testing.assert_array_equal(np.asarray(lvl_sizes).sum(1), n)
  assert np.all(np.diff(labels, axis=1) >= 0) and np.all(labels[:, 0] == 0) and np.all(labels[:, -1] == t - 1)
  # Spans tile [0, n) in order, each non-empty, and agree with sizes and labels.
  assert np.all(spans[:, 0, 0] == 0) and np.all(spans[:, -1, 1] == n)
  np.testing.assert_array_equal(spans[:, 1:, 0], spans[:, :-1, 1])
  np.testing.assert_array_equal(spans[..., 1] - spans[..., 0], sizes)
  frame = np.arange(n)
  in_span = (frame[None, None, :] >= spans[..., :1]) & (frame[None, None, :] < spans[..., 1:])
  np.testing.assert_array_equal(in_span, labels[:, None, :] == np.arange(t)[None, :, None])
  # Each token is the plain mean of the frames it covers (size-weighted merging composes).
  mean = np.einsum("btn,bnd->btd", in_span, frames.astype(np.float64)) / sizes[..., None]
  np.testing.assert_allclose(res.tokens, mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_tome_properties_and_loop_reference(seed):
  targets = (80, 52, 32)
  frames = _random_frames(seed)
  res = OP_TOME(jnp.asarray(frames), targets)
  _check_op_tome_invariants(frames, res, targets)
  for b in range(frames.shape[0]):
    for level, (tok, size, lab) in enumerate(_loop_op_tome(frames[b], targets)):
      np.testing.assert_array_equal(res.level_sizes[level][b], size)
      np.testing.assert_array_equal(res.level_labels[level][b], lab)
    np.testing.assert_allclose(res.tokens[b], tok, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n, targets", [(16, (12, 8, 6)), (10, (5,))])
def test_op_tome_other_schedules(n, targets):
  frames = _random_frames(n, bsz=2, n=n, d=4)
  res = OP_TOME(jnp.asarray(frames), targets)
  _check_op_tome_invariants(frames, res, targets)
  for b in range(2):
    for level, (_, size, lab) in enumerate(_loop_op_tome(frames[b], targets)):
      np.testing.assert_array_equal(res.level_sizes[level][b], size)
      np.testing.assert_array_equal(res.level_labels[level][b], lab)


def test_op_tome_scores_in_several_lane_chunks():
  # D a multiple of the partial-sum lanes, as for the 768-d CLIP frames: each pair score is summed
  # over several chunks of D before the lanes are added.
  targets = (80, 52, 32)
  frames = _random_frames(3, bsz=2, d=2 * tome._DOT_LANES)
  res = OP_TOME(jnp.asarray(frames), targets)
  _check_op_tome_invariants(frames, res, targets)
  for b in range(2):
    for level, (_, size, lab) in enumerate(_loop_op_tome(frames[b], targets)):
      np.testing.assert_array_equal(res.level_sizes[level][b], size)
      np.testing.assert_array_equal(res.level_labels[level][b], lab)


def test_op_tome_tokens_gradient():
  # The merge decisions are constants for autodiff: d(sum of tokens) / d(frame) = 1 / size of the
  # frame's token.
  targets = (12, 8, 6)
  frames = jnp.asarray(_random_frames(4, bsz=2, n=16, d=2 * tome._DOT_LANES))
  grad = jax.jit(jax.grad(lambda v: tome.op_tome(v, targets).tokens.sum()))(frames)
  res = OP_TOME(frames, targets)
  expected = 1.0 / np.take_along_axis(np.asarray(res.sizes), np.asarray(res.labels), axis=1)
  np.testing.assert_allclose(grad, np.broadcast_to(expected[..., None], frames.shape), rtol=1e-6)


def test_op_tome_ties_take_earliest_pairs():
  # Constant input: every pair scores the same; the stable order merges the first N - T pairs.
  res = OP_TOME(jnp.ones((1, 8, 3)), (5,))
  np.testing.assert_array_equal(res.sizes[0], [2, 2, 2, 1, 1])
  np.testing.assert_array_equal(res.labels[0], [0, 0, 1, 1, 2, 2, 3, 4])


@pytest.mark.parametrize("n, targets", [(7, (4,)), (8, (3,)), (8, (8,)), (8, (6, 7))])
def test_op_tome_rejects_bad_schedule(n, targets):
  with pytest.raises(ValueError, match="op_tome"):
    tome.op_tome(jnp.zeros((1, n, 2)), targets)


# ---------------------------------------------------------------- greedy merge properties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_merge_matches_loop_reference(seed):
  x, raw, sizes, labels = _merge_inputs(seed)
  counts = np.roll(COUNTS, seed)
  res = GREEDY(x, raw, sizes, labels, counts)
  per_level = np.asarray(res.labels_per_level)
  for b, k in enumerate(counts):
    ref_x, ref_s, ref_l, ref_levels = _loop_greedy(x[b], raw[b], sizes[b], labels[b], k)
    assert len(ref_x) == k
    np.testing.assert_array_equal(res.sizes[b, :k], ref_s)
    np.testing.assert_array_equal(res.labels[b], ref_l)
    np.testing.assert_allclose(res.segments[b, :k], ref_x, atol=1e-6, rtol=1e-6)
    for level in range(len(LEVELS)):
      if level < len(ref_levels):
        np.testing.assert_array_equal(per_level[b, level], ref_levels[level])
      else:
        assert np.all(per_level[b, level] == -1)


def test_greedy_merge_ties_follow_row_major_order():
  # One-hot similarity tokens: similarities are exactly 0 or 1, so almost every choice is a tie.
  rng = np.random.default_rng(7)
  raw = np.eye(DV, dtype=np.float32)[rng.integers(0, 3, size=(BSZ, 32))]
  x = rng.normal(size=(BSZ, 32, D)).astype(np.float32)
  sizes = np.full((BSZ, 32), 4.0, np.float32)
  labels = np.repeat(np.arange(32), 4)[None].repeat(BSZ, 0)
  counts = COUNTS
  res = GREEDY(x, raw, sizes, labels, counts)
  for b, k in enumerate(counts):
    ref_x, ref_s, ref_l, _ = _loop_greedy(x[b], raw[b], sizes[b], labels[b], k)
    np.testing.assert_array_equal(res.labels[b], ref_l)
    np.testing.assert_array_equal(res.sizes[b, :k], ref_s)
    np.testing.assert_allclose(res.segments[b, :k], ref_x, atol=1e-6)


@pytest.mark.parametrize("seed", [3, 4])
def test_greedy_merge_invariants(seed):
  x, raw, sizes, labels = _merge_inputs(seed)
  counts = COUNTS
  res = GREEDY(x, raw, sizes, labels, counts)
  seg, raw_out, out_sizes = np.asarray(res.segments), np.asarray(res.raw), np.asarray(res.sizes)
  out_labels, valid = np.asarray(res.labels), np.asarray(res.valid)
  assert out_labels.dtype == np.int32 and res.labels_per_level.shape == (BSZ, 4, 128)
  np.testing.assert_array_equal(valid, np.arange(32)[None] < counts[:, None])
  np.testing.assert_array_equal(out_sizes.sum(1), 128)
  assert np.all(seg[~valid] == 0) and np.all(raw_out[~valid] == 0) and np.all(out_sizes[~valid] == 0)
  assert np.all(out_labels >= 0) and np.all(out_labels < counts[:, None])
  onehot = out_labels[:, :, None] == np.arange(32)[None, None, :]  # (B, F, K)
  counts_per_seg = onehot.sum(1)
  np.testing.assert_array_equal(counts_per_seg, out_sizes)  # every valid segment has its frames
  assert np.all(counts_per_seg[valid] >= 1)
  # A segment is the frame-weighted mean of the input tokens of its frames (per frame: its token).
  per_frame_x = np.take_along_axis(x, labels[..., None], axis=1).astype(np.float64)
  per_frame_raw = np.take_along_axis(raw, labels[..., None], axis=1).astype(np.float64)
  denom = np.maximum(counts_per_seg, 1)[..., None]
  np.testing.assert_allclose(seg, np.einsum("bfk,bfd->bkd", onehot, per_frame_x) / denom, atol=1e-5)
  np.testing.assert_allclose(raw_out, np.einsum("bfk,bfd->bkd", onehot, per_frame_raw) / denom, atol=1e-5)
  # The same holds level by level (labels_per_level against the level's own counts).
  for level, target in enumerate(LEVELS):
    lvl = np.asarray(res.labels_per_level[:, level])
    ran = counts <= target
    assert np.all((lvl >= 0).all(1) == ran) and np.all(lvl[~ran] == -1)
    assert np.all(lvl[ran] < target)
    for b in np.flatnonzero(ran):
      assert len(np.unique(lvl[b])) == target  # no empty segment at any level


def test_greedy_merge_gradient():
  x, raw, sizes, labels = _merge_inputs(5)
  counts = jnp.asarray(COUNTS)
  w = np.random.default_rng(0).normal(size=(BSZ, 32)).astype(np.float32)
  w[:, ::3] = 0.0  # segments with zero weight: their tokens must get exactly zero gradient

  def objective(xx):
    res = tome.greedy_merge_levels(xx, raw, sizes, labels, counts)
    return jnp.sum(res.segments * w[..., None])

  grad = np.asarray(jax.jit(jax.grad(objective))(jnp.asarray(x)))
  res = GREEDY(x, raw, sizes, labels, counts)
  assert np.all(np.isfinite(grad))
  # d seg_k / d x_i = s_i / S_k for the segment k that token i ended in (read off its frames).
  final_of_token = np.zeros((BSZ, 32), np.int64)
  for b in range(BSZ):
    final_of_token[b, labels[b]] = np.asarray(res.labels)[b]
  seg_size = np.take_along_axis(np.asarray(res.sizes), final_of_token, axis=1)
  expect = np.take_along_axis(w, final_of_token, axis=1) * sizes / seg_size
  np.testing.assert_allclose(grad, np.broadcast_to(expect[..., None], grad.shape), atol=1e-6)
  assert np.any(grad == 0) and np.any(grad != 0)


def test_greedy_merge_count_outside_schedule():
  # The reference loop only breaks on an exact match: 10 runs all levels (5 clips), 40 runs none.
  x, raw, sizes, labels = _merge_inputs(0)
  odd = GREEDY(x, raw, sizes, labels, np.array([10, 40, 1, 33, 7, 21]))
  np.testing.assert_array_equal(np.asarray(odd.valid).sum(1), [5, 32, 5, 32, 5, 5])
  np.testing.assert_array_equal(odd.labels[1], labels[1])
  np.testing.assert_array_equal(odd.segments[1], x[1])
  five = GREEDY(x, raw, sizes, labels, np.full(BSZ, 5))
  for field in ("labels", "sizes", "segments", "labels_per_level"):
    for b in (0, 2, 4, 5):
      np.testing.assert_array_equal(getattr(odd, field)[b], getattr(five, field)[b], err_msg=field)


def test_greedy_merge_other_levels():
  rng = np.random.default_rng(11)
  bsz, n = 3, 12
  x = rng.normal(size=(bsz, n, 3)).astype(np.float32)
  raw = rng.normal(size=(bsz, n, 5)).astype(np.float32)
  sizes = np.ones((bsz, n), np.float32)
  labels = np.tile(np.arange(n), (bsz, 1))
  counts = np.array([8, 6, 12])
  res = GREEDY(x, raw, sizes, labels, counts, levels=(8, 6))
  assert res.labels_per_level.shape == (bsz, 2, n)
  for b, k in enumerate(counts):
    ref_x, ref_s, ref_l, _ = _loop_greedy(x[b], raw[b], sizes[b], labels[b], k, levels=(8, 6))
    np.testing.assert_array_equal(res.labels[b], ref_l)
    np.testing.assert_array_equal(res.sizes[b, :k], ref_s)
    np.testing.assert_allclose(res.segments[b, :k], ref_x, atol=1e-6)
