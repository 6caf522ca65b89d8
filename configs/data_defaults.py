"""`config.data`: the data keys every benchmark config shares (see prvr_jax/data/).

Keys:
  name: 'synthetic', 'tvr', 'activitynet', 'charades' or 'qvhighlights'.
  root: folder holding the authors' `<collection>/` folder (the TFDS manual dir); unused for
    'synthetic'.
  visual_feature: 'clip' (authors' CLIP-L/14 h5; QVHighlights: SlowFast+CLIP) or an MS-SL BigFile
    folder name under FeatureData/ ('i3d_resnet' TVR, 'i3d' ActivityNet, 'i3d_rgb_lgi' Charades).
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

from __future__ import annotations

import dataclasses

import ml_collections

from prvr_jax.data.synthetic import SyntheticSpec


def synthetic_section(**overrides) -> ml_collections.ConfigDict:
  """`config.data.synthetic`: every SyntheticSpec field with its default, then `overrides`."""
  values = dataclasses.asdict(SyntheticSpec())
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f"unknown synthetic keys {unknown}")
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def data_section(name: str = "synthetic", **overrides) -> ml_collections.ConfigDict:
  """`config.data` for benchmark `name` with the reference's loader settings, then `overrides`."""
  data = ml_collections.ConfigDict(dict(
      name=name, root="", visual_feature="clip", data_dir="", on_error="raise", overwrite=False,
      batch_size=128, max_captions_per_video=0, max_caption_tokens=0, truncate_keep_eos=False,
      num_frames=128, shuffle=True, num_epochs=0, drop_remainder=False,
      eval_video_batch_size=32, eval_query_batch_size=256,
      train_split="train", val_split="val", test_split="test",
      num_threads=2, prefetch_batches=2, num_workers=0,
      synthetic=synthetic_section()))
  for key, value in overrides.items():
    if key not in data:
      raise ValueError(f"unknown data key {key!r}")
    data[key] = value
  return data
