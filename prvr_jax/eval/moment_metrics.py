"""Moment metrics: the moment search returns for the ground-truth video against its annotation.

For each query whose caption has an annotated moment (and whose video a known duration):
  * IoU of the moment `search query` would return for the ground-truth video (the span of the
    best-matching token of the contributing branch, `ops.moments.choose_moment`) with the
    annotated span: mean IoU and the fraction of queries with IoU >= 0.3 / 0.5 / 0.7;
  * corpus-level moment retrieval: a video contributes one (video, moment) pair to a query's
    list, so the top-k pairs hold the right video with IoU >= t exactly when its fused rank is
    <= k and its moment's IoU is >= t: R@k,IoU>=t for k = 1, 10, 100 and t = 0.5, 0.7.
The same numbers for the uniform baseline (the whole video [0, duration] as the moment, the
ranking unchanged) go under 'uniform'. Every figure is a percentage of the annotated queries.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from prvr_jax.ops.moments import BRANCHES, temporal_iou

IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)
RETRIEVAL_IOUS: tuple[float, ...] = (0.5, 0.7)
RETRIEVAL_KS: tuple[int, ...] = (1, 10, 100)


def annotated(results: Mapping[str, np.ndarray]) -> np.ndarray:
  """(M,) bool: the query has an annotated moment and its video a known duration.

  Args:
    results: per-query arrays with `gt_moment` (M, 2) (-1 unknown) and `gt_duration` (M,).
  """
  gt, duration = np.asarray(results["gt_moment"]), np.asarray(results["gt_duration"])
  return (gt[:, 0] >= 0) & (gt[:, 1] >= 0) & (duration > 0)


def moment_ious(results: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """IoU of the returned moment and of the whole video with the annotation.

  Args:
    results: per-query arrays `moment` (M, 2), `gt_moment` (M, 2), `gt_duration` (M,).

  Returns:
    {'model': (M,), 'uniform': (M,)} float64, NaN where the query is not `annotated`.
  """
  known = annotated(results)
  gt = np.asarray(results["gt_moment"], np.float64)
  duration = np.asarray(results["gt_duration"], np.float64)
  whole = np.stack([np.zeros_like(duration), duration], axis=-1)
  return {name: np.where(known, temporal_iou(pred, gt), np.nan)
          for name, pred in (("model", results["moment"]), ("uniform", whole))}


def moment_scores(iou: np.ndarray, fused_ranks: np.ndarray) -> dict[str, float]:
  """mIoU, IoU>=t rates and R@k,IoU>=t (percent) of annotated queries.

  Args:
    iou: (A,) IoU of each annotated query's moment.
    fused_ranks: (A,) their ground-truth video's fused rank.
  """
  iou, ranks = np.asarray(iou, np.float64), np.asarray(fused_ranks)
  out = {"mIoU": 100.0 * float(np.mean(iou))}
  out.update({f"IoU>={t}": 100.0 * float(np.mean(iou >= t)) for t in IOU_THRESHOLDS})
  out.update({f"R@{k},IoU>={t}": 100.0 * float(np.mean((ranks <= k) & (iou >= t)))
              for t in RETRIEVAL_IOUS for k in RETRIEVAL_KS})
  return out


def moment_report(results: Mapping[str, np.ndarray]) -> Optional[dict[str, Any]]:
  """The `moment` object of an eval report, None when no query is `annotated`.

  Args:
    results: per-query arrays: `fused` ranks, `moment`, `moment_branch`, `gt_moment`,
      `gt_duration` (see `evaluate.rank_and_report`).

  Returns:
    {'queries': annotated queries, the `moment_scores` of the returned moments,
     'clip_branch': percent of moments taken from the clip branch, 'uniform': the
     `moment_scores` of the whole-video moment}.
  """
  known = annotated(results)
  if not known.any():
    return None
  ious = moment_ious(results)
  ranks = np.asarray(results["fused"])[known]
  report: dict[str, Any] = {"queries": int(known.sum())}
  report.update(moment_scores(ious["model"][known], ranks))
  branch = np.asarray(results["moment_branch"])[known]
  report["clip_branch"] = 100.0 * float(np.mean(branch == BRANCHES.index("clip")))
  report["uniform"] = moment_scores(ious["uniform"][known], ranks)
  return report
