"""The CLIP zero-shot row: ranks from the features alone, equal to a brute-force computation, and
`--mode=eval --baseline=clip` with no trained run; moments of a real layout, present or absent."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic as synthetic_config
from prvr_jax.data import pipeline
from prvr_jax.data.config import DataConfig
from prvr_jax.data.prepare import prepare
from prvr_jax.errors import ConfigError
from prvr_jax.eval import clip_baseline
from prvr_jax.eval.config import EvalConfig
from prvr_jax.ops import moments
from prvr_jax.ops.video_inputs import prepare_video_inputs
from prvr_jax.train import report as report_lib
from tests import test_data_helpers as h
from tests.test_evaluate import _argsort_ranks, tiny_config


def _config(width: int = 16):
  config = synthetic_config.get_config()
  syn = config.data.synthetic
  syn.num_train_videos, syn.num_val_videos, syn.num_test_videos = 4, 9, 3
  syn.visual_dim, syn.text_dim = width, width
  config.data.eval_video_batch_size, config.data.eval_query_batch_size = 4, 8
  config.data.num_threads = 1
  # Captions are cut to 5 rows for the network: the baseline still reads their EOS row.
  config.data.max_caption_tokens = 5
  return config


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  data = DataConfig.from_config_dict(_config().data)
  return prepare(data, tmp_path_factory.mktemp("clip_data"), progress=False, print_fn=None)["dataset_dir"]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_baseline_equals_brute_force(ddir):
  data = DataConfig.from_config_dict(_config().data)
  report, results = clip_baseline.evaluate_split(data, EvalConfig(), ddir, "val", progress=False)
  info = pipeline.open_split(ddir, "val")
  source = pipeline.RecordSource(ddir, "val")
  recs = [source[i] for i in range(info.num_videos)]
  frames = np.stack([pipeline.resample_to_fixed_length(r["frames"], 128) for r in recs])
  inputs = prepare_video_inputs(jnp.asarray(frames))
  clips, rows = _unit(np.asarray(inputs["clip_video_features"])), _unit(frames)
  eos = _unit(np.stack([c[-1] for r in recs for c in pipeline.split_captions(r)]))  # full captions
  cs = np.einsum("qd,nkd->qnk", eos, clips).max(-1)
  fs = np.einsum("qd,nfd->qnf", eos, rows).max(-1)
  gt = np.repeat(np.arange(info.num_videos), np.diff(info.caption_offsets))
  gt_mask = gt[:, None] == np.arange(info.num_videos)[None, :]
  for kind, scores in (("fused", 0.4 * cs + 0.6 * fs), ("clip", cs), ("frame", fs)):
    np.testing.assert_array_equal(results[kind], _argsort_ranks(scores, gt_mask), err_msg=kind)
  assert report["num_queries"] == info.num_captions and report["moment"]["queries"] == info.num_captions
  assert {"MedR", "MnR", "SumR"} <= set(report) and "uniform" in report["moment"]


def test_baseline_needs_one_feature_space(tmp_path):
  data = tiny_config()  # 16-d video, 8-d caption features
  ddir = prepare(data, tmp_path, progress=False, print_fn=None)["dataset_dir"]
  with pytest.raises(ConfigError, match="16-d video and 8-d caption features"):
    clip_baseline.evaluate_split(data, EvalConfig(), ddir, "val", progress=False)


def test_mode_eval_baseline_clip_needs_no_trained_run(tmp_path):
  workdir = tmp_path / "fresh"  # no run, no dataset: it is prepared
  out = report_lib.evaluate_baseline(_config(), str(workdir), "clip", progress=False)
  assert set(out["eval"]) == {"val", "test"}
  for split in ("val", "test"):
    name = f"{split}_clip_baseline"
    written = json.loads((workdir / f"eval_{name}.json").read_text())
    assert written == json.loads(json.dumps(out["eval"][split]))
    lines = (workdir / f"eval_{name}_queries.jsonl").read_text().splitlines()
    assert len(lines) == written["num_queries"] and json.loads(lines[0])["iou"] is not None
    for png in (f"recall_{name}.png", f"ranks_{name}.png", f"iou_{name}.png"):
      assert (workdir / png).stat().st_size > 5000, png
  assert not (workdir / "checkpoints").exists()
  with pytest.raises(ConfigError, match="--baseline must be one of"):
    report_lib.evaluate_baseline(_config(), str(workdir), "bm25", progress=False)


@pytest.mark.parametrize("with_moments", [True, False])
def test_a_tvr_split_has_a_moment_object_only_with_its_release_file(tmp_path, with_moments):
  """The authors' TVR layout: with tvr_val_release.jsonl the moments are scored in seconds of
  the release's durations; without it the report has no `moment` object (absent, not zero), the
  records no annotation and no IoU plot is drawn."""
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "tvr", splits=(("train", 3), ("val", 4)), video_dim=16,
                                 text_dim=16, moments=with_moments)
  sizes = dict(eval_video_batch_size=4, eval_query_batch_size=8, num_threads=1)  # as _config's
  ddir = h.build(tmp_path, "tvr", root, **sizes)["dataset_dir"]
  data = DataConfig.from_config_dict(h.data_config("tvr", root, **sizes).data)
  report, results = clip_baseline.evaluate_split(data, EvalConfig(), ddir, "val", progress=False)
  written = report_lib.write_split_outputs(str(tmp_path), ddir, "val", "val_clip_baseline", report, results)
  rows = [json.loads(line) for line in (tmp_path / "eval_val_clip_baseline_queries.jsonl").read_text().splitlines()]
  assert [r["caption_id"] for r in rows] == [c.caption_id for v in tree["val"] for c in v.captions]
  iou_png = str(tmp_path / "iou_val_clip_baseline.png")
  if with_moments:
    assert report["moment"]["queries"] == len(rows) and iou_png in written
    for r, (v, k) in zip(rows, [(v, k) for v in tree["val"] for k in range(len(v.captions))]):
      start, end, duration = h.moment_of("tvr", v, k)
      assert r["gt_moment"] == [start, end] and 0 <= r["moment"][0] < r["moment"][1] <= duration
      assert r["iou"] == pytest.approx(float(moments.temporal_iou(np.array(r["moment"]), np.array([start, end]))), abs=1e-3)
  else:
    assert "moment" not in report and iou_png not in written
    assert all(r["gt_moment"] is None and r["iou"] is None for r in rows)
