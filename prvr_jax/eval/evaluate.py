"""Corpus evaluation of text-to-video retrieval: encode in fixed-size chunks, rank by counting.

`evaluate_split` runs three stages:
  1. Videos: the eval video dataset's padded batches of C videos (chunks) are encoded on the
     device (OP-ToMe, clip and frame branches, L2 normalisation) and copied to host memory as
     numpy; padded items are dropped by their validity mask.
  2. Queries: padded batches encoded to L2-normalised pooled vectors, copied to host likewise.
  3. Ranking: a query's rank is 1 + the number of videos scored strictly above its ground-truth
     video (ties do not count, as in `metrics.count_better` on a full matrix). Scores are cosine
     similarities maxed over a video's clip tokens and over its frame tokens, and their fusion
     clip_weight * clip + frame_weight * frame. The corpus is scored chunk by chunk against query
     batches of Qb, so the largest score array on the device is (3, Qb, C); no full sort and no
     (queries x videos) matrix exist anywhere; ranks are counts accumulated over chunks. Pass 1 visits only the chunks holding each query
     batch's ground-truth videos and keeps their score; pass 2 counts every chunk against it.
     Both passes run one compiled kernel on the same (query batch, chunk) pairs, so a ground-truth
     score is bit-identical in both and ties are settled exactly as on a full matrix.

Memory. Device: one chunk of video tokens (C x (K + F) x D), the query vectors (Q x D) and one
(Qb, C, F) query-token similarity block: bounded by the chunk sizes for any corpus size. Host: the encoded
corpus, N x (K + F) x D float32 (1.2 GB for ActivityNet's 4,917 val videos). Keeping the tokens on
host rather than re-streaming the dataset for each query batch means every video is encoded once:
encoding is most of the evaluation's time.

Masked frames: the frame branch zeroes them, and a zero token would score 0 against every query,
above any negative score. A max over tokens does not change when a token is duplicated, so masked
frame tokens are replaced by the video's first valid frame token: they can never win, and scoring
needs no mask. (The pipeline's 128 resampled rows are all valid; this guards other inputs.)

Devices: with a 1-D `data` mesh, each chunk's videos are split over the devices, for encoding
and for scoring (C must divide by the device count); queries and parameters are replicated.

Multi-process: each process loads and encodes its share of the videos and queries on its own
devices (its part of the mesh); the encoded corpora are gathered on host so that each process ranks
its queries against the whole corpus, and the ranks are gathered (see gather.py): every process
ends with the metrics one process would compute. Parameters replicated over a multi-process
training mesh are read from this process's replica.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding

from prvr_jax.data import pipeline
from prvr_jax.data.config import DataConfig
from prvr_jax.errors import ConfigError
from prvr_jax.eval import gather
from prvr_jax.eval.config import EvalConfig
from prvr_jax.eval.metrics import best_gt_score, count_above, recall_at_k
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.similarity import fused_scores, l2_normalize, max_token_scores
from prvr_jax.ops.video_inputs import prepare_video_inputs
from prvr_jax.parallel import DATA_AXIS, batch_sharding, replicated
from prvr_jax.utils.files import atomic_write_text

# Order of the three scores along the leading axis of the ranking kernel's arrays.
SCORE_KINDS: tuple[str, ...] = ("fused", "clip", "frame")
# Queries per ranking call: large enough for an efficient (Qb, D) x (D, C * F) product.
DEFAULT_RANK_QUERY_BATCH = 512


# ----------------------------------------------------------------------------------------------
# Encoded corpus and queries (host arrays).


@dataclasses.dataclass
class EncodedCorpus:
  """L2-normalised video tokens of a corpus, valid videos only, in encoding order (host arrays).

  Attributes:
    clip_tokens: (N, K, D) float32 clip-branch tokens.
    frame_tokens: (N, F, D) float32 frame-branch tokens (masked frames hold a valid frame's token).
    clip_spans: (N, K, 2) int32 [start, end) span of each clip token in the F resampled frames.
    video_index: (N,) int32 index of each video in its split.
    chunk_size: C, videos per encoding batch (ranking scores the corpus in chunks of this size).
  """

  clip_tokens: np.ndarray
  frame_tokens: np.ndarray
  clip_spans: np.ndarray
  video_index: np.ndarray
  chunk_size: int

  def __len__(self) -> int:
    return self.clip_tokens.shape[0]


@dataclasses.dataclass
class EncodedQueries:
  """L2-normalised pooled query vectors, valid queries only (host arrays).

  Attributes:
    vectors: (M, D) float32.
    gt_video_index: (M,) int32 split index of each query's ground-truth video.
    query_index: (M,) int32 index of each query (caption) in its split.
  """

  vectors: np.ndarray
  gt_video_index: np.ndarray
  query_index: np.ndarray

  def __len__(self) -> int:
    return self.vectors.shape[0]


# ----------------------------------------------------------------------------------------------
# Devices.


def _check_mesh(mesh: Mesh) -> Mesh:
  """This process's part of `mesh`, with Auto axis types (GSPMD partitions the encoders from the
  input sharding): every process evaluates the whole split on its own devices."""
  if tuple(mesh.axis_names) != (DATA_AXIS,):
    raise ValueError(f"evaluation needs a 1-D mesh with axis {DATA_AXIS!r}, got axes {mesh.axis_names}")
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if not local:
    raise ValueError("the evaluation mesh holds no device of this process")
  return Mesh(np.asarray(local), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _put(x: Any, sharding: Optional[NamedSharding]) -> Any:
  return jax.device_put(x, sharding) if sharding is not None else jax.device_put(x)


def _local_copy(x: Any) -> Any:
  """This process's replica of an array replicated over a multi-process mesh (the training
  state's parameters); other values unchanged."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError("evaluation needs the parameters replicated on every device (got an array "
                       f"sharded as {x.sharding})")
    return x.addressable_data(0)
  return x


