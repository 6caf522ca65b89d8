"""The bench command's output contract (one JSON object per line and case)."""

from __future__ import annotations

import json

from prvr_jax import bench


def test_tome_bench_prints_json_lines(capsys, tmp_path):
  out = tmp_path / "b.jsonl"
  assert bench.main(["tome", "--batch", "2,4", "--repeats", "2", "--out", str(out)]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [r["case"] for r in lines] == ["op_tome_B2", "op_tome_B4"]
  for r in lines:
    assert r["bench"] == "tome" and r["items"] in (2, 4) and len(r["runs_s"]) == 2
    assert 0 < r["median_s"] < 10 and r["per_video_ms"] == 1e3 * r["median_s"] / r["items"]
    assert r["machine"]["backend"] == "cpu"
  assert [json.loads(l) for l in out.read_text().splitlines()] == lines


def test_bench_rejects_bad_arguments(capsys):
  import pytest
  for argv in (["tome", "--batch", "x"], ["tome", "--repeats", "0"], ["nope"]):
    with pytest.raises(SystemExit) as e:
      bench.main(argv)
    assert e.value.code == 2
