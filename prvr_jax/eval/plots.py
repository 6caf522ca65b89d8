"""PNG figures of a run: training curves, recall curves, collapse diagnostics.

Figures are drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure` (no pyplot, so
no global backend or figure registry is touched) and written atomically: a reader never sees a
half-written PNG.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from prvr_jax.utils.files import atomic_write_bytes

RECALL_KS: tuple[int, ...] = (1, 5, 10, 100)
SCORE_KINDS: tuple[str, ...] = ("fused", "clip", "frame")
# Keys of a training line that are not loss parts.
_NOT_LOSS_PARTS = frozenset({"step", "loss", "lr", "grad_norm", "epoch", "split", "time", "elapsed_s",
                             "steps_per_s", "examples_per_s"})


def save_png(fig: Figure, out_png: str | os.PathLike) -> str:
  """Writes `fig` as a PNG atomically (no half-written file); returns the path."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  atomic_write_bytes(out_png, buf.getvalue())
  return os.fspath(out_png)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The JSON objects of a metrics.jsonl file; unreadable lines (a line being written) are skipped."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_training_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike) -> str:
  """Training curves of a metrics.jsonl written by the training loop.

  Panels: the loss and each loss part vs step (lines with a 'loss' key); lr and grad_norm vs step;
  SumR vs step of each eval split (lines with a 'split' key; fused, and clip / frame dashed).

  Returns:
    The path written.
  """
  rows = read_metrics(metrics_jsonl_path)
  train = [r for r in rows if "loss" in r and "split" not in r and _is_number(r.get("step"))]
  evals = [r for r in rows if "split" in r and _is_number(r.get("step"))]
  fig = Figure(figsize=(16, 4.5), layout="constrained")
  ax_loss, ax_opt, ax_eval = fig.subplots(1, 3)

  parts = sorted({k for r in train for k, v in r.items() if k not in _NOT_LOSS_PARTS and _is_number(v)})
  for name in ["loss"] + parts:
    pts = [(r["step"], r[name]) for r in train if _is_number(r.get(name))]
    if pts:
      steps, values = zip(*pts)
      ax_loss.plot(steps, values, label=name, linewidth=2.0 if name == "loss" else 1.0)
  ax_loss.set(title="loss", xlabel="step")
  if train:
    ax_loss.legend(fontsize="small")

  for name, ax, color in (("lr", ax_opt, "tab:blue"), ("grad_norm", ax_opt.twinx(), "tab:red")):
    pts = [(r["step"], r[name]) for r in train if _is_number(r.get(name))]
    if pts:
      steps, values = zip(*pts)
      ax.plot(steps, values, color=color, label=name)
    ax.set_ylabel(name, color=color)
  ax_opt.set(title="learning rate and gradient norm", xlabel="step")
  ax_opt.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

  for split in sorted({r["split"] for r in evals}):
    lines = sorted((r for r in evals if r["split"] == split), key=lambda r: r["step"])
    fused = [(r["step"], r["SumR"]) for r in lines if _is_number(r.get("SumR"))]
    if fused:
      line, = ax_eval.plot(*zip(*fused), marker="o", label=f"{split} SumR")
      for kind, style in (("clip", "--"), ("frame", ":")):
        pts = [(r["step"], r[kind]["SumR"]) for r in lines
               if isinstance(r.get(kind), dict) and _is_number(r[kind].get("SumR"))]
        if pts:
          ax_eval.plot(*zip(*pts), linestyle=style, color=line.get_color(), alpha=0.7,
                       label=f"{split} {kind} SumR")
  ax_eval.set(title="retrieval", xlabel="step", ylabel="SumR")
  if evals:
    ax_eval.legend(fontsize="small")
  return save_png(fig, out_png)