def place_params(params: Any, mesh: Optional[Mesh] = None) -> Any:
  """`params` replicated over `mesh` (or on the default device); from a multi-process training
  state, this process's replica is used."""
  params = jax.tree_util.tree_map(_local_copy, params)
  return _put(params, replicated(mesh) if mesh is not None else None)


def _check_chunk(video_chunk: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if video_chunk % n:
    raise ConfigError(f"the video chunk of {video_chunk} videos (data.eval_video_batch_size) does not "
                     f"divide by the {n} devices of the evaluation mesh; use a multiple of {n}")


def _shardings(mesh: Optional[Mesh], batch: int) -> tuple[Optional[NamedSharding], Optional[NamedSharding]]:
  """(replicated, split over `data` when `batch` divides by the device count else replicated)."""
  if mesh is None:
    return None, None
  split = batch_sharding(mesh) if batch % mesh.devices.size == 0 else replicated(mesh)
  return replicated(mesh), split


# ----------------------------------------------------------------------------------------------
# Encoders.


def fill_masked_tokens(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Replaces masked tokens by the first valid token of their video (see the module docstring).

  Args:
    tokens: (B, F, D) tokens.
    mask: (B, F) {0, 1} or bool, 1 where the token is valid.

  Returns:
    (B, F, D); a max over tokens of any score is then the max over valid tokens only.
  """
  valid = mask > 0
  first = jnp.argmax(valid, axis=1)
  fill = jnp.take_along_axis(tokens, first[:, None, None], axis=1)
  return jnp.where(valid[..., None], tokens, fill)


# Videos per device in one step of the video encoder's on-device loop over a chunk (see
# `encoder_sub_batch`). On CPU, 4-8 videos per step encode 10-25% faster per video than a whole
# chunk of 25-40 at once: a step's activations (the 8 DyGMM branch outputs and the (L, 4D) FFN
# hidden states) then stay in cache.
VIDEO_SUB_BATCH = 6


def encoder_sub_batch(chunk: int, devices: int = 1, target: int = VIDEO_SUB_BATCH) -> int:
  """Videos per step of the encoder's loop over a chunk of `chunk` videos.

  The divisor s of `chunk / devices` closest to `target` (in ratio; ties to the larger) times
  `devices`, so that the steps split evenly over the devices of a data mesh; `chunk` itself
  (one step) when `devices` does not divide it.
  """
  if chunk % devices:
    return chunk
  per_device = chunk // devices
  divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
  best = min(divisors, key=lambda d: (abs(np.log(d / target)), -d))
  return best * devices


def map_sub_batches(fn: Callable[[jax.Array], Any], frames: jax.Array, sub_batch: int) -> Any:
  """fn applied to groups of `sub_batch` videos in an on-device loop; outputs in input order.

  Args:
    fn: maps (S, ...) videos to a pytree of (S, ...) arrays, row i depending on video i only.
    frames: (C, ...) videos, C a multiple of `sub_batch`.
    sub_batch: S (static).

  Returns:
    fn's pytree with (C, ...) leaves, equal to fn(frames) up to float rounding.

  Step j takes videos j, j + C/S, j + 2C/S, ...: with the chunk split over n devices in blocks and
  n dividing S, every step holds S/n videos of each device, so the loop runs without moving data
  between devices.
  """
  chunk = frames.shape[0]
  if sub_batch >= chunk:
    return fn(frames)
  if chunk % sub_batch:
    raise ValueError(f"a chunk of {chunk} videos does not split into steps of {sub_batch}")
  steps = chunk // sub_batch
  grouped = jnp.swapaxes(frames.reshape((sub_batch, steps) + frames.shape[1:]), 0, 1)
  outs = jax.lax.map(fn, grouped)  # leaves (steps, S, ...)
  return jax.tree_util.tree_map(
      lambda o: jnp.swapaxes(o, 0, 1).reshape((chunk,) + o.shape[2:]), outs)


@functools.lru_cache(maxsize=None)
def make_video_encoder(model_cfg: ModelConfig) -> Callable[[Any, jax.Array], tuple[jax.Array, ...]]:
  """A jitted fn(params, frames (C, F, D_v) un-normalised resampled) ->
  (clip tokens (C, K, D), frame tokens (C, F, D), clip spans (C, K, 2)), tokens L2-normalised.

  Cached per config so that repeated evaluations reuse the compiled program; the device split
  follows the sharding of `frames`. Videos are encoded independently, in steps of
  `encoder_sub_batch(C, local device count)` videos (an on-device loop).
  """
  model = MSCNet(model_cfg)

  def encode_group(params, frames):
    inputs = prepare_video_inputs(frames, use_op_tome=model_cfg.use_op_tome)
    clip = model.apply({"params": params}, inputs["clip_video_features"], inputs["merge_size"],
                       method=MSCNet.encode_clips)
    frame = model.apply({"params": params}, inputs["frame_video_features"], inputs["videos_mask"],
                        method=MSCNet.encode_frames)
    frame = fill_masked_tokens(l2_normalize(frame), inputs["videos_mask"])
    return l2_normalize(clip), frame, inputs["clip_spans"]

  @jax.jit
  def encode(params, frames):
    sub_batch = encoder_sub_batch(frames.shape[0], jax.local_device_count())
    return map_sub_batches(functools.partial(encode_group, params), frames, sub_batch)

  return encode


# The caption arrays of a query batch: token features, or token ids for an in-model CLIP tower.
CAPTION_KEYS = ("text_feat", "text_mask", "caption_ids", "caption_id_mask")


def caption_arrays(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The caption inputs of a query batch (`text_feat` / `text_mask` or `caption_ids` /
  `caption_id_mask`), as `make_query_encoder`'s function takes them."""
  return {k: batch[k] for k in CAPTION_KEYS if k in batch}


@functools.lru_cache(maxsize=None)
def make_query_encoder(model_cfg: ModelConfig) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
  """A jitted fn(params, captions) -> (B, D) L2-normalised queries; captions: `text_feat`
  (B, L, D_t) and `text_mask` (B, L), or for a model with a caption tower `caption_ids` and
  `caption_id_mask` (B, L0) (see `MSCNet.caption_inputs`)."""
  model = MSCNet(model_cfg)

  @jax.jit
  def encode(params, captions):
    query, _ = model.apply({"params": params}, captions, method=MSCNet.encode_captions)
    return l2_normalize(query)

  return encode


def _progress(items: Iterable[Any], progress: bool, desc: str, total: Optional[int]) -> Iterable[Any]:
  return tqdm.tqdm(items, desc=desc, total=total, unit="batch", disable=not progress, leave=False)


def encode_videos(params: Any, model_cfg: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
                  mesh: Optional[Mesh] = None, progress: bool = False,
                  total: Optional[int] = None) -> EncodedCorpus:
  """Encodes padded fixed-size video batches; padded items are dropped.

  Args:
    params: network parameters.
    model_cfg: the network's config.
    batches: dicts with `video_frames` (C, F, D_v) un-normalised resampled frames, `video_valid`
      (C,) bool and `video_index` (C,) int32, C the same for every batch (one compiled program).
    mesh: a 1-D `data` mesh; C must divide by the number of this process's devices in it.
    progress: show a tqdm bar.
    total: number of batches, for the bar.

  Returns:
    The corpus on host.
  """
  encode = make_video_encoder(model_cfg)
  mesh = _check_mesh(mesh) if mesh is not None else None
  params = place_params(params, mesh)
  parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)

  def collect(out, valid, index):
    for name, x in zip(("clip_tokens", "frame_tokens", "clip_spans"), jax.device_get(out)):
      parts[name].append(np.asarray(x)[valid])
    parts["video_index"].append(index[valid])

  pending, chunk_size = None, 0
  for batch in _progress(batches, progress, "encode videos", total):
    frames = batch["video_frames"]
    if not chunk_size:
      chunk_size = frames.shape[0]
      if mesh is not None:
        _check_chunk(chunk_size, mesh)
    out = encode(params, _put(frames, batch_sharding(mesh) if mesh is not None else None))
    # Copy the previous chunk out while the device works on this one.
    if pending is not None:
      collect(*pending)
    pending = (out, np.asarray(batch["video_valid"], bool), np.asarray(batch["video_index"], np.int32))
  if pending is not None:
    collect(*pending)
  if not parts["video_index"] or sum(len(v) for v in parts["video_index"]) == 0:
    raise ValueError("encode_videos: no valid video in the batches")
  return EncodedCorpus(**{k: np.concatenate(v) for k, v in parts.items()}, chunk_size=chunk_size)


def encode_queries(params: Any, model_cfg: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
                   mesh: Optional[Mesh] = None, progress: bool = False,
                   total: Optional[int] = None) -> EncodedQueries:
  """Encodes padded fixed-size query batches; padded items are dropped.

  Args:
    params: network parameters.
    model_cfg: the network's config.
    batches: dicts with `text_feat` (B, L, D_t) and `text_mask` (B, L) (or `caption_ids` /
      `caption_id_mask` (B, L0) for a model with a caption tower), `query_valid` (B,) bool,
      `query_index` (B,) and `gt_video_index` (B,) int32, B and L the same for every batch.
    mesh: a 1-D `data` mesh; batches are split over this process's devices of it when B
      divides by their number, else replicated.
    progress: show a tqdm bar.
    total: number of batches, for the bar.

  Returns:
    The queries on host.
  """
  encode = make_query_encoder(model_cfg)
  mesh = _check_mesh(mesh) if mesh is not None else None
  params = place_params(params, mesh)
  vectors, gts, indices = [], [], []
  for batch in _progress(batches, progress, "encode queries", total):
    _, split = _shardings(mesh, batch["query_valid"].shape[0])
    q = encode(params, {k: _put(v, split) for k, v in caption_arrays(batch).items()})
    valid = np.asarray(batch["query_valid"], bool)
    vectors.append(np.asarray(jax.device_get(q))[valid])
    gts.append(np.asarray(batch["gt_video_index"], np.int32)[valid])
    indices.append(np.asarray(batch["query_index"], np.int32)[valid])
  if not vectors or sum(len(v) for v in vectors) == 0:
    raise ValueError("encode_queries: no valid query in the batches")
  return EncodedQueries(np.concatenate(vectors), np.concatenate(gts), np.concatenate(indices))


# ----------------------------------------------------------------------------------------------
# Ranking.


@functools.lru_cache(maxsize=None)
def _chunk_kernel(clip_weight: float, frame_weight: float) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """jit fn(queries (Qb, D), gt_pos (Qb,), clip (C, K, D), frame (C, F, D), start, num_videos,
  best (3, Qb), counts (3, Qb)) -> (max(best, gt score in this chunk), counts + videos of this
  chunk scored above `best`), for the fused, clip and frame scores.

  Video positions of the chunk are start + [0, C); positions >= num_videos are padding.
  """

  @jax.jit
  def kernel(queries, gt_pos, clip_tokens, frame_tokens, start, num_videos, best, counts):
    clip = max_token_scores(queries, clip_tokens, normalize=False)  # tokens are unit vectors
    frame = max_token_scores(queries, frame_tokens, normalize=False)
    scores = jnp.stack([fused_scores(clip, frame, clip_weight, frame_weight), clip, frame])
    positions = start + jnp.arange(clip_tokens.shape[0], dtype=jnp.int32)
    gt_mask = gt_pos[:, None] == positions[None, :]  # (Qb, C)
    # A ground truth never counts against itself; on a full matrix it cannot either (s > s fails).
    counted = (positions < num_videos)[None, :] & ~gt_mask
    new_counts = counts + count_above(scores, best[..., None], counted)
    return jnp.maximum(best, best_gt_score(scores, gt_mask)), new_counts

  return kernel


def _gt_positions(corpus: EncodedCorpus, gt_video_index: np.ndarray) -> np.ndarray:
  """Position in the corpus of each query's ground-truth video. (M,) -> (M,) int32."""
  order = np.argsort(corpus.video_index, kind="stable")
  ids = corpus.video_index[order]
  at = np.minimum(np.searchsorted(ids, gt_video_index), len(ids) - 1)
  missing = ids[at] != gt_video_index
  if missing.any():
    raise ValueError(f"{int(missing.sum())} queries have a ground-truth video that is not in the corpus "
                     f"(e.g. video index {int(gt_video_index[missing][0])})")
  return order[at].astype(np.int32)


def _padded(x: np.ndarray, rows: int, fill: Any = 0) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, x.dtype)
  return np.concatenate([x, pad])


