"""Video -> (T, P) CLIP image embeddings at a fixed frame rate, for many videos, resumably.

Frames of consecutive videos share fixed-size batches (the last one padded), so the jitted vision
tower compiles once and short videos do not waste a batch each. A batch is dispatched before the
previous one is read back, so decoding overlaps the device's work.

Output (see feature_store.py): one dataset per video id (the file stem), (T, P) float32 projected
image embeddings (not normalised), T = ceil(duration * fps), with attributes `duration` (seconds,
first decoded frame to the end of the last), `fps`, `num_decoded_frames` and `source`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from typing import Any, Optional, Sequence

import numpy as np
import tqdm

from prvr_jax.clip import preprocess
from prvr_jax.clip.feature_store import LEGACY_SETTINGS, FeatureStore
from prvr_jax.clip.model import ClipEncoders
from prvr_jax.clip.summary import Summary
from prvr_jax.clip.video import SampleInfo, VideoError, list_videos, sample_frames
from prvr_jax.errors import PrvrError


class ExtractError(PrvrError, ValueError):
  """A problem that stops a whole run (bad arguments, duplicate ids); names the file."""


@dataclasses.dataclass
class _Job:
  video_id: str
  path: pathlib.Path
  info: SampleInfo
  rows: list[np.ndarray] = dataclasses.field(default_factory=list)
  total: Optional[int] = None  # known once the video is fully decoded


def video_ids(paths: Sequence[pathlib.Path]) -> list[str]:
  """File stems as video ids; two files with one stem are an error naming both.

  Args:
    paths: video files.

  Returns:
    One id per path.
  """
  seen: dict[str, pathlib.Path] = {}
  for p in paths:
    if p.stem in seen:
      raise ExtractError(f"{p}: video id {p.stem!r} is also the id of {seen[p.stem]}")
    seen[p.stem] = p
  return [p.stem for p in paths]


class _Batcher:
  """Packs frames of many videos into fixed-size batches and hands finished videos to the store."""

  def __init__(self, encoders: ClipEncoders, params: Any, batch: int, store: FeatureStore,
               fps: float, summary: Summary):
    self.encoders, self.params, self.batch = encoders, params, batch
    self.store, self.fps, self.summary = store, fps, summary
    self.size = encoders.config.vision.image_size
    self.frames: list[np.ndarray] = []
    self.owners: list[int] = []
    self.in_flight: collections.deque = collections.deque()
    self.jobs: dict[int, _Job] = {}

  def add_frame(self, job_index: int, frame: np.ndarray) -> None:
    self.frames.append(frame)
    self.owners.append(job_index)
    if len(self.frames) == self.batch:
      self._dispatch()

  def _dispatch(self) -> None:
    n = len(self.frames)
    if not n:
      return
    pixels = np.zeros((self.batch, self.size, self.size, 3), np.float32)
    pixels[:n] = preprocess.normalize(np.stack(self.frames))
    # Asynchronous: the device works while the next batch is decoded.
    self.in_flight.append((self.encoders.encode_image(self.params, pixels), self.owners))
    self.frames, self.owners = [], []
    if len(self.in_flight) > 1:
      self._collect(*self.in_flight.popleft())

  def _collect(self, result: Any, owners: list[int]) -> None:
    rows = np.asarray(result)[:len(owners)]
    for row, owner in zip(rows, owners):
      job = self.jobs.get(owner)
      if job is not None:  # else the video failed after these frames were sent
        job.rows.append(row)
    for owner in dict.fromkeys(owners):
      self._maybe_store(owner)

  def video_done(self, job_index: int) -> None:
    job = self.jobs[job_index]
    job.total = job.info.num_sampled
    self._maybe_store(job_index)

  def video_failed(self, job_index: int) -> None:
    self.jobs.pop(job_index, None)
    keep = [i for i, o in enumerate(self.owners) if o != job_index]
    self.frames = [self.frames[i] for i in keep]
    self.owners = [self.owners[i] for i in keep]

  def _maybe_store(self, job_index: int) -> None:
    job = self.jobs.get(job_index)
    if job is None or job.total is None or len(job.rows) < job.total:
      return
    attrs = {"duration": job.info.duration, "fps": self.fps,
             "num_decoded_frames": job.info.num_decoded, "source": str(job.path)}
    self.store.put([(job.video_id, np.stack(job.rows), attrs)])
    del self.jobs[job_index]
    self.summary.done += 1

  def flush(self) -> None:
    self._dispatch()
    while self.in_flight:
      self._collect(*self.in_flight.popleft())


def extract_videos(encoders: ClipEncoders, params: Any, videos: str | os.PathLike, fps: float,
                   out: str | os.PathLike, batch: int = 64, max_items: Optional[int] = None,
                   info: Optional[dict[str, Any]] = None, progress: bool = True) -> Summary:
  """Extracts (T, P) frame embeddings of every listed video into an HDF5 file.

  Videos already in the output are skipped; a video that cannot be decoded is reported in the
  summary and skipped.

  Args:
    encoders: ClipEncoders of the checkpoint.
    params: its params (the vision tower is enough).
    videos: a directory of videos or a list file (see video.list_videos).
    fps: frames per second to sample.
    out: the .h5 output.
    batch: frames per device batch (fixed, so the model compiles once).
    max_items: only the first this many listed videos.
    info: extra root attributes for the output (e.g. the checkpoint path).
    progress: show a tqdm bar.

  Returns:
    The Summary.

  Raises:
    ExtractError, VideoError: bad arguments or list; StoreError: output unusable.
  """
  if fps <= 0:
    raise ExtractError(f"--fps must be > 0, got {fps}")
  if batch <= 0:
    raise ExtractError(f"--batch must be > 0, got {batch}")
  paths = list_videos(videos)[:max_items]
  ids = video_ids(paths)
  settings = {"kind": "clip_video_features", "fps": float(fps),
              "features": "visual_projection (CLIP image embeddings, not normalised)",
              "clip_config": dataclasses.asdict(encoders.config), "clip_dtype": encoders.dtype}
  store = FeatureStore(out, settings, info, assumed=LEGACY_SETTINGS)
  summary = Summary(kind="videos", out=str(out), listed=len(paths))
  todo = [(i, p) for i, p in zip(ids, paths) if i not in store]
  summary.skipped_existing = len(paths) - len(todo)
  batcher = _Batcher(encoders, params, batch, store, fps, summary)
  size = encoders.config.vision.image_size
  bar = tqdm.tqdm(todo, desc="videos", unit="video", disable=not progress)
  for job_index, (video_id, path) in enumerate(bar):
    job = _Job(video_id, path, SampleInfo())
    batcher.jobs[job_index] = job
    frames = sample_frames(path, fps, job.info,
                           transform=lambda im: preprocess.resize_and_crop(im, size))
    while True:
      # Only decoding errors are the video's fault; model or output errors below stop the run.
      try:
        frame = next(frames)
      except StopIteration:
        batcher.video_done(job_index)
        break
      except VideoError as e:
        reason = f"{e.reason} [{path}]"
      except Exception as e:  # pylint: disable=broad-except  # one bad video must not stop the run
        reason = f"{type(e).__name__}: {e} [{path}]"
      else:
        batcher.add_frame(job_index, frame)
        continue
      batcher.video_failed(job_index)
      summary.failed.append({"id": video_id, "reason": reason})
      break
    bar.set_postfix(done=summary.done, failed=len(summary.failed))
  batcher.flush()
  summary.total_in_output = store.finalize()
  return summary
