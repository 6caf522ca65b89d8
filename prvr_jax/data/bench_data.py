"""Loader benchmark at the real TVR shapes: how many training batches per second grain delivers.

A synthetic dataset with TVR's sizes (768-d frames and tokens, 5 captions per video, 64-256 raw
frames per video) is written as ArrayRecord once, then the training pipeline (decode, resample to
128 rows, normalise and pad captions to 77 tokens, collate B = 128 videos / 640 queries) is timed.
The train step at B = 128 takes tens of seconds on 2 CPU cores (README), so the loader must stay
far below that to never be what the step waits on.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Iterator, Optional

import tensorflow_datasets as tfds

from prvr_jax.data import pipeline
from prvr_jax.data.builders.factory import make_builder
from prvr_jax.data.config import DataConfig
from prvr_jax.data.synthetic import SyntheticSpec

TVR_CAPTIONS = 5
TVR_DIM = 768
CLIP_TOKENS = 77


def tvr_like_spec(num_videos: int) -> SyntheticSpec:
  """A synthetic spec with TVR's feature sizes and captions per video."""
  return SyntheticSpec(num_train_videos=num_videos, num_val_videos=0, num_test_videos=0,
                       visual_dim=TVR_DIM, text_dim=TVR_DIM, min_events=TVR_CAPTIONS,
                       max_events=TVR_CAPTIONS, min_frames=64, max_frames=256)


def _build(spec: SyntheticSpec, data_dir: str) -> str:
  builder = make_builder(DataConfig(name="synthetic", synthetic=spec), data_dir,
                                  progress=False)
  tfds.display_progress_bar(False)
  try:
    builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(True)
  return str(builder.data_dir)


def bench_data(batches: int = 4, repeats: int = 3, *, batch_size: int = 128, num_threads: int = 2,
               data_dir: Optional[str] = None) -> Iterator[dict[str, Any]]:
  """Times the training pipeline at TVR shapes.

  Args:
    batches: batches timed per repeat (after one warm-up batch), >= 1.
    repeats: timed repeats; each uses a fresh iterator at a new position.
    batch_size: videos per batch.
    num_threads: loader threads.
    data_dir: where the benchmark dataset is written (default: a temporary folder, removed after).

  Yields:
    {"bench": "data", "case": ..., "items": videos per batch, "median_s": seconds per batch,
     "batches_per_s": ..., "runs_s": per-repeat seconds per batch, ...}: one record for building
    the dataset and one per loader setting.
  """
  if batches < 1 or repeats < 1:
    raise ValueError(f"batches and repeats must be >= 1, got {batches}, {repeats}")
  tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="prvr_bench_data_")
  root = data_dir or tmp.name
  try:
    # Two batches' worth of videos, read over many epochs: the cost of a batch does not depend on
    # which videos it holds, and building ~0.1 GB instead of ~1 GB keeps the bench short.
    num_videos = 2 * batch_size
    t0 = time.perf_counter()
    dataset_dir = _build(tvr_like_spec(num_videos), os.path.join(root, "tfds"))
    build_s = time.perf_counter() - t0
    yield dict(bench="data", case="build_tvr_shapes", items=num_videos, median_s=build_s,
               videos_per_s=num_videos / build_s, runs_s=[round(build_s, 6)])
    for threads in sorted({1, num_threads}):
      ds = pipeline.train_dataset(dataset_dir, batch_size=batch_size, max_captions_per_video=TVR_CAPTIONS,
                                  max_caption_tokens=CLIP_TOKENS, seed=0)
      runs = []
      for r in range(repeats):
        it = pipeline.to_iterator(ds, num_threads=threads, prefetch_batches=2)
        it.set_state({"next_index": r * (batches + 1)})
        next(it)  # warm-up: thread start, file open
        t0 = time.perf_counter()
        for _ in range(batches):
          batch = next(it)
        runs.append((time.perf_counter() - t0) / batches)
        del it
      med = statistics.median(runs)
      yield dict(bench="data", case=f"tvr_shapes_B{batch_size}_threads{threads}", items=batch_size,
                 median_s=med, batches_per_s=1.0 / med, runs_s=[round(t, 6) for t in runs],
                 queries=int(batch["query_valid"].shape[0]), frames=int(batch["video_frames"].shape[1]),
                 caption_tokens=int(batch["text_feat"].shape[1]), dim=TVR_DIM)
  finally:
    if tmp is not None:
      tmp.cleanup()
