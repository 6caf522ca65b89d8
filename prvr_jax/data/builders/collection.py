"""Reading one benchmark in the authors' (or MS-SL's) layout into `VideoRecord`s, with validation.

Two passes. `plan_collection` reads every caption file and only the metadata of the feature files
(shapes), so that ids, missing features, empty entries and feature sizes are checked for all
splits before anything is written. `iter_records` then reads the values split by split, checking
them for NaN / inf as it goes. Every problem goes through the split's `formats.Issues`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Optional, Union

import numpy as np

from prvr_jax.data import formats
from prvr_jax.data.builders.records import UNKNOWN, VideoRecord

VideoStore = Union[formats.H5Features, formats.BigFile]


@dataclasses.dataclass
class PlannedVideo:
  """A video of a split that passed the metadata checks, with its good captions."""

  video_id: str
  feature_key: str
  captions: list[formats.CaptionLine]


@dataclasses.dataclass
class CollectionPlan:
  """Validated structure of a benchmark: what `iter_records` will read."""

  layout: formats.Layout
  splits: dict[str, list[PlannedVideo]]
  moments: dict[str, dict[tuple[str, str], formats.Moment]]
  video_dim: Optional[int]
  text_dim: Optional[int]


class Stores:
  """The open feature stores of one layout (video features, token features)."""

  def __init__(self, layout: formats.Layout, issues: formats.Issues):
    self.video: VideoStore = (formats.BigFile(layout.video_features, issues) if layout.is_bigfile
                              else formats.H5Features(layout.video_features))
    try:
      self.text = formats.H5Features(layout.text_features)
    except formats.DataError:
      self.video.close()
      raise
    self.video_path = (layout.video_features / "video2frames.txt" if layout.is_bigfile
                       else layout.video_features)

  def close(self) -> None:
    """Closes both stores."""
    self.video.close()
    self.text.close()


def _skip_captions(issues: formats.Issues, captions: list[formats.CaptionLine], why: str) -> None:
  for cap in captions:
    issues.skip(cap.caption_id, why)


def _plan_captions(layout: formats.Layout, stores: Stores, lines: list[formats.CaptionLine],
                   iss: formats.Issues, video_shapes: dict[str, tuple[int, ...]],
                   text_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[formats.CaptionLine]]:
  """One split's captions whose video and token features exist, by video (caption-file order);
  fills in the shapes of their features."""
  by_video: dict[str, list[formats.CaptionLine]] = collections.OrderedDict()
  for cap in lines:
    key = layout.feature_key(cap.video_id)
    if key not in stores.video:
      iss.report(formats.DataError(stores.video_path, cap.caption_id,
                                   f"caption's video {cap.video_id!r} has no features "
                                   f"(no entry {key!r})"))
      continue
    if cap.caption_id not in stores.text:
      iss.report(formats.DataError(layout.text_features, cap.caption_id,
                                   "caption has no token features"))
      continue
    try:
      shape = stores.text.shape(cap.caption_id)
    except formats.DataError as e:
      iss.report(e)
      continue
    if len(shape) != 2 or shape[0] == 0:
      iss.report(formats.DataError(layout.text_features, cap.caption_id,
                                   f"token features have shape {shape}, expected (L >= 1, D_t)"))
      continue
    text_shapes[cap.caption_id] = shape
    by_video.setdefault(cap.video_id, []).append(cap)
  for vid in formats.ordered_unique([cap.video_id for cap in lines]):
    if vid not in by_video:
      iss.skip(vid, "all its captions were skipped")
  for vid in list(by_video):
    key = layout.feature_key(vid)
    if key in video_shapes:
      continue
    try:
      video_shapes[key] = stores.video.shape(key)
    except formats.DataError as e:
      iss.report(e)
      _skip_captions(iss, by_video.pop(vid), f"its video {vid!r} was skipped")
  return by_video


def _plan_videos(layout: formats.Layout, stores: Stores, iss: formats.Issues,
                 by_video: dict[str, list[formats.CaptionLine]], video_shapes: dict[str, tuple[int, ...]],
                 text_shapes: dict[str, tuple[int, ...]], video_dim: int, text_dim: int
                 ) -> list[PlannedVideo]:
  """One split's videos whose features have the common sizes, with their good captions."""
  planned = []
  for vid, caps in by_video.items():
    key = layout.feature_key(vid)
    shape = video_shapes[key]
    problem = None
    if len(shape) != 2:
      problem = f"frame features have shape {shape}, expected (T, D_v)"
    elif shape[0] == 0:
      problem = "has 0 feature rows"
    elif shape[1] != video_dim:
      problem = f"feature size {shape[1]} differs from the rest ({video_dim})"
    if problem is not None:
      iss.report(formats.DataError(stores.video_path, vid, problem))
      _skip_captions(iss, caps, f"its video {vid!r} was skipped")
      continue
    good = []
    for cap in caps:
      d = text_shapes[cap.caption_id][-1]
      if d != text_dim:
        iss.report(formats.DataError(layout.text_features, cap.caption_id,
                                     f"token feature size {d} differs from the rest ({text_dim})"))
      else:
        good.append(cap)
    if not good:
      iss.skip(vid, "all its captions were skipped")
      continue
    planned.append(PlannedVideo(vid, key, good))
  return planned


