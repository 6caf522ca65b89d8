"""Corpus evaluation of text-to-video retrieval: encode in fixed-size chunks, rank by counting.

`evaluate_split` runs four stages:
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
     score is bit-identical in both and ties are settled exactly as on a full matrix. Pass 2 also
     keeps each query's running top-k videos by fused score (`lax.top_k` over the k kept and the
     C new ones) and, from the chunk holding its ground-truth video, that video's moment
     (`ops.moments.choose_moment` on its column of the similarities: what search returns).
  4. Report: R@k, MedR and MnR from the ranks (`metrics`), the moment metrics where the split has
     annotations (`moment_metrics`).

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
from prvr_jax.data.builders.records import UNKNOWN
from prvr_jax.eval.metrics import best_gt_score, count_above, rank_statistics, recall_at_k
from prvr_jax.eval.moment_metrics import moment_report
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops import moments
from prvr_jax.ops.similarity import fused_scores, l2_normalize
from prvr_jax.ops.video_inputs import prepare_video_inputs
from prvr_jax.parallel import DATA_AXIS, batch_sharding, replicated
from prvr_jax.utils.files import atomic_write_text

# Order of the three scores along the leading axis of the ranking kernel's arrays.
SCORE_KINDS: tuple[str, ...] = ("fused", "clip", "frame")
# Queries per ranking call: large enough for an efficient (Qb, D) x (D, C * F) product.
DEFAULT_RANK_QUERY_BATCH = 512
# Videos kept per query by fused score: the per-query records' top list.
TOP_VIDEOS = 10


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
    durations: (N,) float32 seconds (-1 unknown), or None: moments are then in resampled rows.
    num_feature_frames: (N,) int32 raw frame count T of each video (with `durations`).
  """

  clip_tokens: np.ndarray
  frame_tokens: np.ndarray
  clip_spans: np.ndarray
  video_index: np.ndarray
  chunk_size: int
  durations: Optional[np.ndarray] = None
  num_feature_frames: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return self.clip_tokens.shape[0]

  def token_spans(self) -> tuple[np.ndarray, np.ndarray]:
    """(clip (N, K, 2), frame (N, F, 2)) float32 time span of every token, as search gives them.

    Seconds (`ops.moments.rows_to_seconds`) when the durations and frame counts are known;
    otherwise resampled rows ([start, end) of a clip token, [r, r + 1) of frame token r). A
    video of unknown duration (-1) gets negative spans: its moments are not scored.
    """
    n, f = self.frame_tokens.shape[:2]
    frame_rows = moments.frame_row_spans(n, f)
    if self.durations is None or self.num_feature_frames is None:
      return self.clip_spans.astype(np.float32), frame_rows.astype(np.float32)
    frames = np.maximum(self.num_feature_frames, 1)
    return (moments.rows_to_seconds(self.clip_spans, frames, self.durations, f),
            moments.rows_to_seconds(frame_rows, frames, self.durations, f))

  def host_arrays(self) -> dict[str, np.ndarray]:
    """Every per-video array by field name (what multi-process evaluation gathers)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "chunk_size" and getattr(self, f.name) is not None}


@dataclasses.dataclass
class EncodedQueries:
  """L2-normalised pooled query vectors, valid queries only (host arrays).

  Attributes:
    vectors: (M, D) float32.
    gt_video_index: (M,) int32 split index of each query's ground-truth video.
    query_index: (M,) int32 index of each query (caption) in its split.
    gt_moments: (M, 2) float32 annotated [start, end] seconds (-1: none), or None.
  """

  vectors: np.ndarray
  gt_video_index: np.ndarray
  query_index: np.ndarray
  gt_moments: Optional[np.ndarray] = None

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


# (EncodedCorpus field, batch key, dtype) of the per-video bookkeeping kept from the batches.
_VIDEO_EXTRAS = (("video_index", "video_index", np.int32), ("durations", "duration", np.float32),
                 ("num_feature_frames", "num_feature_frames", np.int32))


# (EncodedQueries field, batch key, dtype) of the per-query bookkeeping kept from the batches.
_QUERY_EXTRAS = (("gt_video_index", "gt_video_index", np.int32),
                 ("query_index", "query_index", np.int32), ("gt_moments", "gt_moment", np.float32))


def encode_videos(params: Any, model_cfg: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
                  mesh: Optional[Mesh] = None, progress: bool = False,
                  total: Optional[int] = None) -> EncodedCorpus:
  """Encodes padded fixed-size video batches with the network; padded items are dropped.

  Args:
    params: network parameters.
    model_cfg: the network's config.
    batches: dicts with `video_frames` (C, F, D_v) un-normalised resampled frames, `video_valid`
      (C,) bool and `video_index` (C,) int32, C the same for every batch (one compiled program);
      optionally `duration` (C,) float32 and `num_feature_frames` (C,) int32 (moments in seconds).
    mesh: a 1-D `data` mesh; C must divide by the number of this process's devices in it.
    progress: show a tqdm bar.
    total: number of batches, for the bar.

  Returns:
    The corpus on host.
  """
  return encode_videos_with(make_video_encoder(model_cfg), params, batches, mesh=mesh,
                            progress=progress, total=total)


def encode_videos_with(encode: Callable[[Any, jax.Array], tuple[jax.Array, ...]], params: Any,
                       batches: Iterable[Mapping[str, np.ndarray]], *, mesh: Optional[Mesh] = None,
                       progress: bool = False, total: Optional[int] = None) -> EncodedCorpus:
  """`encode_videos` with any jitted encoder fn(params, frames (C, F, D_v)) -> (clip tokens
  (C, K, D), frame tokens (C, F, D), clip spans (C, K, 2)), tokens L2-normalised (the network's,
  or the CLIP baseline's features themselves)."""
  mesh = _check_mesh(mesh) if mesh is not None else None
  params = place_params(params, mesh)
  parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)

  def collect(out, valid, extras):
    for name, x in zip(("clip_tokens", "frame_tokens", "clip_spans"), jax.device_get(out)):
      parts[name].append(np.asarray(x)[valid])
    for name, x in extras.items():
      parts[name].append(x[valid])

  pending, chunk_size = None, 0
  for batch in _progress(batches, progress, "encode videos", total):
    frames = batch["video_frames"]
    if not chunk_size:
      chunk_size = frames.shape[0]
      if mesh is not None:
        _check_chunk(chunk_size, mesh)
    out = encode(params, _put(frames, batch_sharding(mesh) if mesh is not None else None))
    extras = {field: np.asarray(batch[key], dtype)
              for field, key, dtype in _VIDEO_EXTRAS if key in batch}
    # Copy the previous chunk out while the device works on this one.
    if pending is not None:
      collect(*pending)
    pending = (out, np.asarray(batch["video_valid"], bool), extras)
  if pending is not None:
    collect(*pending)
  if not parts["video_index"] or sum(len(v) for v in parts["video_index"]) == 0:
    raise ValueError("encode_videos: no valid video in the batches")
  return EncodedCorpus(**{k: np.concatenate(v) for k, v in parts.items()}, chunk_size=chunk_size)


