"""Scores queries against an index: an exact scan, or ANN candidates re-scored exactly.

Scores are the evaluation's: for a query vector q (L2-normalised pooled MSCNet.encode_query) and a
video, clip = max over its 32 clip tokens of q . token, frame = max over its 128 frame tokens
(tokens are stored L2-normalised, so these are cosines), fused = clip_weight * clip +
frame_weight * frame (the run's config.eval weights).

Exact (`mode='exact'`): the token store is read one chunk at a time; each chunk (padded to C
videos, padded and removed ones masked to -inf) is scored against every query batch by one jitted kernel that merges the chunk's
scores into the batch's running top-k (`lax.top_k` over the k kept + the C new candidates). Device
memory is bounded by (Qb, C, K + F) scores whatever the corpus size, and host memory by one chunk.
Ties keep the earlier video (top_k prefers lower positions and the kept candidates come first), so
the order is: score descending, then index position ascending.

Two stages (`mode='ann'`): per branch the ANN index (ann.py) gives each query's best `candidates`
videos by their best token hit; the union of both branches' candidates (over a group of queries)
is read from the token store, only those rows, and scored by the same kernel, so every returned
score, moment and tie order is the exact one; ANN can only miss a video, never mis-score it.
`auto` picks exact below EXACT_BELOW videos.

Moment: of the two branches, take the one whose weighted score (clip_weight * clip or
frame_weight * frame) contributed more to the fused score ('frame' on an exact tie); the moment is
the time span of that branch's best-matching token: a clip token's merged span, or a frame token's
single resampled row widened to its span (`ops.moments.moment_from_maxima`, the rule evaluation
scores).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prvr_jax.data.pipeline import caption_token_features
from prvr_jax.eval.evaluate import make_query_encoder
from prvr_jax.ops import moments
from prvr_jax.search import ann as ann_lib
from prvr_jax.search.errors import SearchError
from prvr_jax.search.index_store import IndexReader
from prvr_jax.search.model import SearchModel
from prvr_jax.search.token_store import SCALES

DEFAULT_TOP_K = 10
DEFAULT_QUERY_BATCH = 64
BRANCHES = moments.BRANCHES
MODES = ("auto", "exact", "ann")
# `auto` searches exactly below this many videos (where one exact query is about as fast as the
# two stages: measured with `python -m prvr_jax.bench search`, see README).
EXACT_BELOW = 1000
# Queries whose candidates are re-scored together (one token read and one kernel call per group).
RERANK_GROUP = 8
SCORE_BLOCK = 8  # videos scored per step of the kernel (branch_maxima)
SCORED_ARRAYS = ("clip_tokens", "frame_tokens", "clip_spans", "frame_spans", "valid")


@dataclasses.dataclass(frozen=True)
class Hit:
  """One result of one query (the JSON line the CLI prints)."""

  query: str
  rank: int
  video_id: str
  score: float
  clip_score: float
  frame_score: float
  start: float
  end: float
  branch: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def hit_line(hit: Hit) -> dict[str, Any]:
  """A hit as the CLI prints it (and the service answers): scores to 6 decimals, times to 3."""
  line = hit.to_json()
  for key in ("score", "clip_score", "frame_score"):
    line[key] = round(line[key], 6)
  line["start"], line["end"] = round(line["start"], 3), round(line["end"], 3)
  return line


def check_model(index: IndexReader, model: SearchModel) -> None:
  """Raises a SearchError when `model` is not the network that encoded the index's videos."""
  built = index.manifest["model"]
  if built.get("params_hash") != model.identity["params_hash"]:
    raise SearchError(f"{index.directory}: built with {built.get('workdir') or '(in memory)'} step "
                      f"{built.get('step')}, but the model given is {model.name} with other "
                      "parameters; queries must be encoded by the model that encoded the videos")
  if index.manifest["dim"] != model.model_cfg.hidden_size:
    raise SearchError(f"{index.directory}: {index.manifest['dim']}-d tokens, the model's are "
                      f"{model.model_cfg.hidden_size}-d")


