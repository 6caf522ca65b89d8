"""Readers and validators for the feature files the PRVR authors released (and the MS-SL package).

Layouts under `<root>/<collection>/` (collection = the authors' folder name):

  CLIP (authors):  FeatureData/<c>_clip_L14.h5            video id -> (T, D_v) frame features
                   TextData/<c>_clip_L14.h5               caption id -> (L, D_t) token features
  QVHighlights:    FeatureData/qvhighlight_slowfast_clip.h5 (D_v = 2816)
                   TextData/qvhighlight_slowfast_clip_text.h5 (D_t = 512)
  MS-SL:           FeatureData/<feature>/{feature.bin, id.txt, shape.txt, video2frames.txt} (BigFile)
                   TextData/roberta_<c>_query_feat.hdf5   caption id -> (L, D_t)
  all:             TextData/<c>{train,val,test}.caption.txt, lines `<video_id>#enc#<k> <caption text>`
  optional:        moment annotations (TVR / QVHighlights release jsonl, ActivityNet Captions json,
                   Charades-STA txt + Charades_v1_*.csv durations), see MOMENT_FILES

Nothing here imports JAX. Every problem is a `DataError` naming the file and the item; callers pick
whether it is raised or recorded as a skipped item (`Issues`).
"""

from __future__ import annotations

import ast
import collections
import csv
import dataclasses
import json
import os
import pathlib
from typing import Iterable, Iterator, Optional, Sequence

import h5py
import numpy as np

from prvr_jax.errors import ConfigError
from prvr_jax.errors import PrvrError

WHOLE_FILE = "(whole file)"
ON_ERROR_CHOICES = ("raise", "skip")


class DataError(PrvrError, ValueError):
  """A problem with one input file or one item of it.

  Attributes:
    file: the file (or folder) the problem is in.
    item: the id of the bad item (video id, caption id, frame id, line), or WHOLE_FILE.
    reason: what is wrong, in words.
  """

  def __init__(self, file: str | os.PathLike, item: str, reason: str):
    self.file = str(file)
    self.item = str(item)
    self.reason = reason
    super().__init__(f"{self.file}: {self.item}: {reason}")


@dataclasses.dataclass
class Issues:
  """Collects bad items: raises the first one (on_error='raise') or records it ('skip').

  Attributes:
    on_error: 'raise' or 'skip'.
    skipped: one {"id": ..., "reason": ...} per skipped item, in the order they were found.
  """

  on_error: str = "raise"
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.on_error not in ON_ERROR_CHOICES:
      raise ConfigError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")

  def report(self, error: DataError) -> None:
    """Raises `error`, or records its item as skipped (reason includes the file)."""
    if self.on_error == "raise":
      raise DataError(error.file, error.item,
                      error.reason + " (set data.on_error='skip' to skip such items instead)")
    self.skipped.append({"id": error.item, "reason": f"{error.reason} [{error.file}]"})

  def skip(self, item: str, reason: str) -> None:
    """Records an item dropped as a consequence of another one (e.g. captions of a bad video)."""
    self.skipped.append({"id": item, "reason": reason})


# ----------------------------------------------------------------------------------------------
# Caption files and moment annotations.


@dataclasses.dataclass(frozen=True)
class CaptionLine:
  """One line of a `<c><split>.caption.txt` file."""

  caption_id: str
  video_id: str
  text: str
  line: int  # 1-based line number, for messages


def video_id_of(caption_id: str) -> str:
  """The video id of a caption id: the text before the first '#' (the authors' rule)."""
  return caption_id.split("#", 1)[0]


