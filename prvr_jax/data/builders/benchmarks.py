"""TFDS builders of the four PRVR benchmarks from the authors' feature files (a manual dir).

Each builder reads `<manual_dir>/<collection>/` (see `prvr_jax.data.formats`). Builder configs are
feature variants: `clip` (the authors' CLIP-L/14 files; QVHighlights: SlowFast+CLIP) and, for TVR,
ActivityNet and Charades, the MS-SL BigFile folder (`i3d_resnet`, `i3d`, `i3d_rgb_lgi`); any
other BigFile folder name can be passed as a custom config (`make_config`). Splits: train, val
(model selection) and test when its caption file exists.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import tensorflow_datasets as tfds

from prvr_jax.data import formats
from prvr_jax.data.builders import collection
from prvr_jax.data.builders.base import PrvrBuilder
from prvr_jax.data.builders.records import VideoRecord
from prvr_jax.errors import ConfigError

_INSTRUCTIONS = """\
Pass the folder that holds the authors' `<collection>/` folder as the manual dir
(`--config.data.root=DIR`): `<collection>/FeatureData/...`, `<collection>/TextData/...` as
released with the MSC / GMMFormer code (CLIP-L/14 features) or with MS-SL (BigFile + RoBERTa).
"""


def make_config(visual_feature: str) -> tfds.core.BuilderConfig:
  """The builder config of one feature variant ('clip', 'clipsf' or an MS-SL folder name)."""
  if visual_feature in ("clip", "clipsf"):
    desc = "CLIP features of the MSC / GMMFormer release (h5)"
  else:
    desc = f"MS-SL BigFile features FeatureData/{visual_feature}/ with RoBERTa query features"
  return tfds.core.BuilderConfig(name=visual_feature, description=desc)


class _AuthorsLayoutBuilder(PrvrBuilder, skip_registration=True):
  """Shared reading of the authors' layout; subclasses set BENCHMARK."""

  BENCHMARK = ""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  def __init__(self, **kwargs):
    self._stores: Optional[collection.Stores] = None
    self._plan: Optional[collection.CollectionPlan] = None
    super().__init__(**kwargs)

  def _plan_splits(self, manual_dir: Optional[str]) -> dict[str, formats.Issues]:
    if not manual_dir:
      raise ConfigError(f"{self.name}: set the manual dir (data.root) to the folder that holds "
                       f"'{formats.COLLECTIONS[self.BENCHMARK]}/'")
    layout = formats.resolve_layout(manual_dir, self.BENCHMARK, self.builder_config.name)
    issues = {split: formats.Issues(self._on_error) for split in layout.caption_files}
    self._close()
    # Ids in the BigFile itself (duplicate frame ids) are reported with the train split.
    self._stores = collection.Stores(layout, issues["train"])
    self._plan = collection.plan_collection(layout, self._stores, issues)
    return issues

  def _split_total(self, split: str) -> Optional[int]:
    return len(self._plan.splits[split]) if self._plan else None

  def _split_records(self, split: str, issues: formats.Issues) -> Iterator[VideoRecord]:
    return collection.iter_records(self._plan, self._stores, split, issues)

  def _extra_metadata(self) -> dict[str, Any]:
    if self._plan is None:
      return {}
    layout = self._plan.layout
    return dict(benchmark=self.BENCHMARK, collection=layout.collection,
                visual_feature=layout.visual_feature, video_dim=self._plan.video_dim,
                text_dim=self._plan.text_dim)

  def _close(self) -> None:
    if self._stores is not None:
      self._stores.close()
      self._stores = None


class PrvrTvr(_AuthorsLayoutBuilder):
  """TVR (TV show Retrieval) for PRVR: ~17k train / 2k val videos, 5 captions each."""

  name = "prvr_tvr"
  BENCHMARK = "tvr"
  BUILDER_CONFIGS = [make_config("clip"), make_config(formats.MSSL_DEFAULT_FEATURES["tvr"])]


class PrvrActivitynet(_AuthorsLayoutBuilder):
  """ActivityNet Captions for PRVR (caption video ids carry a `v_` prefix the CLIP keys lack)."""

  name = "prvr_activitynet"
  BENCHMARK = "activitynet"
  BUILDER_CONFIGS = [make_config("clip"), make_config(formats.MSSL_DEFAULT_FEATURES["activitynet"])]


class PrvrCharades(_AuthorsLayoutBuilder):
  """Charades-STA for PRVR."""

  name = "prvr_charades"
  BENCHMARK = "charades"
  BUILDER_CONFIGS = [make_config("clip"), make_config(formats.MSSL_DEFAULT_FEATURES["charades"])]


class PrvrQvhighlights(_AuthorsLayoutBuilder):
  """QVHighlights for PRVR: SlowFast+CLIP frame features (2816-d), CLIP text tokens (512-d)."""

  name = "prvr_qvhighlights"
  BENCHMARK = "qvhighlights"
  BUILDER_CONFIGS = [make_config("clipsf")]


BENCHMARK_BUILDERS = {cls.BENCHMARK: cls for cls in (PrvrTvr, PrvrActivitynet, PrvrCharades,
                                                      PrvrQvhighlights)}
