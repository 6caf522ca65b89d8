"""Host-side preparation of raw features: fixed-length resampling and L2 normalisation.

Everything here is vectorised numpy (no Python loop over rows); it runs in the data loader, before
the batch reaches the device. The semantics follow the reference loader (`average_to_fixed_length`
and `l2_normalize_np_array` of the authors' `Datasets/data_provider.py`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The loader's normalisation epsilon: x / (||x|| + eps) (added, not clamped as in F.normalize).
DATA_NORM_EPS = 1e-5
DEFAULT_LENGTH = 128


def resample_boundaries(num_frames: int | np.ndarray, length: int = DEFAULT_LENGTH) -> np.ndarray:
  """Bin boundaries of `resample_to_fixed_length`.

  Computed in float32 exactly as the reference does (`arange / length * T` in float32, then
  round-half-to-even), because a float64 computation can round a boundary that lies on .5
  differently and shift a whole frame between bins.

  Args:
    num_frames: T, the number of input rows (>= 1), or an (N,) array of them (every video at once).
    length: number of output bins.

  Returns:
    (length + 1,) int64 boundaries, each clipped to T - 1; (N, length + 1) for an array of T.
  """
  t = np.asarray(num_frames, np.int64)
  if t.size and t.min() < 1:
    raise ValueError(f"resample_boundaries: need at least one frame, got T={int(t.min())}")
  if length < 1:
    raise ValueError(f"resample_boundaries: length must be >= 1, got {length}")
  idx = np.arange(length + 1, dtype=np.float32) / np.float32(length) * t.astype(np.float32)[..., None]
  return np.minimum(np.round(idx).astype(np.int64), t[..., None] - 1)


def resample_to_fixed_length(frames: np.ndarray, length: int = DEFAULT_LENGTH) -> np.ndarray:
  """Segment-averages a variable-length sequence of frame features to exactly `length` rows.

  Bin j is the mean of rows [idx_j, idx_{j+1}) when that range is non-empty, else row idx_j (so
  short videos repeat rows and the last row is never averaged into the last bin unless a bin starts
  on it: the reference clips every boundary at T - 1).

  Args:
    frames: (T, D) raw frame features, T >= 1, all finite.
    length: number of output rows.

  Returns:
    (length, D) float32.

  Raises:
    ValueError: for non-2-D input, T == 0 or non-finite values.
  """
  frames = np.asarray(frames)
  if frames.ndim != 2:
    raise ValueError(f"resample_to_fixed_length: expected (T, D) frames, got shape {frames.shape}")
  num_frames = frames.shape[0]
  if num_frames == 0:
    raise ValueError("resample_to_fixed_length: video has no frames (T == 0)")
  if not np.all(np.isfinite(frames)):
    raise ValueError("resample_to_fixed_length: frames contain NaN or Inf values")
  idx = resample_boundaries(num_frames, length)
  start, end = idx[:-1], idx[1:]
  # Prefix sums in float64 give every bin sum in O(T + length); float64 keeps the difference of two
  # large prefix sums accurate to far below the float32 result precision.
  prefix = np.concatenate([np.zeros((1, frames.shape[1])), np.cumsum(frames, axis=0, dtype=np.float64)])
  count = end - start
  mean = (prefix[end] - prefix[start]) / np.maximum(count, 1)[:, None]
  out = np.where((count > 0)[:, None], mean, frames[start].astype(np.float64))
  return out.astype(np.float32)


def resample_batch(videos: Sequence[np.ndarray], length: int = DEFAULT_LENGTH) -> np.ndarray:
  """`resample_to_fixed_length` of every video, stacked.

  Args:
    videos: B arrays (T_i, D) with the same D.
    length: number of output rows per video.

  Returns:
    (B, length, D) float32.
  """
  if len(videos) == 0:
    raise ValueError("resample_batch: no videos given")
  dims = {np.shape(v)[-1] if np.ndim(v) == 2 else None for v in videos}
  if len(dims) != 1 or None in dims:
    raise ValueError(f"resample_batch: videos must be (T_i, D) with one common D, got shapes "
                     f"{[np.shape(v) for v in videos]}")
  return np.stack([resample_to_fixed_length(v, length) for v in videos])


def l2_normalize(x: np.ndarray, eps: float = DATA_NORM_EPS) -> np.ndarray:
  """x / (||x|| + eps) over the last axis (the loader's normalisation, not F.normalize's).

  Args:
    x: (..., D) features.
    eps: added to the norm; keeps all-zero rows at zero.

  Returns:
    (..., D), same dtype as x for floating input (float32 otherwise).
  """
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / (norm + x.dtype.type(eps))).astype(x.dtype)


def split_concatenated(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
  """Cuts rows concatenated along axis 0 into pieces: piece i = values[offsets[i]:offsets[i+1]].

  Args:
    values: (sum_i n_i, ...) concatenated rows.
    offsets: (B + 1,) non-decreasing integer offsets from 0 to len(values).

  Returns:
    B arrays (n_i, ...) (views into `values`).

  Raises:
    ValueError: when the offsets are not a valid partition of the rows.
  """
  offsets = np.asarray(offsets)
  if (offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer)
      or offsets[0] != 0 or offsets[-1] != len(values) or np.any(np.diff(offsets) < 0)):
    raise ValueError(f"split_concatenated: offsets must be integers rising from 0 to {len(values)}, "
                     f"got {offsets.tolist() if offsets.size < 20 else offsets.shape}")
  return np.split(values, offsets[1:-1])


def pad_sequences(seqs: Sequence[np.ndarray], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Zero-pads (and truncates to `max_len`) variable-length sequences into one batch.

  Args:
    seqs: B arrays (L_i, D) with one common D.
    max_len: truncate each sequence to this many rows first (None: no truncation).

  Returns:
    (feat (B, L_max, D) float32, mask (B, L_max) float32 with 1 for real rows), L_max the longest
    (truncated) sequence.
  """
  if len(seqs) == 0:
    raise ValueError("pad_sequences: no sequences given")
  seqs = [np.asarray(s)[:max_len] if max_len is not None else np.asarray(s) for s in seqs]
  lengths = np.array([len(s) for s in seqs])
  feat = np.zeros((len(seqs), int(lengths.max()), seqs[0].shape[-1]), np.float32)
  mask = np.arange(feat.shape[1])[None, :] < lengths[:, None]
  feat[mask] = np.concatenate(seqs, axis=0)
  return feat, mask.astype(np.float32)


def normalize_captions(caps: np.ndarray, offsets: np.ndarray,
                       max_len: int = 77) -> tuple[np.ndarray, np.ndarray]:
  """Loader treatment of captions: per-token L2 normalisation, truncation, zero padding.

  Args:
    caps: (sum_q L_q, D_t) caption token features, captions concatenated.
    offsets: (Q + 1,) caption boundaries in `caps`.
    max_len: longest caption kept (the reference truncates to 77 tokens after normalising).

  Returns:
    (text_feat (Q, L_max, D_t) float32, text_mask (Q, L_max) float32).
  """
  return pad_sequences(split_concatenated(l2_normalize(caps), offsets), max_len)
