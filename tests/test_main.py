"""`python -m prvr_jax.main`: prepare end to end on the synthetic config, and its error paths."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "prvr_jax.main", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)


def test_prepare_builds_synthetic_and_writes_summary(tmp_path):
  argv = ["--config=configs/synthetic.py", f"--workdir={tmp_path}", "--mode=prepare",
          "--config.data.synthetic.num_train_videos=40", "--config.data.synthetic.num_val_videos=10",
          "--config.data.synthetic.num_test_videos=10"]
  first = _run(*argv)
  assert first.returncode == 0, first.stderr[-2000:]
  summary = json.loads((tmp_path / "prepare_summary.json").read_text())
  assert {s: summary["splits"][s]["videos"] for s in ("train", "val", "test")} == {"train": 40, "val": 10, "test": 10}
  assert all(summary["splits"][s]["skipped"] == [] for s in summary["splits"])
  second = _run(*argv)
  assert second.returncode == 0 and json.loads((tmp_path / "prepare_summary.json").read_text())["reused"]


def test_unknown_mode_is_a_usage_error(tmp_path):
  result = _run("--config=configs/synthetic.py", f"--workdir={tmp_path}", "--mode=fly")
  assert result.returncode != 0 and "--mode" in result.stderr + result.stdout
  assert not any(tmp_path.iterdir())


def test_eval_of_an_untrained_workdir_is_one_clear_error(tmp_path):
  result = _run("--config=configs/synthetic.py", f"--workdir={tmp_path}", "--mode=eval")
  assert result.returncode == 2
  assert "config.json not found" in result.stderr and "Traceback" not in result.stderr


def test_missing_feature_root_is_one_clear_error(tmp_path):
  result = _run("--config=configs/tvr.py", f"--config.data.root={tmp_path / 'nope'}",
                f"--workdir={tmp_path / 'w'}", "--mode=prepare")
  assert result.returncode == 2
  assert "data.root is not an existing folder" in result.stderr and "Traceback" not in result.stderr


def test_baseline_goes_with_eval_only(tmp_path):
  result = _run("--config=configs/synthetic.py", f"--workdir={tmp_path}", "--mode=train", "--baseline=clip")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "--baseline=clip goes with --mode=eval, not --mode=train" in result.stderr
  assert not any(tmp_path.iterdir())
