"""Corpus evaluation: chunked counting equals full-matrix ranks (ties, padding, masks), the split
evaluation equals a brute-force computation from the same params, sharding changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic as synthetic_config
from prvr_jax.data import pipeline
from prvr_jax.data.prepare import prepare
from prvr_jax.data.preprocess import resample_boundaries
from prvr_jax.data.config import DataConfig
from prvr_jax.eval import evaluate as E
from prvr_jax.eval.config import EvalConfig
from prvr_jax.eval.metrics import gt_ranks, recall_at_k
from prvr_jax.models.config import ModelConfig
from prvr_jax.eval.bench_eval import random_params
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.similarity import fused_scores, max_token_scores
from prvr_jax.ops.video_inputs import prepare_video_inputs
from tests.conftest import REPO_ROOT

TINY_MODEL = ModelConfig(hidden_size=32, num_heads=2, visual_input_size=16, query_input_size=8)


def tiny_config(eval_video_batch_size: int = 4, eval_query_batch_size: int = 8) -> DataConfig:
  """`config.data` of the synthetic config shrunk to 11 val videos of 16-d frames and 8-d caption
  tokens."""
  config = synthetic_config.get_config()
  syn = config.data.synthetic
  syn.num_train_videos, syn.num_val_videos, syn.num_test_videos = 4, 11, 3
  syn.visual_dim, syn.text_dim = 16, 8
  config.data.eval_video_batch_size = eval_video_batch_size
  config.data.eval_query_batch_size = eval_query_batch_size
  config.data.num_threads = 1
  return DataConfig.from_config_dict(config.data)


def build_tiny_dataset(workdir) -> str:
  """Builds the tiny synthetic dataset under `workdir`; returns its directory."""
  return prepare(tiny_config(), workdir, progress=False, print_fn=None)["dataset_dir"]


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return build_tiny_dataset(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def params():
  return random_params(TINY_MODEL, 3)


def _unit(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _full_matrix_ranks(q, clip, frame, gt_mask, clip_w=0.4, frame_w=0.6):
  """metrics.gt_ranks on full (M, N) numpy score matrices."""
  cs = np.einsum("qd,nkd->qnk", q, clip).max(-1)
  fs = np.einsum("qd,nfd->qnf", q, frame).max(-1)
  mats = {"fused": clip_w * cs + frame_w * fs, "clip": cs, "frame": fs}
  return {k: np.asarray(gt_ranks(jnp.asarray(v), jnp.asarray(gt_mask))) for k, v in mats.items()}


def _corpus(clip, frame, video_index, chunk=4):
  return E.EncodedCorpus(clip, frame, np.zeros(clip.shape[:2] + (2,), np.int32),
                         np.asarray(video_index, np.int32), chunk)


def test_chunked_ranks_equal_full_matrix_for_any_chunking():
  rng = np.random.default_rng(0)
  n, m, d = 23, 37, 8
  clip, frame = _unit(rng.normal(size=(n, 3, d))), _unit(rng.normal(size=(n, 5, d)))
  q = _unit(rng.normal(size=(m, d)))
  video_index = rng.permutation(100)[:n]  # split indices need not be 0..N-1
  gt = video_index[rng.integers(0, n, m)]
  queries = E.EncodedQueries(q, gt.astype(np.int32), np.arange(m, dtype=np.int32))
  want = _full_matrix_ranks(q, clip, frame, gt[:, None] == video_index[None, :])
  assert len(set(want["fused"])) > 5  # the ranks are not trivial
  for chunk in (1, 4, 7, 23, 30):  # 4 and 7 do not divide 23; 30 is one padded chunk
    for query_batch in (5, 64):
      got = E.rank_queries(queries, _corpus(clip, frame, video_index), video_chunk=chunk,
                           query_batch=query_batch)
      for kind in ("fused", "clip", "frame"):
        np.testing.assert_array_equal(got[kind], want[kind], err_msg=f"{kind} C={chunk} Qb={query_batch}")


def test_exact_ties_are_not_counted():
  # Entries +-0.5 in 4-d: unit vectors whose dot products (multiples of 1/4) are exact in float32,
  # so duplicated videos tie exactly, whatever the summation order.
  rng = np.random.default_rng(1)
  signs = lambda *shape: (0.5 * rng.choice([-1.0, 1.0], size=shape + (4,))).astype(np.float32)
  base_clip, base_frame = signs(6, 2), signs(6, 3)
  dup = np.array([0, 1, 2, 3, 4, 5, 0, 0, 3, 1])  # videos 6..9 copy videos 0, 0, 3, 1
  clip, frame = base_clip[dup], base_frame[dup]
  q = signs(15)
  gt = rng.integers(0, 10, 15)
  want = _full_matrix_ranks(q, clip, frame, gt[:, None] == np.arange(10)[None, :], 0.5, 0.5)
  # Other videos tie with the ground truth, so counting ties would change ranks.
  cs = np.einsum("qd,nkd->qnk", q, clip).max(-1)
  assert ((cs == cs[np.arange(15), gt][:, None]).sum(1) > 1).any()
  queries = E.EncodedQueries(q, gt.astype(np.int32), np.arange(15, dtype=np.int32))
  for chunk in (1, 3, 10):
    got = E.rank_queries(queries, _corpus(clip, frame, np.arange(10)), video_chunk=chunk, query_batch=4,
                         clip_weight=0.5, frame_weight=0.5)
    for kind in ("fused", "clip", "frame"):
      np.testing.assert_array_equal(got[kind], want[kind], err_msg=f"{kind} C={chunk}")


def test_median_mean_rank_and_top_videos_equal_a_full_sort_with_ties():
  """MedR / MnR come from the counted ranks and equal a full argsort's; the top videos are the
  first of a stable sort of the fused scores (exact ties: the earlier video first)."""
  rng = np.random.default_rng(4)
  signs = lambda *shape: (0.5 * rng.choice([-1.0, 1.0], size=shape + (4,))).astype(np.float32)
  for trial in range(3):
    dup = rng.integers(0, 6, 13)  # 13 videos copied from 6: many exact ties
    clip, frame = signs(6, 2)[dup], signs(6, 3)[dup]
    m = 17
    q, gt = signs(m), rng.integers(0, 13, m)
    cs, fs = np.einsum("qd,nkd->qnk", q, clip).max(-1), np.einsum("qd,nfd->qnf", q, frame).max(-1)
    gt_mask = gt[:, None] == np.arange(13)[None, :]
    queries = E.EncodedQueries(q, gt.astype(np.int32), np.arange(m, dtype=np.int32))
    got = E.rank_queries(queries, _corpus(clip, frame, np.arange(13)), video_chunk=3 + trial,
                         query_batch=5, clip_weight=0.5, frame_weight=0.5, top_k=4)
    report = E.recall_report(got)
    for kind, scores in (("fused", 0.5 * cs + 0.5 * fs), ("clip", cs), ("frame", fs)):
      want = _argsort_ranks(scores, gt_mask)
      np.testing.assert_array_equal(got[kind], want)
      values = report if kind == "fused" else report[kind]
      assert values["MedR"] == np.median(want) and values["MnR"] == pytest.approx(np.mean(want))
    fused = 0.5 * cs + 0.5 * fs
    np.testing.assert_array_equal(got["top_videos"], np.argsort(-fused, axis=1, kind="stable")[:, :4])
  assert (fused == fused[np.arange(m), gt][:, None]).sum(1).max() > 1  # ties with the ground truth


def test_top_videos_are_padded_past_a_small_corpus():
  rng = np.random.default_rng(5)
  corpus = _corpus(_unit(rng.normal(size=(3, 2, 4))), _unit(rng.normal(size=(3, 2, 4))), [7, 8, 9])
  queries = E.EncodedQueries(_unit(rng.normal(size=(2, 4))), np.array([7, 9], np.int32),
                             np.arange(2, dtype=np.int32))
  top = E.rank_queries(queries, corpus, video_chunk=2)["top_videos"]
  assert top.shape == (2, 10) and (top[:, 3:] == -1).all()
  assert sorted(top[0, :3]) == [7, 8, 9]  # split indices, not corpus positions


def test_masked_frames_never_win():
  rng = np.random.default_rng(2)
  # Positive queries, negative frames: every valid frame scores below 0. Masked frames are zero, as
  # the frame branch leaves them, so unless masked they would win with score 0.
  q = _unit(np.abs(rng.normal(size=(6, 8))) + 0.1)
  frame = -_unit(np.abs(rng.normal(size=(5, 4, 8))) + 0.1)
  mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 1, 0]], np.float32)
  frame = frame * mask[..., None]
  filled = np.asarray(E.fill_masked_tokens(jnp.asarray(frame), jnp.asarray(mask)))
  # Scores of filled tokens are the max over valid frames only.
  raw = np.einsum("qd,nfd->qnf", q, frame)
  want = np.where(mask[None] > 0, raw, -np.inf).max(-1)
  np.testing.assert_allclose(np.einsum("qd,nfd->qnf", q, filled).max(-1), want, rtol=1e-6)
  assert (want < 0).all() and (raw.max(-1) == 0).sum() == 4 * 6  # the mask matters for this data
  clip = _unit(rng.normal(size=(5, 2, 8)))
  gt = np.array([0, 1, 2, 3, 4, 2], np.int32)
  got = E.rank_queries(E.EncodedQueries(q, gt, np.arange(6, dtype=np.int32)),
                       _corpus(clip, filled, np.arange(5)), video_chunk=2, query_batch=4)
  cs = np.einsum("qd,nkd->qnk", q, clip).max(-1)
  gt_mask = gt[:, None] == np.arange(5)[None, :]
  np.testing.assert_array_equal(got["frame"], np.asarray(gt_ranks(jnp.asarray(want), jnp.asarray(gt_mask))))
  np.testing.assert_array_equal(got["fused"], np.asarray(gt_ranks(jnp.asarray(0.4 * cs + 0.6 * want),
                                                                  jnp.asarray(gt_mask))))


def test_ground_truth_outside_the_corpus_is_an_error():
  rng = np.random.default_rng(3)
  corpus = _corpus(_unit(rng.normal(size=(3, 2, 4))), _unit(rng.normal(size=(3, 2, 4))), [5, 6, 7])
  queries = E.EncodedQueries(_unit(rng.normal(size=(2, 4))), np.array([5, 9], np.int32),
                             np.arange(2, dtype=np.int32))
  with pytest.raises(ValueError, match="1 queries have a ground-truth video that is not in the corpus"):
    E.rank_queries(queries, corpus, video_chunk=2)


def _model_video_tokens(params, frames):
  """(clip tokens, frame tokens, prepared inputs) straight from the model's two branches."""
  model = MSCNet(TINY_MODEL)
  inputs = prepare_video_inputs(frames)
  clip = model.apply({"params": params}, inputs["clip_video_features"], inputs["merge_size"],
                     method=MSCNet.encode_clips)
  frame = model.apply({"params": params}, inputs["frame_video_features"], inputs["videos_mask"],
                      method=MSCNet.encode_frames)
  return clip, frame, inputs


