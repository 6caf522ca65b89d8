"""Feature extraction: tiny videos written with PyAV, a tiny random checkpoint written with numpy."""

from __future__ import annotations

import pathlib

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from prvr_jax import extract
from prvr_jax.clip import preprocess
from prvr_jax.clip.feature_store import FeatureStore, StoreError
from prvr_jax.clip.load import load_clip
from prvr_jax.clip.model import ClipEncoders
from prvr_jax.clip.video import SampleInfo, VideoError, sample_frames
from prvr_jax.data.formats import H5Features
from tests.test_clip_model import write_checkpoint

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)  # one per second


def write_video(path: pathlib.Path, seconds: int, rate: int = 10, size=(48, 64)) -> None:
  """A video whose colour changes every second (red, green, blue, red, ...)."""
  import av  # pylint: disable=import-outside-toplevel

  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=rate)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    for i in range(seconds * rate):
      image = np.broadcast_to(COLOURS[(i // rate) % 3], (*size, 3)).copy()
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_tiny_clip(directory: pathlib.Path) -> pathlib.Path:
  """A tiny CLIP checkpoint (projection 8) with the real vocabulary size (the tokenizer's ids must
  fit), written to `directory`."""
  from transformers import CLIPConfig  # pylint: disable=import-outside-toplevel

  config = CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=16),
      projection_dim=8)
  write_checkpoint(directory, config)
  return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
  """A tiny CLIP with the real vocabulary size (the tokenizer's ids must fit)."""
  return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("videos")
  write_video(directory / "three.mp4", 3)
  write_video(directory / "two.mkv", 2, rate=25, size=(64, 40))
  (directory / "zero.mp4").write_bytes(b"")
  (directory / "corrupt.avi").write_bytes(np.random.RandomState(0).bytes(4000))
  write_video(directory / "whole.mkv", 4)
  data = (directory / "whole.mkv").read_bytes()
  (directory / "truncated.mkv").write_bytes(data[:len(data) // 2])  # decodes, but only 1 of 4 s
  (directory / "whole.mkv").unlink()
  (directory / "notes.txt").write_text("not a video, not listed")
  return directory


def test_sampling_takes_nearest_frames(videos):
  info = SampleInfo()
  frames = np.stack(list(sample_frames(videos / "three.mp4", 2.0, info)))
  assert frames.shape == (6, 48, 64, 3)
  assert (info.duration, info.num_decoded, info.num_sampled) == (3.0, 30, 6)
  # t = 0, .5 | 1, 1.5 | 2, 2.5: red, red, green, green, blue, blue (lossy codec: +-3).
  np.testing.assert_allclose(frames.mean(axis=(1, 2)), COLOURS[[0, 0, 1, 1, 2, 2]], atol=3)
  # Faster than the video's 10 fps: samples repeat the nearest frame, T = duration * fps.
  info = SampleInfo()
  frames = np.stack(list(sample_frames(videos / "three.mp4", 25.0, info)))
  assert len(frames) == 75
  colour = np.argmax(frames.mean(axis=(1, 2)), axis=-1)
  nearest_frame = np.minimum(np.round(np.arange(75) / 25 * 10), 29)  # frames every 0.1 s
  np.testing.assert_array_equal(colour, nearest_frame // 10)  # e.g. t = 0.96 takes 1.0: green


@pytest.mark.parametrize("name,reason", [
    ("zero.mp4", "empty file"), ("corrupt.avi", "cannot open as a video"),
    ("missing.mp4", "file not found"),
    ("truncated.mkv", r"decoded only 1.00 s of the 4.00 s the file declares \(truncated")])
def test_bad_videos_raise_video_error(videos, name, reason):
  with pytest.raises(VideoError, match=reason):
    list(sample_frames(videos / name, 1.0, SampleInfo()))


def _run(*argv) -> int:
  return extract.main([*argv, "--quiet"])


def test_extract_videos_end_to_end_and_resume(checkpoint, videos, tmp_path, capsys):
  out = tmp_path / "feats.h5"
  args = ("videos", "--clip", str(checkpoint), "--videos", str(videos), "--fps", "2",
          "--out", str(out), "--batch", "4")
  # First run: only the first 2 listed (sorted: corrupt.avi, three.mp4).
  assert _run(*args, "--max-items", "2") == 1
  report = capsys.readouterr().out
  assert "2 listed, 1 done, 0 skipped" in report and "1 failed" in report
  assert "failed corrupt: cannot open as a video" in report
  with h5py.File(out) as f:
    assert set(f) == {"three"}
    first = f["three"][...]
  # Second run: resumes, skipping 'three'; the zero-length, corrupt and truncated files are
  # reported.
  assert _run(*args) == 1
  report = capsys.readouterr().out
  assert "5 listed, 1 done, 1 skipped (already in the output), 3 failed" in report
  assert "failed zero: empty file (0 bytes)" in report
  assert "failed truncated: decoded only" in report
  assert not out.with_name("feats.h5.parts").exists()
  with h5py.File(out) as f:
    assert set(f) == {"three", "two"}
    assert f.attrs["kind"] == "clip_video_features" and float(f.attrs["fps"]) == 2.0
    for vid, duration in (("three", 3.0), ("two", 2.0)):
      ds = f[vid]
      assert ds.dtype == np.float32 and ds.shape[1] == 8
      assert abs(ds.shape[0] - duration * 2) <= 1
      assert ds.attrs["duration"] == pytest.approx(duration, abs=0.05)
    np.testing.assert_array_equal(f["three"][...], first)
  # Rows equal the vision tower on the sampled frames (batches mixing videos keep the order).
  config, params = load_clip(checkpoint, towers=("vision",))
  frames = list(sample_frames(videos / "two.mkv", 2.0, SampleInfo(),
                              transform=lambda im: preprocess.resize_and_crop(im, 32)))
  want = ClipEncoders(config).encode_image(params, preprocess.normalize(np.stack(frames)))
  with h5py.File(out) as f:
    np.testing.assert_allclose(f["two"][...], want, atol=1e-5)
  # The project's own reader accepts the file.
  with H5Features(out) as h5:
    assert len(h5) == 2 and h5.read("three").shape == first.shape


def test_list_file_and_missing_entries(checkpoint, videos, tmp_path, capsys):
  listing = tmp_path / "videos.txt"
  listing.write_text(f"# videos\n{videos / 'three.mp4'}\n\nnope.mp4\n")
  out = tmp_path / "feats.h5"
  assert _run("videos", "--clip", str(checkpoint), "--videos", str(listing), "--fps", "1",
              "--out", str(out)) == 1
  report = capsys.readouterr().out
  assert "2 listed, 1 done" in report and "failed nope: file not found" in report
  with h5py.File(out) as f:
    assert f["three"].shape == (3, 8)


def test_duplicate_ids_are_an_error(checkpoint, videos, tmp_path, capsys):
  listing = tmp_path / "videos.txt"
  listing.write_text(f"{videos / 'three.mp4'}\n{tmp_path / 'three.mkv'}\n")
  assert _run("videos", "--clip", str(checkpoint), "--videos", str(listing), "--fps", "1",
              "--out", str(tmp_path / "a.h5")) == 2
  assert "video id 'three' is also the id of" in capsys.readouterr().err


def test_changed_fps_is_refused(checkpoint, videos, tmp_path, capsys):
  listing = tmp_path / "videos.txt"
  listing.write_text(f"{videos / 'three.mp4'}\n")
  out = tmp_path / "feats.h5"
  args = ("videos", "--clip", str(checkpoint), "--videos", str(listing), "--out", str(out))
  assert _run(*args, "--fps", "1") == 0
  assert _run(*args, "--fps", "2") == 2
  assert "made with fps='1.0', this run has fps='2.0'" in capsys.readouterr().err


def test_interrupted_run_keeps_finished_items(tmp_path):
  out = tmp_path / "feats.h5"
  store = FeatureStore(out, {"kind": "test"})
  store.put([("a", np.ones((2, 3)), {"duration": 1.0})])
  store.put([("b", np.zeros((1, 3)), {})])
  # (crash here: no finalize) -> a new run sees both and merges them.
  again = FeatureStore(out, {"kind": "test"})
  assert "a" in again and "b" in again and "c" not in again
  with pytest.raises(StoreError, match="'a': already stored"):
    again.put([("a", np.ones((2, 3)), {})])
  again.put([("c", np.ones((4, 3)), {})])
  assert again.finalize() == 3
  with h5py.File(out) as f:
    assert {k: f[k].shape for k in f} == {"a": (2, 3), "b": (1, 3), "c": (4, 3)}
    assert f["a"].attrs["duration"] == 1.0
  with pytest.raises(StoreError, match="made with kind='test', this run has kind='other'"):
    FeatureStore(out, {"kind": "other"})
  with pytest.raises(StoreError, match="cannot be an HDF5 dataset name"):
    FeatureStore(out, {"kind": "test"}).put([("x/y", np.ones((1, 1)), {})])


def test_mismatched_checkpoint_is_one_clear_error(checkpoint, videos, tmp_path, capsys):
  bad = tmp_path / "bad_clip"
  bad.mkdir()
  (bad / "config.json").write_text((checkpoint / "config.json").read_text())
  tensors = load_file(str(checkpoint / "model.safetensors"))
  tensors["vision_model.embeddings.patch_embedding.weight"] = np.zeros((16, 3, 8, 8), np.float32)
  save_file(tensors, str(bad / "model.safetensors"))
  assert _run("videos", "--clip", str(bad), "--videos", str(videos), "--fps", "1",
              "--out", str(tmp_path / "x.h5")) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  assert ("model.safetensors: tensor 'vision_model.embeddings.patch_embedding.weight' has shape "
          "(16, 3, 8, 8), config.json implies (16, 3, 16, 16)") in err


def test_extract_captions(checkpoint, tmp_path, capsys):
  captions = tmp_path / "tvrtrain.caption.txt"
  long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
  captions.write_text(f"v1#enc#0 A man plays the guitar.\nv1#enc#1 Someone\u2019s dog runs!\n"
                      f"v2#enc#0 {long_text}\n")
  out = tmp_path / "text.h5"
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions),
              "--out", str(out), "--batch", "2") == 0
  report = capsys.readouterr().out
  assert "3 listed, 3 done" in report and "1 captions longer than 77 tokens" in report
  config, params = load_clip(checkpoint, towers=("text",))
  enc = ClipEncoders(config)
  # "a man plays the guitar ." -> BOS + 6 pieces + EOS.
  from prvr_jax.text.tokenizer import ClipTokenizer  # pylint: disable=import-outside-toplevel
  tok = ClipTokenizer()(["A man plays the guitar."])
  _, _, projected = enc.encode_text(params, tok.input_ids, tok.attention_mask)
  with h5py.File(out) as f:
    assert f.attrs["text_features"] == "projected"
    assert f["v1#enc#0"].shape == (8, 8) and f["v1#enc#0"].dtype == np.float32
    assert f["v1#enc#1"].shape[0] == f["v1#enc#1"].attrs["num_tokens"]
    assert f["v2#enc#0"].shape == (77, 8) and f["v2#enc#0"].attrs["truncated"] == 1
    # EOS is the last row, and it is the caption's CLIP text embedding.
    np.testing.assert_allclose(f["v1#enc#0"][-1], np.asarray(projected)[0], atol=1e-5)
  # Resume with another caption added: only it is computed.
  captions.write_text(captions.read_text() + "v3#enc#0 a cat\n")
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions),
              "--out", str(out)) == 0
  assert "4 listed, 1 done, 3 skipped" in capsys.readouterr().out
  # Unprojected states are the text width (16 here).
  hidden = tmp_path / "hidden.h5"
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions),
              "--out", str(hidden), "--text-features", "hidden", "--max-items", "1") == 0
  with h5py.File(hidden) as f:
    assert set(f) == {"v1#enc#0"} and f["v1#enc#0"].shape == (8, 16)