def encode_queries(params: Any, model_cfg: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
                   mesh: Optional[Mesh] = None, progress: bool = False,
                   total: Optional[int] = None) -> EncodedQueries:
  """Encodes padded fixed-size query batches with the network; padded items are dropped.

  Args:
    params: network parameters.
    model_cfg: the network's config.
    batches: dicts with `text_feat` (B, L, D_t) and `text_mask` (B, L) (or `caption_ids` /
      `caption_id_mask` (B, L0) for a model with a caption tower), `query_valid` (B,) bool,
      `query_index` (B,) and `gt_video_index` (B,) int32, B and L the same for every batch;
      optionally `gt_moment` (B, 2) float32.
    mesh: a 1-D `data` mesh; batches are split over this process's devices of it when B
      divides by their number, else replicated.
    progress: show a tqdm bar.
    total: number of batches, for the bar.

  Returns:
    The queries on host.
  """
  return encode_queries_with(make_query_encoder(model_cfg), params, batches, mesh=mesh,
                             progress=progress, total=total)


def encode_queries_with(encode: Callable[[Any, dict[str, jax.Array]], jax.Array], params: Any,
                        batches: Iterable[Mapping[str, np.ndarray]], *, mesh: Optional[Mesh] = None,
                        progress: bool = False, total: Optional[int] = None) -> EncodedQueries:
  """`encode_queries` with any jitted encoder fn(params, captions) -> (B, D) L2-normalised
  vectors (the network's query encoder, or the CLIP baseline's EOS rows)."""
  mesh = _check_mesh(mesh) if mesh is not None else None
  params = place_params(params, mesh)
  parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
  for batch in _progress(batches, progress, "encode queries", total):
    _, split = _shardings(mesh, batch["query_valid"].shape[0])
    q = encode(params, {k: _put(v, split) for k, v in caption_arrays(batch).items()})
    valid = np.asarray(batch["query_valid"], bool)
    parts["vectors"].append(np.asarray(jax.device_get(q))[valid])
    for field, key, dtype in _QUERY_EXTRAS:
      if key in batch:
        parts[field].append(np.asarray(batch[key], dtype)[valid])
  if not parts["vectors"] or sum(len(v) for v in parts["vectors"]) == 0:
    raise ValueError("encode_queries: no valid query in the batches")
  return EncodedQueries(**{k: np.concatenate(v) for k, v in parts.items()})