@jax.jit
def _split_tokens(params, frames, feat, mask):
  """(clip tokens, frame tokens, clip spans, queries) of a whole split encoded in one call,
  straight from the model, L2-normalised."""
  clip, frame, inputs = _model_video_tokens(params, frames)
  query, _ = MSCNet(TINY_MODEL).apply({"params": params}, feat, mask, method=MSCNet.encode_query)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return unit(clip), unit(frame), inputs["clip_spans"], unit(query)


def _argsort_ranks(scores: np.ndarray, gt_mask: np.ndarray) -> np.ndarray:
  """1-based position of the first ground truth in a full descending sort of each row (ties
  ordered ground truth first, as counting strictly better videos does)."""
  ranks = []
  for row, gt in zip(scores, gt_mask):
    order = np.lexsort((~gt, -row))
    ranks.append(1 + int(np.flatnonzero(gt[order])[0]))
  return np.asarray(ranks)


def _seconds(first_row: int, end_row: int, num_frames: int, duration: float) -> tuple[float, float]:
  """Seconds of the frames behind resampled rows [first_row, end_row) (module docstring of
  ops/moments.py), from the resampling boundaries directly."""
  idx = resample_boundaries(num_frames, 128)
  last = max(int(idx[end_row]), int(idx[end_row - 1]) + 1)
  per_frame = duration / num_frames
  return int(idx[first_row]) * per_frame, last * per_frame


