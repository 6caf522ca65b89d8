"""One test per bad-input case: a clear DataError naming file and item by default; with
data.on_error='skip' the bad items are skipped, listed with reasons, and everything else is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prvr_jax.data.formats import DataError
from tests import test_data_helpers as h


@pytest.fixture
def tvr(tmp_path):
  """(root, tree) of a small TVR tree in the authors' CLIP layout."""
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "tvr", splits=(("train", 4), ("val", 3)))
  return root, tree


def _all_ids(tree, split):
  return ({v.video_id for v in tree[split]}, {c.caption_id for v in tree[split] for c in v.captions})


def _built_ids(summary, split):
  ex = h.read_all(summary["dataset_dir"], split)
  return ({e["video_id"].decode() for e in ex}, {c.decode() for e in ex for c in e["caption_ids"]})


def _expect_raise(tmp_path, root, file_part: str, item: str, reason: str, **kw):
  with pytest.raises(DataError) as err:
    h.build(tmp_path, kw.pop("name", "tvr"), root, **kw)
  msg = str(err.value)
  assert file_part in err.value.file and file_part in msg, msg
  assert err.value.item == item and item in msg, msg
  assert reason in msg, msg
  # Nothing was left behind as if it had been built.
  assert not list((tmp_path / "work").glob("tfds/*/*/*/metadata.json"))


def _expect_skip(tmp_path, root, tree, split, skipped_ids: set[str], reason: str, **kw):
  """Builds with on_error='skip'; the skipped ids are listed and only they are missing.

  A video all of whose captions are skipped is skipped too (and listed).
  """
  summary = h.build(tmp_path, kw.pop("name", "tvr"), root, on_error="skip", **kw)
  listed = summary["splits"][split]["skipped"]
  orphaned = {v.video_id for v in tree[split] if {c.caption_id for c in v.captions} <= skipped_ids}
  assert {s["id"] for s in listed} == skipped_ids | orphaned, listed
  assert any(reason in s["reason"] for s in listed), listed
  videos, captions = _all_ids(tree, split)
  got_v, got_c = _built_ids(summary, split)
  # Nothing dropped silently: every input id is either built or listed as skipped.
  assert got_v == videos - orphaned - skipped_ids
  assert got_c == captions - skipped_ids
  assert summary["splits"][split]["captions"] == len(got_c)
  on_disk = json.loads((tmp_path / "work" / "prepare_summary.json").read_text())
  assert on_disk["splits"][split]["skipped"] == listed
  return summary


# --- missing files -----------------------------------------------------------------------------


def test_missing_caption_file(tmp_path, tvr):
  root, _ = tvr
  (root / "tvr" / "TextData" / "tvrval.caption.txt").unlink()
  for on_error in ("raise", "skip"):  # a whole file is not an item: it always stops the build
    _expect_raise(tmp_path, root, "tvrval.caption.txt", "(whole file)", "not found", on_error=on_error)


def test_missing_video_feature_file(tmp_path, tvr):
  root, _ = tvr
  (root / "tvr" / "FeatureData" / "tvr_clip_L14.h5").unlink()
  _expect_raise(tmp_path, root, "FeatureData/tvr_clip_L14.h5", "(whole file)", "not found")


def test_missing_text_feature_file(tmp_path, tvr):
  root, _ = tvr
  (root / "tvr" / "TextData" / "tvr_clip_L14.h5").unlink()
  _expect_raise(tmp_path, root, "TextData/tvr_clip_L14.h5", "(whole file)", "not found")


def test_missing_bigfile_part(tmp_path):
  root = tmp_path / "root"
  h.write_mssl_collection(root, "tvr", "i3d_resnet")
  (root / "tvr" / "FeatureData" / "i3d_resnet" / "shape.txt").unlink()
  _expect_raise(tmp_path, root, "i3d_resnet/shape.txt", "(whole file)", "not found",
                visual_feature="i3d_resnet")


