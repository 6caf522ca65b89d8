"""Approximate candidates for the two-stage search: per branch, an ANN index over every token.

Each branch (clip: K tokens per video, frame: F) has one index over the L2-normalised tokens of
every video position, added in position order, so token id t belongs to video t // K (or // F);
inner product = cosine. A query's best token hits (FAISS: re-scored exactly from the token store,
only those tokens read) become per-video maxima (the first, i.e. highest, hit of each video),
removed videos are dropped, and the best `candidates` videos of each branch go to the exact
re-scoring of whole videos (query.py). Two backends:

  faiss (default, in process): `faiss.index_factory` (default `default_factory`: an inverted file
    over k-means cells, 4-bit fast-scan product quantisation; a flat index below FLAT_BELOW
    tokens) saved as ann-<generation>-<branch>.faiss. A FAISS build with GPUs moves the index to
    GPU 0 for searching when FAISS supports its type there, else it stays on the CPU.
  milvus (milvus.py): two collections of (video position, token vector) rows in a Milvus server
    or a milvus-lite file, searched with `group_by_field` = video: the engine returns per-video
    maxima itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import pathlib
from typing import Any, Iterator, Optional

import numpy as np
import tqdm

# FAISS runs on OpenMP, whose idle threads spin by default: on a machine shared with JAX's own
# threads or other processes the spinning threads take the cores the working ones need (k-means
# training at 2,000 videos, load 10 on 2 cores: 13.5 s spinning, 3.0 s passive, 2.5 s on one
# thread). OpenMP reads the policy when it is loaded, i.e. when FAISS is imported, hence before
# that import; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import faiss  # pylint: disable=wrong-import-position  # after the policy above

from prvr_jax.search.errors import SearchError
from prvr_jax.search.token_store import SCALES, dequantize

BRANCH_ARRAYS = {"clip": "clip_tokens", "frame": "frame_tokens"}
# Below this many vectors a branch gets an exact flat index: a scan of 100k vectors takes a few ms
# and leaves the candidates exact (measured: IVF64 on the 500-video set kept 96.6 % of top-10s).
FLAT_BELOW = 100_000
# Training sample: k-means wants ~40 points per cell; more only costs time.
TRAIN_POINTS_PER_CELL = 40
MAX_TRAIN_POINTS = 200_000
# Query-time knobs (measured with `python -m prvr_jax.bench search`, see README). At 10,000 videos
# (2,000 base videos, hits re-scored) nprobe 16 / 32 gave recall@10 0.984 / 0.986 with 100
# candidates, 50 / 100 / 150 candidates 0.962 / 0.984 / 0.992 at 27 / 41 / 62 ms (load ~15).
DEFAULT_NPROBE = 16
DEFAULT_CANDIDATES = 100
# Token hits asked of the ANN per candidate video (re-scored, then grouped by video): 8 / 16 / 32
# gave recall@10 0.979 / 0.981 / 0.987 at 100 candidates (10,000 videos), each doubling the reads.
TOKEN_HITS_PER_CANDIDATE = 8
ADD_BATCH_VIDEOS = 512
# A search of fewer queries runs on one thread: splitting one query's few ms of work across OpenMP
# threads cost more than it saved (2,000 videos, load 10: ANN stage 53 ms on 2 threads, 23 on 1).
PARALLEL_FROM_QUERIES = 8
# Queries whose token hits are read and re-scored together (bounds the rows held: 8 x 800 x 2 x D).
REFINE_QUERIES = 8
# Consecutive tokens averaged into one ANN vector per branch (the exact re-score reads every token).
# Neighbouring frame tokens are near-copies (128 rows of a few events), so pairs lose little for
# candidates and halve the frame branch's index and its build time; clip tokens are already merged.
DEFAULT_POOLS = {"clip": 1, "frame": 2}
CELLS_DIVISOR = 4
PQ_DIMS_PER_CODE = 4


def default_factory(num_tokens: int, dim: int) -> str:
  """The FAISS index of a branch of `num_tokens` tokens of width `dim`.

  An IVF over ~sqrt(num_tokens) / 4 cells (a power of two, at least 64; an HNSW graph assigns
  points to cells when there are 4096 or more), each vector coded by dim / 4 four-bit
  sub-quantisers (48 bytes for D = 384) scanned with SIMD (fast-scan); `Flat` (exact) for small
  branches. Few, long lists: assigning vectors to cells is most of the build time, and the SIMD
  scan of long lists is cheap.
  """
  if num_tokens < FLAT_BELOW:
    return "Flat"
  cells = 1 << int(round(np.log2(max(64.0, np.sqrt(num_tokens) / CELLS_DIVISOR))))
  quantizer = f"IVF{cells}_HNSW32" if cells >= 4096 else f"IVF{cells}"
  m = max(2, dim // PQ_DIMS_PER_CODE)
  m -= m % 2
  return f"{quantizer},PQ{m}x4fs"


def _fingerprint(path: pathlib.Path) -> str:
  """sha256 of a file's size, first and last MiB: tells ANN files apart without reading them."""
  size = path.stat().st_size
  digest = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    digest.update(f.read(1 << 20))
    if size > 1 << 20:
      f.seek(max(1 << 20, size - (1 << 20)))
      digest.update(f.read())
  return digest.hexdigest()


