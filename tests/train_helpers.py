"""Tiny synthetic runs shared by the training-loop tests."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Sequence

from tests.conftest import REPO_ROOT

# A 2-branch, 32-wide network on 32 train videos: every step compiles and runs in seconds.
TINY_OVERRIDES = (
    "--config.data.synthetic.num_train_videos=32", "--config.data.synthetic.num_val_videos=16",
    "--config.data.synthetic.num_test_videos=16", "--config.data.batch_size=8",
    "--config.data.eval_video_batch_size=8", "--config.data.eval_query_batch_size=32",
    "--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.model.gauss_widths=(0.5,)",
    "--config.train.num_epochs=2", "--config.train.log_every=1", "--config.eval.diagnostics=False",
)


def tiny_config():
  """configs/synthetic.py shrunk like TINY_OVERRIDES (for in-process runs)."""
  from configs import synthetic  # pylint: disable=import-outside-toplevel

  c = synthetic.get_config()
  c.data.synthetic.num_train_videos, c.data.synthetic.num_val_videos = 32, 16
  c.data.synthetic.num_test_videos = 16
  c.data.batch_size, c.data.eval_video_batch_size, c.data.eval_query_batch_size = 8, 8, 32
  c.model.hidden_size, c.model.num_heads, c.model.gauss_widths = 32, 2, (0.5,)
  c.train.num_epochs, c.train.log_every = 2, 1
  return c


def run_main(workdir: os.PathLike, *extra: str, devices: int = 1, env: dict | None = None,
             timeout: int = 600, launcher: Sequence[str] = ()) -> subprocess.CompletedProcess:
  """`python -m prvr_jax.main` (train mode) on the tiny synthetic config in a subprocess."""
  full_env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=str(REPO_ROOT))
  full_env.update(env or {})
  args = ["--config=configs/synthetic.py", f"--workdir={workdir}", *TINY_OVERRIDES, *extra]
  cmd = [*launcher, *args] if launcher else [sys.executable, "-m", "prvr_jax.main", *args]
  return subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_lines(workdir: os.PathLike) -> list[dict]:
  rows = [json.loads(l) for l in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "split" not in r]


def eval_report(workdir: os.PathLike, split: str = "test") -> dict:
  return json.loads(pathlib.Path(workdir, f"eval_{split}.json").read_text())