def test_extract_in_bfloat16_and_no_mixing_on_resume(checkpoint, tmp_path, capsys):
  captions = tmp_path / "tvrtrain.caption.txt"
  captions.write_text("v1#enc#0 A man plays the guitar.\nv1#enc#1 a dog runs\n")
  out, out32 = tmp_path / "bf16.h5", tmp_path / "f32.h5"
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions), "--out", str(out),
              "--dtype", "bfloat16", "--max-items", "1") == 0
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions),
              "--out", str(out32)) == 0
  capsys.readouterr()
  with h5py.File(out) as f, h5py.File(out32) as g:
    assert f.attrs["clip_dtype"] == "bfloat16" and g.attrs["clip_dtype"] == "float32"
    rows, rows32 = f["v1#enc#0"][...], g["v1#enc#0"][...]
    assert rows.dtype == np.float32 and rows.shape == rows32.shape
    cos = np.sum(rows * rows32, -1) / (np.linalg.norm(rows, axis=-1) * np.linalg.norm(rows32, axis=-1))
    assert cos.min() > 0.99
  # Resuming the bfloat16 file in float32 would mix dtypes: refused, naming the setting.
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions),
              "--out", str(out)) == 2
  err = capsys.readouterr().err
  assert "clip_dtype='bfloat16'" in err and "clip_dtype='float32'" in err


