"""A bounded load test of a running search service: C clients, each sending N queries in turn.

  python -m prvr_jax.search.load http://127.0.0.1:8080 --clients 16 --per-client 50 [--k 10]

Each client is a thread with its own keep-alive HTTP connection that sends `GET /api/search`
requests one after the other (a new one as soon as the last is answered), so up to C requests
are in flight at once. Prints one JSON object: requests, errors (non-200 answers, failed
connections), seconds, queries per second, latency p50 / p99 / max in ms, and the service's
batching counters over the run (from /healthz before and after).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import sys
import time
import urllib.parse
from typing import Any, Optional, Sequence

import numpy as np

SUBJECTS = ("a man", "a woman", "a child", "the dog", "two friends", "a cook", "the driver",
            "a player")
ACTIONS = ("opens the door", "holds a cup", "runs along the beach", "talks on the phone",
           "throws a ball", "cuts vegetables", "parks the red car", "laughs at a joke")


def sample_queries(n: int) -> list[str]:
  """n varied query texts (subject x action), the same list every time."""
  return [f"{SUBJECTS[i % len(SUBJECTS)]} {ACTIONS[(i // len(SUBJECTS)) % len(ACTIONS)]}"
          for i in range(n)]


def _connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
  url = urllib.parse.urlsplit(base_url)
  if url.scheme != "http" or not url.hostname:
    raise ValueError(f"expected an http://HOST:PORT URL, got {base_url!r}")
  return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)


def get_json(base_url: str, path: str, timeout: float = 30.0) -> tuple[int, Any]:
  """(status, parsed JSON body) of one GET."""
  conn = _connection(base_url, timeout)
  try:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")
  finally:
    conn.close()


def _client(base_url: str, texts: Sequence[str], k: int, timeout: float) -> list[tuple[float, int]]:
  """(latency s, status) of each query, sent one after the other on one connection."""
  out = []
  conn = _connection(base_url, timeout)
  try:
    for text in texts:
      path = f"/api/search?q={urllib.parse.quote(text)}&k={k}"
      start = time.perf_counter()
      try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        status = response.status
      except (OSError, http.client.HTTPException):
        status = 0  # connection failed or closed: counted as an error, a fresh connection next
        conn.close()
        conn = _connection(base_url, timeout)
      out.append((time.perf_counter() - start, status))
  finally:
    conn.close()
  return out


def run_load(base_url: str, clients: int = 16, per_client: int = 50, k: int = 10,
             timeout: float = 60.0, queries: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the load and returns the report (see the module docstring).

  Args:
    base_url: the service, e.g. 'http://127.0.0.1:8080'.
    clients: concurrent clients (threads, one connection each).
    per_client: queries each client sends.
    k: results per query.
    timeout: seconds one request may take before it counts as an error.
    queries: the texts (cycled; default `sample_queries`).

  Returns:
    {clients, per_client, requests, errors, seconds, qps, p50_ms, p99_ms, max_ms, batching}.
  """
  texts = list(queries or sample_queries(64))
  plans = [[texts[(c * per_client + i) % len(texts)] for i in range(per_client)]
           for c in range(clients)]
  _, before = get_json(base_url, "/healthz", timeout)
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda plan: _client(base_url, plan, k, timeout), plans))
  seconds = time.perf_counter() - start
  _, after = get_json(base_url, "/healthz", timeout)
  latencies = np.array([t for r in results for t, _ in r]) * 1e3
  errors = sum(status != 200 for r in results for _, status in r)
  b0, b1 = before["batching"], after["batching"]
  batches = b1["batches"] - b0["batches"]
  return dict(clients=clients, per_client=per_client, requests=int(latencies.size), errors=errors,
              seconds=seconds, qps=latencies.size / seconds,
              p50_ms=float(np.percentile(latencies, 50)),
              p99_ms=float(np.percentile(latencies, 99)), max_ms=float(latencies.max()),
              batching=dict(batches=batches,
                            mean_batch_queries=(b1["queries"] - b0["queries"]) / max(batches, 1),
                            wait_ms_p50=b1["wait_ms_p50"], wait_ms_p99=b1["wait_ms_p99"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m prvr_jax.search.load", description=__doc__.split("\n")[0])
  p.add_argument("url", help="the service, e.g. http://127.0.0.1:8080")
  p.add_argument("--clients", type=int, default=16)
  p.add_argument("--per-client", type=int, default=50)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
  args = p.parse_args(argv)
  if min(args.clients, args.per_client, args.k) < 1:
    p.error("--clients, --per-client and --k must be >= 1")
  try:
    report = run_load(args.url, args.clients, args.per_client, args.k, args.timeout)
  except (OSError, ValueError) as e:
    print(f"error: {args.url}: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report))
  return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
