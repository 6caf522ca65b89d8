"""Corpus evaluation: encode videos and queries in fixed-size chunks, rank by counting.

Memory is bounded by the chunk sizes for any corpus size: video tokens are encoded chunk by chunk
into host memory, and query scores are computed against one chunk of videos at a time; a query's
rank is 1 + the number of videos scored above its best ground-truth video, accumulated over
chunks, so no (queries x videos) matrix and no sort is ever built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prvr_jax.eval.metrics import recall_at_k
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.similarity import l2_normalize
from prvr_jax.ops.video_inputs import prepare_video_inputs


@dataclasses.dataclass
class EncodedCorpus:
  """L2-normalised video tokens of a corpus (host arrays).

  Attributes:
    clip_tokens: (N, K, D) clip-branch tokens.
    frame_tokens: (N, F, D) frame-branch tokens (zero where the frame is masked).
    clip_spans: (N, K, 2) int32 [start, end) frame span (of the 128 resampled rows) of each clip.
  """

  clip_tokens: np.ndarray
  frame_tokens: np.ndarray
  clip_spans: np.ndarray

  def __len__(self) -> int:
    return self.clip_tokens.shape[0]


def make_video_encoder(model_cfg: ModelConfig):
  """jit fn(params, frames (C, F, D_v) un-normalised resampled) -> (clip (C,K,D), frame (C,F,D), spans)."""
  model = MSCNet(model_cfg)

  @jax.jit
  def encode(params, frames):
    inputs = prepare_video_inputs(frames)
    clip = model.apply({"params": params}, inputs["clip_video_features"], inputs["merge_size"],
                       method=MSCNet.encode_clips)
    frame = model.apply({"params": params}, inputs["frame_video_features"], inputs["videos_mask"],
                        method=MSCNet.encode_frames)
    return l2_normalize(clip), l2_normalize(frame), inputs["clip_spans"]

  return encode


def make_query_encoder(model_cfg: ModelConfig):
  """jit fn(params, text_feat (C, L, D_t), text_mask (C, L)) -> (C, D) normalised queries."""
  model = MSCNet(model_cfg)

  @jax.jit
  def encode(params, text_feat, text_mask):
    query, _ = model.apply({"params": params}, text_feat, text_mask, method=MSCNet.encode_query)
    return l2_normalize(query)

  return encode


def encode_corpus(params: Any, model_cfg: ModelConfig,
                  chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> EncodedCorpus:
  """Encodes (frames (C, F, D_v), valid (C,) bool) chunks of a fixed size C; padding is dropped."""
  encode = make_video_encoder(model_cfg)
  clips, frames, spans = [], [], []
  for chunk_frames, valid in chunks:
    c, f, s = jax.device_get(encode(params, jnp.asarray(chunk_frames)))
    valid = np.asarray(valid, bool)
    clips.append(c[valid])
    frames.append(f[valid])
    spans.append(s[valid])
  if not clips:
    raise ValueError("encode_corpus: the corpus has no videos")
  return EncodedCorpus(np.concatenate(clips), np.concatenate(frames), np.concatenate(spans))


@jax.jit
def _chunk_scores(queries: jax.Array, clip_tokens: jax.Array, frame_tokens: jax.Array,
                  clip_weight: float, frame_weight: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(Q, D) x (C, K, D) x (C, F, D) -> clip, frame, fused scores (Q, C), all cosine."""
  clip = jnp.max(jnp.einsum("qd,ckd->qck", queries, clip_tokens), axis=-1)
  frame = jnp.max(jnp.einsum("qd,cfd->qcf", queries, frame_tokens), axis=-1)
  return clip, frame, clip_weight * clip + frame_weight * frame


def rank_queries(queries: np.ndarray, gt_video: np.ndarray, corpus: EncodedCorpus,
                 video_chunk: int = 256, clip_weight: float = 0.4,
                 frame_weight: float = 0.6) -> dict[str, np.ndarray]:
  """1-based rank of each query's ground-truth video under the clip, frame and fused scores.

  Args:
    queries: (M, D) normalised query vectors.
    gt_video: (M,) int index of each query's ground-truth video in the corpus.
    corpus: the encoded videos.
    video_chunk: videos scored per call (bounds memory to M x video_chunk x tokens).
    clip_weight / frame_weight: fusion weights.

  Returns:
    {'fused': (M,), 'clip': (M,), 'frame': (M,)} int ranks.
  """
  n = len(corpus)
  gt_video = np.asarray(gt_video)
  if gt_video.min() < 0 or gt_video.max() >= n:
    raise ValueError(f"ground-truth video index out of range [0, {n})")
  q = jnp.asarray(queries)
  gt_scores = [np.asarray(v) for v in _diag_scores(q, jnp.asarray(corpus.clip_tokens[gt_video]),
                                                   jnp.asarray(corpus.frame_tokens[gt_video]),
                                                   clip_weight, frame_weight)]
  better = [np.zeros(len(gt_video), np.int64) for _ in range(3)]
  for start in range(0, n, video_chunk):  # host loop over fixed-size chunks, one jitted call each
    stop = min(start + video_chunk, n)
    pad = video_chunk - (stop - start)
    clip_tok = np.pad(corpus.clip_tokens[start:stop], ((0, pad), (0, 0), (0, 0)))
    frame_tok = np.pad(corpus.frame_tokens[start:stop], ((0, pad), (0, 0), (0, 0)))
    scores = _chunk_scores(q, jnp.asarray(clip_tok), jnp.asarray(frame_tok), clip_weight, frame_weight)
    # The gt video itself never counts, even if its chunk score differs from the direct one in
    # the last bit.
    not_gt = (np.arange(start, stop)[None, :] != gt_video[:, None])
    for i, s in enumerate(scores):
      s = np.asarray(s)[:, : stop - start]
      better[i] += np.sum((s > gt_scores[i][:, None]) & not_gt, axis=1)
  return {"clip": better[0] + 1, "frame": better[1] + 1, "fused": better[2] + 1}


@jax.jit
def _diag_scores(queries, clip_tokens, frame_tokens, clip_weight, frame_weight):
  """Score of query i against its own video i. (M, D), (M, K, D), (M, F, D) -> 3 x (M,)."""
  clip = jnp.max(jnp.einsum("md,mkd->mk", queries, clip_tokens), axis=-1)
  frame = jnp.max(jnp.einsum("md,mfd->mf", queries, frame_tokens), axis=-1)
  return clip, frame, clip_weight * clip + frame_weight * frame


def recall_report(ranks: dict[str, np.ndarray]) -> dict[str, Any]:
  """Fused R@k/SumR at the top level plus `clip` and `frame` sub-objects."""
  report: dict[str, Any] = dict(recall_at_k(ranks["fused"]))
  report["clip"] = recall_at_k(ranks["clip"])
  report["frame"] = recall_at_k(ranks["frame"])
  return report
