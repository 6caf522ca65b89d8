"""Search at collection scale: exact scan vs ANN candidates + exact re-score.

  python -m prvr_jax.bench search --videos 10000,100000 --repeats 3

Token sets. B = `base` synthetic-benchmark videos (prvr_jax/data/synthetic.py at CLIP widths: 2-6
events of recurring concepts) are written to a feature file and indexed by `build_index` with the
default TVR-sized network (random parameters, as `bench eval`), giving real encoded clip and frame
tokens. A collection of N videos is made from them: video j joins the first rows of base video
j mod B with the rest of another base video (a cut at a random multiple of 4 rows in [32, 96]; the
clip tokens are cut at the same fraction), then every token moves by a per-video offset (a random
direction of norm 0.25, like a camera or lighting change shared by a whole video) and its own
noise (norm 0.15) and is L2-normalised again. So videos share events with some others and differ
in the rest (the temporal and event structure of the encoder's tokens is kept), instead of being
i.i.d. vectors. Queries: a random video's random frame token plus its clip token plus noise,
normalised (cosine ~0.6 with the target tokens), as a caption of one moment is near its event.

Per collection size one record per mode (`exact`, `ann`): videos, mode, p50_ms / p99_ms for one
query (model already loaded: query vectors given), batch64_ms (64 queries in one call),
recall_at_10 (fraction of the exact top-10 videos found, ANN vs exact in this run), top1_moment_recall (same top-1 video
and moment), build_s (token store write; + ANN build for ann), disk_bytes_per_video,
ram_bytes_per_video (memory the opened index holds outside the memory-mapped token store: ids
and the ANN indexes, per video), the knobs.
`eval500`: the first 500 base videos as encoded (the evaluation set's size; float16 store, the
default ANN) and 2,500 queries: the fraction of queries whose ANN top-10 equals the exact top-10.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time
from typing import Any, Iterable, Optional, Sequence

import h5py
import numpy as np
import tqdm

from prvr_jax.data import synthetic
from prvr_jax.eval.bench_eval import random_params
from prvr_jax.models.config import ModelConfig
from prvr_jax.search import ann as ann_lib
from prvr_jax.search import query as query_lib
from prvr_jax.search.index import build_index, index_bytes
from prvr_jax.search.index_store import IndexReader, IndexWriter, write_manifest
from prvr_jax.search.model import from_params
from prvr_jax.search.token_store import dequantize

BASE_VIDEOS = 2000
EVAL_VIDEOS, EVAL_QUERIES = 500, 2500
VIDEO_OFFSET, TOKEN_NOISE, QUERY_NOISE = 0.25, 0.15, 1.2
WRITE_BLOCK = 1024


def _heap_bytes(index: IndexReader) -> int:
  """Memory an opened index holds outside the memory-mapped token store: the video ids, the
  removed mask and the ANN indexes (FAISS reads its files into memory)."""
  total = index.video_ids.nbytes + index.alive.nbytes
  for entry in ((index.manifest.get("ann") or {}).get("files") or {}).values():
    total += int(entry["bytes"])
  return total


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def base_index(directory: pathlib.Path, num_videos: int, model_cfg: ModelConfig,
               ann: str = "none") -> pathlib.Path:
  """`build_index` of `num_videos` synthetic-benchmark videos with the random-parameter network."""
  spec = synthetic.SyntheticSpec(num_train_videos=num_videos, visual_dim=model_cfg.visual_input_size,
                                 text_dim=model_cfg.query_input_size)
  world = synthetic.make_world(spec)
  feats = directory / f"base_videos_{num_videos}.h5"
  out = directory / f"base_{num_videos}_{ann}"
  model = from_params(model_cfg, random_params(model_cfg))
  if (out / "manifest.json").is_file():  # a --cache directory: encoded by an earlier run
    if IndexReader(out).manifest["model"]["params_hash"] == model.identity["params_hash"]:
      return out
  with h5py.File(feats, "w") as f:
    for record in synthetic.generate_split(spec, "train", world):
      ds = f.create_dataset(record.video_id, data=record.frames)
      ds.attrs["duration"], ds.attrs["fps"] = record.duration, spec.frames_per_second
  build_index(model, feats, out, chunk=100, dtype="float32", progress=False, ann=ann,
              overwrite=True)
  feats.unlink(missing_ok=True)
  return out


def _perturbed(base: dict[str, np.ndarray], videos: np.ndarray, rng) -> dict[str, np.ndarray]:
  """Arrays of collection videos `videos` (see the module docstring)."""
  b = len(base["durations"])
  n = len(videos)
  first = videos % b
  second = rng.integers(0, b, n)
  cut = 4 * rng.integers(8, 25, n)  # frame rows [0, cut) from `first`
  k, f = base["clip_tokens"].shape[1], base["frame_tokens"].shape[1]
  rows = np.arange(f)[None, :]
  frame_src = np.where(rows < cut[:, None], first[:, None], second[:, None])
  clip_src = np.where(np.arange(k)[None, :] < (cut * k // f)[:, None], first[:, None],
                      second[:, None])
  d = base["frame_tokens"].shape[-1]
  offset = VIDEO_OFFSET * _unit(rng.standard_normal((n, 1, d), np.float32))

  def move(tokens):
    noise = TOKEN_NOISE * _unit(rng.standard_normal(tokens.shape, np.float32))
    return _unit(tokens + offset + noise).astype(np.float32)

  out = dict(clip_tokens=move(base["clip_tokens"][clip_src, np.arange(k)[None, :]]),
             frame_tokens=move(base["frame_tokens"][frame_src, rows]),
             clip_spans=base["clip_spans"][clip_src, np.arange(k)[None, :]],
             frame_spans=base["frame_spans"][frame_src, rows],
             clip_rows=base["clip_rows"][clip_src, np.arange(k)[None, :]],
             durations=base["durations"][first], num_feature_frames=base["num_feature_frames"][first])
  out["video_ids"] = np.asarray([f"vid{v:07d}" for v in videos])
  return out


def _collection_key(base: IndexReader, num_videos: int, dtype: str, seed: int) -> dict[str, Any]:
  """What makes a cached collection the same one: the base videos, the size, dtype and draw."""
  return dict(params_hash=base.manifest["model"]["params_hash"], base_videos=base.num_rows,
              num_videos=num_videos, dtype=dtype, seed=seed,
              noise=[VIDEO_OFFSET, TOKEN_NOISE], block=WRITE_BLOCK)


def _cached(path: pathlib.Path, key: dict[str, Any]) -> Optional[dict[str, Any]]:
  """The timings recorded next to a cached collection index made with `key`, else None."""
  record = path.with_name(path.name + ".json")
  if not (record.is_file() and (path / "manifest.json").is_file()):
    return None
  saved = json.loads(record.read_text(encoding="utf-8"))
  return saved if saved.get("key") == key else None


def _record(path: pathlib.Path, key: dict[str, Any], **timings: float) -> None:
  record = path.with_name(path.name + ".json")
  record.write_text(json.dumps(dict(key=key, **timings)) + "\n", encoding="utf-8")


def collection_index(directory: pathlib.Path, base: IndexReader, num_videos: int, dtype: str,
                     seed: int = 0) -> tuple[pathlib.Path, float]:
  """An index of `num_videos` perturbed videos (no ANN yet); returns (path, seconds to write).

  A collection already in `directory` with the same key (`_collection_key`) is kept (a `--cache`
  run): the seconds are the ones recorded when it was written.
  """
  out = directory / f"collection_{num_videos}_{dtype}"
  key = _collection_key(base, num_videos, dtype, seed)
  cached = _cached(out, key)
  if cached is not None:
    return out, float(cached["write_s"])
  names = ("clip_tokens", "frame_tokens", "clip_spans", "frame_spans", "clip_rows", "durations",
           "num_feature_frames")
  base_arrays = base.rows(np.arange(base.num_rows), names)
  m = base.manifest
  settings = dict(model=m["model"], chunk_size=WRITE_BLOCK, dtype=dtype, num_videos=num_videos,
                  num_clips=m["num_clips"], num_frames=m["num_frames"], dim=m["dim"], id_width=10,
                  clip_weight=m["clip_weight"], frame_weight=m["frame_weight"],
                  features=dict(synthetic_perturbed=num_videos, seed=seed))
  shutil.rmtree(out, ignore_errors=True)
  out.with_name(out.name + ".json").unlink(missing_ok=True)
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  writer = IndexWriter(out, settings)
  blocks = range(0, num_videos, WRITE_BLOCK)
  for i, s in enumerate(tqdm.tqdm(blocks, desc=f"collection {num_videos}", unit="block",
                                  mininterval=30)):
    writer.write_chunk(i, _perturbed(base_arrays, np.arange(s, min(s + WRITE_BLOCK, num_videos)),
                                     rng))
  draft = writer.draft_manifest(writer.close_segment())
  writer.finish(draft)
  write_s = time.perf_counter() - start
  _record(out, key, write_s=write_s)
  return out, write_s


def with_ann(path: pathlib.Path, key: dict[str, Any]) -> tuple[IndexReader, float]:
  """The collection index with the default FAISS ANN (built now, or kept from the cache)."""
  index = IndexReader(path)
  cached = _cached(path, key) or {}
  if index.manifest.get("ann") and "ann_s" in cached:
    return index, float(cached["ann_s"])
  t = time.perf_counter()
  draft = dict(index.manifest)
  draft["ann"] = ann_lib.build_faiss(index, 0, progress=True)
  write_manifest(path, draft)
  ann_s = time.perf_counter() - t
  _record(path, key, write_s=float(cached.get("write_s", 0.0)), ann_s=ann_s)
  return IndexReader(path), ann_s


def make_queries(index: IndexReader, num: int, seed: int) -> np.ndarray:
  """(num, D) query vectors near one moment of a random video (see the module docstring)."""
  rng = np.random.default_rng(seed)
  videos = np.sort(rng.choice(index.num_rows, num, replace=num > index.num_rows))
  arrays = index.rows(videos, ("clip_tokens", "frame_tokens", "clip_rows"))
  frame = dequantize(arrays["frame_tokens"], arrays.get("frame_scales"))
  clip = dequantize(arrays["clip_tokens"], arrays.get("clip_scales"))
  row = rng.integers(0, frame.shape[1], num)
  k = clip.shape[1]
  which = np.minimum(row * k // frame.shape[1], k - 1)
  q = frame[np.arange(num), row] + clip[np.arange(num), which]
  q = _unit(q) + QUERY_NOISE * _unit(rng.standard_normal(q.shape, np.float32)) / np.sqrt(2.0)
  return rng.permutation(_unit(q).astype(np.float32))


def _search(index, queries, mode, **knobs):
  m = index.manifest
  return query_lib.search_vectors(index, queries, ["q"] * len(queries),
                                  clip_weight=m["clip_weight"], frame_weight=m["frame_weight"],
                                  top_k=10, mode=mode, **knobs)


def _latencies(index, queries, mode, **knobs) -> list[float]:
  times = []
  for i in range(len(queries)):
    t = time.perf_counter()
    _search(index, queries[i:i + 1], mode, **knobs)
    times.append(1e3 * (time.perf_counter() - t))
  return times


def _recall(got, want) -> tuple[float, float, float]:
  """(recall@10, same top-10 list fraction, same top-1 video and moment fraction)."""
  rec = [len({h.video_id for h in g} & {h.video_id for h in w}) / max(1, len(w))
         for g, w in zip(got, want)]
  same = [[h.video_id for h in g] == [h.video_id for h in w] for g, w in zip(got, want)]
  top1 = [bool(g) and bool(w) and (g[0].video_id, g[0].start, g[0].end) ==
          (w[0].video_id, w[0].start, w[0].end) for g, w in zip(got, want)]
  return float(np.mean(rec)), float(np.mean(same)), float(np.mean(top1))


def _percentile(values: Sequence[float], q: float) -> float:
  return float(np.percentile(np.asarray(values), q))


def _exact_record(index: IndexReader, queries: np.ndarray, exact_queries: int,
                  write_s: float) -> tuple[dict[str, Any], list]:
  """The exact scan's record and its results for every query (the ground truth)."""
  num_videos = index.num_rows
  t = time.perf_counter()
  truth = _search(index, queries, "exact", batch=64)
  exact_batch_ms = 1e3 * (time.perf_counter() - t) * 64 / len(queries)
  _latencies(index, queries[:1], "exact")  # compiled
  exact_ms = _latencies(index, queries[:exact_queries], "exact")
  record = dict(bench="search", case=f"exact_{num_videos}", videos=num_videos, mode="exact",
                dtype=index.dtype, p50_ms=_percentile(exact_ms, 50),
                p99_ms=_percentile(exact_ms, 99), batch64_ms=exact_batch_ms, recall_at_10=1.0,
                top1_moment_recall=1.0, build_s=write_s,
                disk_bytes_per_video=index_bytes(index.directory) / num_videos,
                ram_bytes_per_video=_heap_bytes(index) / num_videos, queries=len(exact_ms),
                load_avg=_load())
  return record, truth