def read_caption_file(path: str | os.PathLike, issues: Issues) -> list[CaptionLine]:
  """Reads and validates one caption file.

  Blank lines are ignored (a trailing newline is common); a caption id with no text is an 'empty
  caption'; a caption id seen twice is a 'duplicate id' (the later line is the bad item).

  Args:
    path: the caption file.
    issues: where bad lines go.

  Returns:
    The good lines in file order.

  Raises:
    DataError: missing file (always), or a bad line when issues.on_error == 'raise'.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(path, WHOLE_FILE, "caption file not found")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(path, WHOLE_FILE, f"not UTF-8 text: {e}") from None
  out: list[CaptionLine] = []
  first_line: dict[str, int] = {}
  for lineno, raw in enumerate(text.splitlines(), start=1):
    line = raw.strip()
    if not line:
      continue
    parts = line.split(maxsplit=1)
    cap_id = parts[0]
    caption = parts[1].strip() if len(parts) > 1 else ""
    if cap_id in first_line:
      issues.report(DataError(path, cap_id, f"duplicate caption id (line {lineno}; first seen on "
                                            f"line {first_line[cap_id]})"))
      continue
    first_line[cap_id] = lineno
    if not caption:
      issues.report(DataError(path, cap_id, f"empty caption (line {lineno})"))
      continue
    vid = video_id_of(cap_id)
    if not vid:
      issues.report(DataError(path, cap_id, f"caption id has no video id before '#' (line {lineno})"))
      continue
    out.append(CaptionLine(cap_id, vid, caption, lineno))
  return out


@dataclasses.dataclass(frozen=True)
class Moment:
  """A caption's moment annotation, in seconds, and its video's duration (-1: not known)."""

  start: float
  end: float
  duration: float


# Moment annotation styles: 'tvr' and 'qvhighlights' (jsonl, one caption per line),
# 'activitynet' (ActivityNet Captions json: video -> duration, timestamps, sentences) and
# 'charades_sta' (Charades-STA txt lines `<video> <start> <end>##<sentence>`, durations from the
# Charades_v1_<split>.csv files beside it when present).
MOMENT_STYLES = ("tvr", "qvhighlights", "activitynet", "charades_sta")


def check_moment(path: str | os.PathLike, item: str, split: str, video: str, start: float, end: float,
                 duration: float) -> Optional[DataError]:
  """The DataError of an annotation that cannot be a moment of its video, None when it is sound.

  A moment is kept as annotated, never clipped: one that ends before it starts, has no length,
  starts before 0 or ends after a known duration is reported with its split and video.
  """
  where = f"{split} split, video {video!r}: moment [{start:g}, {end:g}] s"
  if not all(np.isfinite([start, end, duration])):
    return DataError(path, item, f"{where} has NaN or inf values (duration {duration:g})")
  if end < start:
    return DataError(path, item, f"{where} ends before it starts")
  if end == start:
    return DataError(path, item, f"{where} has no length")
  if start < 0:
    return DataError(path, item, f"{where} starts before 0")
  if duration >= 0 and end > duration:
    return DataError(path, item, f"{where} ends after the video's duration {duration:g} s")
  if duration == 0:
    return DataError(path, item, f"{where}: the video's duration is 0")
  return None


_Annotation = tuple[str, str, float, float, float]  # video, text, start, end, duration


def _release_jsonl(path: pathlib.Path, style: str) -> Iterator[tuple[str, _Annotation | Exception]]:
  """TVR / QVHighlights release files: one JSON object per caption."""
  keys = {"tvr": ("vid_name", "desc"), "qvhighlights": ("vid", "query")}[style]
  with open(path, encoding="utf-8") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        rec = json.loads(raw)
        vid, text, duration = str(rec[keys[0]]), str(rec[keys[1]]), float(rec["duration"])
        if style == "tvr":
          start, end = (float(t) for t in rec["ts"])
        elif not rec.get("relevant_windows"):
          continue  # a query without windows has no moment (e.g. a test release)
        else:
          start, end = (float(t) for t in rec["relevant_windows"][0])
        yield f"line {lineno}", (vid, text, start, end, duration)
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        yield f"line {lineno}", e


def _activitynet_json(path: pathlib.Path, style: str) -> Iterator[tuple[str, _Annotation | Exception]]:
  """ActivityNet Captions: {video: {duration, timestamps: [[s, e], ...], sentences: [...]}}."""
  del style
  try:
    videos = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(videos, dict):
      raise ValueError(f"expected an object of videos, got {type(videos).__name__}")
  except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
    raise DataError(path, WHOLE_FILE, f"not an ActivityNet Captions json file: {e}") from None
  for vid, rec in videos.items():
    try:
      duration, stamps, sentences = float(rec["duration"]), rec["timestamps"], rec["sentences"]
      if len(stamps) != len(sentences):
        raise ValueError(f"{len(stamps)} timestamps for {len(sentences)} sentences")
    except (KeyError, TypeError, ValueError) as e:
      yield f"video {vid}", e
      continue
    for j, (stamp, text) in enumerate(zip(stamps, sentences)):
      try:
        start, end = (float(t) for t in stamp)
        yield f"video {vid} sentence {j}", (str(vid), str(text), start, end, duration)
      except (TypeError, ValueError) as e:
        yield f"video {vid} sentence {j}", e


def _charades_sta_txt(path: pathlib.Path, style: str) -> Iterator[tuple[str, _Annotation | Exception]]:
  """Charades-STA: lines `<video> <start> <end>##<sentence>`; durations from the CSVs beside."""
  del style
  durations = _charades_durations(path.parent)
  for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not raw.strip():
      continue
    try:
      head, text = raw.split("##", 1)
      vid, start, end = head.split()
      yield f"line {lineno}", (vid, text, float(start), float(end), durations.get(vid, -1.0))
    except ValueError as e:
      yield f"line {lineno}", e


# style -> reader of (item, annotation or parse error).
_MOMENT_READERS = {"tvr": _release_jsonl, "qvhighlights": _release_jsonl,
                   "activitynet": _activitynet_json, "charades_sta": _charades_sta_txt}


def _charades_durations(folder: pathlib.Path) -> dict[str, float]:
  """Video id -> `length` (seconds) from the Charades_v1_{train,test}.csv files in `folder`."""
  out: dict[str, float] = {}
  for name in ("Charades_v1_train.csv", "Charades_v1_test.csv"):
    path = folder / name
    if not path.is_file():
      continue
    with open(path, encoding="utf-8", newline="") as f:
      for lineno, row in enumerate(csv.DictReader(f), start=2):
        try:
          out[str(row["id"])] = float(row["length"])
        except (KeyError, TypeError, ValueError) as e:
          raise DataError(path, f"line {lineno}", f"expected 'id' and 'length' columns: {e!r}") from None
  return out


def read_moments(path: str | os.PathLike, style: str, issues: Issues,
                 split: str = "") -> dict[tuple[str, str], Moment]:
  """Reads moment annotations keyed by (video id, caption text), validated (`check_moment`).

  The reference matches annotations to captions by their text alone; the video id is added to the
  key so that one text used in two videos cannot pick up the other video's moment. Texts are
  compared with surrounding whitespace stripped.

  Args:
    path: the annotation file.
    style: one of MOMENT_STYLES: 'tvr' (`vid_name`, `desc`, `duration`, `ts`), 'qvhighlights'
      (`vid`, `query`, `duration`, `relevant_windows`; the first window is kept, a query without
      one has no moment), 'activitynet' (ActivityNet Captions json), 'charades_sta'.
    issues: where bad annotations go (a skipped one leaves its caption without a moment).
    split: the split the file annotates, for messages.

  Returns:
    {(video_id, text.strip()): Moment}.
  """
  if style not in _MOMENT_READERS:
    raise ValueError(f"unknown moment annotation style {style!r}; expected one of {MOMENT_STYLES}")
  path = pathlib.Path(path)
  out: dict[tuple[str, str], Moment] = {}
  for item, parsed in _MOMENT_READERS[style](path, style):
    if isinstance(parsed, Exception):
      issues.report(DataError(path, item, f"malformed moment annotation: {parsed!r}"))
      continue
    vid, text, start, end, duration = parsed
    problem = check_moment(path, item, split or "?", vid, start, end, duration)
    if problem is not None:
      issues.report(problem)
      continue
    out[(vid, text.strip())] = Moment(start, end, duration)
  return out


# ----------------------------------------------------------------------------------------------
# Feature stores: HDF5 (id -> (rows, dim)) and the MS-SL BigFile (frame id -> dim vector).


def _check_values(file: pathlib.Path, item: str, arr: np.ndarray) -> Optional[DataError]:
  if arr.ndim != 2:
    return DataError(file, item, f"expected a (rows, dim) array, got shape {arr.shape}")
  if arr.shape[0] == 0:
    return DataError(file, item, "has 0 feature rows")
  if not np.all(np.isfinite(arr)):
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    return DataError(file, item, f"has {bad} NaN or inf values")
  return None


class H5Features:
  """An HDF5 file mapping ids to (rows, dim) arrays, opened with clear errors.

  Use as a context manager or call close().
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise DataError(self.path, WHOLE_FILE, "feature file not found")
    try:
      self._file = h5py.File(self.path, "r")
      self._keys = set(self._file.keys())
    except OSError as e:
      raise DataError(self.path, WHOLE_FILE, f"not a readable HDF5 file (truncated, or another "
                                             f"format): {e}") from None

  def __contains__(self, key: str) -> bool:
    return key in self._keys

  def __len__(self) -> int:
    return len(self._keys)

  def shape(self, key: str) -> tuple[int, ...]:
    """Shape of one entry from the file's metadata (no data read)."""
    try:
      node = self._file[key]
      return tuple(node.shape)
    except (KeyError, AttributeError, OSError) as e:
      raise DataError(self.path, key, f"cannot read entry: {e}") from None

  def read(self, key: str) -> np.ndarray | DataError:
    """(rows, dim) float32, or the DataError that makes the entry unusable."""
    try:
      arr = np.asarray(self._file[key][...])
    except (KeyError, OSError, TypeError, ValueError) as e:
      return DataError(self.path, key, f"cannot read entry (file damaged?): {e}")
    if not np.issubdtype(arr.dtype, np.number):
      return DataError(self.path, key, f"entry is not numeric (dtype {arr.dtype})")
    err = _check_values(self.path, key, arr)
    return err if err is not None else arr.astype(np.float32, copy=False)

  def close(self) -> None:
    """Closes the HDF5 file."""
    self._file.close()

  def __enter__(self) -> "H5Features":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class BigFile:
  """The MS-SL feature folder: feature.bin (float32 rows), id.txt, shape.txt, video2frames.txt.

  Frames of a video are the rows named by video2frames[video_id], in that order.
  """

  def __init__(self, folder: str | os.PathLike, issues: Issues):
    self.folder = pathlib.Path(folder)
    for name in ("feature.bin", "id.txt", "shape.txt", "video2frames.txt"):
      if not (self.folder / name).is_file():
        raise DataError(self.folder / name, WHOLE_FILE, "BigFile part not found")
    shape_file = self.folder / "shape.txt"
    try:
      rows, dim = (int(v) for v in shape_file.read_text().split()[:2])
    except ValueError as e:
      raise DataError(shape_file, WHOLE_FILE, f"expected '<rows> <dim>': {e}") from None
    if rows <= 0 or dim <= 0:
      raise DataError(shape_file, WHOLE_FILE, f"non-positive shape {rows} x {dim}")
    id_file = self.folder / "id.txt"
    # The authors decode ids as ISO-8859-1: every byte maps to one character.
    names = id_file.read_bytes().decode("ISO-8859-1").split()
    if len(names) != rows:
      raise DataError(id_file, WHOLE_FILE, f"{len(names)} ids but shape.txt says {rows} rows")
    bin_file = self.folder / "feature.bin"
    expected = rows * dim * 4
    if bin_file.stat().st_size != expected:
      raise DataError(bin_file, WHOLE_FILE, f"{bin_file.stat().st_size} bytes, but {rows} x {dim} "
                                            f"float32 needs {expected} (truncated?)")
    self.dim = dim
    self._rows = np.memmap(bin_file, dtype=np.float32, mode="r", shape=(rows, dim))
    counts = collections.Counter(names)
    self._ambiguous = {n for n, c in counts.items() if c > 1}
    for name in sorted(self._ambiguous):
      issues.report(DataError(id_file, name, f"duplicate frame id ({counts[name]} rows)"))
    self._index = {n: i for i, n in enumerate(names)}
    v2f_file = self.folder / "video2frames.txt"
    try:
      v2f = ast.literal_eval(v2f_file.read_text(encoding="ISO-8859-1"))
      if not isinstance(v2f, dict):
        raise ValueError(f"expected a dict literal, got {type(v2f).__name__}")
    except (ValueError, SyntaxError) as e:
      raise DataError(v2f_file, WHOLE_FILE, f"not a Python dict literal of video -> frame ids: {e}") from None
    self.video2frames: dict[str, list[str]] = {str(k): [str(x) for x in v] for k, v in v2f.items()}
    self.v2f_file = v2f_file

  def __contains__(self, video_id: str) -> bool:
    return video_id in self.video2frames

  def shape(self, video_id: str) -> tuple[int, int]:
    """(T, dim) of a video from video2frames.txt (no data read)."""
    return (len(self.video2frames[video_id]), self.dim)

  def read(self, video_id: str) -> np.ndarray | DataError:
    """(T, dim) float32 frames of one video, or the DataError that makes it unusable."""
    frames = self.video2frames[video_id]
    rows = []
    for frame in frames:
      if frame in self._ambiguous:
        return DataError(self.folder / "id.txt", video_id, f"frame {frame!r} has a duplicate id")
      if frame not in self._index:
        return DataError(self.folder / "id.txt", video_id, f"frame {frame!r} (from video2frames.txt) "
                                                           "is not in id.txt")
      rows.append(self._index[frame])
    if not rows:
      arr = np.zeros((0, self.dim), np.float32)
    else:
      arr = np.asarray(self._rows[np.asarray(rows, np.int64)], np.float32)
    err = _check_values(self.folder / "feature.bin", video_id, arr)
    return err if err is not None else arr

  def close(self) -> None:
    """Drops the memory map of feature.bin."""
    self._rows = None

  def __enter__(self) -> "BigFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------------------------
