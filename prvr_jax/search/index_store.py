"""The on-disk search index: a directory of chunk files and a manifest written last.

Layout of INDEX/:
  build.json          the build's settings (model identity, feature file identity, chunk size,
                      dtype); present while a build is under way, removed once it is complete.
  chunk-000000.npz    videos [0, C), chunk-000001.npz videos [C, 2C), ... (video ids sorted), each
                      with arrays (n <= C videos, K = 32 clip tokens, F = 128 frame tokens):
                        video_ids (n,) str, durations (n,) float32 seconds,
                        num_feature_frames (n,) int32 (T of the features),
                        clip_tokens (n, K, D) and frame_tokens (n, F, D), L2-normalised,
                        float32 or float16,
                        clip_rows (n, K, 2) int32 [start, end) in the 128 resampled rows,
                        clip_spans (n, K, 2) and frame_spans (n, F, 2) float32 [start, end) seconds
                        (see prvr_jax/ops/moments.py).
  manifest.json       build.json's settings + the list of chunks; written last.

Every file is written to a temporary name and renamed (atomic), so a file is complete or absent.
The manifest is written only after every chunk, so an index without one is unfinished and is never
read: `IndexReader` refuses it. Building again with the same settings resumes: chunks already on
disk are kept, the rest are encoded. `overwrite` deletes the manifest first (from then on the
directory is an unfinished index), then the chunks.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import zipfile
from typing import Any, Iterator, Mapping

import numpy as np

from prvr_jax.utils.files import atomic_savez

from prvr_jax.search.errors import SearchError
from prvr_jax.utils.files import atomic_write_text

FORMAT = "prvr_jax.search.index"
VERSION = 1
MANIFEST = "manifest.json"
BUILD = "build.json"
DTYPES = ("float32", "float16")
CHUNK_ARRAYS = ("video_ids", "durations", "num_feature_frames", "clip_tokens", "frame_tokens",
                "clip_rows", "clip_spans", "frame_spans")


def chunk_name(i: int) -> str:
  return f"chunk-{i:06d}.npz"


def _atomic_savez(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  atomic_savez(path, dict(arrays))


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SearchError(f"{path}: not a readable JSON file (index damaged?): {e}") from None
  if not isinstance(data, dict):
    raise SearchError(f"{path}: expected a JSON object")
  return data


def _canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(settings, sort_keys=True))


class IndexWriter:
  """Writes one index directory; resumes an unfinished build with the same settings.

  Attributes:
    directory: INDEX.
    settings: the build's settings (JSON-able).
    complete: the directory already holds a finished index with these settings.
  """

  def __init__(self, directory: str | os.PathLike, settings: Mapping[str, Any],
               overwrite: bool = False):
    """Opens (or starts) an index directory.

    Args:
      directory: INDEX.
      settings: JSON-able build settings; a directory built with other settings is refused unless
        `overwrite`.
      overwrite: delete an index (finished or not) of other settings and start again.

    Raises:
      SearchError: the directory holds other files, or an index of other settings.
    """
    self.directory = pathlib.Path(directory)
    self.settings = _canonical({"format": FORMAT, "version": VERSION, **settings})
    self.complete = False
    if self.directory.exists() and not self.directory.is_dir():
      raise SearchError(f"{self.directory}: exists and is not a directory")
    self.directory.mkdir(parents=True, exist_ok=True)
    for stale in self.directory.glob(".*.tmp"):  # from a build that stopped mid-write
      stale.unlink()
    manifest, build = self.directory / MANIFEST, self.directory / BUILD
    ours = [p for p in self.directory.iterdir()
            if p.name in (MANIFEST, BUILD) or (p.name.startswith("chunk-") and p.suffix == ".npz")]
    others = sorted(p.name for p in self.directory.iterdir() if p not in ours)
    if others:
      raise SearchError(f"{self.directory}: not an index directory (holds {', '.join(others[:3])}"
                        f"{' ...' if len(others) > 3 else ''}); use an empty or new --out")
    found = manifest if manifest.exists() else build if build.exists() else None
    if found is not None:
      previous = _read_json(found) if found.is_file() else {}
      same = {k: v for k, v in previous.items() if k in self.settings} == self.settings
      if same and found == manifest:
        self.complete = True
        return
      if not same:
        if not overwrite:
          state = "a finished" if found == manifest else "an unfinished"
          raise SearchError(f"{self.directory}: holds {state} index built with other settings "
                            f"({_difference(previous, self.settings)}); pass --overwrite to "
                            "rebuild it, or use another --out")
        self._clear()
    elif ours:  # chunk files without build.json: not from this tool's normal run
      if not overwrite:
        raise SearchError(f"{self.directory}: holds chunk files but no {BUILD} or {MANIFEST}; "
                          "pass --overwrite to rebuild it")
      self._clear()
    if not build.exists():
      atomic_write_text(build, json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

  def _clear(self) -> None:
    # The manifest goes first: from then on the directory reads as unfinished, never as complete.
    (self.directory / MANIFEST).unlink(missing_ok=True)
    for chunk in self.directory.glob("chunk-*.npz"):
      chunk.unlink()
    (self.directory / BUILD).unlink(missing_ok=True)

  def has_chunk(self, i: int, video_ids: list[str]) -> bool:
    """Whether chunk i is on disk from an earlier run, holding exactly `video_ids`."""
    path = self.directory / chunk_name(i)
    if not path.is_file():
      return False
    try:
      with np.load(path, allow_pickle=False) as z:
        return [str(v) for v in z["video_ids"]] == list(video_ids)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      return False  # unreadable: encoded again and replaced

  def write_chunk(self, i: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes chunk i atomically.

    Args:
      i: chunk number.
      arrays: every name of CHUNK_ARRAYS (see the module docstring).
    """
    missing = [k for k in CHUNK_ARRAYS if k not in arrays]
    if missing:
      raise ValueError(f"chunk {i}: missing arrays {missing}")
    _atomic_savez(self.directory / chunk_name(i), {k: arrays[k] for k in CHUNK_ARRAYS})

  def finish(self, chunk_sizes: list[int]) -> dict[str, Any]:
    """Writes the manifest (the index is complete from then on) and removes build.json.

    Args:
      chunk_sizes: videos in each chunk, in order.

    Returns:
      The manifest.
    """
    firsts = np.concatenate([[0], np.cumsum(chunk_sizes)[:-1]]).astype(int).tolist()
    manifest = dict(self.settings, created=datetime.datetime.now().astimezone().isoformat(),
                    chunks=[dict(file=chunk_name(i), num_videos=int(n), first=int(f))
                            for i, (n, f) in enumerate(zip(chunk_sizes, firsts))])
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write_text(self.directory / MANIFEST, text)
    (self.directory / BUILD).unlink(missing_ok=True)
    self.complete = True
    return manifest


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