def _ann_record(index: IndexReader, queries: np.ndarray, truth: list, repeats: int,
                ann_queries: int, nprobe: int, candidates: int) -> dict[str, Any]:
  """The ANN record of one (nprobe, candidates): recall against `truth`, latencies."""
  knobs = dict(nprobe=nprobe, candidates=candidates)
  _search(index, queries[:8], "ann", **knobs)  # compiled
  recall, same, top1 = _recall(_search(index, queries, "ann", **knobs), truth)
  runs = [_latencies(index, queries[:ann_queries], "ann", **knobs) for _ in range(repeats)]
  batch = []
  for _ in range(repeats):
    t = time.perf_counter()
    _search(index, queries[:64], "ann", **knobs)
    batch.append(1e3 * (time.perf_counter() - t))
  n = index.num_rows
  return dict(bench="search", case=f"ann_{n}_p{nprobe}_c{candidates}", videos=n, mode="ann",
              dtype=index.dtype, nprobe=nprobe, candidates=candidates,
              factories=index.manifest["ann"]["factories"],
              p50_ms=statistics.median(_percentile(r, 50) for r in runs),
              p99_ms=statistics.median(_percentile(r, 99) for r in runs),
              batch64_ms=statistics.median(batch), recall_at_10=recall, same_top10=same,
              top1_moment_recall=top1, disk_bytes_per_video=index_bytes(index.directory) / n,
              ram_bytes_per_video=_heap_bytes(index) / n, queries=ann_queries,
              recall_queries=len(queries), load_avg=_load())


