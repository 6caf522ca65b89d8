"""Token spans in the resampled rows -> time spans in seconds.

A video of T feature frames and `duration` seconds is resampled to R = 128 rows
(`prvr_jax.data.preprocess.resample_to_fixed_length`): row r is the mean of frames
[idx_r, idx_{r+1}), idx_r = round(r T / R) clipped to T - 1, or frame idx_r alone when that range
is empty (T < R repeats frames). So row r is read as covering exactly the frames it was computed
from, [idx_r, max(idx_{r+1}, idx_r + 1)), and frame f as covering seconds
[f duration / T, (f + 1) duration / T) (extraction samples frame f at f / fps and
T = ceil(duration * fps)).

A clip token merged by OP-ToMe from rows [s, e) covers the union of their frames,
[idx_s, max(idx_e, idx_{e-1} + 1)), and a frame token (one row) r covers row r's frames: a single
row is widened to the span of the frames behind it. (The reference's resampler never averages the
last frame into the last row for T > R, so the last token ends one frame before the video's end.)
"""

from __future__ import annotations

import numpy as np

from prvr_jax.data.preprocess import resample_boundaries


def row_frame_ranges(num_frames: np.ndarray, num_rows: int) -> np.ndarray:
  """The frames behind each resampled row.

  Args:
    num_frames: (N,) T of each video (>= 1).
    num_rows: R, rows after resampling (128).

  Returns:
    (N, R, 2) int64 [first, end) frame of each row.
  """
  idx = np.stack([resample_boundaries(int(t), num_rows) for t in num_frames])  # (N, R + 1)
  return np.stack([idx[:, :-1], np.maximum(idx[:, 1:], idx[:, :-1] + 1)], axis=-1)


def rows_to_seconds(row_spans: np.ndarray, num_frames: np.ndarray, durations: np.ndarray,
                    num_rows: int) -> np.ndarray:
  """Token spans in resampled rows -> spans in seconds of the frames behind them.

  Args:
    row_spans: (N, K, 2) int [start, end) rows of each token (end > start).
    num_frames: (N,) T of each video.
    durations: (N,) seconds.
    num_rows: R.

  Returns:
    (N, K, 2) float32 [start, end) seconds.
  """
  ranges = row_frame_ranges(num_frames, num_rows)  # (N, R, 2)
  row_spans = np.asarray(row_spans, np.int64)
  first = np.take_along_axis(ranges[..., 0], row_spans[..., 0], axis=1)
  end = np.take_along_axis(ranges[..., 1], row_spans[..., 1] - 1, axis=1)
  seconds_per_frame = np.asarray(durations, np.float64) / np.asarray(num_frames, np.float64)
  return (np.stack([first, end], axis=-1) * seconds_per_frame[:, None, None]).astype(np.float32)


def frame_row_spans(num_videos: int, num_rows: int) -> np.ndarray:
  """Each frame token's span in rows: token r covers [r, r + 1).

  Args:
    num_videos: N.
    num_rows: R.

  Returns:
    (N, R, 2) int32.
  """
  starts = np.arange(num_rows, dtype=np.int32)
  return np.broadcast_to(np.stack([starts, starts + 1], axis=-1), (num_videos, num_rows, 2)).copy()
