"""Per-query records and the command that compares two of them (Table A2 counts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prvr_jax.data.pipeline import SplitNames
from prvr_jax.eval import compare, records

NAMES = SplitNames(["v0", "v1", "v2"], ["v0#0", "v0#1", "v1#0", "v2#0"], ["a dog", "a cat", "a cup", "a car"])


def _results(fused):
  return dict(query_index=np.arange(4), gt_video_index=np.array([0, 0, 1, 2]),
              fused=np.asarray(fused), clip=np.array([2, 1, 3, 1]), frame=np.array([1, 3, 2, 2]),
              top_videos=np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [2, -1, -1]]),
              moment=np.array([[1, 2], [3, 4], [0, 9], [5, 6]], np.float32),
              moment_branch=np.array([1, 0, 1, 1], np.int32),
              gt_moment=np.array([[1, 3], [-1, -1], [0, 9], [2, 6]], np.float32),
              gt_duration=np.array([10, 10, 9, -1], np.float32))


def test_query_records_fields():
  rows = records.query_records(_results([1, 2, 1, 3]), NAMES)
  assert [r["caption_id"] for r in rows] == NAMES.caption_ids
  first = rows[0]
  assert first == {"caption_id": "v0#0", "text": "a dog", "video_id": "v0",
                   "rank": {"fused": 1, "clip": 2, "frame": 1}, "top_videos": ["v0", "v1", "v2"],
                   "moment": [1.0, 2.0], "branch": "frame", "gt_moment": [1.0, 3.0], "iou": 0.5}
  assert rows[1]["gt_moment"] is None and rows[1]["iou"] is None and rows[1]["branch"] == "clip"
  assert rows[2]["iou"] == 1.0 and rows[2]["video_id"] == "v1"
  # Unknown duration: the moment is not in seconds, so it is not given (nor scored).
  assert rows[3]["moment"] is None and rows[3]["iou"] is None and rows[3]["top_videos"] == ["v2"]


def test_records_round_trip_and_bad_files(tmp_path):
  path = tmp_path / "eval_val_queries.jsonl"
  records.write_query_records(path, records.query_records(_results([1, 2, 1, 3]), NAMES))
  back = records.read_query_records(path)
  assert list(back) == NAMES.caption_ids and back["v1#0"]["rank"]["fused"] == 1
  with pytest.raises(records.RecordsError, match="records file not found"):
    records.read_query_records(tmp_path / "missing.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(path.read_text().splitlines()[0] + "\n{\"caption_id\": \"x\"}\n")
  with pytest.raises(records.RecordsError, match="bad.jsonl: line 2: not a query record"):
    records.read_query_records(bad)
  twice = tmp_path / "twice.jsonl"
  twice.write_text(path.read_text().splitlines()[0] + "\n" + path.read_text().splitlines()[0] + "\n")
  with pytest.raises(records.RecordsError, match="line 2: caption 'v0#0' appears twice"):
    records.read_query_records(twice)


def _write(tmp_path, name, fused):
  path = tmp_path / name
  records.write_query_records(path, records.query_records(_results(fused), NAMES))
  return str(path)


def test_compare_counts_what_each_fixes(tmp_path, capsys):
  a = _write(tmp_path, "a.jsonl", [1, 2, 1, 30])
  b = _write(tmp_path, "b.jsonl", [4, 1, 1, 12])
  counts = compare.compare_records(records.read_query_records(a), records.read_query_records(b), ks=(1, 10))
  assert counts == {"queries": 4,
                    "R@1": {"a_only": 1, "b_only": 1, "both": 1, "neither": 1},
                    "R@10": {"a_only": 0, "b_only": 0, "both": 3, "neither": 1}}
  assert compare.main([a, b]) == 0
  table = capsys.readouterr().out
  assert "4 queries in both" in table and "A fixes" in table
  assert compare.main([a, b, "--json", "--ks", "1,5"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["R@5"] == {"a_only": 0, "b_only": 0, "both": 3, "neither": 1} and out["a"] == a


def test_compare_refuses_records_of_other_splits(tmp_path, capsys):
  a = _write(tmp_path, "a.jsonl", [1, 2, 1, 3])
  lines = open(a, encoding="utf-8").read().splitlines()
  other = tmp_path / "other.jsonl"
  other.write_text("\n".join(lines[:3]) + "\n")
  assert compare.main([a, str(other)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "1 only in A, e.g. ['v2#0']" in err
  moved = tmp_path / "moved.jsonl"
  rec = json.loads(lines[0])
  rec["video_id"] = "v9"
  moved.write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
  assert compare.main([a, str(moved)]) == 2
  assert "caption 'v0#0': ground-truth video 'v0' in A but 'v9' in B" in capsys.readouterr().err
