"""A growing index: add videos, remove them, compact the store, re-train the ANN quantisers.

Every operation follows one protocol (index_store.py): files left by an interrupted earlier
operation are deleted, the new files are written under names no manifest uses (a new segment is
written as a hidden temporary directory and renamed), the ANN files of the new generation are
written, and only then the manifest is replaced (atomic rename). Until that rename the previous
index is what every reader sees, unchanged; the previous generation's files are kept until the
next operation, so a reader that opened the old manifest a moment earlier still finds them.

  add      appends one segment of newly encoded videos; FAISS: the trained quantisers are kept and
           the new tokens added (so quality drifts as the collection grows: `retrain`).
  remove   tombstones video ids in the manifest (their rows stay until `compact`; no search
           returns them).
  compact  rewrites the live videos into one segment (positions renumbered) and re-adds them to
           the ANN with the trained quantisers (`retrain=True` trains new ones).
  retrain  trains new quantisers on the current tokens and rebuilds the ANN files (also gives an
           index built with --ann none a FAISS ANN).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Optional, Sequence

import numpy as np
import tqdm

from prvr_jax.search import ann as ann_lib
from prvr_jax.search import milvus
from prvr_jax.search.errors import SearchError
from prvr_jax.search.features import VideoFeatureFile
from prvr_jax.search.index import encode_groups, features_identity, index_bytes
from prvr_jax.search.index_store import (IndexReader, referenced_names, remove_unreferenced,
                                         segment_name, stall_point, write_manifest)
from prvr_jax.search.model import SearchModel
from prvr_jax.search.query import check_model
from prvr_jax.search.token_store import SCALES, SegmentWriter, segment_shapes


@dataclasses.dataclass
class OperationSummary:
  """What one operation did (`text()` for the terminal)."""

  operation: str
  index: str
  changed: int
  num_videos: int
  generation: int
  seconds: float
  bytes: int

  def text(self) -> str:
    verb = {"add": "added", "remove": "removed", "compact": "kept", "retrain": "re-indexed"}
    return (f"{self.operation} {self.index}: {self.changed} videos {verb[self.operation]}; the "
            f"index now holds {self.num_videos} videos (generation {self.generation}), "
            f"{self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s")


def _fsync_dir(directory: pathlib.Path) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _start(directory: str | os.PathLike) -> IndexReader:
  """Opens the current index and deletes what an interrupted operation left behind."""
  index = IndexReader(directory)
  remove_unreferenced(index.directory, referenced_names(index.manifest))
  return index


def _new_segment(index: IndexReader, num_videos: int, id_width: int) -> tuple[str, SegmentWriter]:
  name = segment_name(int(index.manifest["next_segment"]))
  m = index.manifest
  shapes = segment_shapes(num_videos, m["num_clips"], m["num_frames"], m["dim"], m["dtype"],
                          id_width)
  return name, SegmentWriter(index.directory / f".{name}.tmp", shapes, resume=False)


def _seal_segment(index: IndexReader, name: str, writer: SegmentWriter, num_videos: int,
                  id_width: int, features: Optional[dict]) -> dict[str, Any]:
  """Closes a segment written under its temporary name and renames it (its manifest entry)."""
  files = writer.close()
  os.rename(index.directory / f".{name}.tmp", index.directory / name)
  _fsync_dir(index.directory)
  return dict(name=name, num_videos=int(num_videos), id_width=int(id_width), files=files,
              features=features)


def _ann_for(index: IndexReader, draft: dict[str, Any], start: int, retrain: bool,
             factory: Optional[str], progress: bool) -> Optional[dict[str, Any]]:
  """The new generation's ANN entry for the token store `draft` describes."""
  entry = index.manifest.get("ann")
  view = IndexReader(index.directory, manifest=dict(draft, ann=None))
  generation = int(draft["generation"])
  if entry is None and not retrain:
    return None
  backend = entry.get("backend") if entry else "faiss"
  if backend == "milvus":
    if retrain or start == 0:
      return milvus.build_milvus(view, entry["uri"], progress=progress)
    return milvus.extend_milvus(view, entry, start, progress=progress)
  if retrain:
    return ann_lib.build_faiss(view, generation, factory=factory, progress=progress)
  return ann_lib.build_faiss(view, generation, trained=entry, start=start, progress=progress)


def _commit(index: IndexReader, draft: dict[str, Any], stage: str) -> None:
  stall_point(stage)
  write_manifest(index.directory, draft)
  _fsync_dir(index.directory)
  previous = index.manifest.get("ann") or {}
  current = draft.get("ann") or {}
  if previous.get("backend") == "milvus" and previous.get("collections") != current.get(
      "collections"):
    milvus.drop_collections(previous)


def _summary(operation: str, index: IndexReader, changed: int, start: float) -> OperationSummary:
  now = IndexReader(index.directory)
  return OperationSummary(operation, str(index.directory), changed, now.num_videos, now.generation,
                          time.time() - start, index_bytes(index.directory))