def rank_queries(queries: EncodedQueries, corpus: EncodedCorpus, *, video_chunk: int,
                 query_batch: int = DEFAULT_RANK_QUERY_BATCH, clip_weight: float = EvalConfig.clip_weight,
                 frame_weight: float = EvalConfig.frame_weight,
                 mesh: Optional[Mesh] = None) -> dict[str, np.ndarray]:
  """1-based rank of each query's ground-truth video under the fused, clip and frame scores.

  Args:
    queries: M encoded queries; `gt_video_index` must name videos of the corpus.
    corpus: N encoded videos.
    video_chunk: C, videos per scoring call (the last chunk is padded); with a mesh, C must
      divide by its size and the chunk's videos are split over the devices.
    query_batch: Qb, queries per scoring call (the last batch is padded).
    clip_weight, frame_weight: weights of the fused score.
    mesh: a 1-D `data` mesh (this process's devices of it are used), or None.

  Returns:
    {'fused', 'clip', 'frame'}: (M,) int64 ranks, in the order of `queries`.
  """
  if video_chunk < 1 or query_batch < 1:
    raise ValueError(f"video_chunk ({video_chunk}) and query_batch ({query_batch}) must be positive")
  n, m = len(corpus), len(queries)
  mesh = _check_mesh(mesh) if mesh is not None else None
  if mesh is not None:
    _check_chunk(video_chunk, mesh)
  rep, _ = _shardings(mesh, query_batch)
  video_split = batch_sharding(mesh) if mesh is not None else None
  kernel = _chunk_kernel(float(clip_weight), float(frame_weight))
  gt_pos = _gt_positions(corpus, np.asarray(queries.gt_video_index, np.int32))

  num_batches = -(-m // query_batch)
  num_chunks = -(-n // video_chunk)
  q_rows = _padded(np.asarray(queries.vectors, np.float32), num_batches * query_batch)
  gt_rows = _padded(gt_pos, num_batches * query_batch, -1)  # -1: no video, never a ground truth
  batch_slices = [slice(b * query_batch, (b + 1) * query_batch) for b in range(num_batches)]
  q_dev = [_put(q_rows[s], rep) for s in batch_slices]
  gt_dev = [_put(gt_rows[s], rep) for s in batch_slices]
  best = [_put(np.full((len(SCORE_KINDS), query_batch), -np.inf, np.float32), rep)
          for _ in range(num_batches)]
  counts = [_put(np.zeros((len(SCORE_KINDS), query_batch), np.int32), rep) for _ in range(num_batches)]
  n_dev = _put(np.int32(n), rep)

  def chunk(c: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    sl = slice(c * video_chunk, (c + 1) * video_chunk)
    return (_put(_padded(corpus.clip_tokens[sl], video_chunk), video_split),
            _put(_padded(corpus.frame_tokens[sl], video_chunk), video_split),
            _put(np.int32(c * video_chunk), rep))

  # Pass 1: the ground-truth scores, from the chunks that hold a batch's ground truths.
  batches_of_chunk: dict[int, list[int]] = collections.defaultdict(list)
  for b, s in enumerate(batch_slices):
    for c in np.unique(gt_rows[s][gt_rows[s] >= 0] // video_chunk):
      batches_of_chunk[int(c)].append(b)
  for c in sorted(batches_of_chunk):
    clip_c, frame_c, start = chunk(c)
    for b in batches_of_chunk[c]:
      best[b], _ = kernel(q_dev[b], gt_dev[b], clip_c, frame_c, start, n_dev, best[b], counts[b])
  # Pass 2: count, chunk by chunk, the videos above each query's ground truth.
  for c in range(num_chunks):
    clip_c, frame_c, start = chunk(c)
    for b in range(num_batches):
      best[b], counts[b] = kernel(q_dev[b], gt_dev[b], clip_c, frame_c, start, n_dev, best[b], counts[b])
  better = np.concatenate(jax.device_get(counts), axis=1)[:, :m].astype(np.int64)
  return {kind: 1 + better[i] for i, kind in enumerate(SCORE_KINDS)}


def recall_report(ranks: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Fused R@k / SumR at the top level plus `clip` and `frame` sub-dicts (same keys)."""
  report: dict[str, Any] = dict(recall_at_k(ranks["fused"]))
  report["clip"] = recall_at_k(ranks["clip"])
  report["frame"] = recall_at_k(ranks["frame"])
  return report


# ----------------------------------------------------------------------------------------------
# A split of a built dataset.


def evaluate_split_with_ranks(params: Any, model_cfg: ModelConfig, data: DataConfig,
                              eval_cfg: EvalConfig, dataset_dir: str, split: str, *,
                              mesh: Optional[Mesh] = None, progress: bool = True
                              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`evaluate_split` that also returns the ranks ({'fused', 'clip', 'frame'}: (M,) int64)."""
  t0 = time.perf_counter()
  # Each process loads its share of the split (see the module docstring).
  videos, queries = pipeline.eval_from_config(data, dataset_dir, split,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count(),
                                              caption_text_length=model_cfg.caption_token_length,
                                              caption_context_length=model_cfg.caption_context_length)
  corpus = encode_videos(params, model_cfg, pipeline.iterator_from_config(data, videos), mesh=mesh,
                         progress=progress, total=len(videos))
  encoded = encode_queries(params, model_cfg, pipeline.iterator_from_config(data, queries), mesh=mesh,
                           progress=progress, total=len(queries))
  if jax.process_count() > 1:
    whole = gather.allgather_rows(dict(clip_tokens=corpus.clip_tokens, frame_tokens=corpus.frame_tokens,
                                       clip_spans=corpus.clip_spans, video_index=corpus.video_index))
    corpus = EncodedCorpus(**whole, chunk_size=corpus.chunk_size)
  ranks = rank_queries(encoded, corpus, video_chunk=corpus.chunk_size, clip_weight=eval_cfg.clip_weight,
                       frame_weight=eval_cfg.frame_weight, mesh=mesh)
  if jax.process_count() > 1:
    ranks = {k: v.astype(np.int64) for k, v in gather.in_split_order(ranks, encoded.query_index).items()}
  report = recall_report(ranks)
  report["num_queries"] = len(ranks["fused"])
  report["num_videos"] = len(corpus)
  logging.info("eval %s: %d queries x %d videos in %.1f s: SumR %.2f (R@1 %.2f R@5 %.2f R@10 %.2f "
               "R@100 %.2f), clip SumR %.2f, frame SumR %.2f", split, len(ranks["fused"]), len(corpus),
               time.perf_counter() - t0, report["SumR"], report["R@1"], report["R@5"], report["R@10"],
               report["R@100"], report["clip"]["SumR"], report["frame"]["SumR"])
  return report, ranks


def evaluate_split(params: Any, model_cfg: ModelConfig, data: DataConfig, eval_cfg: EvalConfig,
                   dataset_dir: str, split: str, *, mesh: Optional[Mesh] = None,
                   progress: bool = True) -> dict[str, Any]:
  """Text-to-video retrieval metrics of `params` on one split of a built dataset.

  Args:
    params: network parameters.
    model_cfg: the network's config.
    data: the run's `config.data` (eval batch sizes and loader settings).
    eval_cfg: the run's `config.eval` (`clip_weight` / `frame_weight`: the score fusion).
    dataset_dir: the built dataset (see `prvr_jax.data.prepare`).
    split: split name.
    mesh: a 1-D `data` mesh (e.g. the training mesh): each video chunk is split over this
      process's devices of it; data.eval_video_batch_size must divide by their number.
    progress: tqdm bars for video and query encoding.

  Returns:
    {'R@1', 'R@5', 'R@10', 'R@100', 'SumR'} (percent, fused score), 'clip' and 'frame' dicts with
    the same keys, 'num_queries' and 'num_videos'.
  """
  return evaluate_split_with_ranks(params, model_cfg, data, eval_cfg, dataset_dir, split, mesh=mesh,
                                   progress=progress)[0]


def write_eval_report(report: Mapping[str, Any], workdir: str | os.PathLike, split: str) -> str:
  """Writes `report` as JSON to <workdir>/eval_<split>.json atomically; returns the path."""
  path = os.path.join(os.fspath(workdir), f"eval_{split}.json")
  atomic_write_text(path, json.dumps(report, indent=2) + "\n")
  return path
