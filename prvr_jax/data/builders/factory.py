"""The builder a `config.data` names: `make_builder(data, data_dir)`."""

from __future__ import annotations

import os
from typing import Any

from prvr_jax.data.builders import benchmarks
from prvr_jax.data.builders.synthetic_benchmark import PrvrSynthetic
from prvr_jax.data.config import DataConfig


def make_builder(data: DataConfig, data_dir: str | os.PathLike, *, progress: bool = True) -> Any:
  """The builder (a `base.PrvrBuilder`) named by `data.name`.

  Args:
    data: the `config.data` section: `name`, `visual_feature`, `on_error`, and for the synthetic
      benchmark `synthetic`.
    data_dir: TFDS data dir (the dataset lands in <data_dir>/<builder>/<config>/<version>).
    progress: show progress bars while building.

  Returns:
    An un-built builder (call download_and_prepare with manual_dir=data.root for the real ones).
  """
  if data.name == "synthetic":
    return PrvrSynthetic(spec=data.synthetic, data_dir=os.fspath(data_dir),
                         file_format="array_record", on_error=data.on_error, progress=progress)
  feature = data.visual_feature or "clip"
  if data.name == "qvhighlights" and feature == "clip":
    feature = "clipsf"  # QVHighlights ships SlowFast+CLIP files only
  cls = benchmarks.BENCHMARK_BUILDERS[data.name]
  known = {c.name: c for c in cls.BUILDER_CONFIGS}
  config = known.get(feature) or benchmarks.make_config(feature)
  return cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record",
             on_error=data.on_error, progress=progress)
