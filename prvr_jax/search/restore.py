"""The model an index was built with: where its run is, and restoring that exact checkpoint.

Queries must be encoded by the network that encoded the videos, so both `query` and `serve`
restore the step the manifest names (from the run it names, or from `--workdir` if the run moved)
and refuse parameters whose hash differs from the manifest's.
"""

from __future__ import annotations

import pathlib
from typing import Optional

from prvr_jax.models.caption_tower import WORKDIR_FILE as CAPTION_TOWER_FILE
from prvr_jax.search import query as query_lib
from prvr_jax.search.errors import SearchError
from prvr_jax.search.index_store import IndexReader
from prvr_jax.search.model import SearchModel, load_search_model


def index_workdir(index: IndexReader, workdir: Optional[str] = None) -> str:
  """The training workdir to restore: `workdir` if given, else the one the manifest names.

  Raises:
    SearchError: the index was built from parameters in memory and no workdir is given.
  """
  workdir = workdir or index.manifest["model"].get("workdir")
  if not workdir:
    raise SearchError(f"{index.directory}: built from parameters in memory, not a workdir; pass "
                      "--workdir")
  return str(workdir)


def has_own_text_tower(workdir: str) -> bool:
  """Whether the run was trained with its own CLIP text tower (queries are text, no --clip)."""
  return (pathlib.Path(workdir) / CAPTION_TOWER_FILE).is_file()


def restore_index_model(index: IndexReader, workdir: str) -> SearchModel:
  """Restores the checkpoint step the index was built with and checks it is the same network.

  Args:
    index: an opened index.
    workdir: from `index_workdir`.

  Returns:
    The SearchModel.

  Raises:
    SearchError: the step is no longer kept, or the parameters differ from the index's.
    prvr_jax.train.checkpoint.CheckpointError: no run or a corrupt checkpoint there.
  """
  built = index.manifest["model"]
  step = built.get("step")  # -1: built from parameters in memory; the hash check still applies
  step = step if isinstance(step, int) and step >= 0 else None
  model = load_search_model(workdir=workdir, which=built.get("which") or "best", step=step)
  query_lib.check_model(index, model)
  return model
