"""The on-disk search index: segments of memory-mapped token arrays, ANN files, a manifest.

Layout of INDEX/ (format version 2):
  manifest.json         what the index is: the build's settings (model identity, dtype, widths,
                        fusion weights), the segments in order, the removed video ids, the ANN
                        files, and a generation number; written last, by atomic rename.
  seg-000000/ ...       one segment per build or `add` (token_store.py: .npy arrays read through
                        memory maps); global video position = the segment's first + its row.
  ann-<gen>-clip.faiss  the FAISS index of every clip token (and -frame.faiss of every frame
  ann-<gen>-frame.faiss token) in position order, named by the generation that wrote them (ann.py).
  build.json            while the first build is under way: its settings and the chunks done.

Crash safety: the manifest names every file a reader opens, with its size, and is replaced
atomically after everything it names is on disk (fsynced). A reader only opens what the manifest
names, so an interrupted build, add, remove, compact or retrain leaves the previous index readable
and unchanged; files it left behind are named by no manifest and are deleted by the next
operation. The first build resumes: build.json records the finished chunks of seg-000000.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from prvr_jax.search.backends import open_ann
from prvr_jax.search.errors import SearchError
from prvr_jax.search.token_store import (DTYPES, SCALES, Segment, SegmentWriter, dequantize,
                                         segment_shapes)
from prvr_jax.utils.files import atomic_write_text

FORMAT = "prvr_jax.search.index"
VERSION = 2
MANIFEST = "manifest.json"
BUILD = "build.json"
# Environment variable naming an operation stage at which the process stops and waits to be killed
# (tests kill a real `search add` there to check that an interrupted operation changes nothing).
STALL_ENV = "PRVR_JAX_SEARCH_STALL"
CHUNK_ARRAYS = ("video_ids", "durations", "num_feature_frames", "clip_tokens", "frame_tokens",
                "clip_rows", "clip_spans", "frame_spans")


def segment_name(k: int) -> str:
  return f"seg-{k:06d}"


def stall_point(stage: str) -> None:
  """Blocks forever at `stage` when STALL_ENV names it (fault injection for the kill tests)."""
  if os.environ.get(STALL_ENV) == stage:
    print(f"stalled at {stage}", file=sys.stderr, flush=True)
    while True:
      time.sleep(60)


def read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SearchError(f"{path}: not a readable JSON file (index damaged?): {e}") from None
  if not isinstance(data, dict):
    raise SearchError(f"{path}: expected a JSON object")
  return data


def _canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(settings, sort_keys=True))


def write_manifest(directory: pathlib.Path, manifest: Mapping[str, Any]) -> None:
  """Replaces INDEX/manifest.json atomically (the commit point of every operation)."""
  rows = sum(int(s["num_videos"]) for s in manifest["segments"])
  manifest = dict(manifest, created=datetime.datetime.now().astimezone().isoformat(),
                  num_videos=rows - len(manifest["removed"]))  # the videos a search can find
  atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _is_ours(p: pathlib.Path) -> bool:
  return (p.name in (MANIFEST, BUILD) or (p.name.startswith("seg-") and p.is_dir())
          or (p.name.startswith("ann-") and p.suffix in (".faiss", ".json"))
          or p.name.endswith(".tmp"))


def referenced_names(manifest: Mapping[str, Any]) -> set[str]:
  """Top-level names of INDEX/ that a manifest's reader opens."""
  names = {MANIFEST} | {s["name"] for s in manifest.get("segments", [])}
  for entry in (manifest.get("ann") or {}).get("files", {}).values():
    names.add(entry["file"])
  return names


def remove_unreferenced(directory: pathlib.Path, keep: set[str]) -> None:
  """Deletes what an interrupted operation left (files no manifest names; temporaries)."""
  for p in directory.iterdir():
    if _is_ours(p) and p.name not in keep and p.name != BUILD:
      if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
      else:
        p.unlink(missing_ok=True)


