"""Orbax checkpoints of a run: train state + data iterator state + loop bookkeeping.

One `CheckpointManager` under `<workdir>/checkpoints` keeps the latest `keep` checkpoints and the
best one by validation SumR (checkpoints saved at an evaluation carry `{"val_SumR": ...}` as
metrics). Orbax writes each step into a temporary directory and renames it when complete, so a
run that stops mid-save leaves no half-written checkpoint. Restoring takes the abstract state with
the shardings of the current mesh, so a run resumes on any device count.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from prvr_jax.errors import PrvrError
from prvr_jax.utils.files import atomic_write_text

BEST_METRIC = "val_SumR"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class CheckpointError(PrvrError, RuntimeError):
  """A checkpoint that cannot be restored (corrupt, incompatible, missing)."""


class MissingStepError(CheckpointError):
  """A checkpoint step that is not (or no longer) kept in the run's checkpoints."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def make_manager(workdir: str | os.PathLike, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's manager: latest `keep` plus the best by val SumR, async saves."""
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep),
      pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                         read_only=read_only, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data", "loop"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         loop_state: dict, val_sumr: Optional[float] = None) -> bool:
  """Starts an async save of step `step` (call `manager.wait_until_finished()` before exit)."""
  metrics = None if val_sumr is None else {BEST_METRIC: float(val_sumr)}
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
      loop=ocp.args.JsonSave(loop_state)), metrics=metrics, force=True)


def abstract_with_sharding(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or shapes) placed with `sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None
            ) -> tuple[int, Any, dict, dict]:
  """(step, state, data_state, loop_state) of `step` (default: latest).

  Raises:
    CheckpointError: nothing to restore, or the files are corrupt / do not match the model.
  """
  step = manager.latest_step() if step is None else step
  where = manager.directory
  if step is None:
    raise CheckpointError(f"no checkpoint in {where}")
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        loop=ocp.args.JsonRestore()))
  except Exception as e:  # orbax/tensorstore raise many types; one message names the checkpoint
    raise CheckpointError(f"cannot restore checkpoint {where}/{step}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
  return step, out["state"], dict(out["data"]), dict(out["loop"])


def best_step(manager: ocp.CheckpointManager) -> Optional[int]:
  """Step of the best checkpoint by val SumR, or None when no evaluated checkpoint exists."""
  best = manager.best_step()
  scored = [s for s in manager.all_steps() if _has_metric(manager, s)]
  return best if best in scored else None


def _has_metric(manager: ocp.CheckpointManager, step: int) -> bool:
  try:
    metrics = manager.metrics(step)
  except Exception:  # pylint: disable=broad-except  # a step without metrics
    return False
  return bool(metrics) and BEST_METRIC in metrics


def write_config(config: Any, workdir: str | os.PathLike) -> str:
  """Writes the resolved config as JSON (what `load_trained` and the search tool read)."""

  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  atomic_write_text(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return path


def read_config(workdir: str | os.PathLike) -> Any:
  """The run's resolved ConfigDict from `<workdir>/config.json`."""

  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} not found: is {workdir} a training workdir?")
  try:
    return ml_collections.ConfigDict(json.loads(open(path).read()))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e})") from None