class IndexReader:
  """A finished index, read chunk by chunk (only one chunk in memory at a time).

  Attributes:
    directory: INDEX.
    manifest: the parsed manifest.json.
    chunk_size: C, videos per chunk (the last may hold fewer).
    num_videos: N.
  """

  def __init__(self, directory: str | os.PathLike):
    """Opens an index and checks its manifest and that every chunk file exists.

    Raises:
      SearchError: missing directory, unfinished build (no manifest), damaged manifest, another
        format version, or a missing chunk file.
    """
    self.directory = pathlib.Path(directory)
    if not self.directory.is_dir():
      raise SearchError(f"{self.directory}: index not found (build it with "
                        "`python -m prvr_jax.search index`)")
    path = self.directory / MANIFEST
    if not path.is_file():
      if (self.directory / BUILD).exists() or any(self.directory.glob("chunk-*.npz")):
        raise SearchError(f"{self.directory}: unfinished index (no {MANIFEST}: its build was "
                          "interrupted); run the same `index` command again to finish it")
      raise SearchError(f"{self.directory}: not a search index (no {MANIFEST})")
    m = _read_json(path)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
      raise SearchError(f"{path}: not a version {VERSION} {FORMAT} manifest (format "
                        f"{m.get('format')!r}, version {m.get('version')!r}); rebuild the index")
    try:
      self.chunk_size = int(m["chunk_size"])
      self.num_videos = int(m["num_videos"])
      chunks = [(str(c["file"]), int(c["num_videos"]), int(c["first"])) for c in m["chunks"]]
      for key in ("num_clips", "num_frames", "dim"):
        int(m[key])
      if not isinstance(m["model"], dict) or m["dtype"] not in DTYPES:
        raise ValueError("model or dtype")
    except (KeyError, TypeError, ValueError) as e:
      raise SearchError(f"{path}: damaged manifest (bad or missing {e})") from None
    if sum(n for _, n, _ in chunks) != self.num_videos or not chunks:
      raise SearchError(f"{path}: damaged manifest (chunks hold {sum(n for _, n, _ in chunks)} "
                        f"videos, num_videos is {self.num_videos})")
    for name, _, _ in chunks:
      if not (self.directory / name).is_file():
        raise SearchError(f"{self.directory / name}: chunk file listed in {MANIFEST} is missing; "
                          "rebuild the index")
    self.manifest = m
    self._chunks = chunks

  @property
  def num_chunks(self) -> int:
    return len(self._chunks)

  def load_chunk(self, i: int) -> dict[str, np.ndarray]:
    """Chunk i's arrays (see the module docstring), checked against the manifest.

    Raises:
      SearchError: unreadable file, missing array or wrong shape (naming the file and array).
    """
    name, n, _ = self._chunks[i]
    path = self.directory / name
    m = self.manifest
    want = dict(video_ids=(n,), durations=(n,), num_feature_frames=(n,),
                clip_tokens=(n, m["num_clips"], m["dim"]),
                frame_tokens=(n, m["num_frames"], m["dim"]),
                clip_rows=(n, m["num_clips"], 2), clip_spans=(n, m["num_clips"], 2),
                frame_spans=(n, m["num_frames"], 2))
    try:
      with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in CHUNK_ARRAYS}
    except KeyError as e:
      raise SearchError(f"{path}: damaged chunk file (no array {e}); rebuild the index") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise SearchError(f"{path}: unreadable chunk file ({e}); rebuild the index") from None
    for key, shape in want.items():
      if out[key].shape != shape:
        raise SearchError(f"{path}: array {key} has shape {out[key].shape}, the manifest implies "
                          f"{shape}; rebuild the index")
    return out

  def chunks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first video position, arrays) of every chunk, in order, one loaded at a time."""
    for i, (_, _, first) in enumerate(self._chunks):
      yield first, self.load_chunk(i)