def _brute_force_report(params, ddir, split, clip_w=0.4, frame_w=0.6):
  """Report and per-query arrays from full score matrices of the split's records read directly:
  ranks by a full sort, moments by the rule of ops/moments.py written out per query."""
  info = pipeline.open_split(ddir, split)
  source = pipeline.RecordSource(ddir, split)
  records = [source[i] for i in range(info.num_videos)]
  frames = np.stack([pipeline.resample_to_fixed_length(r["frames"], 128) for r in records])
  captions = [c for r in records for c in pipeline.split_captions(r)]
  max_tokens = pipeline.resolve_max_tokens(info)
  feat, mask = pipeline._pad_captions(  # pylint: disable=protected-access
      captions, len(captions), max_tokens, info.text_dim, False)
  gt = np.repeat(np.arange(info.num_videos), np.diff(info.caption_offsets))
  gt_mask = gt[:, None] == np.arange(info.num_videos)[None, :]
  clip, frame, clip_spans, query = (np.asarray(x) for x in _split_tokens(params, frames, feat, mask))
  clip_sim = np.einsum("qd,nkd->qnk", query, clip)
  frame_sim = np.einsum("qd,nfd->qnf", query, frame)
  cs, fs = clip_sim.max(-1), frame_sim.max(-1)
  ranks = {k: _argsort_ranks(v, gt_mask) for k, v in
           (("fused", clip_w * cs + frame_w * fs), ("clip", cs), ("frame", fs))}
  report = dict(recall_at_k(ranks["fused"]), MedR=float(np.median(ranks["fused"])),
                MnR=float(np.mean(ranks["fused"])))
  for kind in ("clip", "frame"):
    report[kind] = dict(recall_at_k(ranks[kind]), MedR=float(np.median(ranks[kind])),
                        MnR=float(np.mean(ranks[kind])))
  report.update(num_queries=len(captions), num_videos=info.num_videos)
  moment = np.zeros((len(gt), 2))
  for q, v in enumerate(gt):
    num_frames, duration = len(records[v]["frames"]), float(records[v]["duration"])
    if clip_w * cs[q, v] > frame_w * fs[q, v]:
      start, end = clip_spans[v, np.argmax(clip_sim[q, v])]
    else:
      start = np.argmax(frame_sim[q, v])
      end = start + 1
    moment[q] = _seconds(int(start), int(end), num_frames, duration)
  gt_moment = np.concatenate([r["moments"] for r in records])
  return report, dict(ranks, moment=moment, gt_moment=gt_moment)


