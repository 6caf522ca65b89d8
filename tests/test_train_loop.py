"""The training loop end to end on a tiny synthetic dataset: outputs, resumption, failures."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.train_helpers import TINY_OVERRIDES, eval_report, run_main, train_lines

pytestmark = pytest.mark.slow

PARTS = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "tcpl", "cbva", "tcpl_distance",
         "tcpl_angle", "cbva_unweighted", "clip_count")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> pathlib.Path:
  """Two epochs (8 steps), evaluated every epoch, uninterrupted."""
  workdir = tmp_path_factory.mktemp("full")
  result = run_main(workdir, "--config.eval.diagnostics=True")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_outputs_of_a_run(full_run):
  rows = train_lines(full_run)
  assert [r["step"] for r in rows] == list(range(1, 9))
  for row in rows:
    assert {"loss", "lr", "grad_norm", *PARTS} <= set(row), sorted(row)
    assert np.isfinite(row["loss"])
  assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0  # warm-up starts at 0, as the reference
  evals = [json.loads(l) for l in (full_run / "metrics.jsonl").read_text().splitlines() if '"split"' in l]
  assert [(e["step"], e["split"]) for e in evals] == [(4, "val"), (8, "val")]
  for split in ("val", "test"):
    report = eval_report(full_run, split)
    for scores in (report, report["clip"], report["frame"]):
      assert set(scores) >= {"R@1", "R@5", "R@10", "R@100", "SumR"}
      assert 0 <= scores["R@1"] <= scores["R@5"] <= scores["R@10"] <= scores["R@100"] <= 100
      assert scores["SumR"] == pytest.approx(scores["R@1"] + scores["R@5"] + scores["R@10"] + scores["R@100"])
    assert 1 <= report["MedR"] <= report["num_videos"] and report["MnR"] >= 1
    # Synthetic captions are annotated: the moment object and one record per query.
    assert report["moment"]["queries"] == report["num_queries"]
    assert 0 <= report["moment"]["R@1,IoU>=0.5"] <= report["moment"]["IoU>=0.5"] <= 100
    lines = (full_run / f"eval_{split}_queries.jsonl").read_text().splitlines()
    assert len(lines) == report["num_queries"] and len(json.loads(lines[0])["top_videos"]) == 10
  assert all("MedR" in e and "moment" in e for e in evals)
  for png in ("training_curves.png", "recall_val.png", "recall_test.png", "diagnostics_val.png",
              "ranks_val.png", "ranks_test.png", "iou_val.png", "iou_test.png"):
    assert (full_run / png).stat().st_size > 1000, png
  assert list((full_run / "tensorboard").glob("events.out.tfevents.*"))
  config = json.loads((full_run / "config.json").read_text())
  assert config["model"]["visual_input_size"] == 64  # resolved from the data (0 in the config)
  assert (full_run / "prepare_summary.json").is_file()  # train prepared the dataset itself


def test_rerun_resumes_instead_of_restarting(full_run):
  before = eval_report(full_run)
  result = run_main(full_run)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "stopped (finished) at step 8" in result.stderr
  assert eval_report(full_run) == before
  assert len(train_lines(full_run)) == 8


def test_sigterm_then_resume_equals_uninterrupted(full_run, tmp_path):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(REPO_ROOT))
  args = [sys.executable, "-m", "prvr_jax.main", "--config=configs/synthetic.py",
          f"--workdir={tmp_path}", *TINY_OVERRIDES, "--config.train.checkpoint_every=2"]
  proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "2").is_dir():  # the first checkpoint is complete
    assert proc.poll() is None and time.time() < deadline, "no checkpoint written"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped (signal)" in err
  stopped_at = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert 2 <= stopped_at < 8
  assert not (tmp_path / "eval_test.json").exists()
  result = run_main(tmp_path, "--config.train.checkpoint_every=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert eval_report(tmp_path) == eval_report(full_run)
  losses = [r["loss"] for r in train_lines(tmp_path)]
  np.testing.assert_array_equal(losses, [r["loss"] for r in train_lines(full_run)])


def test_restore_on_a_different_device_count(full_run, tmp_path):
  first = run_main(tmp_path, "--config.train.max_steps=4", devices=1)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "stopped (max_steps) at step 4" in first.stderr
  second = run_main(tmp_path, devices=4)
  assert second.returncode == 0, second.stderr[-3000:]
  resumed = [r["loss"] for r in train_lines(tmp_path)]
  reference = [r["loss"] for r in train_lines(full_run)]
  assert len(resumed) == 8
  # 4 devices reduce in another order: equal up to float32 rounding.
  np.testing.assert_allclose(resumed, reference, rtol=1e-4)


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
  result = run_main(tmp_path, "--config.optim.lr=1e30", "--config.optim.name=adamw",
                    "--config.optim.max_grad_norm=0", "--config.train.checkpoint_every=1")
  assert result.returncode == 2
  assert "non-finite loss" in result.stderr and "at step" in result.stderr
  assert "last good checkpoint is step" in result.stderr and "Traceback" not in result.stderr


def test_batch_not_dividing_the_devices_is_a_clear_error(tmp_path):
  result = run_main(tmp_path, "--config.data.batch_size=12", devices=8, timeout=120)
  assert result.returncode == 2
  assert "data.batch_size=12 does not divide by the 8 devices" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_trained_run_restores_without_its_dataset(full_run, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from prvr_jax.train.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from prvr_jax.run import load_trained  # pylint: disable=import-outside-toplevel

  moved = tmp_path / "moved"
  moved.mkdir()
  shutil.copy(full_run / "config.json", moved / "config.json")
  shutil.copytree(full_run / "checkpoints", moved / "checkpoints")
  run, params, step = load_trained(str(moved))
  assert step in (4, 8) and run.model.visual_input_size == 64  # an evaluated checkpoint
  assert sum(x.size for x in jax.tree.leaves(params)) > 0
  assert not (moved / "tfds").exists()  # nothing was prepared
  with pytest.raises(CheckpointError, match="step 3 is not there"):
    load_trained(str(moved), step=3)
