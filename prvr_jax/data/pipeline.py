"""grain pipelines over a built PRVR dataset: fixed-shape numpy batches for training and evaluation.

Every pipeline is a random-access `grain.MapDataset` whose element k is this process's part of
global batch k, so that:
  * order is a pure function of (seed, epoch, position): a per-epoch permutation of the split,
    cut into global batches of `batch_size` videos, each cut into `process_count` equal local
    batches; process p takes local batch p. Shards are disjoint and together cover the split.
  * the last global batch of an epoch is padded with invalid items (`*_valid` False, index -1)
    so every real item is used exactly once per epoch (training can drop it instead).
  * iterator state (`it.get_state()` / `it.set_state(state)`) is the number of batches consumed,
    so a restored iterator continues the same order, even with another process count.

Host work is numpy only: frames resampled to `num_frames` rows (NOT normalised: OP-ToMe and the
normalisation run on the device), caption tokens L2-normalised (x / (||x|| + 1e-5)), truncated,
zero-padded; or, for a model that runs a CLIP text tower itself (`caption_text_length` > 0), the
caption text tokenised with the vendored CLIP BPE instead of the token features. This module imports no JAX itself; it is what grain worker processes unpickle.
(grain 0.2 itself imports `jax.profiler` when JAX is installed; no backend is initialised.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import threading
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from prvr_jax.data.builders.factory import make_builder
from prvr_jax.data.builders.records import METADATA_KEY, UNKNOWN
from prvr_jax.data.config import DataConfig
from prvr_jax.data.formats import DataError
from prvr_jax.data.preprocess import DEFAULT_LENGTH, l2_normalize, resample_to_fixed_length
from prvr_jax.errors import ConfigError, PrvrError
from prvr_jax.text.tokenizer import CLIP_CONTEXT_LENGTH, ClipTokenizer

# Keys the jitted train step takes; the others are numpy bookkeeping. A model with an in-model
# CLIP text tower takes tokenised captions (CAPTION_ID_KEYS) in place of TEXT_FEATURE_KEYS.
TEXT_FEATURE_KEYS = ("text_feat", "text_mask")
CAPTION_ID_KEYS = ("caption_ids", "caption_id_mask")
TRAIN_KEYS = ("video_frames", "video_valid", "text_feat", "text_mask", "text_labels", "query_valid")
TRAIN_TEXT_KEYS = ("video_frames", "video_valid", "caption_ids", "caption_id_mask", "text_labels",
                   "query_valid")
VIDEO_EVAL_KEYS = ("video_frames", "video_valid")
QUERY_EVAL_KEYS = ("text_feat", "text_mask", "query_valid")
# CLIP's context length; the reference truncates captions to it.
CLIP_MAX_TOKENS = CLIP_CONTEXT_LENGTH
# Epochs of an "unbounded" training pipeline (MapDataset needs a length).
_UNBOUNDED_EPOCHS = 1_000_000
METADATA_FILE = "metadata.json"


# ----------------------------------------------------------------------------------------------
# The built dataset.


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """What the pipelines need to know about one split of a built dataset.

  Attributes:
    dataset_dir: <data_dir>/<builder>/<config>/<version>.
    split: split name.
    num_videos: N examples (videos).
    caption_offsets: (N + 1,) int64: captions of video i are [offsets[i], offsets[i+1]) in the
      split's caption order (the query index).
    max_captions: most captions of one video in this split.
    max_caption_tokens: longest caption (rows) over all splits of the dataset.
    video_dim: D_v, text_dim: D_t.
    metadata: the dataset's whole "prvr" metadata (summary, synthetic concepts, ...).
  """

  dataset_dir: str
  split: str
  num_videos: int
  caption_offsets: np.ndarray
  max_captions: int
  max_caption_tokens: int
  video_dim: int
  text_dim: int
  metadata: dict[str, Any]

  @property
  def num_captions(self) -> int:
    """Q, the number of captions (queries) of the split."""
    return int(self.caption_offsets[-1])


class DatasetNotFoundError(PrvrError, FileNotFoundError):
  """No prepared PRVR dataset at a folder (run --mode=prepare first); the message names it."""


class SplitNotFoundError(PrvrError, LookupError):
  """A split the prepared dataset does not have; the message names the dataset and its splits."""


def is_prepared(dataset_dir: str | os.PathLike) -> bool:
  """True when a built PRVR dataset is at `dataset_dir` (TFDS moves a finished build into place
  with its metadata.json, so a build that stopped half-way has none)."""
  return (pathlib.Path(dataset_dir) / METADATA_FILE).is_file()


def open_split(dataset_dir: str | os.PathLike, split: str) -> SplitInfo:
  """Reads the metadata of one split of a dataset written by a PRVR builder.

  Raises:
    DatasetNotFoundError: no PRVR dataset at `dataset_dir` (run --mode=prepare first).
    SplitNotFoundError: the split does not exist.
  """
  dataset_dir = pathlib.Path(dataset_dir)
  meta_file = dataset_dir / METADATA_FILE
  if not is_prepared(dataset_dir):
    raise DatasetNotFoundError(f"no prepared PRVR dataset at {dataset_dir} (missing metadata.json); "
                               "run `python -m prvr_jax.main --mode=prepare` first")
  meta = json.loads(meta_file.read_text())[METADATA_KEY]
  if split not in meta["splits"]:
    raise SplitNotFoundError(f"split {split!r} not in {dataset_dir} (has {sorted(meta['splits'])})")
  counts = np.asarray(meta["splits"][split]["caption_counts"], np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return SplitInfo(
      dataset_dir=str(dataset_dir), split=split, num_videos=len(counts), caption_offsets=offsets,
      max_captions=int(counts.max(initial=0)),
      max_caption_tokens=max(int(s["max_caption_tokens"]) for s in meta["splits"].values()),
      video_dim=int(meta["video_dim"]), text_dim=int(meta["text_dim"]), metadata=meta)


class RecordSource:
  """Random access to the examples of one split (picklable: opens the files lazily per process).

  `source[i]` is example i decoded by TFDS into numpy (strings as bytes).
  """

  def __init__(self, dataset_dir: str | os.PathLike, split: str):
    self.dataset_dir = os.fspath(dataset_dir)
    self.split = split
    self._source = None
    self._lock = threading.Lock()

  def _open(self):
    with self._lock:
      if self._source is None:  # opened in each process (grain workers unpickle the source)
        builder = tfds.builder_from_directory(self.dataset_dir)
        self._source = builder.as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._open()[int(index)]

  def __getstate__(self):
    return dict(dataset_dir=self.dataset_dir, split=self.split)

  def __setstate__(self, state):
    self.__init__(state["dataset_dir"], state["split"])


@dataclasses.dataclass(frozen=True)
class SplitNames:
  """The ids and texts of one split, in split order (video index, caption = query index).

  Attributes:
    video_ids: N video ids.
    caption_ids: Q caption ids.
    caption_texts: Q caption texts.
  """

  video_ids: list[str]
  caption_ids: list[str]
  caption_texts: list[str]


def read_split_names(dataset_dir: str | os.PathLike, split: str) -> SplitNames:
  """Video ids, caption ids and caption texts of a split (frames and token rows are not decoded)."""
  builder = tfds.builder_from_directory(os.fspath(dataset_dir))
  skipped = {key: tfds.decode.SkipDecoding() for key in ("frames", "caption_tokens", "moments")}
  source = builder.as_data_source(split=split, decoders=skipped)
  text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  videos, ids, texts = [], [], []
  for i in range(len(source)):
    rec = source[i]
    videos.append(text(rec["video_id"]))
    ids.extend(text(c) for c in rec["caption_ids"])
    texts.extend(text(c) for c in rec["caption_texts"])
  return SplitNames(videos, ids, texts)


# ----------------------------------------------------------------------------------------------
# Order and sharding.


class ShardedOrder:
  """Random access: element index -> (item, valid, epoch) for one process.

  Element g of this process is slot j of local batch s of epoch e, i.e. global position
  pos = s * B * P + p * B + j of epoch e's order (B local batch, P processes, p this process).
  Positions past the end of the split are padding: valid False, item = a real one (pos mod N),
  so padded rows hold finite values.

  Args:
    num_items: N items of the split.
    local_batch: B.
    process_index, process_count: p, P.
    num_epochs: epochs covered (the dataset's length).
    seed: order seed; epoch e uses permutation rng([seed, e]).
    shuffle: False keeps the split's order every epoch.
    drop_remainder: drop the last, partial global batch of every epoch instead of padding it.
  """

  def __init__(self, num_items: int, local_batch: int, process_index: int, process_count: int,
               num_epochs: int = 1, seed: int = 0, shuffle: bool = False, drop_remainder: bool = False):
    if num_items < 1:
      raise ValueError("the split has no items")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if local_batch < 1:
      raise ValueError(f"local batch size must be >= 1, got {local_batch}")
    self.num_items = num_items
    self.local_batch = local_batch
    self.process_index = process_index
    self.process_count = process_count
    self.num_epochs = num_epochs
    self.seed = seed
    self.shuffle = shuffle
    global_batch = local_batch * process_count
    self.steps_per_epoch = (num_items // global_batch if drop_remainder
                            else math.ceil(num_items / global_batch))
    if self.steps_per_epoch == 0:
      raise ConfigError(f"drop_remainder with {num_items} items and a global batch of "
                       f"{global_batch} leaves no batch")
    self._perm_cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # loader threads share the cache

  def __len__(self) -> int:
    return self.steps_per_epoch * self.local_batch * self.num_epochs

  def permutation(self, epoch: int) -> np.ndarray:
    """(N,) order of epoch `epoch`."""
    with self._lock:
      perm = self._perm_cache.get(epoch)
      if perm is None:
        perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle
                else np.arange(self.num_items))
        # Keep a couple of epochs: threads near an epoch boundary ask for both.
        if len(self._perm_cache) >= 2:
          self._perm_cache.pop(min(self._perm_cache))
        self._perm_cache[epoch] = perm
      return perm

  def __getitem__(self, index: int) -> tuple[int, bool, int]:
    epoch, rest = divmod(int(index), self.steps_per_epoch * self.local_batch)
    step, slot = divmod(rest, self.local_batch)
    pos = (step * self.process_count + self.process_index) * self.local_batch + slot
    perm = self.permutation(epoch)
    return int(perm[pos % self.num_items]), pos < self.num_items, epoch

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_perm_cache"] = {}
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# Per-item numpy work.


def caption_token_features(tokens: np.ndarray, max_tokens: int, keep_eos: bool = False) -> np.ndarray:
  """Loader treatment of one caption: per-row L2 normalisation, then truncation.

  Args:
    tokens: (L, D_t) raw token features, EOS last.
    max_tokens: rows kept.
    keep_eos: when truncating, keep the first max_tokens - 1 rows and the EOS row (the reference
      keeps the first max_tokens rows; it never truncates CLIP captions, which have <= 77 rows).

  Returns:
    (min(L, max_tokens), D_t) float32.
  """
  feat = l2_normalize(np.asarray(tokens, np.float32))
  if feat.shape[0] <= max_tokens:
    return feat
  if keep_eos:
    return np.concatenate([feat[:max_tokens - 1], feat[-1:]], axis=0)
  return feat[:max_tokens]


def split_captions(record: Mapping[str, Any]) -> list[np.ndarray]:
  """The (L_c, D_t) token features of each caption of a decoded example."""
  lengths = np.asarray(record["caption_lengths"], np.int64)
  return np.split(np.asarray(record["caption_tokens"]), np.cumsum(lengths)[:-1])


def _pad_captions(captions: Sequence[np.ndarray], rows: int, max_tokens: int, dim: int,
                  keep_eos: bool) -> tuple[np.ndarray, np.ndarray]:
  feat = np.zeros((rows, max_tokens, dim), np.float32)
  mask = np.zeros((rows, max_tokens), np.float32)
  for c, tokens in enumerate(captions):
    t = caption_token_features(tokens, max_tokens, keep_eos)
    feat[c, :len(t)] = t
    mask[c, :len(t)] = 1.0
  return feat, mask


class CaptionTokenizer:
  """The offline CLIP tokenizer, built lazily in each process (picklable for grain workers).

  Tokenises to `context_length` ids (BOS ... EOS, EOS kept when truncating, as
  `python -m prvr_jax.extract captions` does) and keeps the first `length` of them.
  """

  def __init__(self, length: int, context_length: int = CLIP_MAX_TOKENS):
    if not 2 <= length <= context_length:
      raise ConfigError(f"caption token length must be in [2, {context_length}], got {length}")
    self.length, self.context_length = int(length), int(context_length)
    self._tokenizer = None
    self._lock = threading.Lock()

  def __call__(self, texts: Sequence[str], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """N <= rows texts -> (ids (rows, length) int32, mask (rows, length) int32), zero rows padding."""
    # One call at a time: a Rust tokenizer shared by loader threads can fail with
    # "Already borrowed".
    with self._lock:
      if self._tokenizer is None:
        self._tokenizer = ClipTokenizer(max_length=self.context_length)
      ids = np.full((rows, self.length), self._tokenizer.eos_id, np.int32)
      mask = np.zeros((rows, self.length), np.int32)
      if len(texts):
        tok = self._tokenizer(list(texts))
        ids[:len(texts)] = tok.input_ids[:, :self.length]
        mask[:len(texts)] = tok.attention_mask[:, :self.length]
    return ids, mask

  def __getstate__(self):
    return dict(length=self.length, context_length=self.context_length)

  def __setstate__(self, state):
    self.__init__(state["length"], state["context_length"])


def _caption_texts(record: Mapping[str, Any]) -> list[str]:
  return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in record["caption_texts"]]


def _caption_inputs(record: Mapping[str, Any], chosen: Sequence[int], rows: int, max_tokens: int,
                    dim: int, keep_eos: bool, tokenizer: Optional[CaptionTokenizer]
                    ) -> dict[str, np.ndarray]:
  """The model inputs of captions `chosen` of a decoded example, padded to `rows` captions.

  Returns:
    `text_feat` (rows, max_tokens, dim) / `text_mask` (rows, max_tokens) float32 token features,
    or with a tokenizer `caption_ids` / `caption_id_mask` (rows, tokenizer.length) int32.
  """
  if tokenizer is None:
    captions = split_captions(record)
    feat, mask = _pad_captions([captions[c] for c in chosen], rows, max_tokens, dim, keep_eos)
    return dict(text_feat=feat, text_mask=mask)
  texts = _caption_texts(record)
  ids, id_mask = tokenizer([texts[c] for c in chosen], rows)
  return dict(caption_ids=ids, caption_id_mask=id_mask)


class _TrainItem(grain.transforms.Map):
  """(record, valid, epoch) -> one video with up to C captions, padded to static shapes."""

  def __init__(self, source: RecordSource, info: SplitInfo, max_captions: int, max_tokens: int,
               num_frames: int, seed: int, keep_eos: bool, tokenizer: Optional[CaptionTokenizer] = None):
    self.source, self.info = source, info
    self.max_captions, self.max_tokens, self.num_frames = max_captions, max_tokens, num_frames
    self.seed, self.keep_eos, self.tokenizer = seed, keep_eos, tokenizer

  def map(self, element):
    index, valid, epoch = element
    rec = self.source[index]
    num_captions = len(rec["caption_lengths"])
    chosen = np.arange(num_captions)
    if num_captions > self.max_captions:
      # A different seeded subset each epoch, so that over epochs every caption is used.
      rng = np.random.default_rng([self.seed, epoch, index, 1])
      chosen = np.sort(rng.choice(num_captions, self.max_captions, replace=False))
    text = _caption_inputs(rec, chosen, self.max_captions, self.max_tokens, self.info.text_dim,
                           self.keep_eos, self.tokenizer)
    query_valid = (np.arange(self.max_captions) < len(chosen)) & valid
    query_index = np.full((self.max_captions,), -1, np.int32)
    if valid:
      query_index[:len(chosen)] = self.info.caption_offsets[index] + chosen
    return dict(
        video_frames=resample_to_fixed_length(rec["frames"], self.num_frames),
        video_valid=np.bool_(valid), **text, query_valid=query_valid,
        video_index=np.int32(index if valid else -1), query_index=query_index,
        epoch=np.int32(epoch))


def _collate_train(items: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """B per-video items -> one batch with the queries of all videos flattened (Q = B * C)."""
  out = {k: np.stack([it[k] for it in items]) for k in items[0]}
  b, c = out["query_valid"].shape
  for key in (*TEXT_FEATURE_KEYS, *CAPTION_ID_KEYS, "query_valid", "query_index"):
    if key in out:
      out[key] = out[key].reshape((b * c,) + out[key].shape[2:])
  out["text_labels"] = np.repeat(np.arange(b, dtype=np.int32), c)
  return out


class _EvalVideo(grain.transforms.Map):
  """(record, valid, _) -> one resampled video for corpus encoding."""

  def __init__(self, source: RecordSource, num_frames: int):
    self.source, self.num_frames = source, num_frames

  def map(self, element):
    index, valid, _ = element
    rec = self.source[index]
    return dict(video_frames=resample_to_fixed_length(rec["frames"], self.num_frames),
                video_valid=np.bool_(valid), video_index=np.int32(index if valid else -1),
                duration=np.float32(rec["duration"]),
                num_feature_frames=np.int32(np.shape(rec["frames"])[0]))


class _EvalQuery(grain.transforms.Map):
  """(caption, valid, _) -> one caption with its ground-truth video."""

  def __init__(self, source: RecordSource, info: SplitInfo, max_tokens: int, keep_eos: bool,
               tokenizer: Optional[CaptionTokenizer] = None):
    self.source, self.info, self.max_tokens, self.keep_eos = source, info, max_tokens, keep_eos
    self.tokenizer = tokenizer

  def map(self, element):
    query, valid, _ = element
    video = int(np.searchsorted(self.info.caption_offsets, query, side="right") - 1)
    rec, caption = self.source[video], query - self.info.caption_offsets[video]
    text = _caption_inputs(rec, [caption], 1, self.max_tokens, self.info.text_dim, self.keep_eos,
                           self.tokenizer)
    moment = np.asarray(rec["moments"], np.float32)[caption] if valid else np.full(2, UNKNOWN, np.float32)
    return dict(**{k: v[0] for k, v in text.items()}, query_valid=np.bool_(valid),
                query_index=np.int32(query if valid else -1),
                gt_video_index=np.int32(video if valid else -1), gt_moment=moment)


# ----------------------------------------------------------------------------------------------
# Pipelines.


def _tokenizer(caption_text_length: int, context_length: int) -> Optional[CaptionTokenizer]:
  if not caption_text_length:
    return None
  return CaptionTokenizer(caption_text_length, context_length or CLIP_MAX_TOKENS)


def _open_nonempty_split(dataset_dir: str | os.PathLike, split: str) -> SplitInfo:
  info = open_split(dataset_dir, split)
  if info.num_videos == 0:
    raise DataError(os.fspath(dataset_dir), split, "the split has no videos")
  return info


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size < 1 or batch_size % process_count:
    raise ConfigError(f"batch_size {batch_size} (global) must be a positive multiple of "
                     f"process_count {process_count}")
  return batch_size // process_count


def resolve_max_tokens(info: SplitInfo, max_caption_tokens: int = 0) -> int:
  """Static caption length L: the config's value, or (0) the longest caption, at most 77."""
  return int(max_caption_tokens) if max_caption_tokens > 0 else min(CLIP_MAX_TOKENS, info.max_caption_tokens)


def resolve_max_captions(info: SplitInfo, max_captions_per_video: int = 0) -> int:
  """Static captions per video C: the config's value, or (0) the split's maximum."""
  return int(max_captions_per_video) if max_captions_per_video > 0 else info.max_captions


def train_dataset(dataset_dir: str | os.PathLike, split: str = "train", *, batch_size: int,
                  max_captions_per_video: int = 0, max_caption_tokens: int = 0,
                  num_frames: int = DEFAULT_LENGTH, seed: int = 0, shuffle: bool = True,
                  num_epochs: int = 0, process_index: int = 0, process_count: int = 1,
                  drop_remainder: bool = False, truncate_keep_eos: bool = False,
                  caption_text_length: int = 0, caption_context_length: int = 0) -> grain.MapDataset:
  """Training batches: B videos with all their captions (up to C), padded to static shapes.

  Args:
    dataset_dir: a built dataset (see prepare).
    split: usually 'train'.
    batch_size: global batch size (videos); each process gets batch_size // process_count.
    max_captions_per_video: C (0: the split's maximum). A video with more captions uses a seeded
      random subset of C of them, a different one each epoch (logged at construction).
    max_caption_tokens: L (0: the longest caption, at most 77).
    num_frames: rows after resampling (128).
    seed: shuffling seed.
    shuffle: reshuffle every epoch (False: the split's order).
    num_epochs: epochs in the dataset (0: unbounded).
    process_index, process_count: this process and how many there are (jax.process_index() /
      jax.process_count(), passed in so that this module needs no JAX).
    drop_remainder: drop the last partial global batch of each epoch instead of padding it.
    truncate_keep_eos: see `caption_token_features`.
    caption_text_length: 0 gives the captions' token features; L0 > 0 gives their text tokenised
      for an in-model CLIP text tower instead: the first L0 of `caption_context_length` ids
      (0: 77) BOS ... EOS (see `CaptionTokenizer`).
    caption_context_length: see caption_text_length.

  Returns:
    MapDataset; element k (global step k) is a dict with B = local batch, Q = B * C:
      video_frames (B, num_frames, D_v) float32, un-normalised
      video_valid (B,) bool
      text_feat (Q, L, D_t) float32, rows L2-normalised, zero padding
      text_mask (Q, L) float32
        (with caption_text_length: caption_ids (Q, L0) int32 and caption_id_mask (Q, L0) int32
        in place of text_feat / text_mask)
      text_labels (Q,) int32, the query's video within the batch (q // C)
      query_valid (Q,) bool
      and bookkeeping: video_index (B,) int32 (example index in the split, -1 padding),
      query_index (Q,) int32 (caption index in the split, -1 padding), epoch (B,) int32.
  """
  info = _open_nonempty_split(dataset_dir, split)
  local = _local_batch(batch_size, process_count)
  max_captions = resolve_max_captions(info, max_captions_per_video)
  max_tokens = resolve_max_tokens(info, max_caption_tokens)
  over = int(np.sum(np.diff(info.caption_offsets) > max_captions))
  if over:
    logging.warning("%d of %d videos of %s/%s have more than %d captions; each epoch uses a seeded "
                    "random subset of %d of them", over, info.num_videos, info.dataset_dir, split,
                    max_captions, max_captions)
  order = ShardedOrder(info.num_videos, local, process_index, process_count,
                       num_epochs or _UNBOUNDED_EPOCHS, seed, shuffle, drop_remainder)
  item = _TrainItem(RecordSource(dataset_dir, split), info, max_captions, max_tokens, num_frames,
                    seed, truncate_keep_eos, _tokenizer(caption_text_length, caption_context_length))
  return grain.MapDataset.source(order).map(item).batch(local, batch_fn=_collate_train)


def eval_video_dataset(dataset_dir: str | os.PathLike, split: str = "val", *, batch_size: int,
                       num_frames: int = DEFAULT_LENGTH, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
  """Every video of a split once, in split order, padded to full batches.

  Returns:
    MapDataset of dicts (B = batch_size // process_count): video_frames (B, num_frames, D_v)
    float32 un-normalised, video_valid (B,) bool, video_index (B,) int32 (-1 padding), duration
    (B,) float32 seconds (-1 unknown), num_feature_frames (B,) int32 (T, the raw frame count).
  """
  info = _open_nonempty_split(dataset_dir, split)
  local = _local_batch(batch_size, process_count)
  order = ShardedOrder(info.num_videos, local, process_index, process_count)
  video = _EvalVideo(RecordSource(dataset_dir, split), num_frames)
  return grain.MapDataset.source(order).map(video).batch(local)


def eval_query_dataset(dataset_dir: str | os.PathLike, split: str = "val", *, batch_size: int,
                       max_caption_tokens: int = 0, process_index: int = 0, process_count: int = 1,
                       truncate_keep_eos: bool = False, caption_text_length: int = 0,
                       caption_context_length: int = 0) -> grain.MapDataset:
  """Every caption of a split once, in split order, padded to full batches.

  Returns:
    MapDataset of dicts (B = batch_size // process_count): text_feat (B, L, D_t) float32,
    text_mask (B, L) float32 (with caption_text_length > 0: caption_ids / caption_id_mask
    (B, L0) int32 instead, see `train_dataset`), query_valid (B,) bool, query_index (B,) int32 (caption index in
    the split, -1 padding), gt_video_index (B,) int32 (its video's index, -1 padding), gt_moment
    (B, 2) float32 the caption's annotated [start, end] seconds (-1 where not annotated).
  """
  info = open_split(dataset_dir, split)
  local = _local_batch(batch_size, process_count)
  if info.num_captions == 0:
    raise DataError(os.fspath(dataset_dir), split, "the split has no captions")
  order = ShardedOrder(info.num_captions, local, process_index, process_count)
  query = _EvalQuery(RecordSource(dataset_dir, split), info, resolve_max_tokens(info, max_caption_tokens),
                     truncate_keep_eos, _tokenizer(caption_text_length, caption_context_length))
  return grain.MapDataset.source(order).map(query).batch(local)


def to_iterator(dataset: grain.MapDataset, *, num_threads: int = 2, prefetch_batches: int = 2,
                num_workers: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator: `get_state()` -> dict, `set_state(dict)` resumes the same order.

  Args:
    dataset: one of the datasets above.
    num_threads: threads preparing batches in this process (numpy releases the GIL in its heavy
      parts; with 2 cores, 2 threads hide the loader behind the train step).
    prefetch_batches: batches prepared ahead.
    num_workers: > 0 adds grain worker processes (spawned; they import this module, numpy,
      h5py-free TFDS reading code and grain, never prvr_jax's JAX modules).
  """
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_batches))
  if num_workers > 0:
    # grain reads one of its absl flags when starting workers; outside an absl app (tests,
    # notebooks) nothing has parsed flags, so their defaults are taken as parsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def split_batch(batch: Mapping[str, np.ndarray], keys: Optional[Sequence[str]] = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(arrays for the jitted step, numpy bookkeeping) of a batch (keys: default TRAIN_KEYS, or
  TRAIN_TEXT_KEYS for a batch of tokenised captions)."""
  if keys is None:
    keys = TRAIN_TEXT_KEYS if "caption_ids" in batch else TRAIN_KEYS
  return ({k: batch[k] for k in keys}, {k: v for k, v in batch.items() if k not in keys})


def steps_per_epoch(dataset: grain.MapDataset, num_epochs: int = 1) -> int:
  """Batches in one epoch of a dataset built with `num_epochs` epochs."""
  return len(dataset) // num_epochs


# ----------------------------------------------------------------------------------------------
# From the typed `config.data`.


def train_from_config(data: DataConfig, dataset_dir: str | os.PathLike, *, seed: int,
                      process_index: int = 0, process_count: int = 1, caption_text_length: int = 0,
                      caption_context_length: int = 0) -> grain.MapDataset:
  """`train_dataset` with the `data` settings and shuffle seed `seed` (the run's); the caption
  lengths are the model's (`ModelConfig.caption_token_length` / `caption_context_length`)."""
  return train_dataset(
      dataset_dir, data.train_split, batch_size=data.batch_size,
      max_captions_per_video=data.max_captions_per_video,
      max_caption_tokens=data.max_caption_tokens, num_frames=data.num_frames, seed=int(seed),
      shuffle=data.shuffle, num_epochs=data.num_epochs, process_index=process_index,
      process_count=process_count, drop_remainder=data.drop_remainder,
      truncate_keep_eos=data.truncate_keep_eos, caption_text_length=caption_text_length,
      caption_context_length=caption_context_length)


def eval_from_config(data: DataConfig, dataset_dir: str | os.PathLike, split: str, *,
                     process_index: int = 0, process_count: int = 1, caption_text_length: int = 0,
                     caption_context_length: int = 0) -> tuple[grain.MapDataset, grain.MapDataset]:
  """(eval_video_dataset, eval_query_dataset) of `split` with the `data` settings; the caption
  lengths are the model's (`ModelConfig.caption_token_length` / `caption_context_length`)."""
  videos = eval_video_dataset(dataset_dir, split, batch_size=data.eval_video_batch_size,
                              num_frames=data.num_frames, process_index=process_index,
                              process_count=process_count)
  queries = eval_query_dataset(dataset_dir, split, batch_size=data.eval_query_batch_size,
                               max_caption_tokens=data.max_caption_tokens,
                               process_index=process_index, process_count=process_count,
                               truncate_keep_eos=data.truncate_keep_eos,
                               caption_text_length=caption_text_length,
                               caption_context_length=caption_context_length)
  return videos, queries


def iterator_from_config(data: DataConfig, dataset: grain.MapDataset) -> grain.DatasetIterator:
  """`to_iterator` with `data.num_threads` / `prefetch_batches` / `num_workers`."""
  return to_iterator(dataset, num_threads=data.num_threads, prefetch_batches=data.prefetch_batches,
                     num_workers=data.num_workers)


def dataset_dir_from_config(data: DataConfig, workdir: str | os.PathLike) -> str:
  """Where `prepare` writes the dataset of `data` (without building it)."""
  return str(make_builder(data, resolve_data_dir(data, workdir), progress=False).data_dir)


def resolve_data_dir(data: DataConfig, workdir: str | os.PathLike) -> str:
  """The TFDS data dir: data.data_dir, or <workdir>/tfds when empty."""
  return data.data_dir or os.path.join(os.fspath(workdir), "tfds")
