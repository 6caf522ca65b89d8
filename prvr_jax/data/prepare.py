"""`--mode=prepare`: build the configured benchmark as ArrayRecord and report what went in.

  python -m prvr_jax.main --config=configs/tvr.py --config.data.root=DIR --workdir=W --mode=prepare

writes the dataset to data.data_dir (default <workdir>/tfds), shows a progress bar per
split, prints a summary and writes it to <workdir>/prepare_summary.json:
  {"benchmark": ..., "dataset_dir": ..., "video_dim": ..., "text_dim": ..., "reused": bool,
   "splits": {"<split>": {"videos": n, "captions": n, "frames": n,
                          "skipped": [{"id": ..., "reason": ...}], ...}}}
A dataset already built for the same config is reused (its stored summary is reported) unless
config.data.overwrite is set.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Optional

import tensorflow_datasets as tfds

from prvr_jax.data import formats
from prvr_jax.data.builders.factory import make_builder
from prvr_jax.data.builders.records import METADATA_KEY, SplitStats
from prvr_jax.data.config import DataConfig
from prvr_jax.data.pipeline import METADATA_FILE, is_prepared, resolve_data_dir
from prvr_jax.errors import ConfigError
from prvr_jax.utils.files import atomic_write_text

SUMMARY_FILE = "prepare_summary.json"
_SHOWN_SKIPS = 20


def _summary_from_metadata(dataset_dir: str) -> dict[str, Any]:
  meta = json.loads((pathlib.Path(dataset_dir) / METADATA_FILE).read_text())[METADATA_KEY]
  splits = {name: SplitStats(**stats).summary() for name, stats in meta["splits"].items()}
  return dict(benchmark=meta.get("benchmark"), visual_feature=meta.get("visual_feature"),
              dataset_dir=dataset_dir, video_dim=meta.get("video_dim"), text_dim=meta.get("text_dim"),
              splits=splits)


def format_summary(summary: dict[str, Any]) -> str:
  """A human-readable table of the summary, with the first skipped items of each split."""
  lines = [f"{summary['benchmark']} ({summary['visual_feature']}) -> {summary['dataset_dir']}"
           f"{' (reused)' if summary.get('reused') else ''}",
           f"feature sizes: video {summary['video_dim']}, text {summary['text_dim']}",
           f"{'split':<8}{'videos':>9}{'captions':>10}{'frames':>12}{'skipped':>9}"]
  for name, s in summary["splits"].items():
    lines.append(f"{name:<8}{s['videos']:>9}{s['captions']:>10}{s['frames']:>12}{len(s['skipped']):>9}")
  for name, s in summary["splits"].items():
    for item in s["skipped"][:_SHOWN_SKIPS]:
      lines.append(f"  skipped [{name}] {item['id']}: {item['reason']}")
    if len(s["skipped"]) > _SHOWN_SKIPS:
      lines.append(f"  ... {len(s['skipped']) - _SHOWN_SKIPS} more skipped in {name} (see {SUMMARY_FILE})")
  return "\n".join(lines)


def prepare(data: DataConfig, workdir: str | os.PathLike, *, progress: bool = True,
            print_fn: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
  """Builds (or reuses) the dataset of `data` and writes <workdir>/prepare_summary.json.

  Args:
    data: the run's `config.data`: name, root (manual dir, not needed for 'synthetic'),
      visual_feature, on_error ('raise' | 'skip'), data_dir, overwrite, synthetic.
    workdir: run directory (the summary goes there; the dataset too unless data.data_dir is set).
    progress: show progress bars.
    print_fn: where the printed summary goes (None: nowhere).

  Returns:
    The summary dict (see the module docstring).

  Raises:
    formats.DataError: bad input with data.on_error='raise' (names the file and the item).
  """
  if data.name != "synthetic" and not data.root:
    raise ConfigError(f"data.name={data.name!r} reads the authors' feature files: set "
                      "--config.data.root to the folder holding the collection's folder")
  if data.name != "synthetic" and not pathlib.Path(data.root).is_dir():
    # Checked here: TFDS would fail on it with a bare AssertionError.
    raise formats.DataError(data.root, formats.WHOLE_FILE, "data.root is not an existing folder")
  builder = make_builder(data, resolve_data_dir(data, workdir), progress=progress)
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if data.overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  reused = (mode == tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
            and is_prepared(builder.data_dir))
  # TFDS' own bars (generation, shuffling) would duplicate ours.
  tfds.display_progress_bar(False)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=data.root or None, download_mode=mode))
  finally:
    tfds.display_progress_bar(True)
  summary = _summary_from_metadata(str(builder.data_dir))
  summary["reused"] = reused
  atomic_write_text(pathlib.Path(workdir) / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
  if print_fn is not None:
    print_fn(format_summary(summary))
  return summary