def _load() -> float:
  """The 1-minute load average (the machine is shared: each record says how busy it was)."""
  return os.getloadavg()[0]


def bench_collection(directory: pathlib.Path, base: IndexReader, num_videos: int, dtype: str,
                     repeats: int, ann_queries: int, exact_queries: int,
                     knobs: Sequence[tuple[int, int]], keep: bool = False
                     ) -> Iterable[dict[str, Any]]:
  """The exact and ANN records of one collection size (ANN once per (nprobe, candidates)).

  `keep`: leave the collection index (with its ANN) in `directory` for the next run (`--cache`).
  """
  path, write_s = collection_index(directory, base, num_videos, dtype)
  index = IndexReader(path)
  queries = make_queries(index, max(ann_queries, 64), seed=1)
  exact, truth = _exact_record(index, queries, exact_queries, write_s)
  yield exact
  index, ann_s = with_ann(path, _collection_key(base, num_videos, dtype, 0))
  index.ann()
  for nprobe, candidates in knobs:
    record = _ann_record(index, queries, truth, repeats, ann_queries, nprobe, candidates)
    yield dict(record, build_s=write_s + ann_s, ann_build_s=ann_s,
               speedup_p50=exact["p50_ms"] / record["p50_ms"])
  if not keep:
    shutil.rmtree(path, ignore_errors=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)


