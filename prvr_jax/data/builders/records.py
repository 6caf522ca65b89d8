"""The stored example (one per video) shared by every PRVR builder, and per-split statistics
(numpy only: the synthetic generator imports it; the TFDS features are in base.py).

An example holds a video's raw frames (variable T), all its captions with their raw token features
(concatenated along rows, cut by `caption_lengths`), moment annotations and the duration when
known. Resampling, normalisation and padding happen later, in the grain pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

UNKNOWN = -1.0  # duration / moment value when the benchmark has no annotation
METADATA_KEY = "prvr"  # the key of our entry in the dataset's metadata.json


@dataclasses.dataclass
class VideoRecord:
  """One video and its captions, before serialisation.

  Attributes:
    video_id: id used by the captions (ActivityNet: with its `v_` prefix).
    feature_key: key of the frames in the feature file.
    frames: (T, D_v) float32 raw frame features.
    caption_ids: C caption ids.
    caption_texts: C caption texts.
    caption_tokens: C arrays (L_c, D_t) float32 raw token features.
    moments: (C, 2) float32 [start, end] seconds, UNKNOWN where not annotated.
    duration: seconds, UNKNOWN when not known.
    caption_concepts: (C,) int32 ground-truth concept of each caption (synthetic data), else -1.
  """

  video_id: str
  feature_key: str
  frames: np.ndarray
  caption_ids: list[str]
  caption_texts: list[str]
  caption_tokens: list[np.ndarray]
  moments: np.ndarray
  duration: float = UNKNOWN
  caption_concepts: Optional[np.ndarray] = None

  def to_example(self) -> dict[str, Any]:
    """The dict TFDS serialises."""
    num = len(self.caption_ids)
    concepts = (np.full((num,), -1, np.int32) if self.caption_concepts is None
                else np.asarray(self.caption_concepts, np.int32))
    return dict(
        video_id=self.video_id, feature_key=self.feature_key,
        frames=np.ascontiguousarray(self.frames, np.float32), duration=np.float32(self.duration),
        caption_ids=list(self.caption_ids), caption_texts=list(self.caption_texts),
        caption_lengths=np.array([len(t) for t in self.caption_tokens], np.int32),
        caption_tokens=np.ascontiguousarray(np.concatenate(self.caption_tokens, axis=0), np.float32),
        moments=np.asarray(self.moments, np.float32).reshape(num, 2), caption_concepts=concepts)


@dataclasses.dataclass
class SplitStats:
  """What a split holds after building; stored in the dataset's metadata.json.

  `caption_counts[i]` is the number of captions of example i (the query iterators index captions
  through it without decoding examples).
  """

  videos: int = 0
  captions: int = 0
  frames: int = 0
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
  caption_counts: list[int] = dataclasses.field(default_factory=list)
  max_caption_tokens: int = 0
  max_frames: int = 0
  captions_with_moments: int = 0
  videos_with_duration: int = 0

  def add(self, rec: VideoRecord) -> None:
    """Counts one written example."""
    self.videos += 1
    self.captions += len(rec.caption_ids)
    self.frames += int(rec.frames.shape[0])
    self.caption_counts.append(len(rec.caption_ids))
    self.max_caption_tokens = max([self.max_caption_tokens] + [len(t) for t in rec.caption_tokens])
    self.max_frames = max(self.max_frames, int(rec.frames.shape[0]))
    self.captions_with_moments += int(np.sum(np.asarray(rec.moments)[:, 1] >= 0))
    self.videos_with_duration += int(rec.duration >= 0)

  def summary(self) -> dict[str, Any]:
    """The public summary of the split (no per-example lists except `skipped`)."""
    return dict(videos=self.videos, captions=self.captions, frames=self.frames,
                skipped=list(self.skipped), max_captions_per_video=max(self.caption_counts, default=0),
                max_caption_tokens=self.max_caption_tokens, max_frames=self.max_frames,
                captions_with_moments=self.captions_with_moments,
                videos_with_duration=self.videos_with_duration)

  def to_json(self) -> dict[str, Any]:
    """Every field (what metadata.json stores)."""
    return dataclasses.asdict(self)
