"""The ANN searcher an index's manifest names: FAISS in process (ann.py) or Milvus (milvus.py)."""

from __future__ import annotations

from prvr_jax.search.ann import FaissANN
from prvr_jax.search.errors import SearchError
from prvr_jax.search.milvus import MilvusANN


def open_ann(index) -> FaissANN | MilvusANN:
  """The ANN searcher of `index` (an IndexReader whose manifest has an `ann` entry), checked
  against its token store.

  Raises:
    SearchError: an unknown backend, or ANN files / collections that do not match the store.
  """
  backend = index.manifest["ann"].get("backend")
  if backend == "faiss":
    return FaissANN(index)
  if backend == "milvus":
    return MilvusANN(index)
  raise SearchError(f"{index.directory / 'manifest.json'}: unknown ANN backend {backend!r}")
