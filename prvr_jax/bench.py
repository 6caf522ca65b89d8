"""Benchmarks at the real TVR shapes. Prints one JSON object per line and case.

  python -m prvr_jax.bench tome            # OP-ToMe 128 -> 32 on a batch of videos
  python -m prvr_jax.bench loss            # MSC losses (+ their gradient) on model-sized outputs
  python -m prvr_jax.bench step            # full train step: msc_B<n> and backbone_B<n>
  python -m prvr_jax.bench block           # one DyGMM block forward+backward, per layout
  python -m prvr_jax.bench data            # the grain loader at TVR shapes
  python -m prvr_jax.bench eval --videos 500 --queries 2500   # evaluation end to end
  python -m prvr_jax.bench search --videos 10000,100000       # exact vs ANN search (search/bench_search.py)
  python -m prvr_jax.bench serve --videos 500 --clients 16 --per-client 50   # search service load
  python -m prvr_jax.bench accel           # the accelerator check: golden parity, f32/bf16 steps, eval
  python -m prvr_jax.bench all --batch 8,32 --repeats 5 --out bench.jsonl

`--dtype float32|bfloat16` and `--remat none|blocks` set the model's compute dtype and remat for
`step`, `block` and `memory` (`--store-dtype` is the search token store's dtype).

Every case reports `bench`, `case`, `items` (videos per call), `median_s` (seconds per call, median
of `--repeats` timed calls after a warm-up call), `runs_s` and the machine. `step` adds the FLOPs
XLA reports for the compiled step and the achieved fraction of the rate of a 2048x2048 f32 matmul
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp

from prvr_jax.convert.golden_parity import ParityError, run_parity
from prvr_jax.data.bench_data import bench_data
from prvr_jax.eval.bench_eval import bench_eval
from prvr_jax.losses.config import LossConfig
from prvr_jax.losses.total import msc_loss
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.gmm_block import DyGMMBlock
from prvr_jax.models.layers import COMPUTE_DTYPES, REMAT_POLICIES
from prvr_jax.models.msc import init_params, last_token_features
from prvr_jax.ops import tome
from prvr_jax.ops.video_inputs import prepare_video_inputs
from prvr_jax.parallel import batch_sharding, make_data_mesh
from prvr_jax.search import ann as ann_lib
from prvr_jax.search.bench_search import bench_search
from prvr_jax.search.bench_serve import bench_serve
from prvr_jax.train.optim import bert_adam, warmup_linear_schedule
from prvr_jax.train.sharded_step import make_sharded_train_step
from prvr_jax.train.step import create_train_state, make_train_step
from prvr_jax.utils import host_memory

# The reference TVR setting.
TVR_MODEL = ModelConfig()  # D=384, 4 heads, 768-d inputs, 32 clips, 128 frames
CAPTIONS_PER_VIDEO = 5
CAPTION_TOKENS = 20
DEFAULT_GOLDEN = os.path.join("..", "shared", "golden", "msc_reference_public.npz")


def _cpu_model() -> str:
  """The CPU's model name (Linux), else the platform's processor string."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _machine() -> dict[str, Any]:
  return dict(platform=platform.platform(), cpu_count=os.cpu_count(),
              device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
              cpu=_cpu_model(), jax=jax.__version__, huge_page_malloc=host_memory.huge_pages_active(),
              malloc_tunables=host_memory.malloc_tunables())


