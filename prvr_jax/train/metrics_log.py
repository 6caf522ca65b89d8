"""Where a run's measurements go: `<workdir>/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from tensorboardX import SummaryWriter

from prvr_jax.utils.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if hasattr(value, "item"):
    return value.item()
  return value


def _scalars(values: Mapping[str, Any], prefix: str) -> list[tuple[str, float]]:
  """(tag, value) of every number of a nested report: `val/SumR`, `val/clip/MedR`,
  `val/moment/uniform/mIoU`, ... (counts such as num_queries are left out)."""
  out = []
  for key, value in values.items():
    if isinstance(value, Mapping):
      out.extend(_scalars(value, f"{prefix}/{key}"))
    elif isinstance(value, float):
      out.append((f"{prefix}/{key}", value))
  return out


def truncate_after(path: str, step: int) -> None:
  """Drops lines of steps > `step` (a resumed run rewrites what followed its checkpoint)."""
  if not os.path.isfile(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line)
      except json.JSONDecodeError:  # a line cut by a crash
        continue

  atomic_write_text(path, "".join(kept))


class MetricsLog:
  """Appends JSON lines and TensorBoard scalars; a no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._writer = None
    if not enabled:
      return
    if resume_step is not None:
      truncate_after(self.path, resume_step)

    self._writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
    self._file = open(self.path, "a")

  def write_train(self, step: int, metrics: Mapping[str, Any]) -> None:
    """One training line: `step`, `loss`, every loss part, `lr`, `grad_norm`."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._append(row)
    for k, v in row.items():
      if k != "step":
        self._writer.add_scalar(f"train/{k}", v, step)

  def write_eval(self, step: int, split: str, report: Mapping[str, Any]) -> None:
    """One evaluation line: `step`, `split` and the metrics (fused at top level, clip / frame /
    moment objects); every float goes to TensorBoard under its path."""
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **_plain(report)}
    self._append(row)
    for tag, value in _scalars(_plain(report), split):
      self._writer.add_scalar(tag, value, step)

  def _append(self, row: dict) -> None:
    self._file.write(json.dumps(row, sort_keys=True) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._writer.close()
