"""Video decoding with PyAV and fixed-rate frame sampling.

Frames are sampled at timestamps k / fps (k = 0, 1, ...) while k / fps < duration, each taking the
decoded frame whose presentation time is nearest (ties to the earlier frame). Times are relative to
the first decoded frame. duration = end of the last decoded frame (its time plus its duration,
or 1 / frame rate when the container gives none), so T = ceil(duration * fps).

Every decoding problem becomes a `VideoError` with the file and a reason, including a file that
decodes to clearly less than the duration it declares (a truncated download would otherwise give
features for only part of the video).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Callable, Iterator

import av
import numpy as np

from prvr_jax.errors import PrvrError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".3gp", ".ts")


class VideoError(PrvrError, ValueError):
  """A video that cannot be used; `reason` says why in words."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


@dataclasses.dataclass
class SampleInfo:
  """Filled in by `sample_frames` once the video is fully decoded.

  Attributes:
    duration: seconds from the first decoded frame to the end of the last.
    num_decoded: frames decoded.
    num_sampled: frames yielded (T).
  """

  duration: float = 0.0
  num_decoded: int = 0
  num_sampled: int = 0


# A video decoding to less than its declared duration by more than both of these is truncated.
# (The container's duration may include a slightly longer audio track, hence the slack.)
_SHORT_SECONDS = 1.0
_SHORT_FRACTION = 0.05


def _declared_duration(container, stream) -> float | None:
  # The video stream's own duration where the format stores one, else the container's.
  if stream.duration and stream.time_base:
    return float(stream.duration * stream.time_base)
  if container.duration:
    return container.duration / 1_000_000  # AV_TIME_BASE units
  return None


def _frame_span(frame, stream) -> float:
  # Duration of one frame in seconds: the frame's own, else the stream's nominal rate.
  if frame.duration and frame.time_base:
    return float(frame.duration * frame.time_base)
  rate = stream.average_rate or stream.guessed_rate
  return 1.0 / float(rate) if rate else 0.0


def sample_frames(path: str | os.PathLike, fps: float, info: SampleInfo,
                  transform: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> Iterator[np.ndarray]:
  """Decodes a video and yields the frames nearest to k / fps, in order.

  Only sampled frames are converted to RGB (then passed through `transform`), so long videos
  stream in constant memory.

  Args:
    path: video file.
    fps: sampling rate, frames per second (> 0).
    info: receives duration and counts when the generator finishes.
    transform: applied to each sampled (H, W, 3) uint8 RGB frame (e.g. resize and crop).

  Yields:
    transform(frame) for k = 0 .. T-1.

  Raises:
    VideoError: missing, unreadable or corrupt file, no video stream, no decodable frame, frames
      without timestamps, or fewer decoded seconds than the file declares (truncated); raised
      after the frames decoded so far were yielded, so callers drop them.
  """

  if fps <= 0:
    raise ValueError(f"fps must be > 0, got {fps}")
  path = pathlib.Path(path)
  if not path.is_file():
    raise VideoError(path, "file not found")
  if path.stat().st_size == 0:
    raise VideoError(path, "empty file (0 bytes)")
  try:
    container = av.open(str(path))
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise VideoError(path, f"cannot open as a video (corrupt or not a video?): {e}") from None
  with container:
    if not container.streams.video:
      raise VideoError(path, "has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    k = 0  # next sample index
    t0 = None
    prev = None  # (relative time, frame) of the last decoded frame
    end = 0.0
    try:
      for frame in container.decode(stream):
        if frame.time is None:
          raise VideoError(path, f"frame {info.num_decoded} has no timestamp")
        if t0 is None:
          t0 = frame.time
        t = frame.time - t0
        info.num_decoded += 1
        end = max(end, t + _frame_span(frame, stream))
        # Emit every sample time that lies before this frame, choosing the nearer neighbour.
        while k / fps <= t:
          target = k / fps
          use_prev = prev is not None and target - prev[0] <= t - target
          chosen = prev[1] if use_prev else frame
          yield transform(chosen.to_ndarray(format="rgb24"))
          k += 1
        prev = (t, frame)
    except av.error.FFmpegError as e:
      raise VideoError(path, f"decoding failed after {info.num_decoded} frames: {e}") from None
    if prev is None:
      raise VideoError(path, "no decodable video frames")
    declared = _declared_duration(container, stream)
    if declared is not None and declared - end > max(_SHORT_SECONDS, _SHORT_FRACTION * declared):
      raise VideoError(path, f"decoded only {end:.2f} s of the {declared:.2f} s the file declares "
                             "(truncated or damaged?)")
    # Sample times after the last frame's start but before the video's end.
    total = math.ceil(end * fps - 1e-9)
    while k < total:
      yield transform(prev[1].to_ndarray(format="rgb24"))
      k += 1
    info.duration = end
    info.num_sampled = k


def list_videos(source: str | os.PathLike) -> list[pathlib.Path]:
  """The videos to extract: the video files in a directory (sorted), or the lines of a list file.

  A list file holds one path per line (relative paths are relative to the list file's
  directory); blank lines and lines starting with '#' are ignored. Listed files that do not exist
  are kept: extraction reports them as failed.

  Args:
    source: a directory or a text file.

  Returns:
    Paths, in order.

  Raises:
    VideoError: source missing, or an empty directory/list.
  """
  source = pathlib.Path(source)
  if source.is_dir():
    paths = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not paths:
      raise VideoError(source, f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in this directory")
    return paths
  if not source.is_file():
    raise VideoError(source, "video directory or list file not found")
  paths = []
  for line in source.read_text(encoding="utf-8").splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
      p = pathlib.Path(line)
      paths.append(p if p.is_absolute() else source.parent / p)
  if not paths:
    raise VideoError(source, "list file names no videos")
  return paths