# ----------------------------------------------------------------------------------------------
# Ranking.


@functools.lru_cache(maxsize=None)
def _chunk_kernel(clip_weight: float, frame_weight: float, top_k: int) -> Callable[..., dict]:
  """jit fn(queries (Qb, D), gt_pos (Qb,), chunk, start, num_videos, state) -> state after this
  chunk of videos, for one query batch.

  chunk: `clip_tokens` (C, K, D), `frame_tokens` (C, F, D), `clip_spans` (C, K, 2) and
  `frame_spans` (C, F, 2) float32 time spans. Video positions of the chunk are start + [0, C);
  positions >= num_videos are padding. state (`_initial_state`):
    best (3, Qb): max(best, ground-truth score in this chunk), fused / clip / frame;
    counts (3, Qb): + videos of this chunk scored strictly above `best`;
    moment (Qb, 2), branch (Qb,): the ground truth's moment (`ops.moments.choose_moment`, what
      search returns for that video), set by the chunk that holds it;
    top_score, top_pos (Qb, top_k): running top-k videos by fused score (ties: earlier position).
  """

  @jax.jit
  def kernel(queries, gt_pos, chunk, start, num_videos, state):
    clip_sim = jnp.einsum("qd,ckd->qck", queries, chunk["clip_tokens"])  # tokens are unit vectors
    frame_sim = jnp.einsum("qd,cfd->qcf", queries, chunk["frame_tokens"])
    clip, frame = jnp.max(clip_sim, axis=-1), jnp.max(frame_sim, axis=-1)
    scores = jnp.stack([fused_scores(clip, frame, clip_weight, frame_weight), clip, frame])
    size = clip_sim.shape[1]
    positions = start + jnp.arange(size, dtype=jnp.int32)
    gt_mask = gt_pos[:, None] == positions[None, :]  # (Qb, C)
    real = positions < num_videos
    # A ground truth never counts against itself; on a full matrix it cannot either (s > s fails).
    counted = real[None, :] & ~gt_mask
    out = dict(counts=state["counts"] + count_above(scores, state["best"][..., None], counted),
               best=jnp.maximum(state["best"], best_gt_score(scores, gt_mask)))
    # The ground truth's moment, from its column of the similarities when it is in this chunk.
    local = jnp.clip(gt_pos - start, 0, size - 1)
    column = lambda sim: jnp.take_along_axis(sim, local[:, None, None], axis=1)[:, 0]
    m = moments.choose_moment(column(clip_sim), column(frame_sim), chunk["clip_spans"][local],
                              chunk["frame_spans"][local], clip_weight, frame_weight)
    here = (gt_pos >= start) & (gt_pos < start + size)
    out["moment"] = jnp.where(here[:, None], jnp.stack([m.start, m.end], axis=-1), state["moment"])
    out["branch"] = jnp.where(here, m.branch, state["branch"])
    fused = jnp.where(real[None, :], scores[0], -jnp.inf)
    pos = jnp.broadcast_to(jnp.where(real, positions, -1), fused.shape)
    both_score = jnp.concatenate([state["top_score"], fused], axis=1)
    both_pos = jnp.concatenate([state["top_pos"], pos], axis=1)
    out["top_score"], top = jax.lax.top_k(both_score, top_k)
    out["top_pos"] = jnp.take_along_axis(both_pos, top, axis=1)
    return out

  return kernel


