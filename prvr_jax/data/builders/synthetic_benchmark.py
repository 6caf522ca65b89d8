"""TFDS builder of the synthetic PRVR benchmark (`prvr_jax.data.synthetic`); needs no files."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Optional

import tensorflow_datasets as tfds

from prvr_jax.data import formats
from prvr_jax.data import synthetic
from prvr_jax.data.builders.base import PrvrBuilder
from prvr_jax.data.builders.records import VideoRecord


def make_config(spec: synthetic.SyntheticSpec) -> tfds.core.BuilderConfig:
  """One config per setting: its name is the seed plus a hash of every field."""
  return tfds.core.BuilderConfig(name=f"seed{spec.seed}_{spec.fingerprint()}",
                                 description=json.dumps(dataclasses.asdict(spec), sort_keys=True))


class PrvrSynthetic(PrvrBuilder):
  """Synthetic PRVR benchmark: multi-event videos, single-event captions, recurring concepts."""

  name = "prvr_synthetic"
  BUILDER_CONFIGS = [make_config(synthetic.SyntheticSpec())]

  def __init__(self, *, spec: Optional[synthetic.SyntheticSpec] = None, **kwargs):
    self._spec = spec if spec is not None else synthetic.SyntheticSpec()
    config = make_config(self._spec)
    # TFDS wants the class's own instance when the name is one of BUILDER_CONFIGS.
    known = {c.name: c for c in self.BUILDER_CONFIGS}
    kwargs.setdefault("config", known.get(config.name, config))
    self._world: Optional[synthetic.World] = None
    super().__init__(**kwargs)

  def _plan_splits(self, manual_dir: Optional[str]) -> dict[str, formats.Issues]:
    self._world = synthetic.make_world(self._spec)
    return {split: formats.Issues(self._on_error) for split in ("train", "val", "test")
            if self._spec.num_videos(split) > 0}

  def _split_total(self, split: str) -> Optional[int]:
    return self._spec.num_videos(split)

  def _split_records(self, split: str, issues: formats.Issues) -> Iterator[VideoRecord]:
    return synthetic.generate_split(self._spec, split, self._world)

  def _extra_metadata(self) -> dict[str, Any]:
    return dict(benchmark="synthetic", collection="synthetic", visual_feature="synthetic",
                video_dim=self._spec.visual_dim, text_dim=self._spec.text_dim,
                synthetic_spec=dataclasses.asdict(self._spec),
                concepts=synthetic.concept_table(self._spec, self._world))
