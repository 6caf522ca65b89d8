"""`config.data` as a frozen dataclass: the dataset to build and how the loaders read it.

Imports no JAX (grain worker processes unpickle the pipelines that hold these values).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from prvr_jax.data.formats import ON_ERROR_CHOICES
from prvr_jax.data.synthetic import SyntheticSpec
from prvr_jax.errors import ConfigError
from prvr_jax.utils.config import Section, checked_kwargs

BENCHMARKS = ("synthetic", "tvr", "activitynet", "charades", "qvhighlights")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """The data keys every config shares (their defaults are the reference's loader settings).

  Attributes:
    name: one of BENCHMARKS.
    root: folder holding the authors' `<collection>/` folder (the TFDS manual dir); unused for
      'synthetic'.
    visual_feature: 'clip' (authors' CLIP-L/14 h5; QVHighlights: SlowFast+CLIP) or an MS-SL
      BigFile folder name under FeatureData/ ('i3d_resnet' TVR, 'i3d' ActivityNet, 'i3d_rgb_lgi'
      Charades).
    data_dir: where the ArrayRecord dataset is written / read ('' = <workdir>/tfds).
    on_error: 'raise' (bad input stops prepare, naming file and item) or 'skip' (bad items are
      skipped and listed in prepare_summary.json).
    overwrite: rebuild even if the dataset exists.
    batch_size: global training batch (videos); each process loads batch_size / process_count.
    max_captions_per_video: C, captions per video in a training batch (0 = the train split's max).
    max_caption_tokens: L, padded caption length (0 = the longest caption, at most 77).
    truncate_keep_eos: when a caption is longer than L, keep its EOS row (reference: first L rows).
    num_frames: rows after resampling (128).
    shuffle: reshuffle the training split every epoch (seed: config.seed).
    num_epochs: epochs the training iterator covers (0 = unbounded).
    drop_remainder: drop each epoch's last partial batch instead of padding it with invalid videos.
    eval_video_batch_size, eval_query_batch_size: evaluation batch sizes (global).
    train_split, val_split, test_split: split names.
    num_threads, prefetch_batches, num_workers: loader parallelism (threads, batches ahead, grain
      worker processes).
    synthetic: the synthetic benchmark's sizes, noise and seed (prvr_jax.data.synthetic).
  """

  SECTION = "data"

  name: str = "synthetic"
  root: str = ""
  visual_feature: str = "clip"
  data_dir: str = ""
  on_error: str = "raise"
  overwrite: bool = False
  batch_size: int = 128
  max_captions_per_video: int = 0
  max_caption_tokens: int = 0
  truncate_keep_eos: bool = False
  num_frames: int = 128
  shuffle: bool = True
  num_epochs: int = 0
  drop_remainder: bool = False
  eval_video_batch_size: int = 32
  eval_query_batch_size: int = 256
  train_split: str = "train"
  val_split: str = "val"
  test_split: str = "test"
  num_threads: int = 2
  prefetch_batches: int = 2
  num_workers: int = 0
  synthetic: SyntheticSpec = SyntheticSpec()

  def __post_init__(self):
    if self.name not in BENCHMARKS:
      raise ConfigError(f"unknown data.name {self.name!r}; expected one of {BENCHMARKS}")
    if self.on_error not in ON_ERROR_CHOICES:
      raise ConfigError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")
    for key in ("batch_size", "eval_video_batch_size", "eval_query_batch_size", "num_frames"):
      if getattr(self, key) < 1:
        raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")

  @classmethod
  def from_config_dict(cls, cfg: Mapping[str, Any]) -> "DataConfig":
    """Builds from `config.data`; unknown keys are an error, missing ones take the defaults."""
    kwargs = checked_kwargs(cls, cfg, cls.SECTION)
    if "synthetic" in kwargs:
      synthetic = kwargs["synthetic"]
      kwargs["synthetic"] = SyntheticSpec.from_dict(
          synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic))
    return cls(**kwargs)