def _initial_state(query_batch: int, top_k: int) -> dict[str, np.ndarray]:
  """`_chunk_kernel`'s state before the first chunk."""
  kinds = len(SCORE_KINDS)
  return dict(best=np.full((kinds, query_batch), -np.inf, np.float32),
              counts=np.zeros((kinds, query_batch), np.int32),
              moment=np.full((query_batch, 2), np.nan, np.float32),
              branch=np.ones((query_batch,), np.int32),
              top_score=np.full((query_batch, top_k), -np.inf, np.float32),
              top_pos=np.full((query_batch, top_k), -1, np.int32))


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
                 frame_weight: float = EvalConfig.frame_weight, top_k: int = TOP_VIDEOS,
                 mesh: Optional[Mesh] = None) -> dict[str, np.ndarray]:
  """Rank of each query's ground-truth video under the fused, clip and frame scores, its moment,
  and the query's top-k videos.

  Args:
    queries: M encoded queries; `gt_video_index` must name videos of the corpus.
    corpus: N encoded videos.
    video_chunk: C, videos per scoring call (the last chunk is padded); with a mesh, C must
      divide by its size and the chunk's videos are split over the devices.
    query_batch: Qb, queries per scoring call (the last batch is padded).
    clip_weight, frame_weight: weights of the fused score.
    top_k: videos kept per query by fused score (the per-query records' list).
    mesh: a 1-D `data` mesh (this process's devices of it are used), or None.

  Returns:
    In the order of `queries`: 'fused', 'clip', 'frame': (M,) int64 1-based ranks (1 + videos
    scored strictly above); 'moment': (M, 2) float32 the moment search returns for the
    ground-truth video (seconds, or rows, see `EncodedCorpus.token_spans`); 'moment_branch':
    (M,) int32 (0 clip, 1 frame); 'top_videos': (M, top_k) int32 split indices of the best
    videos by fused score, best first (-1 past the corpus size; among tied scores the earlier
    video comes first, while the rank counts ties in the ground truth's favour).
  """
  if video_chunk < 1 or query_batch < 1 or top_k < 1:
    raise ValueError(f"video_chunk ({video_chunk}), query_batch ({query_batch}) and top_k "
                     f"({top_k}) must be positive")
  n, m = len(corpus), len(queries)
  mesh = _check_mesh(mesh) if mesh is not None else None
  if mesh is not None:
    _check_chunk(video_chunk, mesh)
  rep, _ = _shardings(mesh, query_batch)
  video_split = batch_sharding(mesh) if mesh is not None else None
  kernel = _chunk_kernel(float(clip_weight), float(frame_weight), int(top_k))
  gt_pos = _gt_positions(corpus, np.asarray(queries.gt_video_index, np.int32))
  clip_spans, frame_spans = corpus.token_spans()

  num_batches = -(-m // query_batch)
  num_chunks = -(-n // video_chunk)
  q_rows = _padded(np.asarray(queries.vectors, np.float32), num_batches * query_batch)
  gt_rows = _padded(gt_pos, num_batches * query_batch, -1)  # -1: no video, never a ground truth
  batch_slices = [slice(b * query_batch, (b + 1) * query_batch) for b in range(num_batches)]
  q_dev = [_put(q_rows[s], rep) for s in batch_slices]
  gt_dev = [_put(gt_rows[s], rep) for s in batch_slices]
  states = [_put(_initial_state(query_batch, top_k), rep) for _ in range(num_batches)]
  n_dev = _put(np.int32(n), rep)

  def chunk(c: int) -> tuple[dict[str, jax.Array], jax.Array]:
    sl = slice(c * video_chunk, (c + 1) * video_chunk)
    arrays = dict(clip_tokens=corpus.clip_tokens[sl], frame_tokens=corpus.frame_tokens[sl],
                  clip_spans=clip_spans[sl], frame_spans=frame_spans[sl])
    return ({k: _put(_padded(v, video_chunk), video_split) for k, v in arrays.items()},
            _put(np.int32(c * video_chunk), rep))

  # Pass 1: the ground-truth scores, from the chunks that hold a batch's ground truths.
  batches_of_chunk: dict[int, list[int]] = collections.defaultdict(list)
  for b, s in enumerate(batch_slices):
    for c in np.unique(gt_rows[s][gt_rows[s] >= 0] // video_chunk):
      batches_of_chunk[int(c)].append(b)
  for c in sorted(batches_of_chunk):
    arrays, start = chunk(c)
    for b in batches_of_chunk[c]:
      best = kernel(q_dev[b], gt_dev[b], arrays, start, n_dev, states[b])["best"]
      states[b] = dict(states[b], best=best)
  # Pass 2: count, chunk by chunk, the videos above each query's ground truth (and the rest).
  for c in range(num_chunks):
    arrays, start = chunk(c)
    for b in range(num_batches):
      states[b] = kernel(q_dev[b], gt_dev[b], arrays, start, n_dev, states[b])
  # best and counts are (3, Qb) per batch, the rest (Qb, ...).
  host = {key: np.concatenate(values, axis=1 if key in ("best", "counts") else 0)
          for key, values in _transpose(jax.device_get(states)).items()}
  better = host["counts"][:, :m].astype(np.int64)
  out = {kind: 1 + better[i] for i, kind in enumerate(SCORE_KINDS)}
  top_pos = host["top_pos"][:m]
  out["top_videos"] = np.where(top_pos >= 0, corpus.video_index[np.maximum(top_pos, 0)], -1).astype(np.int32)
  out["moment"] = host["moment"][:m]
  out["moment_branch"] = host["branch"][:m]
  return out


def _transpose(states: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
  return {key: [s[key] for s in states] for key in states[0]}


def recall_report(ranks: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Fused R@k / SumR / MedR / MnR at the top level plus `clip` and `frame` sub-dicts (same keys)."""
  by_kind = {kind: dict(recall_at_k(ranks[kind]), **rank_statistics(ranks[kind])) for kind in SCORE_KINDS}
  report: dict[str, Any] = dict(by_kind["fused"])
  report["clip"] = by_kind["clip"]
  report["frame"] = by_kind["frame"]
  return report


def rank_and_report(corpus: EncodedCorpus, queries: EncodedQueries, eval_cfg: EvalConfig, *,
                    mesh: Optional[Mesh] = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Ranks this process's queries against the corpus of every process; the report and the
  per-query results of the whole split.

  Args:
    corpus: this process's encoded videos (gathered from every process here).
    queries: this process's encoded queries.
    eval_cfg: the score fusion.
    mesh: see `rank_queries`.

  Returns:
    (report, results). report: `recall_report`, 'num_queries', 'num_videos', and 'moment'
    (`moment_metrics.moment_report`) when some query has an annotated moment. results, in split
    order: the arrays of `rank_queries` plus 'query_index', 'gt_video_index', 'gt_moment'
    (M, 2) (-1 unknown) and 'gt_duration' (M,) (-1 unknown).
  """
  if jax.process_count() > 1:
    corpus = EncodedCorpus(**gather.allgather_rows(corpus.host_arrays()), chunk_size=corpus.chunk_size)
  results = rank_queries(queries, corpus, video_chunk=corpus.chunk_size,
                         clip_weight=eval_cfg.clip_weight, frame_weight=eval_cfg.frame_weight,
                         mesh=mesh)
  m = len(queries)
  durations = (corpus.durations if corpus.durations is not None
               else np.full(len(corpus), UNKNOWN, np.float32))
  results["gt_video_index"] = np.asarray(queries.gt_video_index, np.int32)
  results["gt_duration"] = durations[_gt_positions(corpus, results["gt_video_index"])]
  results["gt_moment"] = (queries.gt_moments if queries.gt_moments is not None
                          else np.full((m, 2), UNKNOWN, np.float32))
  results = gather.in_split_order(results, queries.query_index)
  # (A gather through JAX may narrow int64 to int32.)
  results.update({kind: results[kind].astype(np.int64) for kind in SCORE_KINDS})
  report = recall_report(results)
  report["num_queries"] = len(results["fused"])
  report["num_videos"] = len(corpus)
  moment = moment_report(results)
  if moment is not None:
    report["moment"] = moment
  return report, results


# ----------------------------------------------------------------------------------------------
# A split of a built dataset.


def evaluate_split_with_ranks(params: Any, model_cfg: ModelConfig, data: DataConfig,
                              eval_cfg: EvalConfig, dataset_dir: str, split: str, *,
                              mesh: Optional[Mesh] = None, progress: bool = True
                              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`evaluate_split` that also returns the per-query results (`rank_and_report`)."""
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
  report, results = rank_and_report(corpus, encoded, eval_cfg, mesh=mesh)
  logging.info("eval %s: %d queries x %d videos in %.1f s: %s", split, report["num_queries"],
               report["num_videos"], time.perf_counter() - t0, summary_text(report))
  return report, results


def summary_text(report: Mapping[str, Any]) -> str:
  """One line of an eval report: fused R@k, SumR, MedR, MnR, clip / frame SumR, moment figures."""
  text = (f"R@1 {report['R@1']:.2f}  R@5 {report['R@5']:.2f}  R@10 {report['R@10']:.2f}  "
          f"R@100 {report['R@100']:.2f}  SumR {report['SumR']:.2f}  MedR {report['MedR']:g}  "
          f"MnR {report['MnR']:.2f}  (clip SumR {report['clip']['SumR']:.2f}, frame SumR "
          f"{report['frame']['SumR']:.2f})")
  moment = report.get("moment")
  if moment:
    text += (f"; moment mIoU {moment['mIoU']:.2f}  IoU>=0.5 {moment['IoU>=0.5']:.2f}  "
             f"R@1,IoU>=0.5 {moment['R@1,IoU>=0.5']:.2f}  (uniform: mIoU "
             f"{moment['uniform']['mIoU']:.2f}, IoU>=0.5 {moment['uniform']['IoU>=0.5']:.2f}) "
             f"over {moment['queries']} annotated queries")
  return text


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
    {'R@1', 'R@5', 'R@10', 'R@100', 'SumR'} (percent, fused score), 'MedR' and 'MnR' (median and
    mean rank of the ground truth, 1 = top), 'clip' and 'frame' dicts with the same keys,
    'num_queries', 'num_videos', and 'moment' where the split has moment annotations (see
    `moment_metrics`).
  """
  return evaluate_split_with_ranks(params, model_cfg, data, eval_cfg, dataset_dir, split, mesh=mesh,
                                   progress=progress)[0]


def write_eval_report(report: Mapping[str, Any], workdir: str | os.PathLike, split: str) -> str:
  """Writes `report` as JSON to <workdir>/eval_<split>.json atomically; returns the path."""
  path = os.path.join(os.fspath(workdir), f"eval_{split}.json")
  atomic_write_text(path, json.dumps(report, indent=2) + "\n")
  return path
