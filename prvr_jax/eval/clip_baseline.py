"""The CLIP zero-shot row (the paper's Table 5, first row): retrieval with the features alone.

A caption is its EOS token feature (the CLIP sentence embedding: the last row of the caption's
token features), a video is its features as the network would receive them: the 32 OP-ToMe clips
(128 -> 80 -> 52 -> 32 on the resampled frames) and the 128 resampled frames, all L2-normalised.
clip score = max over the clips of the cosine with the caption, frame score = max over the
frames, fused = clip_weight * clip + frame_weight * frame; the ranking, the moments (the
best-matching clip or frame of the contributing branch, as search defines it) and every metric are
the evaluation's own (`evaluate.rank_and_report`). No parameters: nothing is trained.

This needs the video and caption features in one space (the authors' CLIP-L/14 files: 768-d
both). The synthetic benchmark's 'visual' and 'CLIP' spaces are two different random projections
of the same latents, so there the row is at chance by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prvr_jax.data import pipeline
from prvr_jax.data.config import DataConfig
from prvr_jax.errors import ConfigError
from prvr_jax.eval import evaluate
from prvr_jax.eval.config import EvalConfig
from prvr_jax.ops.similarity import l2_normalize
from prvr_jax.ops.video_inputs import prepare_video_inputs

NAME = "clip_baseline"


@functools.lru_cache(maxsize=None)
def make_video_encoder() -> Callable[[Any, jax.Array], tuple[jax.Array, ...]]:
  """A jitted fn(params (unused), frames (C, F, D_v) resampled) -> (OP-ToMe clips (C, 32, D_v),
  frames (C, F, D_v), clip spans (C, 32, 2)), features L2-normalised."""

  @jax.jit
  def encode(params, frames):
    del params
    inputs = prepare_video_inputs(frames, use_op_tome=True)
    return (l2_normalize(inputs["clip_video_features"]), l2_normalize(inputs["frame_video_features"]),
            inputs["clip_spans"])

  return encode


@functools.lru_cache(maxsize=None)
def make_query_encoder() -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
  """A jitted fn(params (unused), captions) -> (B, D_t) the L2-normalised EOS row of each caption
  (`text_feat` (B, L, D_t), `text_mask` (B, L): the last valid row)."""

  @jax.jit
  def encode(params, captions):
    del params
    last = jnp.maximum(jnp.sum(captions["text_mask"] > 0, axis=1) - 1, 0).astype(jnp.int32)
    eos = jnp.take_along_axis(captions["text_feat"], last[:, None, None], axis=1)[:, 0]
    return l2_normalize(eos)

  return encode


def baseline_data(data: DataConfig) -> DataConfig:
  """`data` with captions at full length and the EOS row kept when truncating (<= 77 rows), so
  the last row the loader gives is always the caption's EOS."""
  return dataclasses.replace(data, max_caption_tokens=0, truncate_keep_eos=True)


def evaluate_split(data: DataConfig, eval_cfg: EvalConfig, dataset_dir: str, split: str, *,
                   mesh: Optional[Mesh] = None, progress: bool = True
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The CLIP zero-shot evaluation of one split: `evaluate.evaluate_split_with_ranks`'s report
  and per-query results, from the features alone.

  Raises:
    ConfigError: video and caption features of different widths (not one embedding space).
  """
  info = pipeline.open_split(dataset_dir, split)
  if info.video_dim != info.text_dim:
    raise ConfigError(f"{dataset_dir}: the CLIP baseline scores caption features against video "
                      f"features, so both must be CLIP's (one width); this dataset has "
                      f"{info.video_dim}-d video and {info.text_dim}-d caption features")
  t0 = time.perf_counter()
  data = baseline_data(data)
  videos, queries = pipeline.eval_from_config(data, dataset_dir, split,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
  corpus = evaluate.encode_videos_with(make_video_encoder(), None,
                                       pipeline.iterator_from_config(data, videos), mesh=mesh,
                                       progress=progress, total=len(videos))
  encoded = evaluate.encode_queries_with(make_query_encoder(), None,
                                         pipeline.iterator_from_config(data, queries), mesh=mesh,
                                         progress=progress, total=len(queries))
  report, results = evaluate.rank_and_report(corpus, encoded, eval_cfg, mesh=mesh)
  logging.info("CLIP baseline %s: %d queries x %d videos in %.1f s: %s", split,
               report["num_queries"], report["num_videos"], time.perf_counter() - t0,
               evaluate.summary_text(report))
  return report, results
