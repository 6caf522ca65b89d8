"""The ANN stage on Milvus (pymilvus): a Milvus server / cluster URI, or a milvus-lite file.

Per branch one collection `prvr_<uid>_<branch>` of rows (pk auto id, `video` int64 position,
`vec` float vector D, inner product, AUTOINDEX). A query's per-video maxima come from the engine
itself: `search(..., group_by_field="video")` returns the best hit of each of the top `limit`
videos (Milvus >= 2.4 and milvus-lite both group; an engine without grouping would need a plain
search with a larger top-k, grouped on the client as ann.per_video_maxima does). Removed videos are
filtered on the client (the search asks for that many more groups), and rows of positions beyond
the manifest's (left by an interrupted `add`) are excluded with a filter and deleted by the next
`add`. The exact re-scoring still reads the local token store.
"""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

import numpy as np
import tqdm

from prvr_jax.search.ann import BRANCH_ARRAYS, DEFAULT_NPROBE, Candidates, branch_tokens
from prvr_jax.search.errors import SearchError

INSERT_ROWS = 8192


def _client(uri: str):
  # pymilvus (grpc, protobuf, pandas) takes 5-9 s to import on the 2-core machine, and every search
  # command imports this module: only an index on Milvus pays for it.
  from pymilvus import MilvusClient  # pylint: disable=import-outside-toplevel

  try:
    return MilvusClient(uri)
  except Exception as e:  # pymilvus raises its own MilvusException and connection errors
    raise SearchError(f"{uri}: cannot connect to Milvus ({type(e).__name__}: {e})") from None


def normalise_uri(uri: str) -> str:
  """A milvus-lite file path made absolute (so `query` finds it from any directory)."""
  if "://" in uri:
    return uri
  return str(pathlib.Path(uri).expanduser().resolve())


def _create(client, name: str, dim: int) -> None:
  from pymilvus import DataType  # pylint: disable=import-outside-toplevel  # as in _client

  schema = client.create_schema(auto_id=True)
  schema.add_field("pk", DataType.INT64, is_primary=True)
  schema.add_field("video", DataType.INT64)
  schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
  params = client.prepare_index_params()
  params.add_index(field_name="vec", index_type="AUTOINDEX", metric_type="IP")
  client.create_collection(name, schema=schema, index_params=params)


def _insert(client, name: str, index, branch: str, start: int, progress: bool) -> None:
  tokens_per_video = index.manifest["num_clips" if branch == "clip" else "num_frames"]
  bar = tqdm.tqdm(total=index.num_rows - start, desc=f"milvus {branch}", unit="video",
                  disable=not progress)
  first = start
  batch = max(1, INSERT_ROWS // tokens_per_video)
  for block in branch_tokens(index, branch, start=start, batch=batch):
    n = len(block) // tokens_per_video
    videos = np.repeat(np.arange(first, first + n), tokens_per_video)
    client.insert(name, [dict(video=int(v), vec=t) for v, t in zip(videos, block)])
    first += n
    bar.update(n)
  bar.close()
  client.flush(name)


def build_milvus(index, uri: str, progress: bool = True) -> dict[str, Any]:
  """New collections holding every token of `index`; returns the manifest's `ann` entry."""
  uri = normalise_uri(uri)
  client = _client(uri)
  uid = uuid.uuid4().hex[:12]
  collections = {b: f"prvr_{uid}_{b}" for b in BRANCH_ARRAYS}
  for branch, name in collections.items():
    _create(client, name, int(index.manifest["dim"]))
    _insert(client, name, index, branch, 0, progress)
  client.close()
  return dict(backend="milvus", uri=uri, collections=collections, rows=int(index.num_rows))


def extend_milvus(index, entry: dict[str, Any], start: int, progress: bool = True
                  ) -> dict[str, Any]:
  """Adds positions [start, num_rows) to the collections (after deleting rows >= start)."""
  client = _client(entry["uri"])
  for branch, name in entry["collections"].items():
    client.load_collection(name)
    client.delete(name, filter=f"video >= {int(start)}")  # an interrupted add's rows
    _insert(client, name, index, branch, start, progress)
  client.close()
  return dict(entry, rows=int(index.num_rows))


def drop_collections(entry: dict[str, Any]) -> None:
  """Drops an old generation's collections (after the manifest no longer names them)."""
  client = _client(entry["uri"])
  for name in entry["collections"].values():
    if client.has_collection(name):
      client.drop_collection(name)
  client.close()


class MilvusANN:
  """The Milvus collections of an index, checked against its token store."""

  def __init__(self, index):
    """Connects and checks both collections hold one row per token of every position.

    Raises:
      SearchError: no connection, a missing collection, or a row count that does not match.
    """
    entry = index.manifest["ann"]
    self.uri = entry["uri"]
    self.client = _client(self.uri)
    self.collections = entry["collections"]
    self.num_rows = index.num_rows
    self.alive = index.alive
    self.num_removed = int((~index.alive).sum())
    for branch, name in self.collections.items():
      if not self.client.has_collection(name):
        raise SearchError(f"{self.uri}: Milvus collection {name!r} named by "
                          f"{index.directory / 'manifest.json'} is missing; run "
                          "`python -m prvr_jax.search retrain`")
      self.client.load_collection(name)
      got = self.client.query(name, filter=f"video < {self.num_rows}",
                              output_fields=["count(*)"])[0]["count(*)"]
      want = self.num_rows * int(index.manifest["num_clips" if branch == "clip" else "num_frames"])
      if got != want:
        raise SearchError(f"{self.uri}: collection {name!r} holds {got} tokens, the token store "
                          f"{want}: the ANN does not match the token store; run "
                          "`python -m prvr_jax.search retrain`")

  def candidates(self, queries: np.ndarray, branch: str, limit: int,
                 nprobe: int = DEFAULT_NPROBE) -> Candidates:
    """Each query's best `limit` live videos in one branch (grouped by the engine)."""
    want = min(self.num_rows, limit + self.num_removed)
    results = self.client.search(
        self.collections[branch], data=np.asarray(queries, np.float32), anns_field="vec",
        limit=want, group_by_field="video", output_fields=["video"],
        filter=f"video < {self.num_rows}",
        search_params={"metric_type": "IP", "params": {"nprobe": int(nprobe)}})
    videos = np.full((len(queries), limit), -1, np.int64)
    scores = np.full((len(queries), limit), -np.inf, np.float32)
    for qi, hits in enumerate(results):  # the engine's reply is a list per query
      found = [(int(h["entity"]["video"]), float(h["distance"])) for h in hits]
      found = [(v, s) for v, s in found if self.alive[v]][:limit]
      if found:
        videos[qi, :len(found)] = [v for v, _ in found]
        scores[qi, :len(found)] = [s for _, s in found]
    return Candidates(videos, scores)