def bench_eval_set(directory: pathlib.Path, base: IndexReader) -> dict[str, Any]:
  """The first 500 base videos as they were encoded (float16 store, the default ANN): the fraction
  of 2,500 queries whose ANN top-10 equals the exact top-10."""
  names = ("video_ids", "clip_tokens", "frame_tokens", "clip_spans", "frame_spans", "clip_rows",
           "durations", "num_feature_frames")
  m = base.manifest
  settings = dict(model=m["model"], chunk_size=EVAL_VIDEOS, dtype="float16",
                  num_videos=EVAL_VIDEOS, num_clips=m["num_clips"], num_frames=m["num_frames"],
                  dim=m["dim"], id_width=m["segments"][0]["id_width"],
                  clip_weight=m["clip_weight"], frame_weight=m["frame_weight"])
  path = directory / f"eval{EVAL_VIDEOS}"
  t = time.perf_counter()
  writer = IndexWriter(path, settings)
  writer.write_chunk(0, base.rows(np.arange(EVAL_VIDEOS), names))
  draft = writer.draft_manifest(writer.close_segment())
  draft["ann"] = ann_lib.build_faiss(IndexReader(path, manifest=draft), 0, progress=False)
  writer.finish(draft)
  build_s = time.perf_counter() - t
  index = IndexReader(path)
  queries = make_queries(index, EVAL_QUERIES, seed=2)
  exact = _search(index, queries, "exact", batch=250)
  got = _search(index, queries, "ann")
  recall, same, top1 = _recall(got, exact)
  return dict(bench="search", case=f"eval{EVAL_VIDEOS}", videos=EVAL_VIDEOS, mode="ann",
              queries=EVAL_QUERIES, same_top10=same, recall_at_10=recall, top1_moment_recall=top1,
              factories=index.manifest["ann"]["factories"], nprobe=ann_lib.DEFAULT_NPROBE,
              candidates=ann_lib.DEFAULT_CANDIDATES, build_s=build_s,
              disk_bytes_per_video=index_bytes(path) / EVAL_VIDEOS, load_avg=_load())