def time_call(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Calls fn once to warm up (compile), then `repeats` times; seconds of each timed call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def _record(bench: str, case: str, items: int, times: list[float], **extra: Any) -> dict[str, Any]:
  rec = dict(bench=bench, case=case, items=items, median_s=statistics.median(times),
             runs_s=[round(t, 6) for t in times], **extra)
  return rec


def synthetic_batch(num_videos: int, key: jax.Array, model_cfg: ModelConfig = TVR_MODEL,
                    captions_per_video: int = CAPTIONS_PER_VIDEO, caption_tokens: int = CAPTION_TOKENS
                    ) -> dict[str, jax.Array]:
  """A random training batch at the given shapes (frames with some temporal structure)."""
  kf, kt, kn = jax.random.split(key, 3)
  num_events = 4
  events = jax.random.normal(kf, (num_videos, num_events, model_cfg.visual_input_size))
  which = jnp.minimum(jnp.arange(model_cfg.num_frames) * num_events // model_cfg.num_frames, num_events - 1)
  frames = events[:, which] + 0.3 * jax.random.normal(kn, (num_videos, model_cfg.num_frames,
                                                           model_cfg.visual_input_size))
  q = num_videos * captions_per_video
  text = jax.random.normal(kt, (q, caption_tokens, model_cfg.query_input_size))
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  lengths = 8 + (jnp.arange(q) % (caption_tokens - 7))
  mask = (jnp.arange(caption_tokens)[None, :] < lengths[:, None]).astype(jnp.float32)
  return dict(video_frames=frames, text_feat=text * mask[..., None], text_mask=mask,
              text_labels=jnp.repeat(jnp.arange(num_videos), captions_per_video).astype(jnp.int32))


def bench_tome(batches: Iterable[int], repeats: int) -> Iterable[dict[str, Any]]:
  fn = jax.jit(tome.op_tome, static_argnums=1)
  for b in batches:
    x = synthetic_batch(b, jax.random.key(b))["video_frames"]
    times = time_call(lambda: fn(x, (80, 52, 32)), repeats)
    rec = _record("tome", f"op_tome_B{b}", b, times)
    rec["per_video_ms"] = 1e3 * rec["median_s"] / b
    yield rec


def _fake_outputs(b: int, key: jax.Array, cfg: ModelConfig = TVR_MODEL) -> tuple[dict, dict]:
  """Model-output-shaped random arrays and the matching batch fields for the loss bench."""
  batch = synthetic_batch(b, key)
  batch.update(jax.jit(prepare_video_inputs)(batch["video_frames"]))
  q = b * CAPTIONS_PER_VIDEO
  ks = jax.random.split(key, 4)
  out = dict(video_query=jax.random.normal(ks[0], (q, cfg.hidden_size)),
             clip_tokens=jax.random.normal(ks[1], (b, cfg.num_clips, cfg.hidden_size)),
             frame_tokens=jax.random.normal(ks[2], (b, cfg.num_frames, cfg.hidden_size)))
  return out, batch


def bench_loss(batches: Iterable[int], repeats: int) -> Iterable[dict[str, Any]]:
  """Value and gradient (w.r.t. the model outputs) of the loss terms, TVR weights."""

  def scored(o, bt):
    # The model-output fields the loss reads (msc_loss forms the score matrices from the tokens).
    c, f = o["clip_tokens"], o["frame_tokens"]
    return dict(o, encoded_clip_feat=c, encoded_frame_feat=f,
                teacher=last_token_features(bt["text_feat"], bt["text_mask"]))

  variants = {
      "msc": LossConfig(),
      "backbone": LossConfig(use_tcpl=False, use_cbva=False),
      "tcpl_only": LossConfig(use_cbva=False),
      "cbva_only": LossConfig(use_tcpl=False),
  }
  for b in batches:
    out, batch = _fake_outputs(b, jax.random.key(b))
    for name, cfg in variants.items():
      fn = jax.jit(jax.value_and_grad(
          lambda o, bt, cfg=cfg: msc_loss(scored(o, bt), bt, cfg, jax.random.key(0), True)[0]))
      times = time_call(lambda: fn(out, batch), repeats)
      yield _record("loss", f"{name}_B{b}", b, times, queries=b * CAPTIONS_PER_VIDEO)


def matmul_rate(repeats: int = 10, n: int = 2048, dtype: str = "float32") -> float:
  """FLOP/s of an n x n matmul in `dtype` on the default device (median of `repeats`)."""
  a = jax.random.normal(jax.random.key(1), (n, n), COMPUTE_DTYPES[dtype])
  b = jax.random.normal(jax.random.key(2), (n, n), COMPUTE_DTYPES[dtype])
  fn = jax.jit(jnp.matmul)
  times = time_call(lambda: fn(a, b), repeats)
  return 2.0 * n ** 3 / statistics.median(times)


def _flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_memory(compiled: Any) -> dict[str, Any]:
  """`peak_memory_mb` of the device (its `memory_stats()` 'peak_bytes_in_use': the process's peak
  so far, GPU / TPU) or, where the backend reports none (CPU), the compiled program's arguments +
  outputs + temporaries from XLA's memory analysis; `memory_source` says which."""
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return dict(peak_memory_mb=stats["peak_bytes_in_use"] / 2**20, memory_source="memory_stats")
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return dict(peak_memory_mb=total / 2**20, memory_source="memory_analysis")


def step_case(name: str, b: int, loss_cfg: LossConfig, model_cfg: ModelConfig, repeats: int,
              rate: float) -> dict[str, Any]:
  """One full optimisation step case at batch `b`: median s/step, XLA FLOPs, the achieved
  fraction of `rate` (FLOP/s of a matmul measured in the same run), memory."""
  schedule = warmup_linear_schedule(3e-4, 10_000, 0.01)
  optimizer = bert_adam(schedule)
  batch = synthetic_batch(b, jax.random.key(b), model_cfg, CAPTIONS_PER_VIDEO, CAPTION_TOKENS)
  step = jax.jit(make_train_step(model_cfg, loss_cfg, optimizer, schedule), donate_argnums=0)
  # The step donates its state, so every case starts from its own params.
  state = create_train_state(init_params(model_cfg, jax.random.key(0)), optimizer)
  compiled = step.lower(state, batch, jax.random.key(0), jnp.asarray(True)).compile()
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch, jax.random.key(0), jnp.asarray(True))
    return metrics["loss"]

  times = time_call(run, repeats)
  flops = _flops(compiled)
  rec = _record("step", name, b, times, flops=flops, matmul_flops_per_s=rate, dtype=model_cfg.dtype,
                remat=model_cfg.remat, temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20,
                **peak_memory(compiled))
  if flops:
    rec["achieved_flops_per_s"] = flops / rec["median_s"]
    rec["fraction_of_matmul_rate"] = rec["achieved_flops_per_s"] / rate
  return rec


def bench_step(batches: Iterable[int], repeats: int,
               model_cfg: Optional[ModelConfig] = None) -> Iterable[dict[str, Any]]:
  """Full optimisation step (forward, losses, backward, BertAdam) per batch size, MSC vs backbone."""
  model_cfg = model_cfg or TVR_MODEL
  rate = matmul_rate()
  yield dict(bench="step", case="matmul_2048_f32", items=0, median_s=2.0 * 2048 ** 3 / rate,
             flops_per_s=rate)
  for b in batches:
    for name, loss_cfg in (("msc", LossConfig()), ("backbone", LossConfig(use_tcpl=False, use_cbva=False))):
      yield step_case(f"{name}_B{b}", b, loss_cfg, model_cfg, repeats, rate)


def bench_block(batches: Iterable[int], repeats: int,
                model_cfg: Optional[ModelConfig] = None) -> Iterable[dict[str, Any]]:
  """Forward+backward of the frame DyGMM block alone (the network's hot spot)."""
  cfg = model_cfg or TVR_MODEL
  block = DyGMMBlock(cfg.num_frames, cfg.num_heads, cfg.dropout, cfg.sft_factor, cfg.gauss_widths,
                     remat=cfg.remat)
  for b in batches:
    x = jax.random.normal(jax.random.key(b), (b, cfg.num_frames, cfg.hidden_size),
                          COMPUTE_DTYPES[cfg.dtype])
    token = jnp.ones((cfg.hidden_size,))
    mask = jnp.ones((b, cfg.num_frames))
    params = block.init({"params": jax.random.key(0)}, x, token, mask, deterministic=True)

    def loss(p, x):
      y = block.apply(p, x, token, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
      return jnp.sum(y * y)

    fn = jax.jit(jax.grad(loss))
    times = time_call(lambda: fn(params, x), repeats)
    yield _record("block", f"frame_dygmm_fwd_bwd_B{b}", b, times, dtype=cfg.dtype, remat=cfg.remat)


def bench_loader(batches: Iterable[int], repeats: int) -> Iterable[dict[str, Any]]:
  """grain training pipeline at TVR shapes (batches per second), one case per batch size."""
  for b in batches:
    yield from bench_data(repeats=repeats, batch_size=b)


def bench_memory(batches: Iterable[int], repeats: int,
                 model_cfg: Optional[ModelConfig] = None) -> Iterable[dict[str, Any]]:
  """Per-device memory of the sharded MSC step over all devices (XLA's analysis of the compiled
  program; nothing runs), one case per global batch size. `repeats` is unused."""
  del repeats
  cfg = model_cfg or TVR_MODEL
  mesh = make_data_mesh()
  schedule = warmup_linear_schedule(3e-4, 1000, 0.01)
  opt = bert_adam(schedule)
  step = make_sharded_train_step(cfg, LossConfig(), opt, mesh, schedule)
  state = jax.eval_shape(lambda k: create_train_state(init_params(cfg, k), opt), jax.random.key(0))
  for b in batches:
    shapes = jax.eval_shape(lambda k, b=b: synthetic_batch(b, k, cfg, CAPTIONS_PER_VIDEO, CAPTION_TOKENS),
                            jax.random.key(1))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh)),
                          shapes)
    start = time.perf_counter()
    memory = step.lower(state, shapes, jax.random.key(2), jnp.asarray(False)).compile().memory_analysis()
    yield dict(bench="memory", case=f"msc_step_B{b}_devices{mesh.devices.size}", items=b,
               devices=int(mesh.devices.size), dtype=cfg.dtype, remat=cfg.remat,
               temp_mb=memory.temp_size_in_bytes / 2**20,
               argument_mb=memory.argument_size_in_bytes / 2**20,
               output_mb=memory.output_size_in_bytes / 2**20,
               compile_s=time.perf_counter() - start)