def test_evaluate_split_equals_brute_force(ddir, params):
  report, results = E.evaluate_split_with_ranks(params, TINY_MODEL, tiny_config(), EvalConfig(), ddir,
                                                "val", progress=False)
  want, want_results = _brute_force_report(params, ddir, "val")
  moment = report.pop("moment")
  assert report == want
  for kind in ("fused", "clip", "frame"):
    np.testing.assert_array_equal(results[kind], want_results[kind])
  assert report["num_videos"] == 11 and report["num_queries"] == pipeline.open_split(ddir, "val").num_captions
  assert 0 < report["SumR"] < 400 and report["R@100"] == 100.0  # 11 videos: every rank <= 100
  assert len(set(results["fused"])) > 3 and report["MedR"] > 1  # the ranks are not trivial
  # The moment search would return for the ground-truth video, in seconds, and its annotation.
  np.testing.assert_allclose(results["moment"], want_results["moment"], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(results["gt_moment"], want_results["gt_moment"])
  assert moment["queries"] == report["num_queries"]  # every synthetic caption is annotated
  iou = E.moments.temporal_iou(want_results["moment"], want_results["gt_moment"])
  assert moment["mIoU"] == pytest.approx(100 * iou.mean())
  assert moment["IoU>=0.5"] == pytest.approx(100 * np.mean(iou >= 0.5))
  assert moment["R@1,IoU>=0.5"] == pytest.approx(100 * np.mean((iou >= 0.5) & (want_results["fused"] == 1)))
  # Another query batch size, and fusion weights from config.eval (the clip branch now gives
  # some of the moments).
  got, got_results = E.evaluate_split_with_ranks(
      params, TINY_MODEL, tiny_config(eval_query_batch_size=5),
      EvalConfig(clip_weight=0.7, frame_weight=0.3), ddir, "val", progress=False)
  assert 0 < got.pop("moment")["clip_branch"] < 100
  want_07, want_07_results = _brute_force_report(params, ddir, "val", 0.7, 0.3)
  assert got == want_07
  np.testing.assert_allclose(got_results["moment"], want_07_results["moment"], rtol=1e-5, atol=1e-4)
  assert got["clip"] == want["clip"] and got["frame"] == want["frame"]


@pytest.mark.parametrize("chunk,devices,want", [(25, 1, 5), (32, 1, 8), (100, 1, 5), (12, 1, 6),
                                                  (7, 1, 7), (4, 1, 4), (32, 4, 32), (40, 4, 20),
                                                  (6, 4, 6), (13, 1, 13)])
def test_encoder_sub_batch(chunk, devices, want):
  assert E.encoder_sub_batch(chunk, devices) == want


def test_map_sub_batches_keeps_video_order():
  x = jnp.arange(12 * 3, dtype=jnp.float32).reshape(12, 3)
  fn = lambda v: (v * 2.0, jnp.sum(v, axis=-1))
  for sub in (1, 2, 3, 4, 6, 12):
    got = E.map_sub_batches(fn, x, sub)
    np.testing.assert_array_equal(got[0], x * 2.0)
    np.testing.assert_array_equal(got[1], jnp.sum(x, axis=-1))
  with pytest.raises(ValueError, match="does not split"):
    E.map_sub_batches(fn, x, 5)


def test_video_encoder_in_steps_equals_the_model(params):
  """A chunk of 12 videos is encoded in 2 on-device steps of 6; same tokens as the model at once."""
  rng = np.random.default_rng(1)
  frames = rng.normal(size=(12, TINY_MODEL.num_frames, TINY_MODEL.visual_input_size)).astype(np.float32)
  clip, frame, spans = E.make_video_encoder(TINY_MODEL)(params, frames)
  want_clip, want_frame, inputs = _model_video_tokens(params, frames)
  unit = lambda t: t / np.linalg.norm(t, axis=-1, keepdims=True)
  np.testing.assert_allclose(clip, unit(np.asarray(want_clip)), atol=1e-5)
  np.testing.assert_allclose(frame, unit(np.asarray(want_frame)), atol=1e-5)
  np.testing.assert_array_equal(spans, inputs["clip_spans"])


def test_write_eval_report(tmp_path):
  report = {"R@1": 10.0, "R@5": 20.0, "R@10": 30.0, "R@100": 90.0, "SumR": 150.0,
            "clip": {"R@1": 1.0, "SumR": 2.0}, "frame": {"R@1": 3.0, "SumR": 4.0},
            "num_queries": 12, "num_videos": 3}
  path = E.write_eval_report(report, str(tmp_path / "run"), "val")
  assert path == str(tmp_path / "run" / "eval_val.json")
  assert json.loads(open(path, encoding="utf-8").read()) == report
  E.write_eval_report(dict(report, SumR=1.0), str(tmp_path / "run"), "val")  # replaces it
  assert json.loads(open(path, encoding="utf-8").read())["SumR"] == 1.0
  assert sorted(os.listdir(tmp_path / "run")) == ["eval_val.json"]  # no temporary left behind


_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from prvr_jax.eval import evaluate as E
from prvr_jax.eval.bench_eval import random_params
from prvr_jax.eval.config import EvalConfig
from prvr_jax.parallel import make_data_mesh
from tests.test_evaluate import TINY_MODEL, tiny_config
assert jax.device_count() == 4, jax.devices()
ddir = sys.argv[1]
params = random_params(TINY_MODEL, 3)
mesh = make_data_mesh()
def run(config, mesh):
  return E.evaluate_split(params, TINY_MODEL, config, EvalConfig(), ddir, "val", mesh=mesh,
                         progress=False)
out = dict(plain=run(tiny_config(), None), sharded=run(tiny_config(), mesh))
try:
  run(tiny_config(eval_video_batch_size=6), mesh)
except ValueError as e:
  out["error"] = str(e)
# The ranking kernel alone, with more videos and a padded last chunk, on a 2-device mesh.
rng = np.random.default_rng(0)
unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
corpus = E.EncodedCorpus(unit(rng.normal(size=(30, 3, 8))), unit(rng.normal(size=(30, 5, 8))),
                         np.zeros((30, 3, 2), np.int32), np.arange(30, dtype=np.int32), 4)
queries = E.EncodedQueries(unit(rng.normal(size=(21, 8))), rng.integers(0, 30, 21).astype(np.int32),
                           np.arange(21, dtype=np.int32))
a = E.rank_queries(queries, corpus, video_chunk=8, query_batch=6)
b = E.rank_queries(queries, corpus, video_chunk=8, query_batch=6, mesh=make_data_mesh(jax.devices()[:2]))
out["kernel_equal"] = all(np.array_equal(a[k], b[k]) for k in a)
print("RESULT " + json.dumps(out))
"""


def test_sharded_evaluation_equals_unsharded(ddir):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, ddir], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
  assert out["sharded"] == out["plain"] and out["plain"]["num_videos"] == 11
  assert "chunk of 6 videos (data.eval_video_batch_size) does not divide by the 4 devices" in out["error"]
  assert out["kernel_equal"]


def test_bench_eval_output_contract(capsys, tmp_path):
  from prvr_jax import bench  # pylint: disable=import-outside-toplevel
  out = tmp_path / "b.jsonl"
  assert bench.main(["eval", "--videos", "3", "--queries", "7", "--repeats", "2", "--out", str(out)]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [r["case"] for r in lines] == ["first_run_V3_Q7", "e2e_V3_Q7"]
  for r, runs in zip(lines, (1, 2)):
    assert r["bench"] == "eval" and r["items"] == 3 and r["queries"] == 7 and len(r["runs_s"]) == runs
    assert r["median_s"] > 0 and r["pairs_per_s"] == pytest.approx(21 / r["median_s"])
    assert set(r["phases_s"]) == {"encode_videos", "encode_queries", "score"} and r["cpu_s"] > 0
    assert sum(r["phases_s"].values()) == pytest.approx(r["median_s"], rel=0.3)
    assert (r["video_chunk"], r["query_batch"]) == (3, 7) and "speedup_vs_reference" not in r
    assert r["machine"]["backend"] == "cpu"
  assert lines[0]["median_s"] > lines[1]["median_s"]  # the first run compiles
  assert [json.loads(l) for l in out.read_text().splitlines()] == lines
  with pytest.raises(SystemExit):
    bench.main(["eval", "--videos", "0"])
