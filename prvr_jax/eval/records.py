"""Per-query records of an evaluation: `eval_<split>_queries.jsonl`, one JSON object per caption.

  {"caption_id": "val00003#enc#1", "text": "a man holds a red cup", "video_id": "val00003",
   "rank": {"fused": 1, "clip": 2, "frame": 1}, "top_videos": ["val00003", ...],
   "moment": [12.0, 19.5], "branch": "frame", "gt_moment": [11.5, 20.0], "iou": 0.8824}

`rank`: the ground-truth video's rank (1 = top) under each score; `top_videos`: the best videos
by fused score, best first; `moment`: what search returns for the ground-truth video (seconds;
null when the video's duration is unknown), `branch` the branch it came from; `gt_moment` the
annotation (null when none) and `iou` their IoU (null without an annotation). Lines are in split
order. `compare.py` reads two such files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from prvr_jax.data.pipeline import SplitNames
from prvr_jax.errors import PrvrError
from prvr_jax.eval.moment_metrics import annotated, moment_ious
from prvr_jax.ops.moments import BRANCHES
from prvr_jax.utils.files import atomic_write_text

SCORE_KINDS: tuple[str, ...] = ("fused", "clip", "frame")


class RecordsError(PrvrError, ValueError):
  """A records file that cannot be read or compared; the message names the file and the line."""


def _span(x: np.ndarray) -> list[float]:
  return [round(float(x[0]), 3), round(float(x[1]), 3)]


def query_records(results: Mapping[str, np.ndarray], names: SplitNames) -> list[dict[str, Any]]:
  """One record per query of an evaluated split.

  Args:
    results: `evaluate.rank_and_report`'s per-query arrays, in split order.
    names: the split's ids and texts (`pipeline.read_split_names`).

  Returns:
    The records, in split order.
  """
  query_index = np.asarray(results["query_index"])
  if len(query_index) and int(query_index.max()) >= len(names.caption_ids):
    raise ValueError(f"results name caption {int(query_index.max())} of a split of "
                     f"{len(names.caption_ids)} captions")
  iou = moment_ious(results)["model"]
  known = annotated(results)
  timed = np.asarray(results["gt_duration"]) > 0
  records = []
  for i, q in enumerate(query_index):
    top = [names.video_ids[v] for v in np.asarray(results["top_videos"][i]) if v >= 0]
    records.append({
        "caption_id": names.caption_ids[q], "text": names.caption_texts[q],
        "video_id": names.video_ids[int(results["gt_video_index"][i])],
        "rank": {kind: int(results[kind][i]) for kind in SCORE_KINDS},
        "top_videos": top,
        "moment": _span(results["moment"][i]) if timed[i] else None,
        "branch": BRANCHES[int(results["moment_branch"][i])] if timed[i] else None,
        "gt_moment": _span(results["gt_moment"][i]) if known[i] else None,
        "iou": round(float(iou[i]), 4) if known[i] else None,
    })
  return records


def write_query_records(path: str | os.PathLike, records: list[dict[str, Any]]) -> str:
  """Writes records as JSON lines, atomically; returns the path."""
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return os.fspath(path)


def read_query_records(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """caption id -> record of a records file.

  Raises:
    RecordsError: a missing file, a line that is not a record, a caption id seen twice.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise RecordsError(f"{path}: records file not found (written by --mode=eval / training as "
                       "eval_<split>_queries.jsonl)")
  out: dict[str, dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        caption, rank = str(rec["caption_id"]), rec["rank"]["fused"]
        if not isinstance(rank, int) or rank < 1:
          raise ValueError(f"fused rank {rank!r} is not a positive integer")
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RecordsError(f"{path}: line {lineno}: not a query record: {e}") from None
      if caption in out:
        raise RecordsError(f"{path}: line {lineno}: caption {caption!r} appears twice")
      out[caption] = rec
  if not out:
    raise RecordsError(f"{path}: no records")
  return out