# --- a caption whose video has no features ------------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_caption_whose_video_has_no_features(tmp_path, tvr, on_error):
  root, tree = tvr
  video = tree["train"][1]
  h.write_clip_files(root, "tvr", tree, drop_videos={video.feature_key})
  if on_error == "raise":
    _expect_raise(tmp_path, root, "tvr_clip_L14.h5", video.captions[0].caption_id, "has no features")
  else:
    s = _expect_skip(tmp_path, root, tree, "train", {c.caption_id for c in video.captions}, "has no features")
    assert s["splits"]["train"]["videos"] == 3


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_caption_without_token_features(tmp_path, tvr, on_error):
  root, tree = tvr
  cap = tree["val"][0].captions[0]
  h.write_clip_files(root, "tvr", tree, drop_captions={cap.caption_id})
  if on_error == "raise":
    _expect_raise(tmp_path, root, "TextData/tvr_clip_L14.h5", cap.caption_id, "no token features")
  else:
    _expect_skip(tmp_path, root, tree, "val", {cap.caption_id}, "no token features")


# --- zero rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_video_with_zero_feature_rows(tmp_path, tvr, on_error):
  root, tree = tvr
  video = tree["val"][2]
  video.frames = video.frames[:0]
  h.write_clip_files(root, "tvr", tree)
  if on_error == "raise":
    _expect_raise(tmp_path, root, "FeatureData/tvr_clip_L14.h5", video.video_id, "0 feature rows")
  else:
    _expect_skip(tmp_path, root, tree, "val", {video.video_id} | {c.caption_id for c in video.captions},
                 "0 feature rows")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_caption_with_zero_token_rows(tmp_path, tvr, on_error):
  root, tree = tvr
  cap = tree["train"][0].captions[0]
  cap.tokens = cap.tokens[:0]
  h.write_clip_files(root, "tvr", tree)
  if on_error == "raise":
    _expect_raise(tmp_path, root, "TextData/tvr_clip_L14.h5", cap.caption_id, "expected (L >= 1")
  else:
    _expect_skip(tmp_path, root, tree, "train", {cap.caption_id}, "expected (L >= 1")


# --- NaN / inf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_nan_in_frames(tmp_path, tvr, on_error):
  root, tree = tvr
  video = tree["train"][2]
  video.frames[1, 3] = np.nan
  h.write_clip_files(root, "tvr", tree)
  if on_error == "raise":
    _expect_raise(tmp_path, root, "FeatureData/tvr_clip_L14.h5", video.video_id, "NaN or inf")
  else:
    _expect_skip(tmp_path, root, tree, "train", {video.video_id} | {c.caption_id for c in video.captions},
                 "NaN or inf")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_inf_in_tokens(tmp_path, tvr, on_error):
  root, tree = tvr
  cap = tree["val"][1].captions[-1]
  cap.tokens[-1, 0] = np.inf
  h.write_clip_files(root, "tvr", tree)
  if on_error == "raise":
    _expect_raise(tmp_path, root, "TextData/tvr_clip_L14.h5", cap.caption_id, "NaN or inf")
  else:
    _expect_skip(tmp_path, root, tree, "val", {cap.caption_id}, "NaN or inf")


# --- a dimension that differs from the rest -----------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_video_dim_differs(tmp_path, tvr, on_error):
  root, tree = tvr
  video = tree["train"][3]
  video.frames = np.zeros((5, 25), np.float32)  # the others are 24-d
  h.write_clip_files(root, "tvr", tree)
  if on_error == "raise":
    _expect_raise(tmp_path, root, "FeatureData/tvr_clip_L14.h5", video.video_id, "feature size 25 differs")
  else:
    s = _expect_skip(tmp_path, root, tree, "train", {video.video_id} | {c.caption_id for c in video.captions},
                     "feature size 25 differs")
    assert s["video_dim"] == 24


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_token_dim_differs(tmp_path, tvr, on_error):
  root, tree = tvr
  cap = tree["train"][0].captions[0]
  cap.tokens = np.ones((4, 17), np.float32)  # the others are 16-d
  h.write_clip_files(root, "tvr", tree)
  if on_error == "raise":
    _expect_raise(tmp_path, root, "TextData/tvr_clip_L14.h5", cap.caption_id, "token feature size 17 differs")
  else:
    _expect_skip(tmp_path, root, tree, "train", {cap.caption_id}, "token feature size 17 differs")


