"""TFDS builders of the PRVR benchmarks (ArrayRecord), and the factory the config uses.

  builder = make_builder(config.data, data_dir)   # data_dir: where ArrayRecord files go
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))

Modules: records.py (the stored example), base.py (shared builder), collection.py (reading and
validating the authors' layout), benchmarks.py (TVR, ActivityNet, Charades, QVHighlights),
synthetic_benchmark.py. The builder classes are imported on first use, so that importing
`records` (numpy only) does not pull in TFDS.
"""

from __future__ import annotations

import os
from typing import Any

BENCHMARKS = ("synthetic", "tvr", "activitynet", "charades", "qvhighlights")
METADATA_KEY = "prvr"  # the key of our entry in the dataset's metadata.json


def _get(cfg: Any, key: str, default: Any) -> Any:
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def make_builder(data_cfg: Any, data_dir: str | os.PathLike, *, progress: bool = True) -> Any:
  """The builder (a `base.PrvrBuilder`) named by `data_cfg.name`.

  Args:
    data_cfg: the `config.data` section (ConfigDict or dict): `name`, `visual_feature`,
      `on_error`, and for the synthetic benchmark `synthetic` (SyntheticSpec fields).
    data_dir: TFDS data dir (the dataset lands in <data_dir>/<builder>/<config>/<version>).
    progress: show progress bars while building.

  Returns:
    An un-built builder (call download_and_prepare with manual_dir=data.root for the real ones).
  """
  # pylint: disable=g-import-not-at-top
  from prvr_jax.data import synthetic
  from prvr_jax.data.builders import benchmarks
  from prvr_jax.data.builders.synthetic_benchmark import PrvrSynthetic
  # pylint: enable=g-import-not-at-top

  name = _get(data_cfg, "name", "synthetic")
  on_error = _get(data_cfg, "on_error", "raise")
  if name == "synthetic":
    raw = _get(data_cfg, "synthetic", None) or {}
    values = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    return PrvrSynthetic(spec=synthetic.SyntheticSpec.from_dict(values), data_dir=os.fspath(data_dir),
                         file_format="array_record", on_error=on_error, progress=progress)
  if name not in benchmarks.BENCHMARK_BUILDERS:
    raise ValueError(f"unknown data.name {name!r}; expected one of {BENCHMARKS}")
  feature = _get(data_cfg, "visual_feature", "clip") or "clip"
  if name == "qvhighlights" and feature == "clip":
    feature = "clipsf"  # QVHighlights ships SlowFast+CLIP files only
  cls = benchmarks.BENCHMARK_BUILDERS[name]
  known = {c.name: c for c in cls.BUILDER_CONFIGS}
  config = known.get(feature) or benchmarks.make_config(feature)
  return cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record",
             on_error=on_error, progress=progress)
