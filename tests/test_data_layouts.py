"""Fixture trees in the authors' layouts -> TFDS ArrayRecord -> grain: counts, shapes, ids, values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prvr_jax.data import pipeline
from prvr_jax.data.preprocess import l2_normalize, resample_to_fixed_length
from tests import test_data_helpers as h


def _check_examples(summary, tree, *, feature_key_differs=False):
  """Every split's examples equal the source tree, in caption-file order."""
  assert set(summary["splits"]) == set(tree)
  for split, videos in tree.items():
    s = summary["splits"][split]
    assert s["videos"] == len(videos)
    assert s["captions"] == sum(len(v.captions) for v in videos)
    assert s["frames"] == sum(len(v.frames) for v in videos)
    assert s["skipped"] == []
    examples = h.read_all(summary["dataset_dir"], split)
    assert [e["video_id"].decode() for e in examples] == [v.video_id for v in videos]
    for e, v in zip(examples, videos):
      assert e["feature_key"].decode() == v.feature_key
      if feature_key_differs:
        assert e["feature_key"].decode() != e["video_id"].decode()
      np.testing.assert_array_equal(e["frames"], v.frames)
      assert [c.decode() for c in e["caption_ids"]] == [c.caption_id for c in v.captions]
      assert [c.decode() for c in e["caption_texts"]] == [c.text for c in v.captions]
      for got, c in zip(pipeline.split_captions(e), v.captions):
        np.testing.assert_array_equal(got, c.tokens)


def _check_grain(summary, tree, split="val"):
  """Eval iterators through grain give every video / caption once, with the loader's values."""
  videos = tree[split]
  ddir = summary["dataset_dir"]
  vds = pipeline.eval_video_dataset(ddir, split, batch_size=4)
  got = {}
  for batch in pipeline.to_iterator(vds):
    for i in np.flatnonzero(batch["video_valid"]):
      got[int(batch["video_index"][i])] = batch["video_frames"][i]
  assert sorted(got) == list(range(len(videos)))
  for i, v in enumerate(videos):
    np.testing.assert_allclose(got[i], resample_to_fixed_length(v.frames, 128), rtol=1e-6, atol=1e-6)
  caps = [(vi, c) for vi, v in enumerate(videos) for c in v.captions]
  qds = pipeline.eval_query_dataset(ddir, split, batch_size=8)
  seen = []
  for batch in pipeline.to_iterator(qds):
    for i in np.flatnonzero(batch["query_valid"]):
      q = int(batch["query_index"][i])
      vi, c = caps[q]
      assert batch["gt_video_index"][i] == vi
      n = len(c.tokens)
      assert batch["text_mask"][i].sum() == n
      np.testing.assert_allclose(batch["text_feat"][i, :n], l2_normalize(c.tokens), rtol=1e-6, atol=1e-6)
      assert not batch["text_feat"][i, n:].any()
      seen.append(q)
  assert sorted(seen) == list(range(len(caps)))


def test_tvr_clip_layout_with_moments(tmp_path):
  tree = h.write_clip_collection(tmp_path / "root", "tvr", moments=True)
  summary = h.build(tmp_path, "tvr", tmp_path / "root")
  assert (summary["video_dim"], summary["text_dim"]) == (24, 16)  # from the files, not 768
  _check_examples(summary, tree)
  _check_grain(summary, tree)
  # Moments come from tvr_<split>_release.jsonl, matched by (video, text) despite the trailing space.
  ex = h.read_all(summary["dataset_dir"], "train")
  for e, v in zip(ex, tree["train"]):
    np.testing.assert_allclose(e["moments"], [[k, k + 2.5] for k in range(len(v.captions))])
    assert e["duration"] == pytest.approx(60.0 + len(v.frames))
  assert summary["splits"]["train"]["captions_with_moments"] == summary["splits"]["train"]["captions"]
  written = json.loads((tmp_path / "work" / "prepare_summary.json").read_text())
  assert written["splits"]["val"]["videos"] == len(tree["val"])


