"""Writes videos and captions in the authors' CLIP-feature layout, so their code can read them.

  python -m prvr_jax.data.export_layout --out DIR [--collection tvr] [--config configs/synthetic.py]

writes the synthetic benchmark of `config.data.synthetic` (any `--config.data.synthetic.<key>=`
override applies) as

  DIR/<c>/TextData/<c>{train,val,test}.caption.txt   `<caption id> <caption text>` per line
  DIR/<c>/FeatureData/<c>_clip_L14.h5                video id -> (T, D_v) frame features
  DIR/<c>/TextData/<c>_clip_L14.h5                   caption id -> (L, D_t) token features

which is what the authors' `Datasets/builder.py` reads for `visual_feature='clip'` (and what
`prvr_jax.data.formats` reads back: a round trip gives the same records). This is how the two codes
are trained on the same data (README, "Training parity with the authors' code").
"""

from __future__ import annotations

import pathlib
import sys
from typing import Iterable, Mapping

import h5py
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from prvr_jax.data import synthetic
from prvr_jax.data.builders.records import VideoRecord
from prvr_jax.data.formats import COLLECTIONS
from prvr_jax.utils.files import atomic_dir



def _define_flags() -> None:
  # Only when run as a command: tests import this module beside others whose absl flags have
  # the same names (`--config`).
  flags.DEFINE_string("out", None, "root folder to write <root>/<collection>/ into", required=True)
  flags.DEFINE_string("collection", "tvr", f"benchmark layout: one of {sorted(COLLECTIONS)}")
  config_flags.DEFINE_config_file("config", "configs/synthetic.py",
                                  "config whose data.synthetic spec is written")


def write_authors_layout(root: str | pathlib.Path, benchmark: str,
                         splits: Mapping[str, Iterable[VideoRecord]]) -> pathlib.Path:
  """Writes records as the authors' CLIP feature files of `benchmark` under `root`.

  Args:
    root: the data root (the authors' `data_root`); `root/<collection>/` is created.
    benchmark: a key of `formats.COLLECTIONS` (e.g. 'tvr'); ActivityNet's `v_` video-id prefix is
      not added (records carry the ids the captions use).
    splits: split name -> records in caption-file order.

  Returns:
    The collection folder. It is written under a temporary name and renamed when complete, so an
    interrupted export leaves no half-written folder.
  """
  collection = COLLECTIONS[benchmark]
  folder = pathlib.Path(root) / collection
  with atomic_dir(folder) as tmp:
    (tmp / "TextData").mkdir(parents=True)
    (tmp / "FeatureData").mkdir(parents=True)
    with h5py.File(tmp / "FeatureData" / f"{collection}_clip_L14.h5", "w") as videos, \
         h5py.File(tmp / "TextData" / f"{collection}_clip_L14.h5", "w") as texts:
      for split, records in splits.items():
        lines = []
        for rec in records:
          videos.create_dataset(rec.feature_key, data=np.asarray(rec.frames, np.float32))
          for cap_id, text, tokens in zip(rec.caption_ids, rec.caption_texts, rec.caption_tokens):
            texts.create_dataset(cap_id, data=np.asarray(tokens, np.float32))
            lines.append(f"{cap_id} {text}")
        (tmp / "TextData" / f"{collection}{split}.caption.txt").write_text("\n".join(lines) + "\n")
  return folder


def export_synthetic(root: str | pathlib.Path, benchmark: str,
                     spec: synthetic.SyntheticSpec) -> pathlib.Path:
  """The synthetic benchmark of `spec` (train, val and test) in the authors' layout."""
  world = synthetic.make_world(spec)
  splits = {split: synthetic.generate_split(spec, split, world)
            for split in ("train", "val", "test") if spec.num_videos(split) > 0}
  return write_authors_layout(root, benchmark, splits)


def main(argv: list[str]) -> int:
  del argv
  args = flags.FLAGS
  if args.collection not in COLLECTIONS:
    print(f"error: --collection {args.collection!r}: expected one of {sorted(COLLECTIONS)}",
          file=sys.stderr)
    return 2
  spec = synthetic.SyntheticSpec.from_dict(dict(args.config.data.synthetic))
  folder = export_synthetic(args.out, args.collection, spec)
  print(f"wrote {folder}")
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