def bench_search(sizes: Sequence[int], repeats: int, dtype: str = "int8",
                 knobs: Optional[Sequence[tuple[int, int]]] = None, ann_queries: int = 100,
                 exact_queries: int = 3, base_videos: int = BASE_VIDEOS,
                 model_cfg: Optional[ModelConfig] = None, workdir: Optional[str] = None,
                 cache: Optional[str] = None) -> Iterable[dict[str, Any]]:
  """Records of `eval500` and of every (size, mode); temporary files are removed at the end.

  `cache`: a directory keeping the encoded base videos and the collection indexes (with their ANN
  files and the seconds their writes took) between runs, so that latencies can be measured again
  without rebuilding; else they are temporary too.
  """
  if base_videos < EVAL_VIDEOS:
    raise ValueError(f"--base-videos must be at least {EVAL_VIDEOS} (the eval{EVAL_VIDEOS} case), "
                     f"got {base_videos}")
  model_cfg = model_cfg or ModelConfig()  # the TVR setting (bench.TVR_MODEL)
  knobs = knobs or [(ann_lib.DEFAULT_NPROBE, ann_lib.DEFAULT_CANDIDATES)]
  directory = pathlib.Path(tempfile.mkdtemp(prefix="prvr_bench_search_", dir=workdir))
  kept = pathlib.Path(cache) if cache else directory
  kept.mkdir(parents=True, exist_ok=True)
  try:
    t = time.perf_counter()
    base = IndexReader(base_index(kept, base_videos, model_cfg))
    encode_s = time.perf_counter() - t
    yield dict(bench_eval_set(directory, base), base_videos=base_videos, base_encode_s=encode_s)
    for size in sizes:
      for record in bench_collection(kept, base, size, dtype, repeats, ann_queries,
                                     exact_queries, knobs, keep=cache is not None):
        record["base_videos"], record["base_encode_s"] = base_videos, encode_s
        yield record
  finally:
    shutil.rmtree(directory, ignore_errors=True)
