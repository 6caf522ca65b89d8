"""The TFDS builder all PRVR benchmarks share: ArrayRecord output, authors' order, a summary.

A subclass says which splits exist and yields `VideoRecord`s per split (`_plan_splits`,
`_split_records`). This class writes them in that order (no TFDS shuffling: example i is the i-th
video of the split as the authors list it), shows a progress bar, and stores per-split
`SplitStats` plus the feature sizes in the dataset's metadata.json under "prvr".
"""

from __future__ import annotations

import abc
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from prvr_jax.data import formats
from prvr_jax.data.builders.records import METADATA_KEY, SplitStats, VideoRecord


def record_features() -> Any:
  """TFDS features (a tfds.features.FeaturesDict) of one example (one video)."""
  # Raw bytes encoding: a (rows, dim) float32 block decodes with one np.frombuffer, several times
  # faster than tf.Example float lists, and both sizes may vary (dims come from the files).
  _BYTES = tfds.features.Encoding.BYTES
  return tfds.features.FeaturesDict({
      "video_id": tfds.features.Text(),
      "feature_key": tfds.features.Text(),
      "frames": tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding=_BYTES),
      "duration": tfds.features.Scalar(dtype=np.float32),
      "caption_ids": tfds.features.Sequence(tfds.features.Text()),
      "caption_texts": tfds.features.Sequence(tfds.features.Text()),
      "caption_lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "caption_tokens": tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding=_BYTES),
      "moments": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
      "caption_concepts": tfds.features.Tensor(shape=(None,), dtype=np.int32),
  })


class PrvrBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC, skip_registration=True):
  """Common part of the PRVR builders.

  Args (constructor, besides TFDS's `data_dir`, `config`, ...):
    on_error: 'raise' (bad input stops the build with a DataError) or 'skip' (bad items are
      skipped and listed in the split's `skipped`).
    progress: show a tqdm bar per split.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: one example per video, raw frames and token features."}

  def __init__(self, *, on_error: str = "raise", progress: bool = True, **kwargs):
    self._on_error = on_error
    self._progress = progress
    formats.Issues(on_error)  # validates the value before any work
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=record_features(),
        disable_shuffling=True, metadata=tfds.core.MetadataDict())

  @abc.abstractmethod
  def _plan_splits(self, manual_dir: Optional[str]) -> dict[str, formats.Issues]:
    """Validates the inputs; returns split -> the Issues collector its records will use."""

  @abc.abstractmethod
  def _split_records(self, split: str, issues: formats.Issues) -> Iterator[VideoRecord]:
    """The split's videos in the authors' order."""

  def _split_total(self, split: str) -> Optional[int]:
    """Number of videos planned for the split, for the progress bar."""
    return None

  def _extra_metadata(self) -> dict[str, Any]:
    """More entries for the metadata (feature sizes, generator settings)."""
    return {}

  def _close(self) -> None:
    """Releases open files after the build."""

  def _split_generators(self, dl_manager):
    manual_dir = str(dl_manager.manual_dir) if self.MANUAL_DOWNLOAD_INSTRUCTIONS else None
    issues = self._plan_splits(manual_dir)
    self.info.metadata[METADATA_KEY] = dict(splits={}, **self._extra_metadata())
    return {split: self._generate_examples(split, iss) for split, iss in issues.items()}

  def _generate_examples(self, split: str, issues: formats.Issues):
    stats = SplitStats()
    records = self._split_records(split, issues)
    bar = tqdm.tqdm(records, total=self._split_total(split), desc=f"{self.name}/{split}",
                    unit="video", disable=not self._progress)
    for i, rec in enumerate(bar):
      stats.add(rec)
      yield i, rec.to_example()
    stats.skipped = list(issues.skipped)
    meta = self.info.metadata[METADATA_KEY]
    meta["splits"][split] = stats.to_json()
    meta.update(self._extra_metadata())  # sizes can only be known once values were read

  def download_and_prepare(self, *args, **kwargs):
    """TFDS' build, then the feature files are closed whatever happened."""
    try:
      return super().download_and_prepare(*args, **kwargs)
    finally:
      self._close()
