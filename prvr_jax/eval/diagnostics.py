"""Semantic-collapse diagnostics of a trained network on one split (the MSC paper's analysis).

Collapse shows as embeddings that are more alike than the semantics they encode:
  * queries: captions of the same video (which describe different moments) get near-identical
    learned embeddings while CLIP still tells them apart. Measured as the mean cosine similarity
    of same-video query pairs, learned vs CLIP (the caption's EOS token feature, the TCPL
    teacher), with the mean over all distinct query pairs as the baseline, and as the Spearman
    rank correlation between learned and CLIP similarities over all distinct query pairs (how
    much of CLIP's similarity structure survives).
  * clip tokens: the clip branch's output tokens of one video become alike. Measured as the mean
    cosine similarity of distinct token pairs within a video, learned (`encode_clips`) vs the
    OP-ToMe input tokens, and the Spearman correlation between the two within each video.

Encoding runs jitted in the eval pipelines' fixed-size batches; the query similarity matrices are
bounded by `max_queries`, the token pairs by `max_videos`. Spearman uses average ranks for ties.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from prvr_jax.data import pipeline
from prvr_jax.data.config import DataConfig
from prvr_jax.errors import ConfigError
from prvr_jax.eval.evaluate import caption_arrays, place_params
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.similarity import l2_normalize
from prvr_jax.ops.video_inputs import prepare_video_inputs


# ----------------------------------------------------------------------------------------------
# Spearman rank correlation (numpy).


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks along the last axis; tied values share the mean of their positions.

  x: (..., n) -> (..., n) float64. E.g. [10, 20, 20, 5] -> [2, 3.5, 3.5, 1].
  """
  x = np.asarray(x)
  n = x.shape[-1]
  values = x.reshape(-1, n)
  rows = np.repeat(np.arange(values.shape[0]), n)
  order = np.lexsort((values.ravel(), rows))  # by row, then by value
  sorted_values, sorted_rows = values.ravel()[order], rows[order]
  starts_group = np.ones(order.size, bool)
  starts_group[1:] = (sorted_values[1:] != sorted_values[:-1]) | (sorted_rows[1:] != sorted_rows[:-1])
  group = np.cumsum(starts_group) - 1
  first = np.flatnonzero(starts_group)
  size = np.diff(np.append(first, order.size))
  position = np.arange(order.size) - sorted_rows * n  # 0-based position within the row
  mean_rank = position[first] + (size - 1) / 2.0 + 1.0
  ranks = np.empty(order.size, np.float64)
  ranks[order] = mean_rank[group]
  return ranks.reshape(x.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
  """Spearman rank correlation of a and b along the last axis (Pearson of average ranks).

  a, b: (..., n) -> (...) float64 (a float for 1-D inputs); NaN where either side is constant.
  """
  ra, rb = average_ranks(a), average_ranks(b)
  ra -= ra.mean(axis=-1, keepdims=True)
  rb -= rb.mean(axis=-1, keepdims=True)
  den = np.sqrt(np.sum(ra * ra, axis=-1) * np.sum(rb * rb, axis=-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    rho = np.where(den > 0, np.sum(ra * rb, axis=-1) / den, np.nan)
  return float(rho) if rho.ndim == 0 else rho


# ----------------------------------------------------------------------------------------------
# Jitted encoders.


@functools.lru_cache(maxsize=None)
def _query_encoder(model_cfg: ModelConfig) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
  """jit fn(params, captions) -> (learned (B, D), CLIP EOS (B, D_t)), both L2-normalised; captions
  as `evaluate.make_query_encoder` takes them (the CLIP EOS row comes from the frozen tower when
  the model runs one)."""
  model = MSCNet(model_cfg)

  @jax.jit
  def encode(params, captions):
    query, teacher = model.apply({"params": params}, captions, method=MSCNet.encode_captions)
    return l2_normalize(query), l2_normalize(teacher)

  return encode


@functools.lru_cache(maxsize=None)
def _clip_pair_encoder(model_cfg: ModelConfig) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """jit fn(params, frames (C, F, D_v)) -> cosine similarities of the K(K-1)/2 distinct clip-token
  pairs of each video, (learned (C, P), OP-ToMe input (C, P))."""
  model = MSCNet(model_cfg)
  first, second = np.triu_indices(model_cfg.num_clips, k=1)

  def pairs(tokens):
    tokens = l2_normalize(tokens)
    return jnp.einsum("cpd,cpd->cp", tokens[:, first], tokens[:, second])

  @jax.jit
  def encode(params, frames):
    inputs = prepare_video_inputs(frames, use_op_tome=model_cfg.use_op_tome)
    learned = model.apply({"params": params}, inputs["clip_video_features"], inputs["merge_size"],
                          method=MSCNet.encode_clips)
    return pairs(learned), pairs(inputs["clip_video_features"])

  return encode


@jax.jit
def _query_pair_stats(learned: jax.Array, clip: jax.Array, video: jax.Array, valid: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Gram matrices and pair masks of M queries.

  Args:
    learned: (M, D), clip: (M, D_t) unit vectors; video: (M,) ground-truth video; valid: (M,).

  Returns:
    (learned Gram (M, M), CLIP Gram (M, M), distinct valid pairs (M, M), same-video pairs (M, M)).
  """
  m = learned.shape[0]
  distinct = valid[:, None] & valid[None, :] & ~jnp.eye(m, dtype=bool)
  same = distinct & (video[:, None] == video[None, :])
  return learned @ learned.T, clip @ clip.T, distinct, same


# ----------------------------------------------------------------------------------------------
# Diagnostics of a split.


def _first_batches(dataset: Any, items: int) -> Any:
  """The leading batches of an eval dataset that hold its first `items` items."""
  batch = dataset[0]
  size = len(next(iter(batch.values())))
  return dataset[:max(1, -(-items // size))]


def query_collapse(params: Any, model_cfg: ModelConfig, data: DataConfig, dataset_dir: str, split: str, *,
                   max_queries: int = 2000, progress: bool = False) -> dict[str, Any]:
  """Query-side diagnostics over the split's first `max_queries` captions (see the module docstring).

  Returns:
    {'num_queries', 'num_pairs', 'num_same_video_pairs', 'same_video_cos': {'learned', 'clip'},
     'all_pairs_cos': {'learned', 'clip'}, 'spearman_learned_vs_clip'}; pairs are unordered pairs
    of distinct queries, 'same_video_cos' is NaN when no two queries share a video.
  """
  _, queries = pipeline.eval_from_config(data, dataset_dir, split,
                                         caption_text_length=model_cfg.caption_token_length,
                                         caption_context_length=model_cfg.caption_context_length)
  queries = _first_batches(queries, max_queries)
  encode = _query_encoder(model_cfg)
  learned, clip, video, valid = [], [], [], []
  for batch in tqdm.tqdm(pipeline.iterator_from_config(data, queries), total=len(queries),
                         desc="diagnostics: queries", disable=not progress, leave=False):
    out = jax.device_get(encode(params, caption_arrays(batch)))
    learned.append(out[0])
    clip.append(out[1])
    video.append(batch["gt_video_index"])
    valid.append(batch["query_valid"] & (batch["query_index"] < max_queries))
  valid_rows = np.concatenate(valid)
  gl, gc, distinct, same = jax.device_get(_query_pair_stats(
      np.concatenate(learned), np.concatenate(clip), np.concatenate(video), valid_rows))
  upper = np.triu(distinct, k=1)  # each unordered pair once
  same = same & upper
  mean = lambda g, mask: float(g[mask].mean()) if mask.any() else float("nan")
  return {
      "num_queries": int(valid_rows.sum()),
      "num_pairs": int(upper.sum()),
      "num_same_video_pairs": int(same.sum()),
      "same_video_cos": {"learned": mean(gl, same), "clip": mean(gc, same)},
      "all_pairs_cos": {"learned": mean(gl, upper), "clip": mean(gc, upper)},
      "spearman_learned_vs_clip": spearman(gl[upper], gc[upper]) if upper.sum() > 1 else float("nan"),
  }


def clip_token_collapse(params: Any, model_cfg: ModelConfig, data: DataConfig, dataset_dir: str,
                        split: str, *,
                        max_videos: int = 500, progress: bool = False) -> dict[str, Any]:
  """Clip-token diagnostics over the split's first `max_videos` videos (see the module docstring).

  Returns:
    {'num_videos', 'pairs_per_video', 'within_video_cos': {'learned', 'input'},
     'spearman_learned_vs_input' (mean over videos of the per-video correlation, videos whose
     similarities are all equal left out), 'spearman_learned_vs_input_pooled' (over all pairs of
     all videos)}.
  """
  videos, _ = pipeline.eval_from_config(data, dataset_dir, split)
  videos = _first_batches(videos, max_videos)
  encode = _clip_pair_encoder(model_cfg)
  learned, given = [], []
  for batch in tqdm.tqdm(pipeline.iterator_from_config(data, videos), total=len(videos),
                         desc="diagnostics: videos", disable=not progress, leave=False):
    keep = batch["video_valid"] & (batch["video_index"] < max_videos)
    out = jax.device_get(encode(params, batch["video_frames"]))
    learned.append(np.asarray(out[0])[keep])
    given.append(np.asarray(out[1])[keep])
  learned, given = np.concatenate(learned), np.concatenate(given)  # (V, P)
  per_video = spearman(learned, given)
  finite = np.isfinite(per_video)
  return {
      "num_videos": int(learned.shape[0]),
      "pairs_per_video": int(learned.shape[1]),
      "within_video_cos": {"learned": float(learned.mean()), "input": float(given.mean())},
      "spearman_learned_vs_input": float(per_video[finite].mean()) if finite.any() else float("nan"),
      "spearman_learned_vs_input_pooled": spearman(learned.ravel(), given.ravel()),
  }


def collapse_diagnostics(params: Any, model_cfg: ModelConfig, data: DataConfig, dataset_dir: str,
                         split: str, *,
                         max_queries: int = 2000, max_videos: Optional[int] = 500,
                         progress: bool = False) -> dict[str, Any]:
  """Semantic-collapse diagnostics of `params` on one split of a built dataset.

  Args:
    params: network parameters.
    model_cfg: the network's config.
    data: the run's `config.data` (eval batch sizes and loader settings).
    dataset_dir: the built dataset.
    split: split name.
    max_queries: the first this many captions of the split (their Gram matrices are
      max_queries^2 floats).
    max_videos: the first this many videos for the clip-token part (None: all).
    progress: tqdm bars.

  Returns:
    {'split', 'query': `query_collapse`'s dict, 'clip_token': `clip_token_collapse`'s dict}.
  """
  if max_queries < 2:
    raise ConfigError(f"max_queries must be >= 2, got {max_queries}")
  params = place_params(params)
  num_videos = pipeline.open_split(dataset_dir, split).num_videos
  return {
      "split": split,
      "query": query_collapse(params, model_cfg, data, dataset_dir, split, max_queries=max_queries,
                              progress=progress),
      "clip_token": clip_token_collapse(params, model_cfg, data, dataset_dir, split,
                                        max_videos=num_videos if max_videos is None else max_videos,
                                        progress=progress),
  }