def plan_collection(layout: formats.Layout, stores: Stores,
                    issues: dict[str, formats.Issues]) -> CollectionPlan:
  """Checks ids, references, shapes and feature sizes of every split.

  Args:
    layout: the benchmark's paths.
    stores: its open feature stores.
    issues: split -> collector (one per split in layout.caption_files).

  Returns:
    The plan: per split, the videos (authors' order: first appearance in the caption file) and
    their good captions; the moment annotations; the feature sizes most entries have.
  """
  per_split: dict[str, dict[str, list[formats.CaptionLine]]] = {}
  moments: dict[str, dict[tuple[str, str], formats.Moment]] = {}
  video_shapes: dict[str, tuple[int, ...]] = {}
  text_shapes: dict[str, tuple[int, ...]] = {}
  for split, cap_file in layout.caption_files.items():
    iss = issues[split]
    lines = formats.read_caption_file(cap_file, iss)
    moments[split] = (formats.read_moments(layout.moment_files[split], layout.moment_style, iss, split)
                      if split in layout.moment_files else {})
    per_split[split] = _plan_captions(layout, stores, lines, iss, video_shapes, text_shapes)
  video_dim = formats.most_common_dim(s[-1] for s in video_shapes.values() if len(s) == 2)
  text_dim = formats.most_common_dim(s[-1] for s in text_shapes.values())
  splits = {split: _plan_videos(layout, stores, issues[split], by_video, video_shapes, text_shapes,
                                video_dim, text_dim)
            for split, by_video in per_split.items()}
  return CollectionPlan(layout, splits, moments, video_dim, text_dim)


def iter_records(plan: CollectionPlan, stores: Stores, split: str,
                 issues: formats.Issues) -> Iterator[VideoRecord]:
  """Reads the values of one planned split; bad values go to `issues`.

  Yields:
    One VideoRecord per video with at least one good caption, in plan order.
  """
  moments = plan.moments.get(split, {})
  for video in plan.splits[split]:
    frames = stores.video.read(video.feature_key)
    if isinstance(frames, formats.DataError):
      issues.report(frames)
      _skip_captions(issues, video.captions, f"its video {video.video_id!r} was skipped")
      continue
    ids, texts, tokens, spans, duration = [], [], [], [], UNKNOWN
    for cap in video.captions:
      tok = stores.text.read(cap.caption_id)
      if isinstance(tok, formats.DataError):
        issues.report(tok)
        continue
      ids.append(cap.caption_id)
      texts.append(cap.text)
      tokens.append(tok)
      m = moments.get((video.video_id, cap.text.strip()))
      spans.append((m.start, m.end) if m is not None else (UNKNOWN, UNKNOWN))
      if m is not None:
        duration = max(duration, m.duration)
    if not ids:
      issues.skip(video.video_id, "all its captions were skipped")
      continue
    yield VideoRecord(video_id=video.video_id, feature_key=video.feature_key, frames=frames,
                      caption_ids=ids, caption_texts=texts, caption_tokens=tokens,
                      moments=np.asarray(spans, np.float32), duration=duration)
