"""Reads the HDF5 feature files of `python -m prvr_jax.extract` for indexing and querying.

Video files hold one (T, D) dataset per video id with attributes `duration` (seconds) and `fps`;
caption files one (L, D) dataset per caption id (rows BOS ... EOS). Every problem is a
SearchError naming the file and the item.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Optional, Sequence

import h5py
import numpy as np

from prvr_jax.search.errors import SearchError


def _open_h5(path: pathlib.Path, what: str):
  if not path.is_file():
    raise SearchError(f"{path}: {what} file not found")
  try:
    return h5py.File(path, "r")
  except OSError as e:
    raise SearchError(f"{path}: not a readable HDF5 file (truncated, or another format?): "
                      f"{e}") from None


def _read_rows(path: pathlib.Path, handle, item: str, kind: str) -> np.ndarray:
  """(rows, dim) float32 of one dataset, checked."""

  node = handle.get(item)
  if node is None:
    raise SearchError(f"{path}: {kind} {item!r} not found in the file")
  if not isinstance(node, h5py.Dataset):
    raise SearchError(f"{path}: {kind} {item!r} is an HDF5 group, not a (rows, dim) dataset")
  try:
    arr = np.asarray(node[...])
  except (OSError, TypeError, ValueError) as e:
    raise SearchError(f"{path}: {kind} {item!r}: cannot read (file damaged?): {e}") from None
  if arr.ndim != 2 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.number):
    raise SearchError(f"{path}: {kind} {item!r}: expected a non-empty numeric (rows, dim) array, got "
                      f"shape {arr.shape} dtype {arr.dtype}")
  arr = arr.astype(np.float32, copy=False)
  if not np.all(np.isfinite(arr)):
    raise SearchError(f"{path}: {kind} {item!r}: contains NaN or inf")
  return arr


class VideoFeatureFile:
  """A video feature file opened for indexing (use as a context manager).

  Attributes:
    path: the .h5 file.
    ids: video ids, sorted (the index order).
    dim: D_v, the feature width (all videos share it).
  """

  def __init__(self, path: str | os.PathLike, fps: Optional[float] = None):
    """Opens the file and checks every entry's shape from the metadata (no features read).

    Args:
      path: the .h5 file.
      fps: frame rate of videos that carry neither a `duration` nor an `fps` attribute
        (features not written by `prvr_jax.extract`); None = such videos are an error.

    Raises:
      SearchError: missing or unreadable file, no videos, a non-2-D entry or mixed widths.
    """

    self.path = pathlib.Path(path)
    self.fps = fps
    self._file = _open_h5(self.path, "video feature")
    self.ids = sorted(self._file.keys())
    if not self.ids:
      raise SearchError(f"{self.path}: no videos in the file")
    dims = {}
    for video_id in self.ids:
      node = self._file[video_id]
      if not isinstance(node, h5py.Dataset) or len(node.shape) != 2 or node.shape[0] == 0:
        raise SearchError(f"{self.path}: video {video_id!r}: expected a (frames, dim) dataset with "
                          f"at least one frame, got {getattr(node, 'shape', 'a group')}")
      dims.setdefault(int(node.shape[1]), video_id)
    if len(dims) > 1:
      (d0, v0), (d1, v1) = sorted(dims.items())[:2]
      raise SearchError(f"{self.path}: videos have different feature widths: {v0!r} is {d0}-d, "
                        f"{v1!r} is {d1}-d")
    self.dim = next(iter(dims))

  def check_dim(self, expected: int, model_name: str) -> None:
    """Raises a SearchError naming the file, a video and both widths when D_v != expected."""
    if self.dim != expected:
      raise SearchError(f"{self.path}: video {self.ids[0]!r} has {self.dim}-d features but the model "
                        f"{model_name} takes {expected}-d video features (model.visual_input_size); "
                        "extract the videos with the CLIP model the run was trained on")

  def num_frames(self, video_id: str) -> int:
    """T of one video, from the metadata."""
    return int(self._file[video_id].shape[0])

  def read(self, video_id: str) -> tuple[np.ndarray, float]:
    """One video's frames and duration.

    Args:
      video_id: an id of `ids`.

    Returns:
      (frames (T, D_v) float32, duration in seconds). The duration is the `duration` attribute,
      else T / the `fps` attribute, else T / the `fps` given to the constructor.

    Raises:
      SearchError: unreadable or non-finite features, or no way to know the duration.
    """
    frames = _read_rows(self.path, self._file, video_id, "video")
    attrs = self._file[video_id].attrs
    if "duration" in attrs:
      duration = float(np.asarray(attrs["duration"]))
    elif "fps" in attrs or self.fps:
      fps = float(np.asarray(attrs["fps"])) if "fps" in attrs else float(self.fps)
      duration = frames.shape[0] / fps if fps > 0 else math.nan
    else:
      raise SearchError(f"{self.path}: video {video_id!r} has no 'duration' or 'fps' attribute, so "
                        "its frames cannot be placed in time; pass --fps (frames per second of "
                        "the features)")
    if not math.isfinite(duration) or duration <= 0:
      raise SearchError(f"{self.path}: video {video_id!r}: duration {duration} s is not a positive "
                        "number")
    return frames, duration

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "VideoFeatureFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_caption_features(path: str | os.PathLike,
                          ids: Optional[Sequence[str]] = None) -> list[tuple[str, np.ndarray]]:
  """Token features of captions from a caption feature file (`prvr_jax.extract captions`).

  Args:
    path: the .h5 file.
    ids: caption ids to read, in this order; None = every caption, sorted by id.

  Returns:
    [(caption id, (L, D_t) float32 rows BOS ... EOS)].

  Raises:
    SearchError: missing or unreadable file, an unknown id, or a bad entry.
  """
  path = pathlib.Path(path)
  with _open_h5(path, "caption feature") as f:
    if ids is None:
      ids = sorted(f.keys())
      if not ids:
        raise SearchError(f"{path}: no captions in the file")
    return [(cid, _read_rows(path, f, cid, "caption")) for cid in ids]
