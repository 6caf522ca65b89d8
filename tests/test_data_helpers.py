"""Fixture trees in the authors' and MS-SL's exact layouts, and a one-call build (used by test_data_*).

Holds no tests itself. Every writer returns what it wrote, so tests compare the built dataset with
the source values rather than with constants.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional

import h5py
import ml_collections
import numpy as np

from configs.data_defaults import data_section
from prvr_jax.data import pipeline
from prvr_jax.data.config import DataConfig
from prvr_jax.data.prepare import prepare


@dataclasses.dataclass
class Caption:
  caption_id: str
  text: str
  tokens: np.ndarray  # (L, D_t) raw


@dataclasses.dataclass
class Video:
  video_id: str  # as the captions spell it
  feature_key: str  # as the feature file spells it
  frames: np.ndarray  # (T, D_v) raw
  captions: list[Caption]


Tree = dict[str, list[Video]]  # split -> videos in caption-file order


def make_videos(rng: np.random.Generator, split: str, num_videos: int, video_dim: int, text_dim: int,
                prefix: str = "", key_prefix: str = "", captions=(1, 4)) -> list[Video]:
  """Random videos with 1-3 captions each (ids unique per split)."""
  out = []
  for i in range(num_videos):
    vid = f"{prefix}{split}vid{i:03d}_{rng.integers(1000):03d}"
    key = vid[len(prefix):] if key_prefix == "strip" else vid
    frames = rng.normal(size=(int(rng.integers(3, 300)), video_dim)).astype(np.float32)
    caps = []
    for k in range(int(rng.integers(*captions))):
      length = int(rng.integers(3, 20))
      caps.append(Caption(f"{vid}#enc#{k}", f"person does thing {k} in {split} video {i}",
                          rng.normal(size=(length, text_dim)).astype(np.float32)))
    out.append(Video(vid, key, frames, caps))
  return out


def write_caption_files(text_dir: pathlib.Path, collection: str, tree: Tree) -> None:
  text_dir.mkdir(parents=True, exist_ok=True)
  for split, videos in tree.items():
    lines = [f"{c.caption_id} {c.text}" for v in videos for c in v.captions]
    (text_dir / f"{collection}{split}.caption.txt").write_text("\n".join(lines) + "\n")


def write_h5(path: pathlib.Path, entries: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, "w") as f:
    for key, value in entries.items():
      f.create_dataset(key, data=value)


def write_clip_collection(root: pathlib.Path, name: str, *, splits=(("train", 7), ("val", 5)),
                          video_dim: int = 24, text_dim: int = 16, seed: int = 0,
                          moments: bool = False) -> Tree:
  """The authors' CLIP layout of benchmark `name` under root/<collection>/, with its quirks.

  ActivityNet: caption video ids carry `v_`, feature keys do not. QVHighlights: slowfast_clip file
  names. moments=True: the annotation files (`write_moment_files`).
  """
  rng = np.random.default_rng(seed)
  anet = name == "activitynet"
  tree = {split: make_videos(rng, split, n, video_dim, text_dim, prefix="v_" if anet else "",
                             key_prefix="strip" if anet else "") for split, n in splits}
  write_clip_files(root, name, tree)
  collection = {"qvhighlights": "qvhighlight"}.get(name, name)
  folder = root / collection
  if moments:
    write_moment_files(folder, name, tree)
  return tree


def moment_of(name: str, video: Video, k: int) -> tuple[float, float, float]:
  """(start, end, duration) that `write_moment_files` gives caption k of `video`."""
  if name == "tvr":
    return float(k), float(k) + 2.5, 60.0 + len(video.frames)
  if name == "qvhighlights":
    return 2.0 * k, 2.0 * k + 4, 150.0
  return 1.5 * k, 1.5 * k + 3.0, 30.0 + len(video.frames)


def write_moment_files(folder: pathlib.Path, name: str, tree: Tree) -> None:
  """The collection's moment annotations in the original releases' formats: TVR / QVHighlights
  jsonl, ActivityNet Captions json (train.json, val_1.json), Charades-STA txt (train, test = val)
  with its Charades_v1_*.csv durations. Texts carry stray whitespace, as the releases do."""
  for split in ("train", "val"):
    videos = tree.get(split, [])
    if name in ("tvr", "qvhighlights"):
      lines = []
      for v in videos:
        for k, c in enumerate(v.captions):
          start, end, duration = moment_of(name, v, k)
          if name == "tvr":
            lines.append(dict(desc_id=len(lines), vid_name=v.video_id, desc=c.text + " ",
                              duration=duration, ts=[start, end]))
          else:
            lines.append(dict(qid=len(lines), vid=v.video_id, query=c.text, duration=duration,
                              relevant_windows=[[start, end], [100, 102]]))
      fname = {"tvr": f"tvr_{split}_release.jsonl", "qvhighlights": f"highlight_{split}_release.jsonl"}[name]
      (folder / fname).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    elif name == "activitynet":
      entries = {v.video_id: dict(duration=moment_of(name, v, 0)[2],
                                  timestamps=[list(moment_of(name, v, k)[:2]) for k in range(len(v.captions))],
                                  sentences=[" " + c.text for c in v.captions]) for v in videos}
      (folder / {"train": "train.json", "val": "val_1.json"}[split]).write_text(json.dumps(entries))
    elif name == "charades":
      lines = [f"{v.video_id} {moment_of(name, v, k)[0]} {moment_of(name, v, k)[1]}##{c.text}"
               for v in videos for k, c in enumerate(v.captions)]
      stem = {"train": "train", "val": "test"}[split]
      (folder / f"charades_sta_{stem}.txt").write_text("\n".join(lines) + "\n")
      rows = ["id,subject,scene,length"] + [f"{v.video_id},S1,kitchen,{moment_of(name, v, 0)[2]}" for v in videos]
      (folder / f"Charades_v1_{stem}.csv").write_text("\n".join(rows) + "\n")


def clip_paths(root: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """(video h5, text h5, TextData folder) of the CLIP layout of `name`."""
  collection = {"qvhighlights": "qvhighlight"}.get(name, name)
  folder = root / collection
  if name == "qvhighlights":
    return (folder / "FeatureData" / f"{collection}_slowfast_clip.h5",
            folder / "TextData" / f"{collection}_slowfast_clip_text.h5", folder / "TextData")
  return (folder / "FeatureData" / f"{collection}_clip_L14.h5",
          folder / "TextData" / f"{collection}_clip_L14.h5", folder / "TextData")


def write_clip_files(root: pathlib.Path, name: str, tree: Tree, *, drop_videos=(), drop_captions=()) -> None:
  """(Re)writes the feature and caption files of a CLIP-layout tree; dropped keys are left out."""
  video_file, text_file, text_dir = clip_paths(root, name)
  write_h5(video_file, {v.feature_key: v.frames for vs in tree.values() for v in vs
                        if v.feature_key not in drop_videos})
  write_h5(text_file, {c.caption_id: c.tokens for vs in tree.values() for v in vs for c in v.captions
                       if c.caption_id not in drop_captions})
  write_caption_files(text_dir, {"qvhighlights": "qvhighlight"}.get(name, name), tree)


def write_bigfile(folder: pathlib.Path, names: list[str], rows: np.ndarray,
                  video2frames: dict[str, list[str]]) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "shape.txt").write_text(f"{rows.shape[0]} {rows.shape[1]}\n")
  (folder / "id.txt").write_text(" ".join(names) + "\n")
  rows.astype(np.float32).tofile(folder / "feature.bin")
  (folder / "video2frames.txt").write_text(repr(video2frames))


def write_mssl_collection(root: pathlib.Path, name: str, feature: str, *, splits=(("train", 6), ("val", 4)),
                          video_dim: int = 20, text_dim: int = 12, seed: int = 1,
                          captions_of: Optional[Tree] = None) -> Tree:
  """MS-SL layout: FeatureData/<feature>/ BigFile and TextData/roberta_<c>_query_feat.hdf5.

  Frames are stored shuffled in feature.bin, so reading them in video2frames order is tested.
  `captions_of`: reuse the ids and captions of an existing tree (the caption files are shared by
  both layouts of a collection); features are drawn anew.
  """
  rng = np.random.default_rng(seed)
  if captions_of is not None:
    tree = {split: [Video(v.video_id, v.video_id, rng.normal(size=(len(v.frames), video_dim)).astype(np.float32),
                          [Caption(c.caption_id, c.text, rng.normal(size=(len(c.tokens), text_dim)).astype(np.float32))
                           for c in v.captions]) for v in vs] for split, vs in captions_of.items()}
  else:
    tree = {split: make_videos(rng, split, n, video_dim, text_dim, prefix="v_" if name == "activitynet" else "")
            for split, n in splits}
  folder = root / name
  names, rows, v2f = [], [], {}
  for vs in tree.values():
    for v in vs:
      v.frames = v.frames[:40]
      frame_ids = [f"{v.video_id}_{t}" for t in range(len(v.frames))]
      v2f[v.video_id] = frame_ids
      names += frame_ids
      rows.append(v.frames)
  rows = np.concatenate(rows)
  perm = rng.permutation(len(names))
  write_bigfile(folder / "FeatureData" / feature, [names[i] for i in perm], rows[perm], v2f)
  write_h5(folder / "TextData" / f"roberta_{name}_query_feat.hdf5",
           {c.caption_id: c.tokens for vs in tree.values() for v in vs for c in v.captions})
  write_caption_files(folder / "TextData", name, tree)
  return tree


def data_config(name: str, root: pathlib.Path | str = "", **data_overrides: Any) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_section(name, root=str(root), **data_overrides)
  return config


def build(tmp_path: pathlib.Path, name: str, root: Optional[pathlib.Path] = None, **data_overrides: Any
          ) -> dict[str, Any]:
  """prepare() into tmp_path/work; returns the summary."""
  config = data_config(name, root or "", **data_overrides)
  return prepare(DataConfig.from_config_dict(config.data), tmp_path / "work", progress=False,
                 print_fn=None)


def read_all(dataset_dir: str, split: str) -> list[dict[str, Any]]:
  """Every example of a split through the pipeline's record source."""
  source = pipeline.RecordSource(dataset_dir, split)
  return [source[i] for i in range(len(source))]
