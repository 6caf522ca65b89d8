"""Evaluation over several processes: each encodes and ranks its share, host arrays are gathered.

With P processes, process p loads and encodes its slice of the eval videos and of the queries
(the pipelines' process sharding). The encoded corpora are gathered so that every process holds
the whole corpus, each process ranks its own queries against it, and the ranks are gathered, so
every process ends with the same ranks, in split order, as one process would compute. Encoding
(most of the evaluation's time) is thus split over the processes instead of repeated on each.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

# Rows gathered per collective: bounds the device memory of the gather (P x block rows).
GATHER_BLOCK_ROWS = 64


def allgather_rows(arrays: Mapping[str, np.ndarray],
                   block_rows: int = GATHER_BLOCK_ROWS) -> dict[str, np.ndarray]:
  """Every process's arrays concatenated along axis 0, in process order.

  Args:
    arrays: name -> (n_p, ...) host arrays; n_p (the same for every name) may differ between
      processes, the trailing shapes and dtypes may not.
    block_rows: rows per collective call.

  Returns:
    name -> (sum_p n_p, ...) arrays, identical on every process (the input itself with one
    process).
  """
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in arrays.items()}
  lengths = {int(np.shape(v)[0]) for v in arrays.values()}
  if len(lengths) != 1:
    raise ValueError(f"allgather_rows: arrays of different lengths {sorted(lengths)}")
  counts = np.asarray(multihost_utils.process_allgather(np.int32(lengths.pop()))).reshape(-1)
  most = max(int(counts.max()), 1)
  out = {}
  for name, value in arrays.items():
    value = np.asarray(value)
    padded = np.zeros((most,) + value.shape[1:], value.dtype)
    padded[:value.shape[0]] = value
    blocks = [np.asarray(multihost_utils.process_allgather(padded[s:s + block_rows]))
              for s in range(0, most, block_rows)]
    gathered = np.concatenate(blocks, axis=1)  # (P, most, ...)
    out[name] = np.concatenate([gathered[p, :counts[p]] for p in range(len(counts))])
  return out


def in_split_order(arrays: Mapping[str, np.ndarray], query_index: np.ndarray) -> dict[str, np.ndarray]:
  """Per-query arrays gathered from all processes, reordered by query (caption) index.

  Args:
    arrays: name -> (M, ...) this process's arrays (ranks, moments, ...), in the order of
      query_index.
    query_index: (M,) split index of each of this process's queries.

  Returns:
    name -> (M_total, ...) arrays of all queries in split order, plus 'query_index' (sorted).
  """
  gathered = allgather_rows(dict(arrays, query_index=np.asarray(query_index)))
  order = np.argsort(gathered["query_index"], kind="stable")
  return {k: v[order] for k, v in gathered.items()}
