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


# The files that take longest (minutes on 2 cores: 8-device and 2-process runs, training to
# resume, the notebook, end-to-end search), longest first. They are collected first so that the
# two test processes (`-n 2 --dist loadfile`, which hands out whole files in collection order)
# start with them and end on short files, instead of one process running a long file alone at the
# end. Order inside a file is unchanged.
LONGEST_FILES = ("test_sharded_step.py", "test_train_loop.py", "test_launch.py", "test_notebook.py",
                 "test_trajectory.py", "test_search.py", "test_caption_tower.py", "test_parity.py",
                 "test_server.py", "test_search_ann.py", "test_bench.py", "test_evaluate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
