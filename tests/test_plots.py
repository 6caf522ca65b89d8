"""Plots: each writes a readable, non-empty PNG atomically, from partial or messy inputs too."""

from __future__ import annotations

import json
import os

import matplotlib.image
import numpy as np

from prvr_jax.eval import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, expected):
  assert path == str(expected)
  data = open(path, "rb").read()
  assert data[:8] == PNG_SIGNATURE and len(data) > 5000
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 200 and image.shape[1] > 300
  assert image[..., :3].std() > 0.01  # something was drawn
  assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]  # atomic write


def _report(scale: float) -> dict:
  r = lambda s: {"R@1": 10 * s, "R@5": 30 * s, "R@10": 45 * s, "R@100": 90 * s, "SumR": 175 * s}
  return dict(r(scale), clip=r(scale * 0.8), frame=r(scale * 0.9), num_queries=40, num_videos=150)


def test_training_curves(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = []
  for step in range(1, 41):
    lines.append(json.dumps({"step": step, "loss": 5.0 / step, "clip_nce": 1.0 / step, "tcpl": 0.5 / step,
                             "lr": 3e-4 * min(1.0, step / 4), "grad_norm": 2.0 / step ** 0.5}))
    if step % 10 == 0:
      lines.append(json.dumps(dict(_report(step / 40), step=step, split="val")))
  lines.append('{"step": 41, "loss": ')  # a line cut off by a running writer
  path.write_text("\n".join(lines))
  rows = plots.read_metrics(path)
  assert len(rows) == 44 and sum("split" in r for r in rows) == 4
  out = tmp_path / "out" / "curves.png"  # the folder is created
  _check_png(plots.plot_training_curves(path, out), out)
  # Only training lines so far (no eval yet) still plots.
  train_only = tmp_path / "train_only.jsonl"
  train_only.write_text("\n".join(l for l in lines[:5] if '"split"' not in l))
  _check_png(plots.plot_training_curves(train_only, tmp_path / "c2.png"), tmp_path / "c2.png")


def test_recall_plot_with_and_without_ranks(tmp_path):
  _check_png(plots.plot_recall(_report(1.0), tmp_path / "r.png"), tmp_path / "r.png")
  rng = np.random.default_rng(0)
  ranks = {k: rng.integers(1, 150, 40) for k in ("fused", "clip", "frame")}
  _check_png(plots.plot_recall(_report(1.0), tmp_path / "r2.png", ranks=ranks), tmp_path / "r2.png")
  ks, curve = plots._recall_curve(np.array([1, 1, 3, 7]))  # pylint: disable=protected-access
  np.testing.assert_array_equal(ks, np.arange(1, 8))
  np.testing.assert_array_equal(curve, [50, 50, 75, 75, 75, 75, 100])


def test_diagnostics_plot(tmp_path):
  diag = {"split": "val",
          "query": {"num_queries": 20, "num_pairs": 190, "num_same_video_pairs": 12,
                    "same_video_cos": {"learned": 0.9, "clip": 0.6},
                    "all_pairs_cos": {"learned": 0.7, "clip": 0.5}, "spearman_learned_vs_clip": 0.3},
          "clip_token": {"num_videos": 6, "pairs_per_video": 496,
                         "within_video_cos": {"learned": 0.95, "input": 0.8},
                         "spearman_learned_vs_input": 0.4, "spearman_learned_vs_input_pooled": float("nan")}}
  _check_png(plots.plot_diagnostics(diag, tmp_path / "d.png"), tmp_path / "d.png")


def test_rank_and_iou_histograms(tmp_path):
  rng = np.random.default_rng(1)
  ranks = {k: rng.integers(1, 300, 80) for k in ("fused", "clip", "frame")}
  _check_png(plots.plot_rank_histogram(ranks, tmp_path / "ranks.png", num_videos=300, title="val"),
             tmp_path / "ranks.png")
  np.testing.assert_array_equal(plots.rank_bins(300), [1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 513])
  counts = np.histogram([1, 1, 2, 3, 4, 5, 300], bins=plots.rank_bins(300))[0]
  np.testing.assert_array_equal(counts, [2, 1, 2, 1, 0, 0, 0, 0, 0, 1])  # 1 | 2 | 3-4 | 5-8 | ...
  ious = {"model": np.r_[rng.uniform(0, 1, 50), np.nan], "uniform": np.r_[rng.uniform(0, 0.5, 50), np.nan]}
  _check_png(plots.plot_iou_histogram(ious, tmp_path / "iou.png", title="val"), tmp_path / "iou.png")