def golden_parity_record(path: str) -> dict[str, Any]:
  """Golden parity in float32 on the default backend (`golden_parity.run_parity`) as one record:
  `ok`, `compared`, `failed` keys, `seconds`; ok None when `path` is '' (skipped)."""
  rec: dict[str, Any] = dict(bench="accel", case="golden_parity_f32", items=0, golden=path)
  if not path:
    return dict(rec, ok=None, note="skipped: --golden ''")
  start = time.perf_counter()
  try:
    rows = run_parity(path)
  except ParityError as e:
    return dict(rec, ok=False, note=str(e))
  failed = [r.key for r in rows if r.ok is False]
  compared = sum(r.ok is not None for r in rows)
  return dict(rec, ok=not failed and compared > 0, compared=compared, failed=failed,
              skipped=sum(r.ok is None for r in rows), seconds=time.perf_counter() - start)


def bench_accel(batches: Iterable[int], repeats: int, golden: str, eval_videos: int,
                eval_queries: int) -> Iterable[dict[str, Any]]:
  """The prepared device check: golden parity (float32), a large matmul per dtype (the peak the
  step fractions refer to), the TVR-shaped MSC train step per batch in bfloat16 and float32, and
  the eval bench. Every record has bench 'accel'."""
  yield golden_parity_record(golden)
  # 2048 saturates a CPU; an accelerator needs a larger product to approach its peak.
  n = 2048 if jax.default_backend() == "cpu" else 8192
  rates = {d: matmul_rate(n=n, dtype=d) for d in ("float32", "bfloat16")}
  for d, rate in rates.items():
    yield dict(bench="accel", case=f"matmul_{n}_{d}", items=0, median_s=2.0 * n ** 3 / rate,
               flops_per_s=rate, dtype=d)
  for b in batches:
    # bfloat16 first: the device's peak_bytes_in_use is the process's peak so far, so each
    # case must need more than those before it for its peak to be its own.
    for d in ("bfloat16", "float32"):
      cfg = dataclasses.replace(TVR_MODEL, dtype=d)
      yield dict(step_case(f"msc_B{b}_{d}", b, LossConfig(), cfg, repeats, rates[d]), bench="accel")
  for rec in bench_eval(eval_videos, eval_queries, repeats, TVR_MODEL):
    yield dict(rec, bench="accel", case=f"eval_{rec['case']}")


