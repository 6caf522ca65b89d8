"""Shared pytest fixtures: the public golden file of the authors' implementation."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_PATH = pathlib.Path(
    os.environ.get("PRVR_GOLDEN", REPO_ROOT.parent / "shared" / "golden" / "msc_reference_public.npz"))


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
  """All arrays of the public golden file (see ../shared/golden/README.md)."""
  if not GOLDEN_PATH.exists():
    pytest.fail(f"golden file not found at {GOLDEN_PATH} (set PRVR_GOLDEN or put ../shared beside the repo)")
  with np.load(GOLDEN_PATH) as z:
    return {k: z[k] for k in z.files}
