"""Evaluation throughput end to end at the reference's scale (500 videos x 2,500 queries).

  python -m prvr_jax.bench eval --videos 500 --queries 2500 --repeats 3

One run = `encode_videos` (OP-ToMe, both branches, normalisation, copy to host) + `encode_queries` +
`rank_and_report` (scores, ranks, each query's top-10 videos and its ground truth's moment, R@k,
MedR / MnR and the moment metrics) + the per-query records, on in-memory random inputs at TVR
shapes (768-d frames and caption tokens, 128 frames, 32 clips, 32 caption tokens; every caption
with an annotated moment) with random parameters of the default network. The first run compiles and is reported as its own case; the steady case gives
the median of --repeats further runs, the split into encode-videos / encode-queries / score time
and query-video pairs per second. The reference evaluates 500 x 2,500 in about 27 s.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prvr_jax.data.pipeline import SplitNames
from prvr_jax.eval import evaluate, records
from prvr_jax.eval.config import EvalConfig
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import init_params

REFERENCE_SECONDS = 27.0  # the reference's eval of 500 videos x 2,500 queries, this machine class
REFERENCE_SIZE = (500, 2500)
# Videos per chunk (the encoder itself runs a chunk in on-device steps of ~6 videos, see
# `evaluate.encoder_sub_batch`: 25 = 5 steps of 5); the ranking scores the corpus in chunks of
# the same size. Queries per batch: the reference's eval_query_batch_size.
VIDEO_CHUNK = 25
QUERY_BATCH = 50
CAPTION_TOKENS = 32
PHASES = ("encode_videos", "encode_queries", "score")


def random_params(model_cfg: ModelConfig, seed: int = 0) -> Any:
  """Parameters of `model_cfg`'s network drawn as the initialiser draws them, without compiling it.

  Weights N(0, initializer_range), the weight token N(0, 1), LayerNorm scales 1, biases 0; the
  shapes come from tracing `init_params` (compiling it takes longer than a small evaluation).
  """
  shapes = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return jnp.zeros(leaf.shape, leaf.dtype)
    std = 1.0 if name == "weight_token" else model_cfg.initializer_range
    return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)]) if len(x) < rows else x


def random_eval_batches(num_videos: int, num_queries: int, model_cfg: ModelConfig, seed: int = 0,
                        video_chunk: int = VIDEO_CHUNK, query_batch: int = QUERY_BATCH,
                        caption_tokens: int = CAPTION_TOKENS
                        ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
  """Padded eval batches as the eval pipelines give them, from random numbers.

  Videos are 4 events of near-constant features plus noise (so OP-ToMe has structure to merge);
  captions are random unit token rows with 8..caption_tokens valid rows; consecutive queries
  share a video (query i belongs to video i * num_videos // num_queries), as in split order.

  Returns:
    (video batches: `video_frames` (C, F, D_v), `video_valid` (C,), `video_index` (C,),
     `duration` (C,), `num_feature_frames` (C,);
     query batches: `text_feat` (B, L, D_t), `text_mask` (B, L), `query_valid`, `query_index`,
     `gt_video_index` (B,), `gt_moment` (B, 2)).
  """
  rng = np.random.default_rng(seed)
  f, dv, dt = model_cfg.num_frames, model_cfg.visual_input_size, model_cfg.query_input_size
  events = rng.standard_normal((num_videos, 4, dv), np.float32)
  frames = events[:, np.arange(f) * 4 // f] + 0.3 * rng.standard_normal((num_videos, f, dv), np.float32)
  # TVR-like timing: 30-150 raw frames at 1.5 fps; each caption annotates one of the 4 events.
  raw_frames = rng.integers(30, 151, num_videos).astype(np.int32)
  durations = (raw_frames / 1.5).astype(np.float32)
  video_batches = []
  for s in range(0, num_videos, video_chunk):
    n = min(video_chunk, num_videos - s)
    video_batches.append(dict(
        video_frames=_pad_rows(frames[s:s + n], video_chunk),
        video_valid=np.arange(video_chunk) < n,
        video_index=np.where(np.arange(video_chunk) < n, s + np.arange(video_chunk), -1).astype(np.int32),
        duration=_pad_rows(durations[s:s + n], video_chunk),
        num_feature_frames=_pad_rows(raw_frames[s:s + n], video_chunk)))
  text = rng.standard_normal((num_queries, caption_tokens, dt), np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  lengths = 8 + np.arange(num_queries) % (caption_tokens - 7)
  mask = (np.arange(caption_tokens)[None, :] < lengths[:, None]).astype(np.float32)
  text *= mask[..., None]
  gt_video = np.arange(num_queries) * num_videos // num_queries
  event = rng.integers(0, 4, num_queries)
  gt_moment = (np.stack([event, event + 1], axis=-1) / 4 * durations[gt_video, None]).astype(np.float32)
  query_batches = []
  for s in range(0, num_queries, query_batch):
    n = min(query_batch, num_queries - s)
    valid = np.arange(query_batch) < n
    index = np.where(valid, s + np.arange(query_batch), -1)
    query_batches.append(dict(
        text_feat=_pad_rows(text[s:s + n], query_batch), text_mask=_pad_rows(mask[s:s + n], query_batch),
        query_valid=valid, query_index=index.astype(np.int32),
        gt_video_index=np.where(valid, index * num_videos // num_queries, -1).astype(np.int32),
        gt_moment=_pad_rows(gt_moment[s:s + n], query_batch)))
  return video_batches, query_batches


def _names(num_videos: int, num_queries: int) -> SplitNames:
  """Ids and texts for the per-query records of the random benchmark."""
  return SplitNames([f"video{i:05d}" for i in range(num_videos)],
                    [f"video{i * num_videos // num_queries:05d}#enc#{i}" for i in range(num_queries)],
                    [f"caption {i}" for i in range(num_queries)])


def eval_once(params: Any, model_cfg: ModelConfig, video_batches: Iterable[dict[str, np.ndarray]],
              query_batches: Iterable[dict[str, np.ndarray]], video_chunk: int = VIDEO_CHUNK
              ) -> tuple[dict[str, float], dict[str, Any]]:
  """One evaluation; ({phase: wall seconds, 'cpu': process CPU seconds}, the recall report).

  Every phase ends on host arrays, so its time includes the device work.
  """
  cpu0 = time.process_time()
  t0 = time.perf_counter()
  corpus = evaluate.encode_videos(params, model_cfg, video_batches)
  t1 = time.perf_counter()
  queries = evaluate.encode_queries(params, model_cfg, query_batches)
  t2 = time.perf_counter()
  report, results = evaluate.rank_and_report(corpus, queries, EvalConfig())
  records.query_records(results, _names(len(corpus), len(queries)))
  t3 = time.perf_counter()
  return dict(encode_videos=t1 - t0, encode_queries=t2 - t1, score=t3 - t2,
              cpu=time.process_time() - cpu0), report


def bench_eval(num_videos: int, num_queries: int, repeats: int,
               model_cfg: Optional[ModelConfig] = None) -> Iterable[dict[str, Any]]:
  """Yields the first (compiling) run's record, then the steady record (median of `repeats`).

  Each record: bench 'eval', case, items (videos), queries, median_s, runs_s, phases_s (median
  seconds per phase), cpu_s (median process CPU seconds of a run: with other jobs on the machine,
  cpu_s / cores estimates the wall time the machine alone would give), pairs_per_s (queries x videos / median_s), video_chunk, query_batch, and at
  the reference's size reference_s and speedup_vs_reference.
  """
  model_cfg = model_cfg or ModelConfig()
  params = random_params(model_cfg)
  # Small sizes (tests) do not pad one chunk up to the full batch size.
  video_chunk, query_batch = min(VIDEO_CHUNK, num_videos), min(QUERY_BATCH, num_queries)
  video_batches, query_batches = random_eval_batches(num_videos, num_queries, model_cfg,
                                                     video_chunk=video_chunk, query_batch=query_batch)
  size = f"V{num_videos}_Q{num_queries}"

  def record(case: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    totals = [sum(r[p] for p in PHASES) for r in runs]
    median = statistics.median(totals)
    rec = dict(bench="eval", case=case, items=num_videos, queries=num_queries, median_s=median,
               runs_s=[round(t, 6) for t in totals],
               phases_s={p: statistics.median(r[p] for r in runs) for p in PHASES},
               cpu_s=statistics.median(r["cpu"] for r in runs),
               pairs_per_s=num_videos * num_queries / median, video_chunk=video_chunk,
               query_batch=query_batch, caption_tokens=CAPTION_TOKENS)
    if (num_videos, num_queries) == REFERENCE_SIZE:
      rec.update(reference_s=REFERENCE_SECONDS, speedup_vs_reference=REFERENCE_SECONDS / median)
    return rec

  first, _ = eval_once(params, model_cfg, video_batches, query_batches, video_chunk)
  yield record(f"first_run_{size}", [first])
  runs = [eval_once(params, model_cfg, video_batches, query_batches, video_chunk)[0]
          for _ in range(repeats)]
  yield record(f"e2e_{size}", runs)
