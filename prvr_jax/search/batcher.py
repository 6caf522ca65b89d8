"""Dynamic batching: concurrent requests' queries go through the model in one call.

Requests are queued; one worker thread (the only one that calls the model, so device calls never
interleave) takes the oldest, then keeps taking queued requests until the batch holds `max_batch`
queries or the oldest has waited `max_wait_s`. A request that would overflow the batch waits for
the next one. While the worker computes, new requests queue up, so under load batches fill without
waiting at all; when idle, a lone query waits at most `max_wait_s` for company.

Every answer says how it was served (the batch's size, the request's queueing wait and the batch's
compute time), and `BatchStats` keeps the recent history for /healthz and the benchmark.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

# The compute function: N query texts -> N answers (in order).
RunBatch = Callable[[Sequence[str]], Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class BatchInfo:
  """How one request was served.

  Attributes:
    queries: queries in the batch its queries went in (all requests together).
    requests: requests in that batch.
    wait_ms: from the request's arrival to the batch's start.
    compute_ms: the batch's model call.
  """

  queries: int
  requests: int
  wait_ms: float
  compute_ms: float

  def to_json(self) -> dict[str, Any]:
    return dict(batch_queries=self.queries, batch_requests=self.requests,
                wait_ms=round(self.wait_ms, 3), compute_ms=round(self.compute_ms, 3))


@dataclasses.dataclass
class _Pending:
  texts: list[str]
  future: concurrent.futures.Future
  arrived: float


class BatchStats:
  """Counts and the last `window` batches' sizes and waits (thread-safe)."""

  def __init__(self, window: int = 4096):
    self._lock = threading.Lock()
    self.batches = self.queries = self.requests = 0
    self._sizes: collections.deque[int] = collections.deque(maxlen=window)
    self._waits: collections.deque[float] = collections.deque(maxlen=window)

  def add(self, batch: Sequence[_Pending], started: float) -> None:
    with self._lock:
      self.batches += 1
      self.requests += len(batch)
      size = sum(len(p.texts) for p in batch)
      self.queries += size
      self._sizes.append(size)
      self._waits.extend(1e3 * (started - p.arrived) for p in batch)

  def to_json(self) -> dict[str, Any]:
    """{batches, queries, requests, mean_batch_queries, wait_ms_p50, wait_ms_p99} (recent)."""
    with self._lock:
      sizes, waits = list(self._sizes), list(self._waits)
      out = dict(batches=self.batches, queries=self.queries, requests=self.requests)
    out["mean_batch_queries"] = float(np.mean(sizes)) if sizes else 0.0
    out["wait_ms_p50"] = float(np.percentile(waits, 50)) if waits else 0.0
    out["wait_ms_p99"] = float(np.percentile(waits, 99)) if waits else 0.0
    return out


class QueryBatcher:
  """Queues requests (lists of query texts) and answers them in shared model calls.

  Attributes:
    max_batch: queries per model call (a request holds at most this many).
    max_wait_s: how long the oldest queued request waits for others before its batch starts.
    stats: the served batches.
  """

  def __init__(self, run_batch: RunBatch, max_batch: int, max_wait_s: float):
    """Starts the worker thread.

    Args:
      run_batch: N texts -> N answers; called by the worker only, N <= max_batch.
      max_batch: see the class.
      max_wait_s: see the class (0 = never wait for company).
    """
    if max_batch < 1 or max_wait_s < 0:
      raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
    self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_s)
    self.stats = BatchStats()
    self._run_batch = run_batch
    self._queue: queue.Queue[Optional[_Pending]] = queue.Queue()
    self._carry: Optional[_Pending] = None
    self._thread = threading.Thread(target=self._work, name="query-batcher", daemon=True)
    self._thread.start()

  def submit(self, texts: Sequence[str]) -> concurrent.futures.Future:
    """Queues one request; the future gives (answers, BatchInfo) or the batch's exception."""
    if not 1 <= len(texts) <= self.max_batch:
      raise ValueError(f"a request holds 1 to {self.max_batch} queries, got {len(texts)}")
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put(_Pending(list(texts), future, time.perf_counter()))
    return future

  async def answer(self, texts: Sequence[str]) -> tuple[list[Any], BatchInfo]:
    """`submit`, awaited from an event loop (the loop keeps serving while the worker computes)."""
    return await asyncio.wrap_future(self.submit(texts))

  def close(self) -> None:
    """Stops the worker after the requests already queued."""
    self._queue.put(None)
    self._thread.join()

  def _next_batch(self) -> Optional[list[_Pending]]:
    first = self._carry or self._queue.get()
    self._carry = None
    if first is None:
      return None
    batch, size = [first], len(first.texts)
    deadline = first.arrived + self.max_wait_s
    while size < self.max_batch:
      remaining = deadline - time.perf_counter()
      try:
        item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if item is None:
        self._queue.put(None)  # seen again once this batch is done: stop then
        break
      if size + len(item.texts) > self.max_batch:
        self._carry = item
        break
      batch.append(item)
      size += len(item.texts)
    return batch

  def _work(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      # A request whose client went away is dropped; the others can no longer be cancelled.
      batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
      if not batch:
        continue
      started = time.perf_counter()
      texts = [t for p in batch for t in p.texts]
      try:
        answers = list(self._run_batch(texts))
      except BaseException as e:  # pylint: disable=broad-except  # handed to every waiting request
        for p in batch:
          p.future.set_exception(e)
        continue
      compute_ms = 1e3 * (time.perf_counter() - started)
      self.stats.add(batch, started)
      at = 0
      for p in batch:
        info = BatchInfo(len(texts), len(batch), 1e3 * (started - p.arrived), compute_ms)
        p.future.set_result((answers[at:at + len(p.texts)], info))
        at += len(p.texts)
