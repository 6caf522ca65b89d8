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


def test_memory_bench_reports_per_device_sizes(capsys, monkeypatch):
  from prvr_jax.models.config import ModelConfig
  tiny = ModelConfig(hidden_size=32, num_heads=4, visual_input_size=24, query_input_size=16,
                     max_desc_len=12, gauss_widths=(0.5,))
  monkeypatch.setattr(bench, "TVR_MODEL", tiny)
  monkeypatch.setattr(bench, "CAPTION_TOKENS", 8)
  assert bench.main(["memory", "--batch", "2"]) == 0
  (rec,) = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert rec["case"] == "msc_step_B2_devices1" and rec["devices"] == 1
  assert rec["temp_mb"] > 0 and rec["argument_mb"] > 0


def test_loss_bench_runs_every_variant(capsys):
  assert bench.main(["loss", "--batch", "2", "--repeats", "1"]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [r["case"] for r in lines] == ["msc_B2", "backbone_B2", "tcpl_only_B2", "cbva_only_B2"]
  assert all(r["bench"] == "loss" and r["queries"] == 2 * bench.CAPTIONS_PER_VIDEO and r["median_s"] > 0
             for r in lines)


def _tiny(monkeypatch):
  from prvr_jax.models.config import ModelConfig
  # max_desc_len 77: the eval bench's queries have more tokens than the step's 8.
  tiny = ModelConfig(hidden_size=32, num_heads=4, visual_input_size=24, query_input_size=16,
                     max_desc_len=77, gauss_widths=(0.5,))
  monkeypatch.setattr(bench, "TVR_MODEL", tiny)
  monkeypatch.setattr(bench, "CAPTION_TOKENS", 8)


def test_memory_bench_takes_the_compute_dtype_and_remat(capsys, monkeypatch):
  _tiny(monkeypatch)
  temp = {}
  for argv in (["--dtype", "float32"], ["--dtype", "bfloat16"], ["--remat", "blocks"]):
    assert bench.main(["memory", "--batch", "4"] + argv) == 0
    (rec,) = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    temp[(rec["dtype"], rec["remat"])] = rec["temp_mb"]
  assert set(temp) == {("float32", "none"), ("bfloat16", "none"), ("float32", "blocks")}
  # At this toy size the loss terms' temporaries dominate, so only bfloat16 shows here; remat's
  # saving is tested on the block (tests/test_model.py) and measured at TVR size (README).
  assert temp[("bfloat16", "none")] < temp[("float32", "none")]


def test_accel_bench_runs_on_cpu_and_emits_every_record(capsys, monkeypatch, tmp_path):
  _tiny(monkeypatch)
  monkeypatch.setattr(bench, "matmul_rate", lambda n, dtype: 1e9)  # the 2048 matmul: seconds on CPU
  missing = tmp_path / "none.npz"
  assert bench.main(["accel", "--batch", "2", "--repeats", "1", "--videos", "8", "--queries", "16",
                     "--golden", str(missing)]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert all(r["bench"] == "accel" for r in lines)
  parity = lines[0]
  assert parity["case"] == "golden_parity_f32" and parity["ok"] is False and "not found" in parity["note"]
  cases = {r["case"]: r for r in lines}
  assert {"matmul_2048_float32", "matmul_2048_bfloat16", "msc_B2_float32", "msc_B2_bfloat16"} <= set(cases)
  for d in ("float32", "bfloat16"):
    step = cases[f"msc_B2_{d}"]
    assert step["dtype"] == d and step["median_s"] > 0 and step["flops"] > 0
    assert step["fraction_of_matmul_rate"] == step["achieved_flops_per_s"] / 1e9
    assert step["memory_source"] == "memory_analysis" and step["peak_memory_mb"] > step["temp_mb"] > 0
  assert any(c.startswith("eval_") for c in cases)
  assert lines[-1]["machine"]["backend"] == "cpu"