# --- duplicate ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_duplicate_caption_id(tmp_path, tvr, on_error):
  root, tree = tvr
  cap = tree["val"][0].captions[0]
  cap_file = root / "tvr" / "TextData" / "tvrval.caption.txt"
  cap_file.write_text(cap_file.read_text() + f"{cap.caption_id} a second caption under the same id\n")
  if on_error == "raise":
    _expect_raise(tmp_path, root, "tvrval.caption.txt", cap.caption_id, "duplicate caption id")
  else:
    summary = h.build(tmp_path, "tvr", root, on_error="skip")
    listed = summary["splits"]["val"]["skipped"]
    assert [s["id"] for s in listed] == [cap.caption_id] and "duplicate" in listed[0]["reason"]
    ex = h.read_all(summary["dataset_dir"], "val")
    texts = {c.decode() for e in ex for c in e["caption_texts"]}
    assert cap.text in texts and "a second caption under the same id" not in texts  # first one kept


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_duplicate_frame_id_in_bigfile(tmp_path, on_error):
  root = tmp_path / "root"
  tree = h.write_mssl_collection(root, "tvr", "i3d_resnet")
  folder = root / "tvr" / "FeatureData" / "i3d_resnet"
  video = tree["train"][0]
  names = (folder / "id.txt").read_text().split()
  j = names.index(f"{video.video_id}_1")
  names[j] = f"{video.video_id}_0"  # two rows now claim frame 0; frame 1 is gone
  (folder / "id.txt").write_text(" ".join(names))
  if on_error == "raise":
    _expect_raise(tmp_path, root, "i3d_resnet/id.txt", f"{video.video_id}_0", "duplicate frame id",
                  visual_feature="i3d_resnet")
  else:
    summary = h.build(tmp_path, "tvr", root, on_error="skip", visual_feature="i3d_resnet")
    ids = {s["id"] for s in summary["splits"]["train"]["skipped"]}
    assert ids == {f"{video.video_id}_0", video.video_id} | {c.caption_id for c in video.captions}
    assert summary["splits"]["train"]["videos"] == len(tree["train"]) - 1


# --- empty caption ------------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_empty_caption(tmp_path, tvr, on_error):
  root, tree = tvr
  cap = tree["train"][1].captions[0]
  cap_file = root / "tvr" / "TextData" / "tvrtrain.caption.txt"
  cap_file.write_text(cap_file.read_text().replace(f"{cap.caption_id} {cap.text}", f"{cap.caption_id}   "))
  if on_error == "raise":
    _expect_raise(tmp_path, root, "tvrtrain.caption.txt", cap.caption_id, "empty caption")
  else:
    _expect_skip(tmp_path, root, tree, "train", {cap.caption_id}, "empty caption")


# --- truncated or non-HDF5 files ----------------------------------------------------------------


def test_truncated_hdf5(tmp_path, tvr):
  root, _ = tvr
  path = root / "tvr" / "FeatureData" / "tvr_clip_L14.h5"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  for on_error in ("raise", "skip"):
    _expect_raise(tmp_path, root, "FeatureData/tvr_clip_L14.h5", "(whole file)", "not a readable HDF5 file",
                  on_error=on_error)


def test_non_hdf5_file(tmp_path, tvr):
  root, _ = tvr
  (root / "tvr" / "TextData" / "tvr_clip_L14.h5").write_text("caption_id,feature\nthis is CSV\n")
  _expect_raise(tmp_path, root, "TextData/tvr_clip_L14.h5", "(whole file)", "not a readable HDF5 file")


