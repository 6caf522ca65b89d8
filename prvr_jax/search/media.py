"""The video files a service may serve, and thumbnails taken from them at a moment.

Only files directly under the --videos directory whose stem is an indexed video id are ever
served, looked up by id in a table built at start: no request path is joined to a directory, so
`..`, absolute paths and ids of files that are not in the index reach nothing. A file that is a
link is followed only when its target is still under the directory (checked again on every
request, since a link can change while the service runs).

Thumbnails: the frame shown at time t (the last decoded frame whose time is <= t, times relative
to the first frame as extraction counts them), scaled to `width` pixels wide, as JPEG; the last
`cache_size` are kept in memory.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pathlib
import sys
from typing import Iterable

import av
import av.error

from prvr_jax.clip.video import VIDEO_EXTENSIONS
from prvr_jax.search.errors import SearchError

THUMBNAIL_WIDTH = 320
THUMBNAIL_CACHE = 512


class NotServed(SearchError):
  """A video id that has no file this service may serve (the message says why)."""


class VideoLibrary:
  """The servable video files of the indexed ids.

  Attributes:
    root: the --videos directory, resolved.
    missing: indexed ids with no video file under root.
  """

  def __init__(self, root: str | os.PathLike, video_ids: Iterable[str],
               width: int = THUMBNAIL_WIDTH, cache_size: int = THUMBNAIL_CACHE):
    """Finds the file of each indexed video id.

    Args:
      root: the --videos directory (as given to `python -m prvr_jax.extract videos`).
      video_ids: the index's ids.
      width: thumbnail width in pixels.
      cache_size: thumbnails kept in memory.

    Raises:
      SearchError: root is not a directory.
    """
    given = pathlib.Path(root)
    if not given.is_dir():
      raise SearchError(f"{given}: --videos directory not found")
    self.root = given.resolve()
    wanted = set(video_ids)
    self._files: dict[str, pathlib.Path] = {}
    for path in sorted(self.root.iterdir()):
      if path.suffix.lower() not in VIDEO_EXTENSIONS or path.stem not in wanted:
        continue
      if path.stem in self._files:
        print(f"note: {path.name} and {self._files[path.stem].name} have the same video id; "
              f"serving {self._files[path.stem].name}", file=sys.stderr)
        continue
      self._files[path.stem] = path
    self.missing = sorted(wanted - set(self._files))
    self.width = int(width)
    self._thumbnail = functools.lru_cache(maxsize=cache_size)(self._render_thumbnail)

  def num_servable(self) -> int:
    """Indexed ids whose file would be served now."""
    return sum(self.has(v) for v in self._files)

  def has(self, video_id: str) -> bool:
    """Whether `video_id` has a file this library would serve now."""
    try:
      self.path(video_id)
    except NotServed:
      return False
    return True

  def path(self, video_id: str) -> pathlib.Path:
    """The file of an indexed video id, resolved, checked to be a regular file under root.

    Raises:
      NotServed: no such id, or its file left root (a link) or is no longer a file.
    """
    path = self._files.get(video_id)
    if path is None:
      raise NotServed(f"video {video_id!r}: no such indexed video with a file under --videos")
    real = path.resolve()
    if not real.is_relative_to(self.root):
      raise NotServed(f"video {video_id!r}: its file {path.name} is a link that leads outside "
                      "--videos; not served")
    if not real.is_file():
      raise NotServed(f"video {video_id!r}: its file {path.name} is gone or not a regular file")
    return real

  def thumbnail(self, video_id: str, t: float) -> bytes:
    """JPEG bytes of the frame shown at `t` seconds (cached).

    Raises:
      NotServed: see `path`.
      SearchError: t not finite or < 0, or the file cannot be decoded.
    """
    if not (math.isfinite(t) and t >= 0):
      raise SearchError(f"t must be a finite number of seconds >= 0, got {t}")
    self.path(video_id)  # refused before the cache is consulted: a link may have changed
    return self._thumbnail(video_id, float(t))

  def cache_info(self) -> dict[str, int]:
    info = self._thumbnail.cache_info()
    return dict(hits=info.hits, misses=info.misses, size=info.currsize, max_size=info.maxsize)

  def _render_thumbnail(self, video_id: str, t: float) -> bytes:
    path = self.path(video_id)
    try:
      with av.open(str(path)) as container:
        stream = container.streams.video[0]
        first = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        target = first + t
        if t > 0:  # to the keyframe at or before the target, then decode forward
          container.seek(int(target / stream.time_base), stream=stream, backward=True)
        shown = None
        for frame in container.decode(stream):
          if frame.time is not None and frame.time > target + 1e-6 and shown is not None:
            break
          shown = frame
        if shown is None:
          raise SearchError(f"video {video_id!r}: {path.name} has no decodable frame")
        image = shown.to_image()
    except (av.error.FFmpegError, IndexError, OSError) as e:
      raise SearchError(f"video {video_id!r}: cannot decode {path.name}: {e}") from None
    height = max(1, round(image.height * self.width / image.width))
    image = image.convert("RGB").resize((self.width, height))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