def pad_token_features(rows: Sequence[np.ndarray],
                       model: SearchModel) -> tuple[np.ndarray, np.ndarray]:
  """The loader's treatment of caption token rows, padded to one shape.

  Args:
    rows: Q arrays (L_i, D_t) of raw token features (as `prvr_jax.extract captions` writes them).
    model: gives the row limit and truncation rule.

  Returns:
    text_feat (Q, L, D_t) float32 (each row x / (||x|| + 1e-5), truncated as the loader does,
    zero padding) and text_mask (Q, L), L = model.max_query_tokens.
  """
  length = model.max_query_tokens
  feat = np.zeros((len(rows), length, model.model_cfg.query_input_size), np.float32)
  mask = np.zeros((len(rows), length), np.float32)
  for i, r in enumerate(rows):
    t = caption_token_features(r, length, model.truncate_keep_eos)
    feat[i, :len(t)] = t
    mask[i, :len(t)] = 1.0
  return feat, mask


def encode_token_features(model: SearchModel, rows: Sequence[np.ndarray], batch: int,
                          names: Optional[Sequence[str]] = None, source: str = "") -> np.ndarray:
  """L2-normalised query vectors from caption token features.

  Args:
    model: the network.
    rows: Q arrays (L_i, D_t), e.g. from a caption feature file.
    batch: queries per device call (fixed; the last batch is padded).
    names: the queries' ids, for messages.
    source: the file they came from, for messages.

  Returns:
    (Q, D) float32.

  Raises:
    SearchError: a query whose width is not the model's query_input_size.
  """
  if model.model_cfg.caption_tower is not None:
    raise SearchError(f"{source or 'query features'}: the model {model.name} runs its own CLIP text "
                      "tower on query text; pass the queries as text (no --text-features)")
  want = model.model_cfg.query_input_size
  for i, r in enumerate(rows):
    if r.ndim != 2 or r.shape[1] != want:
      name = names[i] if names else i
      raise SearchError(f"{source or 'query features'}: caption {name!r} has shape {r.shape}, the "
                        f"model {model.name} takes {want}-d token features (model.query_input_size)")
  encode = make_query_encoder(model.model_cfg)
  batch = max(1, min(batch, len(rows)))
  out = []
  for start in range(0, len(rows), batch):
    part = list(rows[start:start + batch])
    n = len(part)
    feat, mask = pad_token_features(part, model)
    if n < batch:  # one valid row keeps padded queries finite; they are dropped
      feat = np.concatenate([feat, np.zeros((batch - n,) + feat.shape[1:], np.float32)])
      mask = np.concatenate([mask, np.zeros((batch - n, mask.shape[1]), np.float32)])
      mask[n:, 0] = 1.0
    out.append(np.asarray(encode(model.params, dict(text_feat=feat, text_mask=mask)))[:n])
  return np.concatenate(out)


def _score_block(num_videos: int) -> int:
  """Videos per step of `branch_maxima`: the largest power of two <= SCORE_BLOCK dividing C."""
  block = SCORE_BLOCK
  while num_videos % block:
    block //= 2
  return block


