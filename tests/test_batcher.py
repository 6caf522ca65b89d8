"""The query batcher: queued requests share model calls, bounded by size and by waiting time.

Deterministic: the model call of the first batch blocks on an event, so the requests sent
meanwhile are known to be queued when the worker takes the next batch.
"""

from __future__ import annotations

import threading

import pytest

from prvr_jax.search.batcher import QueryBatcher


class GatedModel:
  """Upper-cases texts; the call for ['hold'] waits until `release`."""

  def __init__(self):
    self.calls: list[list[str]] = []
    self.gate, self.busy = threading.Event(), threading.Event()

  def __call__(self, texts):
    self.calls.append(list(texts))
    if list(texts) == ["hold"]:
      self.busy.set()
      assert self.gate.wait(30)
    if "boom" in texts:
      raise RuntimeError("model failed")
    return [t.upper() for t in texts]


@pytest.fixture
def model():
  return GatedModel()


@pytest.fixture
def batcher_of(model):
  """fn(max_batch, max_wait_s) -> a QueryBatcher over `model`, closed after the test."""
  made: list[QueryBatcher] = []

  def make(max_batch: int, max_wait_s: float) -> QueryBatcher:
    made.append(QueryBatcher(model, max_batch=max_batch, max_wait_s=max_wait_s))
    return made[-1]

  yield make
  model.gate.set()  # a failed test may leave the worker held
  for batcher in made:
    batcher.close()


def hold(batcher: QueryBatcher, model: GatedModel):
  """Occupies the worker with a call that waits for `model.gate`; returns its future."""
  future = batcher.submit(["hold"])
  assert model.busy.wait(30)
  return future


def test_queued_requests_share_one_call_up_to_max_batch(model, batcher_of):
  batcher = batcher_of(max_batch=4, max_wait_s=0.0)
  first = hold(batcher, model)
  a, b, c = batcher.submit(["a", "b"]), batcher.submit(["c"]), batcher.submit(["d", "e"])
  model.gate.set()
  assert first.result(30)[0] == ["HOLD"]
  # 2 + 1 queries fit in 4; the next request (2 more) would overflow: it goes in the next call.
  assert a.result(30)[0] == ["A", "B"] and b.result(30)[0] == ["C"]
  assert c.result(30)[0] == ["D", "E"]
  assert model.calls == [["hold"], ["a", "b", "c"], ["d", "e"]]
  info = a.result()[1]
  assert (info.queries, info.requests) == (3, 2) and info.wait_ms >= 0
  assert (c.result()[1].queries, c.result()[1].requests) == (2, 1)
  stats = batcher.stats.to_json()
  assert (stats["batches"], stats["queries"], stats["requests"]) == (3, 6, 4)


def test_a_full_batch_starts_without_waiting_out_the_deadline(model, batcher_of):
  batcher = batcher_of(max_batch=2, max_wait_s=3600.0)
  x = batcher.submit(["x"])  # waits (up to an hour) for company ...
  y = batcher.submit(["y"])  # ... which fills the batch: it starts at once
  assert x.result(30)[0] == ["X"] and y.result(30)[0] == ["Y"]
  assert model.calls == [["x", "y"]]


def test_a_failed_call_fails_its_requests_only(model, batcher_of):
  batcher = batcher_of(max_batch=4, max_wait_s=0.0)
  first = hold(batcher, model)
  bad, neighbour = batcher.submit(["boom"]), batcher.submit(["fine"])
  model.gate.set()
  first.result(30)
  for future in (bad, neighbour):  # one call: both see its error
    with pytest.raises(RuntimeError, match="model failed"):
      future.result(30)
  assert batcher.submit(["after"]).result(30)[0] == ["AFTER"]  # the worker carries on


def test_cancelled_requests_are_dropped_and_bad_sizes_refused(model, batcher_of):
  batcher = batcher_of(max_batch=2, max_wait_s=0.0)
  first = hold(batcher, model)
  gone, kept = batcher.submit(["gone"]), batcher.submit(["kept"])
  assert gone.cancel()  # its client went away while it was queued
  model.gate.set()
  assert kept.result(30)[0] == ["KEPT"] and first.result(30)[0] == ["HOLD"]
  assert model.calls == [["hold"], ["kept"]]
  for texts in ([], ["a", "b", "c"]):
    with pytest.raises(ValueError, match="a request holds 1 to 2 queries"):
      batcher.submit(texts)
  with pytest.raises(ValueError):
    QueryBatcher(model, max_batch=0, max_wait_s=0.0)
