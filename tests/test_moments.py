"""The moment rule shared by search and evaluation, time spans, IoU and the moment metrics."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from prvr_jax.data.preprocess import resample_boundaries
from prvr_jax.eval.moment_metrics import moment_ious, moment_report
from prvr_jax.ops import moments
from prvr_jax.search import query as search_query


def _reference_moment(clip_sim, frame_sim, clip_spans, frame_spans, cw, fw):
  """The rule written out for one (query, video): numpy, first maximum, 'frame' on a tie."""
  c, f = int(np.argmax(clip_sim)), int(np.argmax(frame_sim))
  use_clip = cw * clip_sim[c] > fw * frame_sim[f]
  span = clip_spans[c] if use_clip else frame_spans[f]
  return float(span[0]), float(span[1]), 0 if use_clip else 1


def test_choose_moment_equals_the_rule_per_pair_with_broadcast_spans():
  rng = np.random.default_rng(0)
  q, c, k, f = 5, 4, 3, 6
  clip_sim = rng.normal(size=(q, c, k)).astype(np.float32)
  frame_sim = rng.normal(size=(q, c, f)).astype(np.float32)
  clip_sim[0, 0] = [0.5, 0.5, 0.1]  # tied best token: the first one
  frame_sim[1, 2, :] = 0.4 / 0.6 * clip_sim[1, 2].max()  # weighted tie between branches: 'frame'
  clip_spans = rng.uniform(0, 50, size=(c, k, 2)).astype(np.float32)
  frame_spans = rng.uniform(0, 50, size=(c, f, 2)).astype(np.float32)
  m = jax.jit(moments.choose_moment, static_argnums=(4, 5))(clip_sim, frame_sim, clip_spans,
                                                            frame_spans, 0.4, 0.6)
  assert m.start.shape == (q, c) and m.branch.dtype == np.int32
  for i in range(q):
    for j in range(c):
      want = _reference_moment(clip_sim[i, j], frame_sim[i, j], clip_spans[j], frame_spans[j], 0.4, 0.6)
      assert (float(m.start[i, j]), float(m.end[i, j]), int(m.branch[i, j])) == want
  np.testing.assert_allclose(m.score, 0.4 * clip_sim.max(-1) + 0.6 * frame_sim.max(-1), rtol=1e-6)
  assert int(m.branch[1, 2]) == 1
  assert float(m.start[0, 0]) in (clip_spans[0, 0, 0], frame_spans[0, np.argmax(frame_sim[0, 0]), 0])
  # Per-query spans (evaluation's ground-truth column) give the same moments.
  per_query = moments.choose_moment(clip_sim[:, 1], frame_sim[:, 1], np.broadcast_to(clip_spans[1], (q, k, 2)),
                                    np.broadcast_to(frame_spans[1], (q, f, 2)), 0.4, 0.6)
  np.testing.assert_array_equal(per_query.start, m.start[:, 1])
  np.testing.assert_array_equal(per_query.branch, m.branch[:, 1])
  assert search_query.moments.choose_moment is moments.choose_moment  # search uses this very function


@pytest.mark.parametrize("rows", [128, 7])
def test_row_frame_ranges_equal_the_resampler_boundaries(rows):
  counts = np.arange(1, 400)
  got = moments.row_frame_ranges(counts, rows)
  for t, ranges in zip(counts, got):
    idx = resample_boundaries(int(t), rows)
    np.testing.assert_array_equal(ranges[:, 0], idx[:-1])
    np.testing.assert_array_equal(ranges[:, 1], np.maximum(idx[1:], idx[:-1] + 1))
  with pytest.raises(ValueError, match="at least one frame"):
    moments.row_frame_ranges(np.array([3, 0]), rows)


def test_rows_to_seconds_of_clip_and_frame_tokens():
  # 256 frames over 128 s into 128 rows: row r = frames [2r, 2r + 2) = seconds [r, r + 1).
  clip_rows = np.array([[[0, 4], [4, 128]]])
  np.testing.assert_array_equal(moments.rows_to_seconds(clip_rows, [256], [128.0], 128),
                                [[[0, 4], [4, 127.5]]])  # the last row stops before the last frame
  frame = moments.rows_to_seconds(moments.frame_row_spans(1, 128), [64], [32.0], 128)
  np.testing.assert_array_equal(frame[0, :2], [[0.0, 0.5], [0.0, 0.5]])  # T < R repeats frames


def test_temporal_iou():
  a = np.array([[0, 10], [0, 10], [0, 10], [5, 5], [3, 3]], np.float64)
  b = np.array([[0, 10], [5, 15], [20, 30], [0, 10], [3, 3]], np.float64)
  np.testing.assert_allclose(moments.temporal_iou(a, b), [1.0, 5 / 15, 0.0, 0.0, 0.0])


def _results(**overrides):
  base = dict(fused=np.array([1, 3, 1, 20, 2]), moment=np.array([[0, 10], [5, 15], [20, 30], [0, 1], [2, 4]],
                                                                 np.float32),
              moment_branch=np.array([0, 1, 1, 1, 0], np.int32),
              gt_moment=np.array([[0, 10], [0, 10], [20, 25], [0, 2], [-1, -1]], np.float32),
              gt_duration=np.array([40, 20, 50, -1, 30], np.float32))
  base.update(overrides)
  return base


def test_moment_report_on_hand_made_results():
  report = moment_report(_results())
  # Query 3 has no duration and query 4 no annotation: 3 annotated queries, IoUs 1, 1/3, 1/2.
  assert report["queries"] == 3
  assert report["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.5) / 3)
  assert report["IoU>=0.3"] == pytest.approx(100.0)
  assert report["IoU>=0.5"] == pytest.approx(200 / 3) and report["IoU>=0.7"] == pytest.approx(100 / 3)
  # Top-1 pairs: queries 0 (IoU 1) and 2 (IoU 0.5) rank their video first.
  assert report["R@1,IoU>=0.5"] == pytest.approx(200 / 3) and report["R@1,IoU>=0.7"] == pytest.approx(100 / 3)
  assert report["R@10,IoU>=0.5"] == pytest.approx(200 / 3)
  assert report["clip_branch"] == pytest.approx(100 / 3)
  # Uniform: [0, 40] vs [0, 10] -> 0.25; [0, 20] vs [0, 10] -> 0.5; [0, 50] vs [20, 25] -> 0.1.
  assert report["uniform"]["mIoU"] == pytest.approx(100 * (0.25 + 0.5 + 0.1) / 3)
  assert report["uniform"]["R@1,IoU>=0.5"] == 0.0 and report["uniform"]["R@10,IoU>=0.5"] == pytest.approx(100 / 3)
  ious = moment_ious(_results())
  assert np.isnan(ious["model"][3:]).all() and np.isfinite(ious["uniform"][:3]).all()


def test_moment_report_is_absent_without_annotations():
  none = _results(gt_moment=np.full((5, 2), -1, np.float32))
  assert moment_report(none) is None
  assert moment_report(_results(gt_duration=np.full(5, -1, np.float32))) is None