def test_truncated_bigfile(tmp_path):
  root = tmp_path / "root"
  h.write_mssl_collection(root, "tvr", "i3d_resnet")
  path = root / "tvr" / "FeatureData" / "i3d_resnet" / "feature.bin"
  path.write_bytes(path.read_bytes()[:-8])
  _expect_raise(tmp_path, root, "i3d_resnet/feature.bin", "(whole file)", "truncated",
                visual_feature="i3d_resnet")


# --- optional moment annotations -----------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_malformed_moment_line(tmp_path, on_error):
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "tvr", splits=(("train", 3), ("val", 2)), moments=True)
  jsonl = root / "tvr" / "tvr_val_release.jsonl"
  jsonl.write_text(jsonl.read_text() + '{"vid_name": "x", "desc": "no ts or duration"}\n')
  n = len(jsonl.read_text().splitlines())
  if on_error == "raise":
    _expect_raise(tmp_path, root, "tvr_val_release.jsonl", f"line {n}", "malformed moment annotation")
  else:
    s = h.build(tmp_path, "tvr", root, on_error="skip")
    assert [x["id"] for x in s["splits"]["val"]["skipped"]] == [f"line {n}"]
    assert s["splits"]["val"]["captions_with_moments"] == sum(len(v.captions) for v in tree["val"])


@pytest.mark.parametrize("start,end,reason", [(5.0, 3.0, "ends before it starts"),
                                              (2.0, 2.0, "has no length"),
                                              (-1.0, 3.0, "starts before 0"),
                                              (10.0, 500.0, "ends after the video's duration")])
def test_out_of_range_moment_is_reported_not_clipped(tmp_path, start, end, reason):
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "tvr", splits=(("train", 3), ("val", 2)), moments=True)
  jsonl = root / "tvr" / "tvr_val_release.jsonl"
  lines = jsonl.read_text().splitlines()
  bad = json.loads(lines[1])
  bad["ts"] = [start, end]
  jsonl.write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n")
  with pytest.raises(DataError) as err:
    h.build(tmp_path, "tvr", root)
  msg = str(err.value)
  assert "tvr_val_release.jsonl" in err.value.file and err.value.item == "line 2", msg
  assert reason in msg and "val split" in msg and repr(bad["vid_name"]) in msg, msg
  # Skipped instead: listed with its reason, and its caption keeps no moment (-1), not a clipped one.
  s = h.build(tmp_path, "tvr", root, on_error="skip")
  assert [(x["id"], reason in x["reason"]) for x in s["splits"]["val"]["skipped"]] == [("line 2", True)]
  total = sum(len(v.captions) for v in tree["val"])
  assert s["splits"]["val"]["captions_with_moments"] == total - 1
  moments = np.concatenate([e["moments"] for e in h.read_all(s["dataset_dir"], "val")])
  assert (moments == -1).all(axis=1).sum() == 1


def test_activitynet_moment_beyond_its_duration(tmp_path):
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "activitynet", splits=(("train", 3), ("val", 2)), moments=True)
  path = root / "activitynet" / "train.json"
  entries = json.loads(path.read_text())
  vid = tree["train"][1].video_id
  entries[vid]["timestamps"][0] = [1.0, entries[vid]["duration"] + 4.0]
  path.write_text(json.dumps(entries))
  _expect_raise(tmp_path, root, "train.json", f"video {vid} sentence 0",
                "ends after the video's duration", name="activitynet")


def test_charades_moment_ending_before_it_starts(tmp_path):
  root = tmp_path / "root"
  tree = h.write_clip_collection(root, "charades", splits=(("train", 3), ("val", 2)), moments=True)
  path = root / "charades" / "charades_sta_test.txt"
  lines = path.read_text().splitlines()
  vid = tree["val"][0].video_id
  lines[0] = f"{vid} 9.5 4.0##{tree['val'][0].captions[0].text}"
  path.write_text("\n".join(lines) + "\n")
  _expect_raise(tmp_path, root, "charades_sta_test.txt", "line 1", "ends before it starts", name="charades")


def test_on_error_value_checked(tmp_path, tvr):
  root, _ = tvr
  with pytest.raises(ValueError, match="on_error"):
    h.build(tmp_path, "tvr", root, on_error="ignore")
