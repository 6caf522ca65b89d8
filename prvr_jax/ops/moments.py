"""The moment of a (query, video) pair, shared by search and evaluation, and its time spans.

Moment (what `search query` returns and what evaluation scores): of the two branches, take the one
whose weighted score (clip_weight * clip or frame_weight * frame) contributed more to the fused
score ('frame' on an exact tie); the moment is the time span of that branch's best-matching
token (the first one on a tie). `choose_moment` is that rule as one jittable function
(`moment_from_maxima` the same from reduced similarities).

Time spans (numpy, host side). A video of T feature frames and `duration` seconds is resampled
to R = 128 rows (`prvr_jax.data.preprocess.resample_to_fixed_length`): row r is the mean of frames
[idx_r, idx_{r+1}), idx_r = round(r T / R) clipped to T - 1, or frame idx_r alone when that range
is empty (T < R repeats frames). So row r is read as covering exactly the frames it was computed
from, [idx_r, max(idx_{r+1}, idx_r + 1)), and frame f as covering seconds
[f duration / T, (f + 1) duration / T) (extraction samples frame f at f / fps and
T = ceil(duration * fps)). A clip token merged by OP-ToMe from rows [s, e) covers the union of
their frames, [idx_s, max(idx_e, idx_{e-1} + 1)), and a frame token (one row) r covers row r's
frames. (The reference's resampler never averages the last frame into the last row for T > R, so
the last token ends one frame before the video's end.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prvr_jax.data.preprocess import resample_boundaries

# Branch codes of `Moment.branch`, in this order.
BRANCHES: tuple[str, ...] = ("clip", "frame")


class Moment(NamedTuple):
  """A video's scores for a query and the moment it returns (arrays of one leading shape S).

  Attributes:
    clip, frame: (S,) best clip-token / frame-token similarity.
    score: (S,) clip_weight * clip + frame_weight * frame.
    start, end: (S,) the moment, in the unit of the spans given (seconds for search and eval).
    branch: (S,) int32, 0 = clip, 1 = frame (index into BRANCHES).
  """

  clip: jax.Array
  frame: jax.Array
  score: jax.Array
  start: jax.Array
  end: jax.Array
  branch: jax.Array


def _token_span(arg: jax.Array, spans: jax.Array) -> jax.Array:
  """The span of token `arg`. (S...) int, (S..., L, 2) broadcastable -> (S..., 2)."""
  spans = jnp.reshape(spans, (1,) * (arg.ndim + 2 - spans.ndim) + spans.shape)
  return jnp.take_along_axis(spans, arg[..., None, None], axis=-2)[..., 0, :]


def choose_moment(clip_sim: jax.Array, frame_sim: jax.Array, clip_spans: jax.Array,
                  frame_spans: jax.Array, clip_weight: float, frame_weight: float) -> Moment:
  """The fused score of a video for a query and the moment it returns (see the module docstring).

  Args:
    clip_sim: (S..., K) query-token similarities of the video's clip tokens.
    frame_sim: (S..., F) the same for its frame tokens.
    clip_spans: (S..., K, 2) [start, end) of each clip token; leading axes broadcast against
      clip_sim's (e.g. (C, K, 2) spans of C videos for (Q, C, K) similarities of Q queries).
    frame_spans: (S..., F, 2) likewise.
    clip_weight, frame_weight: the fusion weights (config.eval).

  Returns:
    A Moment with (S...) arrays, start/end as float32.
  """
  return moment_from_maxima(jnp.max(clip_sim, axis=-1), jnp.argmax(clip_sim, axis=-1),
                            jnp.max(frame_sim, axis=-1), jnp.argmax(frame_sim, axis=-1),
                            clip_spans, frame_spans, clip_weight, frame_weight)


def moment_from_maxima(clip: jax.Array, clip_arg: jax.Array, frame: jax.Array,
                       frame_arg: jax.Array, clip_spans: jax.Array, frame_spans: jax.Array,
                       clip_weight: float, frame_weight: float) -> Moment:
  """`choose_moment` from each branch's best similarity and its (first) best token.

  For callers that reduce the similarities themselves (the search kernel does it a few videos at
  a time, dequantising int8 tokens on the way).

  Args:
    clip, frame: (S...) best clip-token / frame-token similarity.
    clip_arg, frame_arg: (S...) int, the token that has it (the first one on a tie).
    clip_spans, frame_spans: (S..., K or F, 2), broadcastable as in `choose_moment`.
    clip_weight, frame_weight: the fusion weights.

  Returns:
    A Moment with (S...) arrays, start/end as float32.
  """
  use_clip = clip_weight * clip > frame_weight * frame
  span = jnp.where(use_clip[..., None], _token_span(clip_arg, clip_spans),
                   _token_span(frame_arg, frame_spans)).astype(jnp.float32)
  return Moment(clip=clip, frame=frame, score=clip_weight * clip + frame_weight * frame,
                start=span[..., 0], end=span[..., 1],
                branch=jnp.where(use_clip, 0, 1).astype(jnp.int32))


def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of time spans. (..., 2), (..., 2) [start, end] -> (...,) float64.

  A pair whose union is empty (two empty spans at one point) has IoU 0.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  inter = np.maximum(0.0, np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]))
  union = np.maximum(a[..., 1], b[..., 1]) - np.minimum(a[..., 0], b[..., 0])
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# Token spans in the resampled rows -> seconds.


def row_frame_ranges(num_frames: np.ndarray, num_rows: int) -> np.ndarray:
  """The frames behind each resampled row.

  Args:
    num_frames: (N,) T of each video (>= 1).
    num_rows: R, rows after resampling (128).

  Returns:
    (N, R, 2) int64 [first, end) frame of each row.
  """
  idx = resample_boundaries(np.asarray(num_frames, np.int64).reshape(-1), num_rows)  # (N, R + 1)
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