def branch_tokens(index, branch: str, positions: Optional[np.ndarray] = None,
                  start: int = 0, batch: int = ADD_BATCH_VIDEOS, pool: int = 1
                  ) -> Iterator[np.ndarray]:
  """(n * T / pool, D) float32 ANN vectors of a branch, in position order, `batch` videos at a time.

  Args:
    index: an IndexReader-like object (segments, firsts, num_rows, rows()).
    branch: 'clip' or 'frame'.
    positions: sorted positions to read (None: every position from `start`).
    start: first position when `positions` is None.
    batch: videos per yielded block.
    pool: consecutive tokens averaged (then L2-normalised) into one vector; must divide T.
  """
  name = BRANCH_ARRAYS[branch]
  if positions is None:
    positions = np.arange(start, index.num_rows)
  for s in range(0, len(positions), batch):
    rows = index.rows(positions[s:s + batch], (name,))
    tokens = dequantize(rows[name], rows.get(SCALES[name]))
    n, t, d = tokens.shape
    if pool > 1:
      tokens = tokens.reshape(n, t // pool, pool, d).mean(axis=2)
      tokens /= np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    yield np.ascontiguousarray(tokens.reshape(-1, d), np.float32)


def _tokens_per_video(index, branch: str) -> int:
  return int(index.manifest["num_clips" if branch == "clip" else "num_frames"])


def _train_sample(index, branch: str, factory: str, seed: int, pool: int) -> np.ndarray:
  """ANN vectors of randomly chosen videos, enough for the factory's k-means (sorted reads)."""
  tokens_per_video = _tokens_per_video(index, branch) // pool
  found = re.match(r"IVF(\d+)", factory)
  cells = int(found.group(1)) if found else 1
  want = min(MAX_TRAIN_POINTS, max(TRAIN_POINTS_PER_CELL * cells, 4096))
  videos = min(index.num_rows, -(-want // tokens_per_video))
  rng = np.random.default_rng(seed)
  positions = np.sort(rng.choice(index.num_rows, size=videos, replace=False))
  return np.concatenate(list(branch_tokens(index, branch, positions, pool=pool)))


def _write_index(idx, path: pathlib.Path) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  faiss.write_index(idx, str(tmp))
  fd = os.open(tmp, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  os.replace(tmp, path)


def _ann_file(generation: int, branch: str) -> str:
  return f"ann-{generation:06d}-{branch}.faiss"


def _new_branch_index(index, branch: str, factory: Optional[str], seed: int
                      ) -> tuple[Any, str, int]:
  """(trained empty FAISS index, factory string, pool) of one branch.

  The pool is `DEFAULT_POOLS` for a quantised index and 1 for a flat one: a flat scan of every
  token is exact and cheap at the sizes that get one (averaged frame pairs cost the 500-video set
  1 % of its exact top-10s, measured with `bench search`).
  """
  d = int(index.manifest["dim"])
  tokens = _tokens_per_video(index, branch)
  pool = DEFAULT_POOLS[branch] if tokens % DEFAULT_POOLS[branch] == 0 else 1
  spec = factory or default_factory(index.num_rows * tokens // pool, d)
  if spec == "Flat":
    pool = 1
  try:
    idx = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
  except RuntimeError as e:
    raise SearchError(f"--ann-factory {spec!r}: not a FAISS index factory string ({e})") from None
  if not idx.is_trained:
    idx.train(_train_sample(index, branch, spec, seed, pool))
  return idx, spec, pool


def _trained_branch_index(index, branch: str, trained: dict[str, Any], start: int) -> Any:
  """The current FAISS index of one branch, holding positions [0, start) (emptied if start = 0)."""
  previous = index.directory / trained["files"][branch]["file"]
  idx = faiss.read_index(str(previous))
  want = start * (_tokens_per_video(index, branch) // int(trained["pools"][branch]))
  if start == 0:  # the same quantisers over a rewritten store (compact)
    idx.reset()
  elif idx.ntotal != want:
    raise SearchError(f"{previous}: holds {idx.ntotal} tokens, the token store {want}: the ANN "
                      "file does not match the token store; run `search retrain`")
  return idx


def build_faiss(index, generation: int, factory: Optional[str] = None,
                trained: Optional[dict[str, Any]] = None, start: int = 0, seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
  """Writes the FAISS files of both branches for every position of `index`.

  Vectors: each branch's tokens, `DEFAULT_POOLS` consecutive ones averaged for a quantised index,
  every token for a flat one (the pools are kept from `trained`).

  Args:
    index: IndexReader-like (its token store must be complete).
    generation: the manifest generation the files belong to (their names).
    factory: FAISS factory string for both branches; None: `default_factory` per branch.
    trained: the current ANN entry whose trained quantisers are kept (its files hold positions
      [0, start)); None trains new quantisers on a sample of the tokens.
    start: with `trained`, the first position to add (0: emptied first, every position added).
    seed: training sample draw.
    progress: tqdm bars.

  Returns:
    The manifest's `ann` entry.
  """
  files, factories, pools = {}, {}, {}
  for branch in BRANCH_ARRAYS:
    if trained is not None:
      idx = _trained_branch_index(index, branch, trained, start)
      spec, pool, first = trained["factories"][branch], int(trained["pools"][branch]), start
    else:
      (idx, spec, pool), first = _new_branch_index(index, branch, factory, seed), 0
    factories[branch], pools[branch] = spec, pool
    tokens_per_video = _tokens_per_video(index, branch) // pool
    bar = tqdm.tqdm(total=index.num_rows - first, desc=f"ann {branch}", unit="video",
                    disable=not progress)
    for block in branch_tokens(index, branch, start=first, pool=pool):
      idx.add(block)
      bar.update(len(block) // tokens_per_video)
    bar.close()
    path = index.directory / _ann_file(generation, branch)
    _write_index(idx, path)
    files[branch] = dict(file=path.name, bytes=path.stat().st_size, ntotal=int(idx.ntotal),
                         fingerprint=_fingerprint(path))
  return dict(backend="faiss", factories=factories, files=files, pools=pools, trained_rows=int(
      trained["trained_rows"] if trained is not None else index.num_rows))


@dataclasses.dataclass
class Candidates:
  """Per branch, each query's best videos by their best token hit.

  Attributes:
    videos: (Q, M) int64 positions, -1 = none (best first).
    scores: (Q, M) float32 approximate per-video maxima.
  """

  videos: np.ndarray
  scores: np.ndarray


def per_video_maxima(scores: np.ndarray, videos: np.ndarray, alive: np.ndarray,
                     limit: int) -> Candidates:
  """Token hits -> the best `limit` distinct live videos of each query.

  Args:
    scores: (Q, k) token scores, each row sorted descending (as ANN searches return them).
    videos: (Q, k) the hits' video positions, -1 for no hit.
    alive: (N,) bool, False for removed videos.
    limit: M.

  Returns:
    Candidates (Q, M): the first hit of each video is its maximum.
  """
  q, k = videos.shape
  order = np.argsort(videos, axis=1, kind="stable")
  sorted_videos = np.take_along_axis(videos, order, axis=1)
  first_sorted = np.ones((q, k), bool)
  first_sorted[:, 1:] = sorted_videos[:, 1:] != sorted_videos[:, :-1]
  first = np.empty_like(first_sorted)
  np.put_along_axis(first, order, first_sorted, axis=1)
  keep = first & (videos >= 0) & alive[np.clip(videos, 0, None)]
  rank = np.cumsum(keep, axis=1) - 1
  keep &= rank < limit
  out_v = np.full((q, limit), -1, np.int64)
  out_s = np.full((q, limit), -np.inf, np.float32)
  rows, cols = np.nonzero(keep)
  out_v[rows, rank[rows, cols]] = videos[rows, cols]
  out_s[rows, rank[rows, cols]] = scores[rows, cols]
  return Candidates(out_v, out_s)


class FaissANN:
  """The FAISS indexes of an index directory, checked against its token store."""

  def __init__(self, index):
    """Loads both branch files named by the manifest.

    Raises:
      SearchError: a missing file, or one that does not match the token store (size, fingerprint,
        token count or width).
    """
    entry = index.manifest["ann"]
    self.alive = index.alive
    try:
      pools = {b: int(entry["pools"][b]) for b in BRANCH_ARRAYS}
    except (KeyError, TypeError, ValueError):
      raise SearchError(f"{index.directory / 'manifest.json'}: damaged manifest (bad ann entry)"
                        ) from None
    self.index, self.pools = index, pools
    self.tokens_per_video = {b: _tokens_per_video(index, b) // pools[b] for b in BRANCH_ARRAYS}
    self.indexes = {}
    self.on_gpu = False
    try:
      files = {b: entry["files"][b] for b in BRANCH_ARRAYS}
    except (KeyError, TypeError):
      raise SearchError(f"{index.directory / 'manifest.json'}: damaged manifest (bad ann entry)"
                        ) from None
    for branch, info in files.items():
      path = index.directory / str(info["file"])
      if not path.is_file():
        raise SearchError(f"{path}: ANN file listed in the manifest is missing; run "
                          "`python -m prvr_jax.search retrain`")
      want = index.num_rows * self.tokens_per_video[branch]
      if path.stat().st_size != info.get("bytes") or _fingerprint(path) != info.get("fingerprint"):
        raise SearchError(f"{path}: this ANN file is not the one the manifest names (another "
                          "index's, or changed since): it does not match the token store; run "
                          "`python -m prvr_jax.search retrain`")
      try:
        idx = faiss.read_index(str(path))
      except RuntimeError as e:
        raise SearchError(f"{path}: unreadable ANN file ({str(e).splitlines()[0]}); run "
                          "`python -m prvr_jax.search retrain`") from None
      if idx.ntotal != want or idx.d != int(index.manifest["dim"]):
        raise SearchError(f"{path}: {idx.ntotal} tokens of width {idx.d}, the token store has "
                          f"{want} of width {index.manifest['dim']}: the ANN file does not match "
                          "the token store; run `python -m prvr_jax.search retrain`")
      self.indexes[branch] = self._maybe_gpu(idx)

  def _maybe_gpu(self, idx):
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
      return idx
    try:
      self._gpu_resources = getattr(self, "_gpu_resources", None) or faiss.StandardGpuResources()
      moved = faiss.index_cpu_to_gpu(self._gpu_resources, 0, idx)
    except RuntimeError:  # an index type FAISS cannot run on GPUs (e.g. fast-scan codes)
      return idx
    self.on_gpu = True
    return moved

  def candidates(self, queries: np.ndarray, branch: str, limit: int,
                 nprobe: int = DEFAULT_NPROBE) -> Candidates:
    """Each query's best `limit` live videos in one branch.

    The ANN's token hits are re-scored exactly (their tokens read from the store) before they
    become per-video maxima: the quantised scores alone ranked the videos too loosely (at 10,000
    videos 0.90 of the exact top-10 found with 50 candidates per branch, 0.96 after the re-score).

    Args:
      queries: (Q, D) float32 L2-normalised.
      branch: 'clip' or 'frame'.
      limit: M, videos per query.
      nprobe: IVF cells visited per query (ignored by flat indexes).

    Returns:
      Candidates (Q, M), scores the exact maxima over each video's hit tokens.
    """
    idx = self.indexes[branch]
    k = min(int(idx.ntotal), limit * TOKEN_HITS_PER_CANDIDATE)
    params = None
    if hasattr(faiss.extract_index_ivf(idx) if _is_ivf(idx) else None, "nprobe"):
      params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    queries = np.ascontiguousarray(queries, np.float32)
    with _omp_threads(1 if len(queries) < PARALLEL_FROM_QUERIES else None):
      _, labels = idx.search(queries, k, params=params)
    scores = np.concatenate([self._exact_hit_scores(queries[s:s + REFINE_QUERIES], branch,
                                                    labels[s:s + REFINE_QUERIES])
                             for s in range(0, len(queries), REFINE_QUERIES)])
    videos = np.where(labels >= 0, labels // self.tokens_per_video[branch], -1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return per_video_maxima(np.take_along_axis(scores, order, axis=1),
                            np.take_along_axis(videos, order, axis=1), self.alive, limit)

  def _exact_hit_scores(self, queries: np.ndarray, branch: str, labels: np.ndarray) -> np.ndarray:
    """(q, k) exact scores of ANN hits: the best q . token over each hit vector's `pool` tokens.

    Args:
      queries: (q, D) float32.
      branch: 'clip' or 'frame'.
      labels: (q, k) ANN vector ids, -1 for no hit (scored -inf).
    """
    pool, per_video = self.pools[branch], self.tokens_per_video[branch]
    hit = labels >= 0
    ids = np.where(hit, labels, 0)
    videos = np.broadcast_to((ids // per_video)[..., None], ids.shape + (pool,))
    tokens = (ids % per_video)[..., None] * pool + np.arange(pool)
    rows = self.index.token_rows(BRANCH_ARRAYS[branch], videos.ravel(), tokens.ravel())
    exact = np.einsum("qkpd,qd->qkp", rows.reshape(tokens.shape + (-1,)), queries).max(axis=-1)
    return np.where(hit, exact, -np.inf).astype(np.float32)


@contextlib.contextmanager
def _omp_threads(threads: Optional[int]) -> Iterator[None]:
  """FAISS's OpenMP thread count set to `threads` (None: unchanged) for the block."""
  if threads is None:
    yield
    return
  before = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(threads)
  try:
    yield
  finally:
    faiss.omp_set_num_threads(before)


def _is_ivf(idx) -> bool:
  try:
    faiss.extract_index_ivf(idx)
    return True
  except RuntimeError:
    return False
