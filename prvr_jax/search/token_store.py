"""One segment of an index: the videos of one build or one `add`, as memory-mapped .npy arrays.

A segment directory holds one .npy file per array (n videos, K = 32 clip tokens, F = 128 frame
tokens, D = hidden size):
  video_ids (n,) unicode, durations (n,) float32 seconds, num_feature_frames (n,) int32,
  clip_tokens (n, K, D), frame_tokens (n, F, D): L2-normalised, float16 / float32, or int8 with
    clip_scales (n, K) and frame_scales (n, F) float32 (token = int8 row * scale),
  clip_rows (n, K, 2) int32 [start, end) resampled rows of each clip token,
  clip_spans (n, K, 2), frame_spans (n, F, 2) float32 [start, end) seconds (see prvr_jax/ops/moments.py).

Every array is opened with `np.load(mmap_mode='r')`: re-ranking reads only the rows of its
candidate videos and the exact scan reads one chunk at a time, so a store larger than memory
works. A segment is written in place through `open_memmap` (a resumed build rewrites the chunks it
had not finished); the manifest that lists it records every file's size, checked when it is opened.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional

import numpy as np

from prvr_jax.search.errors import SearchError

DTYPES = ("float16", "float32", "int8")
DEFAULT_DTYPE = "float16"
BRANCH_TOKENS = ("clip_tokens", "frame_tokens")
SCALES = {"clip_tokens": "clip_scales", "frame_tokens": "frame_scales"}


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 per token: x ~ q * scale.

  Args:
    x: (..., D) float.

  Returns:
    (q (..., D) int8, scale (...) float32 = max |x| / 127, 1 for all-zero rows).
  """
  x = np.asarray(x, np.float32)
  peak = np.abs(x).max(axis=-1)
  scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
  return q, scale


def dequantize(tokens: np.ndarray, scales: Optional[np.ndarray]) -> np.ndarray:
  """(..., D) float32 tokens from a stored array (int8 with its (...) scales, or float)."""
  out = np.asarray(tokens, np.float32)
  return out if scales is None else out * np.asarray(scales, np.float32)[..., None]


def segment_shapes(n: int, num_clips: int, num_frames: int, dim: int, dtype: str,
                   id_width: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{file stem: (shape, dtype)} of a segment of n videos."""
  token = np.dtype(dtype)
  shapes = dict(video_ids=((n,), np.dtype(f"<U{max(1, id_width)}")),
                durations=((n,), np.dtype(np.float32)),
                num_feature_frames=((n,), np.dtype(np.int32)),
                clip_tokens=((n, num_clips, dim), token), frame_tokens=((n, num_frames, dim), token),
                clip_rows=((n, num_clips, 2), np.dtype(np.int32)),
                clip_spans=((n, num_clips, 2), np.dtype(np.float32)),
                frame_spans=((n, num_frames, 2), np.dtype(np.float32)))
  if dtype == "int8":
    shapes["clip_scales"] = ((n, num_clips), np.dtype(np.float32))
    shapes["frame_scales"] = ((n, num_frames), np.dtype(np.float32))
  return shapes


class SegmentWriter:
  """Writes the arrays of one segment in place, chunk by chunk (use `open` to resume one)."""

  def __init__(self, directory: str | os.PathLike, shapes: Mapping[str, tuple], resume: bool):
    """Creates (or, with `resume`, reopens read-write) every array of a segment.

    Args:
      directory: the segment directory (created).
      shapes: `segment_shapes(...)`.
      resume: reopen the existing files (a resumed build); False creates them.
    """
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.dtype = str(shapes["clip_tokens"][1])
    self.arrays = {}
    for name, (shape, dtype) in shapes.items():
      path = self.directory / f"{name}.npy"
      if resume and path.is_file():
        arr = np.load(path, mmap_mode="r+")
        if arr.shape != shape or arr.dtype != dtype:
          raise SearchError(f"{path}: shape {arr.shape} {arr.dtype}, the build expects {shape} "
                            f"{dtype}; pass --overwrite")
      else:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
      self.arrays[name] = arr

  def write(self, start: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Rows [start, start + n) of every array; float tokens are cast or quantised to the dtype.

    Args:
      start: first video row.
      arrays: video_ids, durations, num_feature_frames, clip_tokens, frame_tokens (float32),
        clip_rows, clip_spans, frame_spans for n videos; or already stored forms (with scales).
    """
    n = len(arrays["video_ids"])
    rows = slice(start, start + n)
    for name, value in arrays.items():
      if name in SCALES and self.dtype == "int8" and SCALES[name] not in arrays:
        q, scale = quantize_int8(value)
        self.arrays[name][rows] = q
        self.arrays[SCALES[name]][rows] = scale
      elif name in self.arrays:
        self.arrays[name][rows] = value

  def flush(self) -> None:
    """Pushes written rows to the files (msync + fsync), so recorded progress is on disk."""
    for arr in self.arrays.values():
      arr.flush()
    for path in self.directory.glob("*.npy"):
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)

  def close(self) -> dict[str, int]:
    """Flushes, closes the maps and returns {file name: bytes} for the manifest."""
    self.flush()
    sizes = {}
    for name, arr in self.arrays.items():
      sizes[f"{name}.npy"] = int(os.path.getsize(self.directory / f"{name}.npy"))
      del arr
    self.arrays = {}
    return sizes


class Segment:
  """A finished segment opened read-only through memory maps.

  Attributes:
    directory: the segment directory.
    num_videos: n.
    arrays: {name: np.memmap}.
    scales: {token array name: its scales memmap} (int8 segments only).
  """

  def __init__(self, directory: pathlib.Path, num_videos: int, files: Mapping[str, int],
               shapes: Mapping[str, tuple]):
    """Opens every array and checks sizes against the manifest and shapes against the settings.

    Raises:
      SearchError: a missing, truncated, resized or corrupt file (naming it).
    """
    self.directory = directory
    self.num_videos = num_videos
    self.arrays = {}
    for name, (shape, dtype) in shapes.items():
      path = directory / f"{name}.npy"
      want = files.get(path.name)
      if not path.is_file():
        raise SearchError(f"{path}: token store file listed in the manifest is missing; rebuild "
                          "the index")
      size = path.stat().st_size
      if want is not None and size != want:
        raise SearchError(f"{path}: {size} bytes, the manifest recorded {want} (truncated or "
                          "replaced token file); rebuild the index")
      try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError, EOFError) as e:
        raise SearchError(f"{path}: unreadable token file (corrupt or truncated: {e}); rebuild "
                          "the index") from None
      if arr.shape != shape or arr.dtype != dtype:
        raise SearchError(f"{path}: array of shape {arr.shape} {arr.dtype}, the manifest implies "
                          f"{shape} {dtype}; rebuild the index")
      self.arrays[name] = arr
    self.scales = {k: self.arrays[v] for k, v in SCALES.items() if v in self.arrays}

  def rows(self, positions: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows of the given (sorted) local positions of some arrays (only those rows are read)."""
    return {name: self.arrays[name][positions] for name in names}