# Where each collection keeps its files.

# The benchmark names used in configs -> the authors' folder names.
COLLECTIONS = {"tvr": "tvr", "activitynet": "activitynet", "charades": "charades",
               "qvhighlights": "qvhighlight"}
# The MS-SL feature folder each collection ships (TVR: I3D+ResNet, ActivityNet: I3D,
# Charades: I3D RGB from LGI).
MSSL_DEFAULT_FEATURES = {"tvr": "i3d_resnet", "activitynet": "i3d", "charades": "i3d_rgb_lgi"}
SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Every path of one collection and feature variant.

  Attributes:
    collection: the authors' folder name.
    visual_feature: 'clip' (CLIP-L/14 h5), 'clipsf' (QVHighlights SlowFast+CLIP h5), or an MS-SL
      BigFile folder name.
    folder: <root>/<collection>.
    video_features: the h5 file, or the BigFile folder.
    text_features: the token-feature h5 file.
    caption_files: split -> caption file (test only when it exists).
    moment_files: split -> jsonl (only those found).
    moment_style: one of MOMENT_STYLES, or None.
    strip_video_prefix: prefix that caption video ids carry and feature keys lack ('v_' for
      ActivityNet's CLIP features).
  """

  collection: str
  visual_feature: str
  folder: pathlib.Path
  video_features: pathlib.Path
  text_features: pathlib.Path
  caption_files: dict[str, pathlib.Path]
  moment_files: dict[str, pathlib.Path]
  moment_style: Optional[str]
  strip_video_prefix: str

  @property
  def is_bigfile(self) -> bool:
    """Whether the video features are an MS-SL BigFile folder (else one h5 file)."""
    return self.visual_feature not in ("clip", "clipsf")

  def feature_key(self, video_id: str) -> str:
    """Key of a caption's video in the video feature store."""
    p = self.strip_video_prefix
    return video_id[len(p):] if p and video_id.startswith(p) else video_id


# Moment annotation files by collection: (style, {split: file name}), looked for in the collection
# folder and in its TextData/. ActivityNet Captions: the dense-captioning release (val = val_1,
# test = val_2); Charades-STA: its train and test files (val and test are read from the test file).
MOMENT_FILES = {
    "tvr": ("tvr", {"train": "tvr_train_release.jsonl", "val": "tvr_val_release.jsonl"}),
    "qvhighlight": ("qvhighlights", {"train": "highlight_train_release.jsonl",
                                     "val": "highlight_val_release.jsonl"}),
    "activitynet": ("activitynet", {"train": "train.json", "val": "val_1.json", "test": "val_2.json"}),
    "charades": ("charades_sta", {"train": "charades_sta_train.txt", "val": "charades_sta_test.txt",
                                  "test": "charades_sta_test.txt"}),
}


def resolve_layout(root: str | os.PathLike, name: str, visual_feature: str = "clip") -> Layout:
  """Paths of one benchmark under `root`, checking that the required ones exist.

  Args:
    root: folder holding `<collection>/` (the TFDS manual dir).
    name: 'tvr', 'activitynet', 'charades' or 'qvhighlights'.
    visual_feature: 'clip', 'clipsf' (QVHighlights) or an MS-SL feature folder name.

  Returns:
    The Layout.

  Raises:
    DataError: a required file or folder is missing, or the variant does not exist for `name`.
  """
  if name not in COLLECTIONS:
    raise ConfigError(f"unknown benchmark {name!r}; expected one of {sorted(COLLECTIONS)}")
  c = COLLECTIONS[name]
  folder = pathlib.Path(root) / c
  if not folder.is_dir():
    raise DataError(folder, WHOLE_FILE, f"collection folder not found (expected <root>/{c}/)")
  if name == "qvhighlights" and visual_feature == "clip":
    visual_feature = "clipsf"  # QVHighlights only ships the SlowFast+CLIP files
  if visual_feature == "clip":
    video = folder / "FeatureData" / f"{c}_clip_L14.h5"
    text = folder / "TextData" / f"{c}_clip_L14.h5"
  elif visual_feature == "clipsf":
    if name != "qvhighlights":
      raise ConfigError(f"visual_feature 'clipsf' is QVHighlights' layout, not {name!r}'s")
    video = folder / "FeatureData" / f"{c}_slowfast_clip.h5"
    text = folder / "TextData" / f"{c}_slowfast_clip_text.h5"
  else:
    video = folder / "FeatureData" / visual_feature
    text = folder / "TextData" / f"roberta_{c}_query_feat.hdf5"
  if not video.exists():
    raise DataError(video, WHOLE_FILE, "video feature file not found")
  if not text.exists():
    raise DataError(text, WHOLE_FILE, "text feature file not found")
  captions = {}
  for split in SPLITS:
    p = folder / "TextData" / f"{c}{split}.caption.txt"
    if p.is_file():
      captions[split] = p
    elif split in REQUIRED_SPLITS:
      raise DataError(p, WHOLE_FILE, "caption file not found")
  moments: dict[str, pathlib.Path] = {}
  style = None
  if c in MOMENT_FILES:
    style, files = MOMENT_FILES[c]
    for split, fname in files.items():
      for cand in (folder / fname, folder / "TextData" / fname):
        if cand.is_file():
          moments[split] = cand
          break
  prefix = "v_" if (c == "activitynet" and visual_feature == "clip") else ""
  return Layout(c, visual_feature, folder, video, text, captions, moments, style, prefix)


def most_common_dim(dims: Iterable[int]) -> Optional[int]:
  """The feature size most entries have (ties: the smallest), None for no entries."""
  counts = collections.Counter(dims)
  if not counts:
    return None
  best = max(counts.values())
  return min(d for d, n in counts.items() if n == best)


def ordered_unique(items: Sequence[str]) -> list[str]:
  """Items in order of first appearance."""
  return list(dict.fromkeys(items))

