"""prepare(): summary printed and written atomically, reuse / overwrite; configs; loader bench."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import data_defaults
from configs import synthetic as synthetic_config
from prvr_jax.data import pipeline
from prvr_jax.data.bench_data import bench_data
from prvr_jax.data.config import DataConfig
from prvr_jax.data.prepare import SUMMARY_FILE, format_summary, prepare
from tests import test_data_helpers as h


def _small_synthetic(**overrides) -> DataConfig:
  config = synthetic_config.get_config()
  config.data.synthetic.num_train_videos = 20
  config.data.synthetic.num_val_videos = 7
  config.data.synthetic.num_test_videos = 3
  config.data.batch_size = 8
  config.data.update(overrides)
  return DataConfig.from_config_dict(config.data)


def test_prepare_prints_and_writes_the_summary(tmp_path):
  printed = []
  summary = prepare(_small_synthetic(), tmp_path, progress=True, print_fn=printed.append)
  on_disk = json.loads((tmp_path / SUMMARY_FILE).read_text())
  assert on_disk == summary
  assert set(summary["splits"]) == {"train", "val", "test"}
  for split, n in (("train", 20), ("val", 7), ("test", 3)):
    s = summary["splits"][split]
    assert s["videos"] == n and s["captions"] >= 2 * n and s["frames"] > 0 and s["skipped"] == []
  assert summary["reused"] is False
  table = printed[0]
  assert "train" in table and str(summary["splits"]["train"]["captions"]) in table
  # Written atomically: no temporary file is left beside it.
  assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [SUMMARY_FILE]
  again = prepare(_small_synthetic(), tmp_path, progress=False, print_fn=None)
  assert again["reused"] is True and again["splits"] == summary["splits"]
  config = _small_synthetic(overwrite=True)
  assert prepare(config, tmp_path, progress=False, print_fn=None)["reused"] is False
  assert pipeline.dataset_dir_from_config(config, tmp_path) == summary["dataset_dir"]


def test_skip_summary_lists_every_skipped_item(tmp_path):
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "charades", splits=(("train", 30), ("val", 3)))
  bad = {c.caption_id for v in tree["train"] for c in v.captions}
  for v in tree["train"]:
    for c in v.captions:
      c.tokens[0, 0] = np.nan
  tree["train"][0].captions[0].tokens[0, 0] = 1.0  # one good caption keeps the split non-empty
  bad.discard(tree["train"][0].captions[0].caption_id)
  h.write_clip_files(root, "charades", tree)
  printed = []
  config = DataConfig.from_config_dict(h.data_config("charades", root, on_error="skip").data)
  summary = prepare(config, tmp_path / "work", progress=False, print_fn=printed.append)
  skipped = summary["splits"]["train"]["skipped"]
  assert bad <= {s["id"] for s in skipped}
  assert "more skipped in train" in printed[0]  # the printout stays short; the file has them all
  assert len(json.loads((tmp_path / "work" / SUMMARY_FILE).read_text())["splits"]["train"]["skipped"]) == len(skipped)


def test_config_driven_pipelines(tmp_path):
  data = _small_synthetic()
  summary = prepare(data, tmp_path, progress=False, print_fn=None)
  ddir = summary["dataset_dir"]
  train = pipeline.train_from_config(data, ddir, seed=0)
  batch = next(pipeline.iterator_from_config(data, train))
  c = data.max_captions_per_video
  assert batch["video_frames"].shape == (8, 128, data.synthetic.visual_dim)
  assert batch["text_feat"].shape[:1] == (8 * c,)
  jit_inputs, book = pipeline.split_batch(batch)
  assert set(jit_inputs) == set(pipeline.TRAIN_KEYS) and "video_index" in book
  videos, queries = pipeline.eval_from_config(data, ddir, "val")
  vb, qb = videos[0], queries[0]
  assert vb["video_frames"].shape[0] == data.eval_video_batch_size
  assert qb["text_feat"].shape[0] == data.eval_query_batch_size


def test_configs_expose_the_data_keys():
  config = synthetic_config.get_config()
  assert config.seed == 0 and config.data.name == "synthetic"
  for key in ("root", "on_error", "batch_size", "max_captions_per_video", "max_caption_tokens", "shuffle",
              "data_dir", "visual_feature", "num_workers"):
    assert key in config.data
  assert config.data.synthetic.visual_dim == 64
  with pytest.raises(ValueError, match="unknown data key"):
    data_defaults.data_section("tvr", batch_sz=3)
  with pytest.raises(ValueError, match="unknown synthetic keys"):
    data_defaults.synthetic_section(dims=3)


def test_format_summary_shows_counts():
  text = format_summary(dict(benchmark="tvr", visual_feature="clip", dataset_dir="/d", video_dim=768,
                             text_dim=768, reused=False, splits=dict(train=dict(
                                 videos=3, captions=15, frames=300, skipped=[dict(id="a#enc#0", reason="r")]))))
  assert "tvr (clip) -> /d" in text and "skipped [train] a#enc#0: r" in text


def test_bench_data_records(tmp_path):
  records = list(bench_data(batches=1, repeats=1, batch_size=4, data_dir=str(tmp_path)))
  assert [r["case"] for r in records] == ["build_tvr_shapes", "tvr_shapes_B4_threads1", "tvr_shapes_B4_threads2"]
  for r in records:
    assert r["bench"] == "data" and r["median_s"] > 0
  loader = records[1]
  assert loader["items"] == 4 and loader["queries"] == 20 and loader["caption_tokens"] == 77
  assert loader["batches_per_s"] == pytest.approx(1 / loader["median_s"])
  with pytest.raises(ValueError):
    list(bench_data(batches=0))
