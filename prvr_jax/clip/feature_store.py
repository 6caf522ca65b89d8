"""Resumable, crash-safe HDF5 output: id -> (rows, dim) float32 datasets in the authors' layout.

While extracting, finished items go to small part files in `<out>.parts/` (each written to a
temporary name, then renamed, so a part is either complete or absent). `finalize` builds a new
HDF5 file from the existing output plus all parts, renames it over the output in one step and
removes the parts. A crash therefore never leaves a half-written dataset: the output file is
always a complete earlier version, and the next run skips every id found in the output or the
parts and merges them.

Layout: one dataset per id at the root (nothing else, so the readers in prvr_jax.data.formats see
only item ids); per-item metadata as dataset attributes; run settings as root attributes, checked
on resume so a run never mixes features made with other settings.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import uuid
import zipfile
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from prvr_jax.errors import PrvrError
from prvr_jax.utils.files import atomic_write_bytes


# Settings that extraction outputs did not always record, and what the ones without them were
# made with: CLIP ran in float32 only until `--dtype` came.
LEGACY_SETTINGS = {"clip_dtype": "float32"}


class StoreError(PrvrError, ValueError):
  """An output file or part that cannot be used; names the file and the item."""


def _check_id(item_id: str) -> None:
  # h5py would turn '/' into groups; '.' names the root.
  if not item_id or "/" in item_id or item_id == ".":
    raise StoreError(f"{item_id!r}: id cannot be an HDF5 dataset name (empty, '.' or has '/')")


def _jsonable(settings: Mapping[str, Any]) -> dict[str, str]:
  return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in settings.items()}


class FeatureStore:
  """The output of one extraction command.

  Attributes:
    path: the HDF5 output.
    parts_dir: `<path>.parts`, finished items not merged yet.
  """

  def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any],
               info: Mapping[str, Any] | None = None, assumed: Mapping[str, Any] | None = None):
    """Opens (or starts) an output and checks that earlier work used the same settings.

    Args:
      path: the .h5 output.
      settings: root attributes (str, or JSON-serialisable values stored as JSON) that must match
        an existing output's, e.g. kind, fps, model config.
      info: further root attributes, written but not checked (e.g. the checkpoint's path).
      assumed: what an existing output that records no such setting was made with, for settings
        added after outputs were already written (e.g. clip_dtype: float32, the only dtype
        before); any other setting an existing output lacks is refused.

    Raises:
      StoreError: an unreadable existing output or part, or settings that differ from it.
    """
    self.path = pathlib.Path(path)
    self.parts_dir = self.path.with_name(self.path.name + ".parts")
    self.settings = _jsonable(settings)
    self.info = _jsonable(info or {})
    self.assumed = _jsonable(assumed or {})
    self._ids: set[str] = set()
    self._next_part = 0
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # from an interrupted merge
      stale.unlink()
    if self.path.exists():
      self._ids |= self._read_output_ids()
    if self.parts_dir.is_dir():
      self._check_settings(self.parts_dir / "settings.json",
                           json.loads((self.parts_dir / "settings.json").read_text())
                           if (self.parts_dir / "settings.json").is_file() else {})
      for part in sorted(self.parts_dir.glob("part-*.npz")):
        self._ids |= set(self._part_ids(part))
        self._next_part = max(self._next_part, int(part.stem.split("-")[1]) + 1)
    else:
      self.parts_dir.mkdir()
      (self.parts_dir / "settings.json").write_text(json.dumps(self.settings, sort_keys=True))

  def _read_output_ids(self) -> set[str]:
    try:
      with h5py.File(self.path, "r") as f:
        self._check_settings(self.path, {k: str(v) for k, v in f.attrs.items()})
        return set(f.keys())
    except OSError as e:
      raise StoreError(f"{self.path}: existing output is not a readable HDF5 file ({e}); move it "
                       "away to start again") from None

  def _check_settings(self, where: pathlib.Path, found: Mapping[str, str]) -> None:
    for key, want in self.settings.items():
      if key in found:
        have, how = found[key], "was made with"
      elif key in self.assumed:
        have = self.assumed[key]
        how = f"records no {key}, so it predates that setting and was made with"
      else:
        raise StoreError(f"{where}: earlier output records no {key} (this run has {key}={want!r}), "
                         "so it cannot be checked against this run; use another --out")
      if have != want:
        raise StoreError(f"{where}: earlier output {how} {key}={have!r}, this run has "
                         f"{key}={want!r}; use another --out or the same settings")

  @staticmethod
  def _part_ids(part: pathlib.Path) -> list[str]:
    try:
      with np.load(part, allow_pickle=False) as z:
        return json.loads(str(z["ids"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      raise StoreError(f"{part}: unreadable part file ({e}); delete it to redo its items") from None

  def __contains__(self, item_id: str) -> bool:
    return item_id in self._ids

  def put(self, items: Iterable[tuple[str, np.ndarray, Mapping[str, Any]]]) -> None:
    """Stores finished items atomically in one part file.

    Args:
      items: (id, (rows, dim) array, attributes) triples; attributes are numbers or strings.

    Raises:
      StoreError: a bad id, an id already stored, or a non-2-D array.
    """
    items = list(items)
    if not items:
      return
    arrays: dict[str, np.ndarray] = {}
    ids, attrs = [], []
    for i, (item_id, arr, item_attrs) in enumerate(items):
      _check_id(item_id)
      if item_id in self._ids or item_id in ids:
        raise StoreError(f"{item_id!r}: already stored in {self.path} or its parts")
      arr = np.asarray(arr, np.float32)
      if arr.ndim != 2:
        raise StoreError(f"{item_id!r}: features must be (rows, dim), got shape {arr.shape}")
      ids.append(item_id)
      attrs.append(dict(item_attrs))
      arrays[f"a{i}"] = arr
    part = self.parts_dir / f"part-{self._next_part:08d}.npz"
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.array(json.dumps(ids)), attrs=np.array(json.dumps(attrs)), **arrays)
    atomic_write_bytes(part, buffer.getvalue())
    self._next_part += 1
    self._ids.update(ids)

  def finalize(self) -> int:
    """Merges the output and all parts into a new output file, atomically; removes the parts.

    Returns:
      Number of items in the output.
    """

    parts = sorted(self.parts_dir.glob("part-*.npz"))
    if not parts and self.path.exists():  # nothing new: keep the file as it is
      self._remove_parts_dir(parts)
      with h5py.File(self.path, "r") as f:
        return len(f.keys())
    # Not mkstemp: its 0600 mode would stick to the output; h5py's 'w-' creates with the umask.
    tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
    try:
      with h5py.File(tmp, "w-") as out:
        for key, value in {**self.info, **self.settings}.items():
          out.attrs[key] = value
        if self.path.exists():
          with h5py.File(self.path, "r") as old:
            for key in old.keys():
              old.copy(old[key], out, name=key)
        for part in parts:
          with np.load(part, allow_pickle=False) as z:
            ids, attrs = json.loads(str(z["ids"])), json.loads(str(z["attrs"]))
            for i, (item_id, item_attrs) in enumerate(zip(ids, attrs)):
              if item_id in out:
                continue  # never happens through put(), which refuses stored ids
              ds = out.create_dataset(item_id, data=z[f"a{i}"])
              for key, value in item_attrs.items():
                ds.attrs[key] = value
        count = len(out.keys())
      os.replace(tmp, self.path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise
    self._remove_parts_dir(parts)
    return count

  def _remove_parts_dir(self, parts: list[pathlib.Path]) -> None:
    for part in parts:
      part.unlink()
    for leftover in self.parts_dir.glob(".part-*.tmp"):
      leftover.unlink()
    (self.parts_dir / "settings.json").unlink(missing_ok=True)
    self.parts_dir.rmdir()