BENCHES = {"tome": bench_tome, "loss": bench_loss, "step": bench_step, "block": bench_block,
           "data": bench_loader, "memory": bench_memory}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m prvr_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("bench", choices=sorted(BENCHES) + ["accel", "eval", "search", "serve", "all"])
  parser.add_argument("--batch", default=None,
                      help="comma-separated videos per batch (8,32,128; accel: 32,128)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (after warm-up)")
  parser.add_argument("--out", help="also append the JSON lines to this file")
  parser.add_argument("--videos", default=None,
                      help="eval, serve: corpus videos (500); search: comma-separated collection sizes "
                           "(10000,100000)")
  parser.add_argument("--queries", type=int, default=2500, help="eval: queries")
  parser.add_argument("--store-dtype", default="int8", help="search: token store dtype")
  parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32",
                      help="step, block, memory: the model's compute dtype")
  parser.add_argument("--remat", choices=sorted(REMAT_POLICIES), default="none",
                      help="step, block, memory: rematerialise every attention block")
  parser.add_argument("--golden", default=DEFAULT_GOLDEN,
                      help="accel: the golden file of the parity check ('' skips it)")
  parser.add_argument("--nprobe", default=None, help="search: comma-separated IVF cells visited")
  parser.add_argument("--candidates", default=None,
                      help="search: comma-separated videos per branch re-scored")
  parser.add_argument("--workdir", default=None, help="search: where temporary indexes go")
  parser.add_argument("--cache", default=None,
                      help="search: keep the encoded base videos and the collection indexes here "
                           "between runs")
  parser.add_argument("--base-videos", type=int, default=2000,
                      help="search: synthetic-benchmark videos encoded, then perturbed")
  parser.add_argument("--clients", type=int, default=16, help="serve: concurrent clients")
  parser.add_argument("--per-client", type=int, default=50, help="serve: queries per client")
  parser.add_argument("--text-tower", choices=("l14", "tiny"), default="l14",
                      help="serve: CLIP text tower shape (random weights)")
  return parser