def test_activitynet_v_prefix_quirk(tmp_path):
  tree = h.write_clip_collection(tmp_path / "root", "activitynet")
  assert all(v.video_id.startswith("v_") and not v.feature_key.startswith("v_")
             for vs in tree.values() for v in vs)
  summary = h.build(tmp_path, "activitynet", tmp_path / "root")
  _check_examples(summary, tree, feature_key_differs=True)
  _check_grain(summary, tree)
  ex = h.read_all(summary["dataset_dir"], "val")
  assert all(e["duration"] == -1 and (e["moments"] == -1).all() for e in ex)  # no annotations


def test_qvhighlights_slowfast_clip_files(tmp_path):
  tree = h.write_clip_collection(tmp_path / "root", "qvhighlights", video_dim=2816, text_dim=512,
                                 splits=(("train", 3), ("val", 3)), moments=True)
  summary = h.build(tmp_path, "qvhighlights", tmp_path / "root")
  assert summary["visual_feature"] == "clipsf"
  assert (summary["video_dim"], summary["text_dim"]) == (2816, 512)
  _check_examples(summary, tree)
  _check_grain(summary, tree)
  ex = h.read_all(summary["dataset_dir"], "train")
  # Moment-DETR jsonl: `query` text, the first relevant window, the video duration.
  np.testing.assert_allclose(ex[0]["moments"][0], [0.0, 4.0])
  assert ex[0]["duration"] == 150


def test_charades_with_test_split(tmp_path):
  tree = h.write_clip_collection(tmp_path / "root", "charades", splits=(("train", 5), ("val", 3), ("test", 4)))
  summary = h.build(tmp_path, "charades", tmp_path / "root")
  assert set(summary["splits"]) == {"train", "val", "test"}
  _check_examples(summary, tree)
  _check_grain(summary, tree, split="test")


@pytest.mark.parametrize("name", ["activitynet", "charades"])
def test_activitynet_and_charades_moments_from_their_releases(tmp_path, name):
  """ActivityNet Captions json (train.json, val_1.json; keys with the `v_` prefix, sentences with
  a leading space) and Charades-STA txt + Charades_v1_*.csv durations."""
  tree = h.write_clip_collection(tmp_path / "root", name, splits=(("train", 4), ("val", 3)), moments=True)
  summary = h.build(tmp_path, name, tmp_path / "root")
  for split in ("train", "val"):
    assert summary["splits"][split]["captions_with_moments"] == summary["splits"][split]["captions"]
    for e, v in zip(h.read_all(summary["dataset_dir"], split), tree[split]):
      want = [h.moment_of(name, v, k)[:2] for k in range(len(v.captions))]
      np.testing.assert_allclose(e["moments"], want)
      assert e["duration"] == pytest.approx(h.moment_of(name, v, 0)[2])


@pytest.mark.parametrize("name,feature", [("tvr", "i3d_resnet"), ("activitynet", "i3d"),
                                          ("charades", "i3d_rgb_lgi")])
def test_mssl_bigfile_layout(tmp_path, name, feature):
  tree = h.write_mssl_collection(tmp_path / "root", name, feature)
  summary = h.build(tmp_path, name, tmp_path / "root", visual_feature=feature)
  assert summary["visual_feature"] == feature
  assert (summary["video_dim"], summary["text_dim"]) == (20, 12)
  _check_examples(summary, tree)  # frames in video2frames order although feature.bin is shuffled
  _check_grain(summary, tree)
  assert f"/{feature}/" in summary["dataset_dir"]


def test_clip_and_mssl_variants_build_side_by_side(tmp_path):
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "tvr")
  h.write_mssl_collection(root, "tvr", "i3d_resnet", captions_of=tree)
  clip = h.build(tmp_path, "tvr", root)
  mssl = h.build(tmp_path, "tvr", root, visual_feature="i3d_resnet")
  assert clip["dataset_dir"] != mssl["dataset_dir"]
  assert (clip["video_dim"], mssl["video_dim"]) == (24, 20)


def test_real_benchmark_needs_root(tmp_path):
  with pytest.raises(ValueError, match="data.root"):
    h.build(tmp_path, "tvr")