def _recall_curve(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(k = 1..max rank, R@k in percent) from (M,) 1-based ranks."""
  ranks = np.asarray(ranks)
  ks = np.arange(1, int(ranks.max()) + 1)
  return ks, 100.0 * np.searchsorted(np.sort(ranks), ks, side="right") / ranks.size


def plot_recall(report: Mapping[str, Any], out_png: str | os.PathLike,
                ranks: Optional[Mapping[str, np.ndarray]] = None,
                ks: Sequence[int] = RECALL_KS) -> str:
  """R@k vs k (log scale) for the fused, clip and frame scores of an eval report.

  Args:
    report: `evaluate_split`'s dict (fused R@k at the top level, 'clip' and 'frame' sub-dicts).
    out_png: where to write.
    ranks: optional {'fused', 'clip', 'frame'}: (M,) ranks (`evaluate_split_with_ranks`); adds the
      full curve R@k for every k.
    ks: the cut-offs read from the report.

  Returns:
    The path written.
  """
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.subplots()
  for kind in SCORE_KINDS:
    values = report if kind == "fused" else report.get(kind, {})
    pts = [(k, values[f"R@{k}"]) for k in ks if f"R@{k}" in values]
    if not pts:
      continue
    sumr = values.get("SumR")
    label = f"{kind}" + (f" (SumR {sumr:.1f})" if _is_number(sumr) else "")
    line, = ax.plot(*zip(*pts), marker="o", linestyle="none" if ranks else "-", label=label)
    if ranks is not None and kind in ranks:
      ax.plot(*_recall_curve(ranks[kind]), color=line.get_color(), linewidth=1.0)
  ax.set_xscale("log")
  ax.set(xlabel="k", ylabel="R@k (%)", ylim=(0, 100))
  title = "text-to-video recall"
  if "num_queries" in report and "num_videos" in report:
    title += f": {report['num_queries']} queries, {report['num_videos']} videos"
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return save_png(fig, out_png)


def plot_diagnostics(diag: Mapping[str, Any], out_png: str | os.PathLike) -> str:
  """Bars of `collapse_diagnostics`: learned vs CLIP / input cosine similarities, and Spearman.

  Returns:
    The path written.
  """
  query, tokens = diag.get("query", {}), diag.get("clip_token", {})
  fig = Figure(figsize=(11, 4.5), layout="constrained")
  ax_cos, ax_rho = fig.subplots(1, 2)
  groups = [("queries,\nsame video", query.get("same_video_cos", {}), "clip"),
            ("queries,\nall pairs", query.get("all_pairs_cos", {}), "clip"),
            ("clip tokens,\nwithin video", tokens.get("within_video_cos", {}), "input")]
  x = np.arange(len(groups))
  learned = [g.get("learned", np.nan) for _, g, _ in groups]
  reference = [g.get(ref, np.nan) for _, g, ref in groups]
  for offset, values, label in ((-0.2, learned, "learned"),
                                (0.2, reference, "CLIP (queries) / OP-ToMe input (tokens)")):
    bars = ax_cos.bar(x + offset, values, 0.4, label=label)
    ax_cos.bar_label(bars, fmt="%.2f", fontsize="small")
  ax_cos.set_xticks(x, [name for name, _, _ in groups])
  # Room above the bars for the legend.
  ax_cos.set(title="mean cosine similarity", ylim=(min(0.0, np.nanmin(learned + reference + [0.0])), 1.25))
  ax_cos.legend(fontsize="small", loc="upper left", ncol=2)
  rhos = [("queries\nvs CLIP", query.get("spearman_learned_vs_clip", np.nan)),
          ("clip tokens vs\ninput, per video", tokens.get("spearman_learned_vs_input", np.nan)),
          ("clip tokens vs\ninput, pooled", tokens.get("spearman_learned_vs_input_pooled", np.nan))]
  bars = ax_rho.bar(np.arange(len(rhos)), [v for _, v in rhos], 0.5, color="tab:green")
  ax_rho.bar_label(bars, fmt="%.2f", fontsize="small")
  ax_rho.set_xticks(np.arange(len(rhos)), [name for name, _ in rhos])
  ax_rho.axhline(0.0, color="black", linewidth=0.8)
  ax_rho.set(title="Spearman: learned vs reference similarities", ylim=(-1.0, 1.0))
  if "split" in diag:
    fig.suptitle(f"semantic-collapse diagnostics ({diag['split']})")
  return save_png(fig, out_png)


def rank_bins(top: int) -> np.ndarray:
  """Edges 1, 2, 3, 5, 9, 17, ... of the rank bins 1, 2, 3-4, 5-8, 9-16, ..., the last one
  ending past `top`. (top,) -> (B + 1,) int64."""
  edges = [1, 2]
  while edges[-1] <= top:
    edges.append(2 * edges[-1] - 1)
  return np.asarray(edges, np.int64)


def plot_rank_histogram(ranks: Mapping[str, np.ndarray], out_png: str | os.PathLike,
                        num_videos: Optional[int] = None, title: str = "") -> str:
  """Share of queries whose ground-truth video ranks 1, 2, 3-4, 5-8, 9-16, ... for the fused,
  clip and frame scores (grouped bars), with each score's MedR and MnR in the legend.

  Args:
    ranks: {'fused', 'clip', 'frame'}: (M,) 1-based ranks.
    out_png: where to write.
    num_videos: corpus size (the bins reach it; default the largest rank).
    title: suffix of the title (e.g. the split).

  Returns:
    The path written.
  """
  kinds = [k for k in SCORE_KINDS if k in ranks]
  top = max([int(num_videos or 1)] + [int(np.max(ranks[k])) for k in kinds])
  edges = rank_bins(top)
  names = [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
  fig = Figure(figsize=(max(6.5, 0.55 * len(names) + 2), 4.5), layout="constrained")
  ax = fig.subplots()
  x = np.arange(len(names))
  width = 0.8 / max(len(kinds), 1)
  for i, kind in enumerate(kinds):
    r = np.asarray(ranks[kind])
    share = 100.0 * np.histogram(r, bins=edges)[0] / max(r.size, 1)
    ax.bar(x + (i - (len(kinds) - 1) / 2) * width, share, width,
           label=f"{kind} (MedR {np.median(r):g}, MnR {np.mean(r):.1f})")
  ax.set_xticks(x, names, rotation=45 if len(names) > 8 else 0)
  ax.set(xlabel="rank of the ground-truth video (1 = top)", ylabel="queries (%)")
  ax.set_title("rank histogram" + (f": {title}" if title else ""))
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend()
  return save_png(fig, out_png)


def plot_iou_histogram(ious: Mapping[str, np.ndarray], out_png: str | os.PathLike,
                       title: str = "", thresholds: Sequence[float] = (0.3, 0.5, 0.7)) -> str:
  """Histogram of the IoU of the returned moment with the annotated one, next to the uniform
  baseline's (the whole video), over annotated queries.

  Args:
    ious: {'model': (M,), 'uniform': (M,)} IoUs, NaN where not annotated (`moment_metrics.moment_ious`).
    out_png: where to write.
    title: suffix of the title.
    thresholds: IoU thresholds marked with vertical lines.

  Returns:
    The path written.
  """
  edges = np.linspace(0.0, 1.0, 21)
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.subplots()
  labels = {"model": "returned moment", "uniform": "uniform: the whole video"}
  for name, values in ious.items():
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
      continue
    share = 100.0 * np.histogram(v, bins=edges)[0] / v.size
    ax.stairs(share, edges, label=f"{labels.get(name, name)} (mIoU {100 * v.mean():.1f})",
              fill=name == "model", alpha=0.5 if name == "model" else 1.0, linewidth=1.5)
  for t in thresholds:
    ax.axvline(t, color="grey", linestyle=":", linewidth=1.0)
  ax.set(xlabel="temporal IoU with the annotated moment", ylabel="annotated queries (%)", xlim=(0, 1))
  ax.set_title("moment IoU" + (f": {title}" if title else ""))
  ax.grid(True, alpha=0.3)
  ax.legend()
  return save_png(fig, out_png)