def branch_maxima(queries: jax.Array, tokens: jax.Array,
                  scales: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Each video's best token for each query: max and argmax over T of q . token (* scale).

  Args:
    queries: (Qb, D) float32.
    tokens: (C, T, D) float32, float16 or int8.
    scales: (C, T) float32 per-token scales of int8 tokens, or None.

  Returns:
    (Qb, C) float32 maxima and (Qb, C) int32 token indices.
  """
  c, t, d = tokens.shape
  block = _score_block(c)

  def step(part):
    tok, scale = part
    sim = jnp.einsum("ctd,qd->ctq", tok.astype(jnp.float32), queries)  # (block, T, Qb)
    if scale is not None:
      sim = sim * scale[..., None].astype(jnp.float32)
    return jnp.max(sim, axis=1), jnp.argmax(sim, axis=1).astype(jnp.int32)

  # A few videos per step: scored whole, XLA:CPU writes the float32 copy of the (C, T, D) tokens
  # and the (C, T, Qb) products to memory before reducing them; per block both stay in cache
  # (single query, C = 1024 int8 videos: 3.3x faster, measured).
  parts = (tokens.reshape(c // block, block, t, d),
           None if scales is None else scales.reshape(c // block, block, t))
  best, arg = jax.lax.map(step, parts)  # (C / block, block, Qb)
  return best.reshape(c, -1).T, arg.reshape(c, -1).T


@functools.lru_cache(maxsize=None)
def make_topk_kernel(k: int, clip_weight: float, frame_weight: float) -> Callable[..., dict]:
  """A jitted fn(state, queries, chunk, first, num_valid) -> state merging one chunk's scores.

  Args of the returned function:
    state: dict of (Qb, k) arrays, the running top-k: `score`, `clip`, `frame` float32, `pos`
      int32 (video position, -1 = none yet), `start`, `end` float32 seconds, `branch` int32
      (0 clip, 1 frame). `initial_state` makes an empty one.
    queries: (Qb, D) L2-normalised query vectors.
    chunk: dict with `clip_tokens` (C, K, D), `frame_tokens` (C, F, D) (float32, float16, or
      int8 with `clip_scales` (C, K) / `frame_scales` (C, F)), `clip_spans` (C, K, 2),
      `frame_spans` (C, F, 2) seconds, `valid` (C,) bool (False: removed or padding).
    first: int32 position of the chunk's first video.
    num_valid: int32 videos of the chunk that are real (the rest is padding).

  Returns:
    The new state, sorted by score descending (ties: lower position first).
  """

  @jax.jit
  def merge(state, queries, chunk, first, num_valid):
    clip, clip_arg = branch_maxima(queries, chunk["clip_tokens"], chunk.get("clip_scales"))
    frame, frame_arg = branch_maxima(queries, chunk["frame_tokens"], chunk.get("frame_scales"))
    m = moments.moment_from_maxima(clip, clip_arg, frame, frame_arg, chunk["clip_spans"],
                                   chunk["frame_spans"], clip_weight, frame_weight)  # (Qb, C)
    videos = jnp.arange(clip.shape[1])
    valid = (videos < num_valid) & chunk["valid"]
    new = dict(score=jnp.where(valid[None], m.score, -jnp.inf), clip=m.clip, frame=m.frame,
               pos=jnp.broadcast_to(jnp.where(valid, first + videos, -1).astype(jnp.int32),
                                    m.score.shape),
               start=m.start, end=m.end, branch=m.branch)
    both = {key: jnp.concatenate([state[key], new[key]], axis=1) for key in state}
    _, top = jax.lax.top_k(both["score"], k)
    return {key: jnp.take_along_axis(value, top, axis=1) for key, value in both.items()}

  return merge


def initial_state(num_queries: int, k: int) -> dict[str, np.ndarray]:
  """An empty running top-k: (Q, k) arrays with score -inf and position -1."""
  f = lambda v: np.full((num_queries, k), v, np.float32)
  return dict(score=f(-np.inf), clip=f(0.0), frame=f(0.0),
              pos=np.full((num_queries, k), -1, np.int32), start=f(0.0), end=f(0.0),
              branch=np.ones((num_queries, k), np.int32))


def _pad_chunk(arrays: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """The arrays the kernel reads, padded with zero videos (valid False) to `size`."""
  n = arrays["clip_tokens"].shape[0]
  out = {}
  for key in SCORED_ARRAYS + tuple(SCALES.values()):
    if key in arrays:
      x = arrays[key]
      out[key] = x if n == size else np.concatenate([x, np.zeros((size - n,) + x.shape[1:],
                                                                 x.dtype)])
  return out


def _check_knobs(top_k: int, batch: int, mode: str, nprobe: Optional[int],
                 candidates: Optional[int]) -> None:
  if top_k <= 0:
    raise SearchError(f"--top-k must be > 0, got {top_k}")
  if batch <= 0:
    raise SearchError(f"--batch must be > 0, got {batch}")
  if mode not in MODES:
    raise SearchError(f"--mode must be one of {MODES}, got {mode!r}")
  for name, value in (("nprobe", nprobe), ("candidates", candidates)):
    if value is not None and not value > 0:
      raise SearchError(f"--{name} must be > 0, got {value}")


def choose_mode(index: IndexReader, mode: str = "auto") -> str:
  """'exact' or 'ann' for `mode` ('auto': ANN from EXACT_BELOW videos on, when the index has one).

  Raises:
    SearchError: mode 'ann' on an index built without an ANN (--ann none).
  """
  if mode == "ann" and not index.manifest.get("ann"):
    raise SearchError(f"{index.directory}: built without an ANN index (--ann none); search it with "
                      "--mode exact, or run `python -m prvr_jax.search retrain` to add one")
  if mode == "auto":
    return "ann" if index.manifest.get("ann") and index.num_rows >= EXACT_BELOW else "exact"
  return mode


def _hits(host: dict[str, np.ndarray], video_ids: np.ndarray, names: Sequence[str],
          top_k: int) -> list[list[Hit]]:
  results = []
  for qi, name in enumerate(names):
    hits = []
    for j in range(top_k):
      pos = int(host["pos"][qi, j])
      if pos < 0:
        break
      hits.append(Hit(query=name, rank=j + 1, video_id=str(video_ids[pos]),
                      score=float(host["score"][qi, j]), clip_score=float(host["clip"][qi, j]),
                      frame_score=float(host["frame"][qi, j]), start=float(host["start"][qi, j]),
                      end=float(host["end"][qi, j]), branch=BRANCHES[int(host["branch"][qi, j])]))
    results.append(hits)
  return results


def _exact_top_k(index: IndexReader, queries: np.ndarray, merge: Callable[..., dict],
                 top_k: int, batch: int) -> dict[str, np.ndarray]:
  """(Q, k) top-k state of every query over every chunk of the index."""
  num = queries.shape[0]
  batch = min(batch, num)
  padded = np.zeros((-(-num // batch) * batch, queries.shape[1]), np.float32)
  padded[:num] = queries
  q_batches = [jnp.asarray(padded[s:s + batch]) for s in range(0, len(padded), batch)]
  states = [initial_state(batch, top_k) for _ in q_batches]
  for first, arrays in index.chunks():
    chunk = jax.device_put(_pad_chunk(arrays, index.chunk_size))
    n = jnp.int32(arrays["clip_tokens"].shape[0])
    # Dispatched without waiting: the next chunk is read from disk while the device scores this one.
    states = [merge(s, q, chunk, jnp.int32(first), n) for s, q in zip(states, q_batches)]
  return {key: np.concatenate([np.asarray(s[key]) for s in states])[:num] for key in states[0]}


def _bucket(n: int) -> int:
  """Padded candidate count: a power of two >= n, so one shape is compiled per group and limit."""
  return 1 << int(np.ceil(np.log2(max(n, 1))))


def _ann_top_k(index: IndexReader, queries: np.ndarray, merge: Callable[..., dict], top_k: int,
               nprobe: int, candidates: int) -> dict[str, np.ndarray]:
  """(Q, k) top-k state: ANN candidates of both branches, re-scored exactly from the store.

  Queries go in groups of RERANK_GROUP: each group's candidate videos (the union over its queries
  and both branches) are read from the token store once and every query of the group is scored
  exactly against all of them (more candidates than its own: recall can only gain).
  """
  searcher = index.ann()
  limit = max(candidates, top_k)
  found = [searcher.candidates(queries, branch, limit, nprobe).videos for branch in BRANCHES]
  videos = np.concatenate(found, axis=1)  # (Q, 2M), -1 = none
  num, out = queries.shape[0], []
  g = min(RERANK_GROUP, _bucket(num))  # a single query is scored alone
  size = _bucket(g * videos.shape[1])  # the largest union: one compiled shape
  for s in range(0, num, g):
    group = np.zeros((g, queries.shape[1]), np.float32)
    group[:min(g, num - s)] = queries[s:s + g]
    union = np.unique(videos[s:s + g])
    union = union[union >= 0]
    chunk = index.rows(union, SCORED_ARRAYS[:-1], size=size)
    chunk["valid"] = np.arange(size) < len(union)
    state = merge(initial_state(g, top_k), jnp.asarray(group), jax.device_put(chunk),
                  jnp.int32(0), jnp.int32(len(union)))
    host = {key: np.asarray(value) for key, value in state.items()}
    pos = host["pos"]
    host["pos"] = (np.where(pos >= 0, union[np.clip(pos, 0, None)], -1) if len(union)
                   else np.full_like(pos, -1))
    out.append({key: value[:num - s] for key, value in host.items()})
  return {key: np.concatenate([o[key] for o in out]) for key in out[0]}


def search_vectors(index: IndexReader, queries: np.ndarray, names: Sequence[str], *,
                   clip_weight: float, frame_weight: float, top_k: int = DEFAULT_TOP_K,
                   batch: int = DEFAULT_QUERY_BATCH, mode: str = "auto",
                   nprobe: Optional[int] = None,
                   candidates: Optional[int] = None) -> list[list[Hit]]:
  """Top-k videos and moments of each query vector over the index.

  Args:
    index: an opened index.
    queries: (Q, D) L2-normalised query vectors (encoded by the index's model).
    names: Q strings, the `query` field of the hits.
    clip_weight, frame_weight: score fusion.
    top_k: results per query (fewer when the index holds fewer videos).
    batch: Qb, queries per kernel call of the exact scan (fixed; the last batch is padded).
    mode: 'exact' (every video scored), 'ann' (candidates from the ANN index of each branch,
      re-scored exactly) or 'auto' (`choose_mode`).
    nprobe: IVF cells visited per query (ANN; default ann.DEFAULT_NPROBE).
    candidates: videos per branch and query re-scored exactly (ANN; default
      ann.DEFAULT_CANDIDATES, at least top_k).

  Returns:
    Q lists of Hits, rank 1 first; removed videos are never returned.
  """
  _check_knobs(top_k, batch, mode, nprobe, candidates)
  merge = make_topk_kernel(int(top_k), float(clip_weight), float(frame_weight))
  queries = np.ascontiguousarray(queries, np.float32)
  if choose_mode(index, mode) == "ann":
    host = _ann_top_k(index, queries, merge, int(top_k), int(nprobe or ann_lib.DEFAULT_NPROBE),
                      int(candidates or ann_lib.DEFAULT_CANDIDATES))
  else:
    host = _exact_top_k(index, queries, merge, int(top_k), int(batch))
  return _hits(host, index.video_ids, names, int(top_k))


def search(index: IndexReader, model: SearchModel, queries: np.ndarray, names: Sequence[str], *,
           top_k: int = DEFAULT_TOP_K, batch: int = DEFAULT_QUERY_BATCH, mode: str = "auto",
           nprobe: Optional[int] = None, candidates: Optional[int] = None) -> list[list[Hit]]:
  """`search_vectors` with the model's fusion weights, after checking the model is the index's.

  Args:
    index: an opened index.
    model: the network that built it.
    queries: (Q, D) query vectors from `encode_token_features` or `text.encode_texts`.
    names: Q strings.
    top_k, batch, mode, nprobe, candidates: see `search_vectors`.

  Returns:
    Q lists of Hits.
  """
  check_model(index, model)
  return search_vectors(index, queries, names, clip_weight=model.clip_weight,
                        frame_weight=model.frame_weight, top_k=top_k, batch=batch, mode=mode,
                        nprobe=nprobe, candidates=candidates)
