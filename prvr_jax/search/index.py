"""Builds a search index: every video of a feature file encoded once by a trained model.

Per chunk of C videos (ids sorted): each video's (T, D_v) features are resampled to 128 rows on
the host (`resample_to_fixed_length`), the chunk is padded to C videos (repeating its first video,
so the device sees real data) and encoded by one jitted program (OP-ToMe via
`prepare_video_inputs`, the clip and frame branches, L2 normalisation: the evaluation's encoder,
so index scores equal evaluation scores); padded videos are dropped and the chunk is written (see
index_store.py for the format and the crash safety). A chunk is dispatched before the previous
one is read back and written, so reading and writing overlap the device's work. Once every chunk is
written, the ANN indexes of both branches are built from the stored tokens (ann.py) and the
manifest is written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm

from prvr_jax.data.preprocess import resample_to_fixed_length
from prvr_jax.eval.evaluate import make_video_encoder
from prvr_jax.search import ann as ann_lib
from prvr_jax.search import milvus
from prvr_jax.ops import moments
from prvr_jax.search.errors import SearchError
from prvr_jax.search.features import VideoFeatureFile
from prvr_jax.search.index_store import (MANIFEST, IndexReader, IndexWriter, read_json,
                                         referenced_names)
from prvr_jax.search.token_store import DEFAULT_DTYPE, DTYPES
from prvr_jax.search.model import SearchModel

DEFAULT_CHUNK = 256
ANN_BACKENDS = ("faiss", "milvus", "none")


@dataclasses.dataclass
class IndexSummary:
  """What a build did.

  Attributes:
    out: the index directory.
    num_videos: videos in the index.
    num_chunks: chunk files.
    encoded: chunks encoded by this run.
    reused: chunks kept from an interrupted earlier run (or all, when the index was complete).
    seconds: wall time.
    model: the model's identity.
    bytes: size of the index files (token store and ANN).
  """

  out: str
  num_videos: int
  num_chunks: int
  encoded: int = 0
  reused: int = 0
  seconds: float = 0.0
  model: dict[str, Any] = dataclasses.field(default_factory=dict)
  bytes: int = 0

  def text(self) -> str:
    """A few lines for the terminal."""
    m = self.model
    if self.encoded == 0 and self.reused == self.num_chunks:
      state = "already complete, nothing to do"
    else:
      state = f"{self.encoded} encoded, {self.reused} kept from an interrupted run"
    return (f"index {self.out}: {self.num_videos} videos in {self.num_chunks} chunks ({state}), "
            f"{self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s\n"
            f"model: {m.get('workdir') or '(in memory)'} step {m.get('step')} "
            f"(config {str(m.get('config_hash'))[:12]}, params {str(m.get('params_hash'))[:12]})")


def features_identity(features: VideoFeatureFile) -> dict[str, Any]:
  """What makes a feature file the same file for resuming: path, size, mtime and its ids."""
  stat = features.path.stat()
  ids = hashlib.sha256(json.dumps(features.ids).encode()).hexdigest()
  return dict(path=str(features.path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
              ids_sha256=ids, num_videos=len(features.ids), dim=features.dim, fps=features.fps)


def _encode_inputs(features: VideoFeatureFile, ids: list[str], chunk: int,
                   num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(frames (C, R, D_v) resampled and padded, durations (n,), feature frame counts (n,))."""
  rows, durations, counts = [], [], []
  for video_id in ids:
    frames, duration = features.read(video_id)
    rows.append(resample_to_fixed_length(frames, num_rows))
    durations.append(duration)
    counts.append(frames.shape[0])
  rows += [rows[0]] * (chunk - len(ids))
  return np.stack(rows), np.asarray(durations, np.float32), np.asarray(counts, np.int32)


def _chunk_arrays(out: tuple[Any, ...], ids: list[str], durations: np.ndarray, counts: np.ndarray,
                  num_rows: int) -> dict[str, np.ndarray]:
  clip, frame, clip_rows = (np.asarray(x)[:len(ids)] for x in jax.device_get(out))
  frame_rows = moments.frame_row_spans(len(ids), frame.shape[1])
  return dict(
      video_ids=np.asarray(ids, dtype=str), durations=durations, num_feature_frames=counts,
      clip_tokens=clip, frame_tokens=frame,
      clip_rows=clip_rows.astype(np.int32),
      clip_spans=moments.rows_to_seconds(clip_rows, counts, durations, num_rows),
      frame_spans=moments.rows_to_seconds(frame_rows, counts, durations, num_rows))


def encode_groups(model: SearchModel, source: VideoFeatureFile, groups: list[list[str]],
                  skip: Callable[[int], bool], write: Callable[[int, dict], None],
                  bar: Optional[tqdm.tqdm] = None) -> int:
  """Encodes groups of videos (one padded chunk each) and hands each chunk's arrays to `write`.

  Args:
    model: the network.
    source: the open feature file.
    groups: video ids per chunk (all groups but the last of equal length C).
    skip: chunk number -> already done (not encoded).
    write: fn(chunk number, arrays of CHUNK_ARRAYS).
    bar: advanced by each chunk's videos.

  Returns:
    Chunks encoded.
  """
  cfg = model.model_cfg
  chunk = len(groups[0]) if groups else 0
  encode = make_video_encoder(cfg)
  pending, encoded = None, 0
  for i, ids in enumerate(groups):
    if skip(i):
      if bar is not None:
        bar.update(len(ids))
      continue
    frames, durations, counts = _encode_inputs(source, ids, chunk, cfg.num_frames)
    out = encode(model.params, frames)  # dispatched: the previous chunk is written meanwhile
    if pending is not None:
      write(pending[0], _chunk_arrays(*pending[1:], cfg.num_frames))
      if bar is not None:
        bar.update(len(pending[2]))
    pending = (i, out, ids, durations, counts)
    encoded += 1
  if pending is not None:
    write(pending[0], _chunk_arrays(*pending[1:], cfg.num_frames))
    if bar is not None:
      bar.update(len(pending[2]))
  return encoded


