"""Load benchmark of the search service: one-at-a-time vs batched encoder calls, same run.

`python -m prvr_jax.bench serve --videos 500 --clients 16 --per-client 50 --repeats 3`

The service runs at real shapes: the MSC network of the TVR setting (768-d inputs, D = 384) with
random weights, an index of `videos` random videos built by `index.build_index`, and a CLIP
ViT-L/14-shaped text tower (12 layers, width 768, 77 tokens) with random weights, so that
encoding a query costs what it costs with the real checkpoint (`--text-tower tiny`: a one-layer
tower instead, leaving the service's own costs). Two real uvicorn servers on
loopback ports serve the same engine parts: `one_at_a_time` (one query per encoder call, no
waiting) and `batched_B<max_batch>` (concurrent requests share calls, up to `max_wait_ms`).
The load (`prvr_jax.search.load`: `clients` keep-alive connections, each sending `per_client`
queries in turn) runs in a separate process, so the clients do not compete with the server for
Python's interpreter lock; on a 2-core machine they still share the cores.

Cases alternate within each repeat (one, batched, one, batched, ...); each case reports the
medians over repeats of queries per second and p50 / p99 latency, the errors summed over all
repeats, and the batching the server did; a last `speedup` record gives the ratio of the
median throughputs and the machine's load average before and after.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterable

import h5py
import jax
import numpy as np

from prvr_jax.clip.config import ClipConfig, TextConfig, VisionConfig
from prvr_jax.clip.model import ClipEncoders
from prvr_jax.text.tokenizer import ClipTokenizer
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import init_params
from prvr_jax.search.api import Limits, create_app
from prvr_jax.search.index import build_index
from prvr_jax.search.model import from_params
from prvr_jax.search.server import listen_socket, make_server
from prvr_jax.search.service import ResidentIndex, SearchEngine
from prvr_jax.search.text import ClipTextTower, clip_text_encoder

# CLIP ViT-L/14's text tower (the vision tower is not used by queries: a token one).
L14_TEXT = TextConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                      activation="quick_gelu", layer_norm_eps=1e-5)
TEXT_TOWERS = {"l14": L14_TEXT,
               "tiny": TextConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                                  activation="quick_gelu", layer_norm_eps=1e-5)}
TINY_VISION = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                           activation="quick_gelu", layer_norm_eps=1e-5, image_size=32,
                           patch_size=16)
BENCH_K = 10


def _random_features(path: pathlib.Path, num_videos: int, dim: int, seed: int = 0) -> None:
  """num_videos videos of 32..160 random frames (2 fps) with some temporal structure."""
  rng = np.random.RandomState(seed)
  with h5py.File(path, "w") as f:
    for v in range(num_videos):
      frames = rng.randint(32, 161)
      walk = np.cumsum(rng.randn(frames, dim).astype(np.float32), axis=0) / np.sqrt(frames)
      ds = f.create_dataset(f"video{v:05d}", data=walk + rng.randn(1, dim).astype(np.float32))
      ds.attrs["duration"], ds.attrs["fps"] = frames / 2.0, 2.0


def random_text_tower(shape: str, seed: int = 0) -> ClipTextTower:
  """A CLIP text tower with random weights and 768-d projected tokens.

  Args:
    shape: 'l14' (CLIP ViT-L/14's text tower) or 'tiny' (one layer of width 64: what is left is
      the service's own cost, HTTP, queueing and the index scan).
    seed: for the weights.
  """
  config = ClipConfig(text=TEXT_TOWERS[shape], vision=TINY_VISION, projection_dim=768)
  encoders = ClipEncoders(config)
  return ClipTextTower(encoders, encoders.init(jax.random.key(seed)),
                       ClipTokenizer(max_length=config.text.context_length), "projected",
                       f"random CLIP text tower of shape {shape}")


class _Running:
  """A uvicorn server in a thread of this process, on a free loopback port."""

  def __init__(self, engine: SearchEngine, limits: Limits):
    sock = listen_socket("127.0.0.1", 0)
    self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ready = threading.Event()
    self.server = make_server(create_app(engine, None, limits), limits, ready.set)
    self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]),
                                   daemon=True)
    self.thread.start()
    if not ready.wait(120):
      raise RuntimeError("the benchmark's server did not start")

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(30)


def _load(url: str, clients: int, per_client: int) -> dict[str, Any]:
  out = subprocess.run([sys.executable, "-m", "prvr_jax.search.load", url, "--clients",
                        str(clients), "--per-client", str(per_client), "--k", str(BENCH_K)],
                       capture_output=True, text=True, check=False, timeout=3600)
  if not out.stdout.strip():
    raise RuntimeError(f"load test failed: {out.stderr}")
  return json.loads(out.stdout)


def bench_serve(num_videos: int, clients: int, per_client: int, repeats: int,
                text_tower: str = "l14", max_batch: int = 32,
                max_wait_ms: float = 5.0) -> Iterable[dict[str, Any]]:
  """Yields one record per case, then the `speedup` record (see the module docstring).

  Args:
    num_videos: indexed videos.
    clients, per_client: the load (see `prvr_jax.search.load.run_load`).
    repeats: load runs per case (alternating).
    text_tower: 'l14' or 'tiny' (see `random_text_tower`).
    max_batch, max_wait_ms: the batched case's settings.
  """
  load_before = os.getloadavg()
  model_cfg = ModelConfig()
  model = from_params(model_cfg, init_params(model_cfg, jax.random.key(0)))
  tower = random_text_tower(text_tower)
  encoder = clip_text_encoder(tower, model)  # shared: both servers use the same compiled parts
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
    features = pathlib.Path(tmp) / "videos.h5"
    _random_features(features, num_videos, model_cfg.visual_input_size)
    build_index(model, features, pathlib.Path(tmp) / "index", progress=False)
    index = ResidentIndex(pathlib.Path(tmp) / "index")  # as the service holds it
    cases = {"one_at_a_time": Limits(max_k=BENCH_K, max_batch=1, max_wait_ms=0.0),
             f"batched_B{max_batch}": Limits(max_k=BENCH_K, max_batch=max_batch,
                                             max_wait_ms=max_wait_ms)}
    servers, warm = {}, {}
    for case, limits in cases.items():
      engine = SearchEngine(index, model, encoder, max_k=BENCH_K, max_batch=limits.max_batch)
      warm[case] = engine.warm_up()
      servers[case] = _Running(engine, limits)
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    try:
      for _ in range(repeats):
        for case, server in servers.items():
          runs[case].append(_load(server.url, clients, per_client))
    finally:
      for server in servers.values():
        server.stop()
  medians = {}
  for case, limits in cases.items():
    reports = runs[case]
    median = lambda key, reports=reports: statistics.median(r[key] for r in reports)
    medians[case] = median("qps")
    yield dict(bench="serve", case=f"{case}_{text_tower}", items=clients * per_client,
               videos=num_videos, text_tower=text_tower,
               clients=clients, per_client=per_client, max_batch=limits.max_batch,
               max_wait_ms=limits.max_wait_ms, qps=medians[case], p50_ms=median("p50_ms"),
               p99_ms=median("p99_ms"), errors=sum(r["errors"] for r in reports),
               requests=sum(r["requests"] for r in reports),
               mean_batch_queries=statistics.median(r["batching"]["mean_batch_queries"]
                                                    for r in reports),
               median_s=median("seconds"), runs_qps=[round(r["qps"], 3) for r in reports],
               warm_up_s=warm[case])
  one, batched = medians["one_at_a_time"], medians[f"batched_B{max_batch}"]
  yield dict(bench="serve", case=f"speedup_{text_tower}", items=clients * per_client,
             batched_over_one_at_a_time=batched / one, load_average_before=load_before,
             load_average_after=os.getloadavg(), text_tower=text_tower,
             model="TVR ModelConfig(), random weights",
             finished=time.strftime("%Y-%m-%d %H:%M:%S"))