def add_videos(model: SearchModel, features: str | os.PathLike, directory: str | os.PathLike, *,
               fps: Optional[float] = None, progress: bool = True) -> OperationSummary:
  """Appends the videos of a feature file (`extract videos`) to an index, atomically.

  Args:
    model: the network that built the index (checked by parameter hash).
    features: video features .h5; none of its ids may be in the index already.
    directory: INDEX.
    fps: frame rate for videos without `duration` / `fps` attributes.
    progress: tqdm bars.

  Returns:
    The summary.

  Raises:
    SearchError: another model, a file of the wrong width, an id already in the index.
  """
  start_time = time.time()
  index = _start(directory)
  check_model(index, model)
  cfg = model.model_cfg
  with VideoFeatureFile(features, fps) as source:
    source.check_dim(cfg.visual_input_size, model.name)
    there = [v for v in source.ids if index.position(v) is not None]
    if there:
      gone = not index.alive[index.position(there[0])]
      raise SearchError(f"{source.path}: video {there[0]!r} is already in the index "
                        f"{index.directory}{' (removed, until `search compact`)' if gone else ''}"
                        f" ({len(there)} of the file's {len(source.ids)} ids are); "
                        "`search remove` it first, or add a file of new videos")
    width = max(len(v) for v in source.ids)
    name, writer = _new_segment(index, len(source.ids), width)
    chunk = index.chunk_size
    groups = [source.ids[i:i + chunk] for i in range(0, len(source.ids), chunk)]
    bar = tqdm.tqdm(total=len(source.ids), desc="add", unit="video", disable=not progress)
    encode_groups(model, source, groups, lambda i: False,
                  lambda i, arrays: writer.write(i * chunk, arrays), bar)
    bar.close()
    identity = features_identity(source)
  stall_point("add:encoded")
  entry = _seal_segment(index, name, writer, len(source.ids), width, identity)
  m = index.manifest
  draft = dict(m, generation=index.generation + 1, next_segment=int(m["next_segment"]) + 1,
               segments=list(m["segments"]) + [entry])
  draft["ann"] = _ann_for(index, draft, index.num_rows, False, None, progress)
  _commit(index, draft, "add:ann")
  return _summary("add", index, len(source.ids), start_time)


def remove_videos(directory: str | os.PathLike, video_ids: Sequence[str]) -> OperationSummary:
  """Tombstones videos: no search returns them from the next manifest on.

  Raises:
    SearchError: no ids, an unknown id, or one already removed.
  """
  start_time = time.time()
  index = _start(directory)
  if not video_ids:
    raise SearchError("search remove: give the video ids to remove")
  removed = list(index.manifest["removed"])
  for v in dict.fromkeys(video_ids):
    pos = index.position(v)
    if pos is None:
      raise SearchError(f"{index.directory}: video {v!r} is not in the index")
    if not index.alive[pos]:
      raise SearchError(f"{index.directory}: video {v!r} was already removed")
    removed.append(v)
  draft = dict(index.manifest, generation=index.generation + 1, removed=removed)
  _commit(index, draft, "remove")
  return _summary("remove", index, len(removed) - len(index.manifest["removed"]), start_time)


def compact(directory: str | os.PathLike, *, retrain: bool = False,
            progress: bool = True) -> OperationSummary:
  """Rewrites the live videos into one segment and rebuilds the ANN over them, atomically.

  Args:
    directory: INDEX.
    retrain: train new ANN quantisers too (else the trained ones are reused).
    progress: tqdm bars.
  """
  start_time = time.time()
  index = _start(directory)
  live = np.nonzero(index.alive)[0]
  if len(live) == 0:
    raise SearchError(f"{index.directory}: every video was removed; build a new index instead")
  width = max(len(str(v)) for v in index.video_ids[live])
  name, writer = _new_segment(index, len(live), width)
  names = tuple(writer.arrays)
  stored = tuple(n for n in names if n not in SCALES.values())
  bar = tqdm.tqdm(total=len(live), desc="compact", unit="video", disable=not progress)
  for s in range(0, len(live), index.chunk_size):
    rows = index.rows(live[s:s + index.chunk_size], stored)
    writer.write(s, rows)
    bar.update(len(rows["video_ids"]))
  bar.close()
  entry = _seal_segment(index, name, writer, len(live), width, None)
  m = index.manifest
  draft = dict(m, generation=index.generation + 1, next_segment=int(m["next_segment"]) + 1,
               segments=[entry], removed=[])
  draft["ann"] = _ann_for(index, draft, 0, retrain, None, progress)
  _commit(index, draft, "compact")
  return _summary("compact", index, len(live), start_time)


def retrain(directory: str | os.PathLike, *, factory: Optional[str] = None,
            progress: bool = True) -> OperationSummary:
  """New ANN quantisers trained on the current tokens, every token re-added, atomically.

  Args:
    directory: INDEX.
    factory: FAISS factory string (None: `ann.default_factory` for the current size).
    progress: tqdm bars.
  """
  start_time = time.time()
  index = _start(directory)
  draft = dict(index.manifest, generation=index.generation + 1)
  draft["ann"] = _ann_for(index, draft, 0, True, factory, progress)
  _commit(index, draft, "retrain")
  return _summary("retrain", index, index.num_rows, start_time)