def test_empty_caption_names_the_line(checkpoint, tmp_path, capsys):
  captions = tmp_path / "c.caption.txt"
  captions.write_text("v1#enc#0 fine\nv1#enc#1   \nv2#enc#0 ok\n")
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions),
              "--out", str(tmp_path / "t.h5")) == 2
  err = capsys.readouterr().err
  assert "c.caption.txt: caption 'v1#enc#1': empty caption (line 2)" in err
  assert not (tmp_path / "t.h5").exists()


def test_output_that_predates_a_setting(checkpoint, tmp_path, capsys):
  # A file written before `clip_dtype` was recorded (float32 was the only dtype then): resuming
  # it in float32 continues it, in bfloat16 is refused; a file lacking another setting is refused.
  captions = tmp_path / "tvrtrain.caption.txt"
  captions.write_text("v1#enc#0 A man plays the guitar.\nv1#enc#1 a dog runs\n")
  out = tmp_path / "old.h5"
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions), "--out", str(out),
              "--max-items", "1") == 0
  with h5py.File(out, "a") as f:
    del f.attrs["clip_dtype"]
  capsys.readouterr()
  assert _run("captions", "--clip", str(checkpoint), "--captions", str(captions), "--out", str(out),
              "--dtype", "bfloat16") == 2
  err = capsys.readouterr().err
  assert "records no clip_dtype" in err and "clip_dtype='float32'" in err and str(out) in err
  with h5py.File(out) as f:
    assert sorted(f.keys()) == ["v1#enc#0"]  # nothing mixed in
  resume = ("captions", "--clip", str(checkpoint), "--captions", str(captions), "--out", str(out))
  assert _run(*resume) == 0
  with h5py.File(out) as f:
    assert sorted(f.keys()) == ["v1#enc#0", "v1#enc#1"]
  with h5py.File(out, "a") as f:
    del f.attrs["kind"]
  capsys.readouterr()
  assert _run(*resume) == 2
  assert "records no" in capsys.readouterr().err