def _difference(previous: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
  """The first differing setting, in words."""
  for key, want in settings.items():
    have = previous.get(key)
    if have != want:
      if isinstance(want, dict) and isinstance(have, dict):
        sub = next((k for k in want if have.get(k) != want[k]), "?")
        return f"{key}.{sub}: {have.get(sub)!r} there, {want[sub]!r} now"
      return f"{key}: {have!r} there, {want!r} now"
  return "unknown difference"


class IndexWriter:
  """Writes the first build of an index directory (one segment); resumes an unfinished one.

  Attributes:
    directory: INDEX.
    settings: the build's settings (JSON-able).
    complete: the directory already holds a finished index built with these settings.
  """

  def __init__(self, directory: str | os.PathLike, settings: Mapping[str, Any],
               overwrite: bool = False):
    """Opens (or starts) an index directory.

    Args:
      directory: INDEX.
      settings: JSON-able build settings with at least num_videos, chunk_size, dtype, num_clips,
        num_frames, dim, id_width; a directory built with other settings is refused unless
        `overwrite`.
      overwrite: delete an index (finished or not) of other settings and start again.

    Raises:
      SearchError: the directory holds other files, or an index of other settings.
    """
    self.directory = pathlib.Path(directory)
    self.settings = _canonical({"format": FORMAT, "version": VERSION, **settings})
    if self.settings["dtype"] not in DTYPES:
      raise SearchError(f"--dtype must be one of {DTYPES}, got {self.settings['dtype']!r}")
    self.complete = False
    self._done: set[int] = set()
    self._segment: Optional[SegmentWriter] = None
    if self.directory.exists() and not self.directory.is_dir():
      raise SearchError(f"{self.directory}: exists and is not a directory")
    self.directory.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in self.directory.iterdir() if not _is_ours(p))
    if others:
      raise SearchError(f"{self.directory}: not an index directory (holds {', '.join(others[:3])}"
                        f"{' ...' if len(others) > 3 else ''}); use an empty or new --out")
    manifest, build = self.directory / MANIFEST, self.directory / BUILD
    if manifest.exists():
      previous = read_json(manifest) if manifest.is_file() else {}
      built = previous.get("build", {})
      if built == self.settings:
        self.complete = True
        return
      if not overwrite:
        raise SearchError(f"{self.directory}: holds a finished index built with other settings "
                          f"({_difference(built, self.settings)}); pass --overwrite to rebuild it, "
                          "or use another --out")
      self._clear()
    elif build.exists():
      previous = read_json(build) if build.is_file() else {}
      if previous.get("settings") == self.settings:
        self._done = {int(i) for i in previous.get("done", [])}
      elif not overwrite:
        raise SearchError(f"{self.directory}: holds an unfinished index built with other settings "
                          f"({_difference(previous.get('settings', {}), self.settings)}); pass "
                          "--overwrite to rebuild it, or use another --out")
      else:
        self._clear()
    elif any(_is_ours(p) for p in self.directory.iterdir()):
      if not overwrite:
        raise SearchError(f"{self.directory}: holds index files but no {BUILD} or {MANIFEST}; "
                          "pass --overwrite to rebuild it")
      self._clear()
    remove_unreferenced(self.directory, {segment_name(0)} if self._done else set())
    if not self._done:
      shutil.rmtree(self.directory / segment_name(0), ignore_errors=True)
      self._save_progress()

  def _clear(self) -> None:
    # The manifest goes first: from then on the directory reads as unfinished, never as complete.
    (self.directory / MANIFEST).unlink(missing_ok=True)
    (self.directory / BUILD).unlink(missing_ok=True)
    remove_unreferenced(self.directory, set())
    self._done = set()

  def _save_progress(self) -> None:
    text = json.dumps(dict(settings=self.settings, done=sorted(self._done)), sort_keys=True)
    atomic_write_text(self.directory / BUILD, text + "\n")

  def shapes(self) -> dict[str, tuple]:
    s = self.settings
    return segment_shapes(s["num_videos"], s["num_clips"], s["num_frames"], s["dim"], s["dtype"],
                          s["id_width"])

  def has_chunk(self, i: int) -> bool:
    """Whether chunk i was written (and flushed) by an earlier run of this build."""
    return i in self._done

  def write_chunk(self, i: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes chunk i (videos [i C, i C + n)) into the segment and records it as done.

    Args:
      i: chunk number.
      arrays: every name of CHUNK_ARRAYS, float32 tokens (cast or quantised to the dtype).
    """
    missing = [k for k in CHUNK_ARRAYS if k not in arrays]
    if missing:
      raise ValueError(f"chunk {i}: missing arrays {missing}")
    if self._segment is None:
      self._segment = SegmentWriter(self.directory / segment_name(0), self.shapes(),
                                    resume=bool(self._done))
    self._segment.write(i * self.settings["chunk_size"], arrays)
    self._segment.flush()
    self._done.add(i)
    self._save_progress()

  def close_segment(self) -> dict[str, Any]:
    """The finished segment's manifest entry (closing its maps; every chunk must be done)."""
    if self._segment is None:
      self._segment = SegmentWriter(self.directory / segment_name(0), self.shapes(), resume=True)
    files = self._segment.close()
    self._segment = None
    return dict(name=segment_name(0), num_videos=int(self.settings["num_videos"]),
                id_width=int(self.settings["id_width"]), files=files,
                features=self.settings.get("features"))

  def draft_manifest(self, segment: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of the finished build, without its ANN entry (`IndexReader(manifest=)`)."""
    s = self.settings
    return dict(format=FORMAT, version=VERSION, build=s, generation=0, next_segment=1,
                model=s["model"], dtype=s["dtype"], num_clips=s["num_clips"],
                num_frames=s["num_frames"], dim=s["dim"], chunk_size=s["chunk_size"],
                clip_weight=s.get("clip_weight"), frame_weight=s.get("frame_weight"),
                segments=[dict(segment)], removed=[], ann=None)

  def finish(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the manifest (the index is complete from then on) and removes build.json.

    Args:
      manifest: `draft_manifest(...)` with its `ann` entry (ann.py; None: exact search only).

    Returns:
      The manifest.
    """
    write_manifest(self.directory, manifest)
    (self.directory / BUILD).unlink(missing_ok=True)
    self.complete = True
    return manifest


class IndexReader:
  """A finished index opened through memory maps (nothing but the manifest is read eagerly).

  Attributes:
    directory: INDEX.
    manifest: the parsed manifest.json.
    chunk_size: C, videos per exact-scan chunk.
    num_rows: video positions (removed ones included until `compact`).
    num_videos: videos that can be found (num_rows minus the removed).
    video_ids: (num_rows,) the id of each position.
    alive: (num_rows,) bool, False for removed videos.
    segments: the opened segments, in position order; `firsts` their first positions.
  """

  def __init__(self, directory: str | os.PathLike, manifest: Optional[Mapping[str, Any]] = None):
    """Opens an index and checks its manifest, every token file's size, shape and dtype.

    Args:
      directory: INDEX.
      manifest: open these contents instead of INDEX/manifest.json (an operation reading the
        token store it is about to commit).

    Raises:
      SearchError: missing directory, unfinished build (no manifest), damaged manifest, another
        format version, or a missing, truncated or corrupt token file.
    """
    self.directory = pathlib.Path(directory)
    if not self.directory.is_dir():
      raise SearchError(f"{self.directory}: index not found (build it with "
                        "`python -m prvr_jax.search index`)")
    path = self.directory / MANIFEST
    if manifest is None and not path.is_file():
      if (self.directory / BUILD).exists() or any(self.directory.glob("seg-*")):
        raise SearchError(f"{self.directory}: unfinished index (no {MANIFEST}: its build was "
                          "interrupted); run the same `index` command again to finish it")
      raise SearchError(f"{self.directory}: not a search index (no {MANIFEST})")
    m = read_json(path) if manifest is None else _canonical(manifest)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
      raise SearchError(f"{path}: not a version {VERSION} {FORMAT} manifest (format "
                        f"{m.get('format')!r}, version {m.get('version')!r}); rebuild the index "
                        "with `python -m prvr_jax.search index`")
    try:
      self.chunk_size = int(m["chunk_size"])
      k, f, d = int(m["num_clips"]), int(m["num_frames"]), int(m["dim"])
      if not isinstance(m["model"], dict) or m["dtype"] not in DTYPES:
        raise ValueError("model or dtype")
      entries = [(str(s["name"]), int(s["num_videos"]), int(s["id_width"]), dict(s["files"]))
                 for s in m["segments"]]
      removed = [str(v) for v in m["removed"]]
      int(m["generation"])
    except (KeyError, TypeError, ValueError) as e:
      raise SearchError(f"{path}: damaged manifest (bad or missing {e})") from None
    if not entries:
      raise SearchError(f"{path}: damaged manifest (no segments)")
    self.manifest = m
    self.segments, self.firsts = [], []
    first = 0
    for name, n, width, files in entries:
      shapes = segment_shapes(n, k, f, d, m["dtype"], width)
      self.segments.append(Segment(self.directory / name, n, files, shapes))
      self.firsts.append(first)
      first += n
    self.num_rows = first
    self.video_ids = np.concatenate([s.arrays["video_ids"] for s in self.segments])
    self._position = {str(v): i for i, v in enumerate(self.video_ids)}
    if len(self._position) != self.num_rows:
      raise SearchError(f"{path}: damaged index (a video id appears twice)")
    self.alive = np.ones(self.num_rows, bool)
    for v in removed:
      if v not in self._position:
        raise SearchError(f"{path}: damaged manifest (removed id {v!r} is not in the index)")
      self.alive[self._position[v]] = False
    self.num_videos = int(self.alive.sum())
    self._ann = None

  @property
  def dtype(self) -> str:
    return self.manifest["dtype"]

  @property
  def generation(self) -> int:
    return int(self.manifest["generation"])

  def position(self, video_id: str) -> Optional[int]:
    """The position of a video id (removed ones included), or None."""
    return self._position.get(video_id)

  @property
  def num_chunks(self) -> int:
    return sum(-(-s.num_videos // self.chunk_size) for s in self.segments)

  def _chunk_slices(self) -> Iterator[tuple[int, Segment, slice]]:
    for seg, first in zip(self.segments, self.firsts):
      for s in range(0, seg.num_videos, self.chunk_size):
        yield first + s, seg, slice(s, min(s + self.chunk_size, seg.num_videos))

  def load_chunk(self, i: int) -> dict[str, np.ndarray]:
    """Chunk i's arrays (token_store.py names, read from the maps) and `valid` (n,) bool."""
    for j, (first, seg, rows) in enumerate(self._chunk_slices()):
      if j == i:
        out = {name: np.asarray(arr[rows]) for name, arr in seg.arrays.items()}
        out["valid"] = self.alive[first:first + rows.stop - rows.start]
        return out
    raise IndexError(f"chunk {i} of {self.num_chunks}")

  def chunks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first video position, arrays) of every chunk, in order, one read at a time."""
    for first, seg, rows in self._chunk_slices():
      out = {name: np.asarray(arr[rows]) for name, arr in seg.arrays.items()}
      out["valid"] = self.alive[first:first + rows.stop - rows.start]
      yield first, out

  def rows(self, positions: np.ndarray, names: Sequence[str],
           size: Optional[int] = None) -> dict[str, np.ndarray]:
    """Arrays of some videos, read from the maps: only these rows are touched.

    Args:
      positions: (U,) int global positions, sorted ascending (disk order).
      names: array names (token_store.py); token arrays bring their scales when int8.
      size: pad every array with zero rows to (size, ...) (>= U), read straight into place.

    Returns:
      {name: (U or size, ...) array} in the order of `positions`.
    """
    positions = np.asarray(positions, np.int64)
    names = list(names) + [SCALES[n] for n in names if n in SCALES and self.dtype == "int8"]
    template = self.segments[0].arrays
    total = len(positions) if size is None else size
    out = {n: np.zeros((total,) + template[n].shape[1:], template[n].dtype) for n in names}
    bounds = np.searchsorted(positions, np.asarray(self.firsts[1:] + [self.num_rows]))
    lo = 0
    for seg, first, hi in zip(self.segments, self.firsts, bounds):
      if hi > lo:
        local = positions[lo:hi] - first
        for n in names:
          np.take(seg.arrays[n], local, axis=0, out=out[n][lo:hi])
      lo = hi
    return out

  def token_rows(self, name: str, positions: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Single tokens of some videos, dequantised: only their rows are read from the maps.

    Args:
      name: 'clip_tokens' or 'frame_tokens'.
      positions: (n,) int global video positions, any order.
      tokens: (n,) int token index within each video.

    Returns:
      (n, D) float32 tokens.
    """
    positions = np.asarray(positions, np.int64)
    tokens = np.asarray(tokens, np.int64)
    out = np.empty((len(positions), int(self.manifest["dim"])), np.float32)
    which = np.searchsorted(np.asarray(self.firsts), positions, side="right") - 1
    for k in np.unique(which):  # one segment at a time: a few per index
      seg, mine = self.segments[k], np.nonzero(which == k)[0]
      arr = seg.arrays[name]
      flat = (positions[mine] - self.firsts[k]) * arr.shape[1] + tokens[mine]
      scales = seg.arrays.get(SCALES[name])
      out[mine] = dequantize(np.take(arr.reshape(-1, arr.shape[-1]), flat, axis=0),
                             None if scales is None else np.take(scales.reshape(-1), flat))
    return out

  def ann(self):
    """The ANN searcher of this index (ann.py), loaded and checked on first use; None if none."""
    if self._ann is None and self.manifest.get("ann"):
      self._ann = open_ann(self)
    return self._ann
