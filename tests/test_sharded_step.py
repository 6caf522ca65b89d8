"""Cross-device negatives: the step on 8 (fake CPU) devices equals the single-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> dict:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run([sys.executable, "-m", "tests.multidevice.sharded_step_check"], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("hard", ["hard=False", "hard=True"])
def test_loss_and_gradients_equal_single_device(report, hard):
  r = report[hard]
  np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=2e-6)
  assert r["parts_max_rel"] < 1e-6
  # Reduction order differs (all-reduce of per-device sums), nothing else.
  assert r["grad_max_abs"] < 2e-6 * max(r["grad_scale"], 1.0)


def test_full_step_equals_single_device(report):
  r = report["step"]
  np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=2e-6)
  np.testing.assert_allclose(r["grad_norm"][1], r["grad_norm"][0], rtol=1e-5)
  assert r["params_max_abs"] < 1e-6
  assert r["params_moved"] > 1e-4  # the second step really updated them
  assert r["params_sharding"] in ("P()", "PartitionSpec()")  # replicated, no duplicated reduction


def test_device_scope_tcpl_is_a_different_loss(report):
  global_tcpl, device_tcpl = report["device_scope_tcpl"]
  assert np.isfinite(device_tcpl) and device_tcpl > 0
  assert abs(device_tcpl - global_tcpl) > 1e-4


def test_in_model_text_tower_equals_single_device(report):
  r = report["tower"]
  np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=2e-6)
  assert r["top_grad"] > 0  # the trainable top block really gets a gradient
  assert r["grad_max_abs"] < 2e-6 * max(r["grad_scale"], 1.0)