def check_ann_backend(ann: str, milvus_uri: Optional[str]) -> None:
  if ann not in ANN_BACKENDS:
    raise SearchError(f"--ann must be one of {ANN_BACKENDS}, got {ann!r}")
  if (ann == "milvus") != bool(milvus_uri):
    raise SearchError("--ann milvus needs --milvus-uri (a server URI or a milvus-lite .db file), "
                      "and --milvus-uri needs --ann milvus")


def build_ann_entry(index: IndexReader, generation: int, ann: str, factory: Optional[str],
                    milvus_uri: Optional[str], progress: bool) -> Optional[dict[str, Any]]:
  """The ANN of a complete token store, for a new manifest (None for --ann none)."""
  if ann == "faiss":
    return ann_lib.build_faiss(index, generation, factory=factory, progress=progress)
  if ann == "milvus":
    return milvus.build_milvus(index, milvus_uri, progress=progress)
  return None


def build_index(model: SearchModel, features: str | os.PathLike, out: str | os.PathLike, *,
                chunk: int = DEFAULT_CHUNK, dtype: str = DEFAULT_DTYPE, fps: Optional[float] = None,
                overwrite: bool = False, progress: bool = True, ann: str = "faiss",
                ann_factory: Optional[str] = None,
                milvus_uri: Optional[str] = None) -> IndexSummary:
  """Encodes every video of a feature file into an index directory.

  Args:
    model: the trained network (`model.load_search_model` or `model.from_params`).
    features: a video feature .h5 (`python -m prvr_jax.extract videos`): (T, D_v) per video id,
      attributes `duration` / `fps`.
    out: the index directory (created; an unfinished build with the same settings is resumed).
    chunk: C, videos per encoding batch (also the exact scan's chunk).
    dtype: stored tokens: 'float16' (default), 'float32', or 'int8' with a per-token scale.
    fps: frame rate for videos without `duration` / `fps` attributes.
    overwrite: rebuild an index of other settings found at `out`.
    progress: show tqdm bars.
    ann: candidate index: 'faiss' (in process), 'milvus' (a Milvus server / milvus-lite file at
      `milvus_uri`) or 'none' (exact search only).
    ann_factory: FAISS factory string; None = `ann.default_factory` for each branch's size.
    milvus_uri: with ann='milvus'.

  Returns:
    The summary.

  Raises:
    SearchError: bad arguments, a feature file that does not fit the model (naming the file and
      the video), or an `out` that holds something else.
  """
  start_time = time.time()
  if chunk <= 0:
    raise SearchError(f"--chunk must be > 0, got {chunk}")
  if dtype not in DTYPES:
    raise SearchError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
  if fps is not None and not fps > 0:
    raise SearchError(f"--fps must be > 0, got {fps}")
  check_ann_backend(ann, milvus_uri)
  cfg = model.model_cfg
  with VideoFeatureFile(features, fps) as source:
    source.check_dim(cfg.visual_input_size, model.name)
    settings = dict(model=model.identity, features=features_identity(source), chunk_size=chunk,
                    dtype=dtype, num_videos=len(source.ids), num_clips=cfg.num_clips,
                    num_frames=cfg.num_frames, dim=cfg.hidden_size,
                    id_width=max(len(v) for v in source.ids),
                    clip_weight=model.clip_weight, frame_weight=model.frame_weight,
                    ann=dict(backend=ann, factory=ann_factory, milvus_uri=milvus_uri))
    writer = IndexWriter(out, settings, overwrite=overwrite)
    groups = [source.ids[i:i + chunk] for i in range(0, len(source.ids), chunk)]
    summary = IndexSummary(out=str(out), num_videos=len(source.ids), num_chunks=len(groups),
                           model=model.identity)
    if writer.complete:
      summary.reused = len(groups)
    else:
      bar = tqdm.tqdm(total=len(source.ids), desc="index", unit="video", disable=not progress)
      summary.encoded = encode_groups(model, source, groups, writer.has_chunk,
                                      writer.write_chunk, bar)
      summary.reused = len(groups) - summary.encoded
      bar.close()
      draft = writer.draft_manifest(writer.close_segment())
      draft["ann"] = build_ann_entry(IndexReader(writer.directory, manifest=draft), 0, ann,
                                     ann_factory, milvus_uri, progress)
      writer.finish(draft)
  summary.bytes = index_bytes(pathlib.Path(out))
  summary.seconds = time.time() - start_time
  return summary


def index_bytes(directory: pathlib.Path) -> int:
  """Bytes of the files the index's manifest names (token store + ANN files)."""
  manifest = read_json(directory / MANIFEST)
  total = 0
  for name in referenced_names(manifest):
    p = directory / name
    total += sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size
  return total