def main(argv: Optional[list[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  args.batch = args.batch or ("32,128" if args.bench == "accel" else "8,32,128")
  try:
    batches = [int(b) for b in args.batch.split(",") if b]
  except ValueError:
    parser.error(f"--batch must be comma-separated integers, got {args.batch!r}")
  if args.repeats < 1 or not batches or min(batches) < 1:
    parser.error("--repeats and every --batch value must be positive")
  try:
    sizes = [int(v) for v in (args.videos or ("10000,100000" if args.bench == "search" else "500")
                              ).split(",") if v]
    nprobes = [int(v) for v in args.nprobe.split(",")] if args.nprobe else [None]
    candidates = [int(v) for v in args.candidates.split(",")] if args.candidates else [None]
  except ValueError:
    parser.error("--videos, --nprobe and --candidates must be comma-separated integers")
  if not sizes or min(sizes + [args.queries, args.clients, args.per_client]) < 1:
    parser.error("--videos, --queries, --clients and --per-client must be positive")
  if args.bench != "search" and len(sizes) > 1:
    parser.error("--videos takes one size except for `search`")
  names = sorted(BENCHES) if args.bench == "all" else [args.bench]
  machine = _machine()
  sink = open(args.out, "a", encoding="utf-8") if args.out else None
  try:
    for name in names:
      if name == "eval":
        records = bench_eval(sizes[0], args.queries, args.repeats)
      elif name == "search":
        knobs = [(p or ann_lib.DEFAULT_NPROBE, c or ann_lib.DEFAULT_CANDIDATES)
                 for p in nprobes for c in candidates]
        records = bench_search(sizes, args.repeats, dtype=args.store_dtype, knobs=knobs,
                               workdir=args.workdir, cache=args.cache,
                               base_videos=args.base_videos)
      elif name == "serve":
        records = bench_serve(sizes[0], args.clients, args.per_client, args.repeats,
                              args.text_tower)
      elif name == "accel":
        records = bench_accel(batches, args.repeats, args.golden, sizes[0], args.queries)
      elif name in ("step", "block", "memory"):
        model_cfg = dataclasses.replace(TVR_MODEL, dtype=args.dtype, remat=args.remat)
        records = BENCHES[name](batches, args.repeats, model_cfg)
      else:
        records = BENCHES[name](batches, args.repeats)
      for rec in records:
        rec["machine"] = machine
        line = json.dumps(rec)
        print(line, flush=True)
        if sink:
          sink.write(line + "\n")
          sink.flush()
  finally:
    if sink:
      sink.close()
  return 0


if __name__ == "__main__":
  host_memory.reexec_with_malloc_tunables()
  sys.exit(main())
