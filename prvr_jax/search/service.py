"""The search engine a service keeps loaded: index, model and query encoder, compiled once.

`open_engine` opens the index once, restores what `query` restores (the index's exact checkpoint,
refused when its parameters differ) and builds the raw-text query encoder once;
`SearchEngine.warm_up` compiles it and the scoring kernels for every batch size the service will
use, so the first request is not the one that pays for compilation.

Search modes are `query`'s (`SearchSettings`: --mode auto|exact|ann, --nprobe, --candidates, the
same defaults), resolved once at start: `exact` holds the whole token store in memory (read once;
the service scores every video of every batch), `ann` loads the ANN index once and re-scores its
candidates from the memory-mapped token store (only their rows are read).

Static shapes: a batch of N texts is padded with empty texts to the smallest of a few fixed sizes
(`batch_sizes`: 1, 4, 16, ... up to max_batch) and always searched for `max_k` results (cut to
each request's k afterwards), so serving never compiles after the warm-up.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np

from prvr_jax.search import ann as ann_lib
from prvr_jax.search import query as query_lib
from prvr_jax.search import restore
from prvr_jax.search.errors import SearchError
from prvr_jax.search.index_store import IndexReader
from prvr_jax.search.model import SearchModel
from prvr_jax.search.query import Hit
from prvr_jax.search.token_store import SCALES
from prvr_jax.search.text import TextEncoder, clip_text_encoder, load_text_tower
from prvr_jax.search.text import model_tower_text_encoder


# The arrays the scoring kernel reads (int8 tokens bring their scales); a full chunk's are kept on
# the device.
_SCORED = query_lib.SCORED_ARRAYS + tuple(SCALES.values())


@dataclasses.dataclass(frozen=True)
class SearchSettings:
  """How the index is searched: `query`'s --mode, --nprobe and --candidates (None: ann.py's
  defaults)."""

  mode: str = "auto"
  nprobe: Optional[int] = None
  candidates: Optional[int] = None


class ResidentIndex(IndexReader):
  """An index whose chunks are read from disk once, at start, and then kept in memory.

  A service answers every batch from the whole index: re-reading the chunk files each time
  (what `query` does, to search indexes larger than memory) would cost more than scoring them.
  The scored arrays of every full chunk are put on the device once (the kernel then takes them
  as they are); the last, partial chunk stays on the host, since it is padded for each call.
  """

  def __init__(self, directory: str | os.PathLike):
    super().__init__(directory)
    self._resident = []
    for first, arrays in super().chunks():
      if len(arrays["video_ids"]) == self.chunk_size:
        arrays = dict(arrays, **{k: jax.device_put(arrays[k]) for k in _SCORED if k in arrays})
      self._resident.append((first, arrays))

  def chunks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    yield from self._resident


def batch_sizes(max_batch: int) -> tuple[int, ...]:
  """The padded batch sizes: powers of 4 below max_batch, then max_batch (1, 4, 16, 32 for 32)."""
  sizes = [1]
  while sizes[-1] * 4 < max_batch:
    sizes.append(sizes[-1] * 4)
  if sizes[-1] != max_batch:
    sizes.append(max_batch)
  return tuple(sizes)


class SearchEngine:
  """Answers batches of query texts over one index.

  Attributes:
    index: the opened index.
    model: the network that built it.
    max_k: results computed per query.
    sizes: the padded batch sizes (the last is the largest batch).
    settings: the search settings, `mode` resolved ('exact' or 'ann').
    durations: {video id: seconds} of every video that can be found (not the removed ones).
    warm_up_s: seconds the warm-up took (None before it).
  """

  def __init__(self, index: IndexReader, model: SearchModel, encoder: TextEncoder, *,
               max_k: int, max_batch: int, settings: SearchSettings = SearchSettings()):
    """Checks the model against the index, resolves the mode and reads every video's duration.

    Args:
      index: an opened index.
      model: the network that encoded its videos.
      encoder: N texts -> (N, D) query vectors (`text.clip_text_encoder` or
        `text.model_tower_text_encoder`).
      max_k: results per query (requests ask for at most this many).
      max_batch: queries per encoder call.
      settings: mode ('auto' is resolved here, see `query.choose_mode`), nprobe, candidates.

    Raises:
      SearchError: the model is not the index's, max_k / max_batch < 1, or mode 'ann' on an
        index without an ANN index.
    """
    if max_k < 1 or max_batch < 1:
      raise SearchError(f"--max-k and --max-batch must be >= 1, got {max_k}, {max_batch}")
    query_lib.check_model(index, model)
    self.index, self.model, self.max_k = index, model, int(max_k)
    self.sizes = batch_sizes(int(max_batch))
    self.settings = dataclasses.replace(settings, mode=query_lib.choose_mode(index, settings.mode))
    if self.settings.mode == "ann":
      index.ann()  # loaded (and checked against the token store) once, before serving
    self._encoder = encoder
    durations = np.concatenate([seg.arrays["durations"] for seg in index.segments])
    self.durations: dict[str, float] = {str(v): float(d) for v, d, alive in
                                        zip(index.video_ids, durations, index.alive) if alive}
    self.warm_up_s: Optional[float] = None

  @property
  def max_batch(self) -> int:
    return self.sizes[-1]

  def search(self, texts: Sequence[str]) -> list[list[Hit]]:
    """Top `max_k` hits of each text.

    Args:
      texts: 1 to max_batch query strings.

    Returns:
      len(texts) lists of Hits, rank 1 first.
    """
    n = len(texts)
    if not 1 <= n <= self.max_batch:
      raise ValueError(f"1 to {self.max_batch} texts per batch, got {n}")
    size = next(s for s in self.sizes if s >= n)
    padded = list(texts) + [""] * (size - n)
    vectors = self._encoder(padded)
    return query_lib.search(index=self.index, model=self.model, queries=vectors, names=padded,
                            top_k=self.max_k, batch=size, mode=self.settings.mode,
                            nprobe=self.settings.nprobe,
                            candidates=self.settings.candidates)[:n]

  def describe(self) -> dict[str, Any]:
    """The search settings for /healthz: mode, nprobe and candidates in use (ANN only)."""
    if self.settings.mode != "ann":
      return dict(mode="exact")
    return dict(mode="ann", nprobe=self.settings.nprobe or ann_lib.DEFAULT_NPROBE,
                candidates=self.settings.candidates or ann_lib.DEFAULT_CANDIDATES)

  def warm_up(self) -> float:
    """Compiles the encoder and the scoring kernel for every batch size; returns the seconds."""
    start = time.perf_counter()
    for size in self.sizes:
      self.search(["warm up"] * size)
    self.warm_up_s = time.perf_counter() - start
    return self.warm_up_s


def open_engine(index_dir: str, *, clip: Optional[str] = None, text_kind: str = "projected",
                precision: str = "highest", workdir: Optional[str] = None, max_k: int = 50,
                max_batch: int = 32, settings: SearchSettings = SearchSettings()) -> SearchEngine:
  """Opens an index and restores its model and query encoder (not yet warmed up).

  Args:
    index_dir: the index directory.
    clip: CLIP checkpoint directory for a run trained on extracted caption features (None for a
      run with its own CLIP text tower).
    text_kind, precision: the CLIP text features ('projected' / 'hidden') and matmul precision.
    workdir: the run, when it moved from where the manifest says.
    max_k, max_batch, settings: see `SearchEngine`.

  Returns:
    The engine; its index is a ResidentIndex in exact mode.

  Raises:
    SearchError: bad index (or ANN files), mode 'ann' without an ANN index, a missing or
      superfluous --clip, or a model that is not the index's.
    prvr_jax.train.checkpoint.CheckpointError, prvr_jax.clip.load.CheckpointError: unreadable
      checkpoints.
  """
  # The index, its mode and its ANN files are checked before the (slow) model restore.
  index = IndexReader(index_dir)
  settings = dataclasses.replace(settings, mode=query_lib.choose_mode(index, settings.mode))
  if settings.mode == "exact":
    index = ResidentIndex(index_dir)
  else:
    index.ann()
  workdir = restore.index_workdir(index, workdir)
  own_tower = restore.has_own_text_tower(workdir)
  if own_tower and clip:
    raise SearchError(f"{workdir}: the model runs its own CLIP text tower on query text; drop "
                      "--clip")
  if not own_tower and not clip:
    raise SearchError(f"{workdir}: the model was trained on extracted caption features: pass "
                      "--clip CLIP_DIR (the CLIP they were extracted with)")
  tower = load_text_tower(clip, text_kind, precision) if clip else None
  model = restore.restore_index_model(index, workdir)
  encoder = clip_text_encoder(tower, model) if tower else model_tower_text_encoder(model)
  return SearchEngine(index, model, encoder, max_k=max_k, max_batch=max_batch, settings=settings)

