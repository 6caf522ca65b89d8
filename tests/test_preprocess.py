"""Host-side preprocessing: resampling to 128 rows, loader normalisation, caption batches."""

from __future__ import annotations

import numpy as np
import pytest

from prvr_jax.data import preprocess


def _loop_resample(frames: np.ndarray, length: int) -> np.ndarray:
  """Plain per-bin loop of the documented semantics (float32 boundaries, half-to-even, clip)."""
  t = frames.shape[0]
  idx = np.arange(length + 1, dtype=np.float32) / np.float32(length) * np.float32(t)
  idx = np.minimum(np.round(idx).astype(np.int64), t - 1)
  out = np.empty((length, frames.shape[1]), np.float64)
  for j in range(length):
    s, e = idx[j], idx[j + 1]
    out[j] = frames[s:e].astype(np.float64).mean(0) if s < e else frames[s]
  return out


def test_golden_resample_and_normalise(golden):
  videos = preprocess.split_concatenated(golden["input/frames"], golden["input/frame_offsets"])
  lengths = [len(v) for v in videos]
  assert min(lengths) < 128 < max(lengths)  # both directions are exercised
  fixed = preprocess.resample_batch(videos, 128)
  assert fixed.dtype == np.float32 and fixed.shape == golden["data/fixed128"].shape
  np.testing.assert_allclose(fixed, golden["data/fixed128"], atol=1e-5, rtol=0)
  frame_feat = preprocess.l2_normalize(fixed)
  np.testing.assert_allclose(frame_feat, golden["batch/frame_video_features"], atol=1e-5, rtol=0)


def test_golden_captions(golden):
  feat, mask = preprocess.normalize_captions(golden["input/caps"], golden["input/cap_offsets"])
  assert feat.shape == golden["batch/text_feat"].shape
  np.testing.assert_array_equal(mask, golden["batch/text_mask"])
  np.testing.assert_allclose(feat, golden["batch/text_feat"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 5, 64, 100, 127, 128, 129, 191, 256, 300, 1000])
@pytest.mark.parametrize("length", [128, 7])
def test_resample_matches_loop(num_frames, length):
  rng = np.random.default_rng(num_frames * 31 + length)
  frames = rng.normal(size=(num_frames, 5)).astype(np.float32) * 3 + 10
  out = preprocess.resample_to_fixed_length(frames, length)
  assert out.shape == (length, 5) and out.dtype == np.float32
  np.testing.assert_allclose(out, _loop_resample(frames, length), atol=1e-5, rtol=1e-6)


def test_resample_short_video_repeats_rows():
  frames = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
  out = preprocess.resample_to_fixed_length(frames, 8)
  # Boundaries round(j * 3 / 8) clipped at 2 = [0,0,1,1,2,2,2,2,2]: bins 1 and 3 average one row,
  # the empty ranges repeat row idx_j; the clip at T - 1 means the last row is only repeated.
  np.testing.assert_array_equal(out[:, 0], [0, 0, 2, 2, 4, 4, 4, 4])


def test_resample_boundaries_match_torch_float32():
  torch = pytest.importorskip("torch")
  for t in list(range(1, 400)) + [513, 777, 1024, 2049]:
    ref = torch.clamp(torch.round(torch.arange(0, 129, 1.0) / 128 * t).long(), max=t - 1).numpy()
    np.testing.assert_array_equal(preprocess.resample_boundaries(t, 128), ref, err_msg=f"T={t}")


def test_resample_half_to_even():
  # T = 64: boundaries j/2 land on .5 for odd j and round to the even neighbour.
  idx = preprocess.resample_boundaries(64, 128)
  np.testing.assert_array_equal(idx[:8], [0, 0, 1, 2, 2, 2, 3, 4])


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 4), np.float32), "no frames"),
    (np.zeros((4,), np.float32), r"\(T, D\)"),
    (np.zeros((2, 3, 4), np.float32), r"\(T, D\)"),
    (np.array([[1.0, np.nan]], np.float32), "NaN or Inf"),
    (np.array([[1.0, np.inf]], np.float32), "NaN or Inf"),
])
def test_resample_rejects_bad_input(bad, match):
  with pytest.raises(ValueError, match=match):
    preprocess.resample_to_fixed_length(bad)


def test_resample_batch_shapes_and_errors():
  rng = np.random.default_rng(0)
  vids = [rng.normal(size=(t, 6)).astype(np.float32) for t in (40, 128, 300)]
  out = preprocess.resample_batch(vids)
  assert out.shape == (3, 128, 6)
  np.testing.assert_array_equal(out[1], vids[1])  # T == length is the identity
  with pytest.raises(ValueError, match="common D"):
    preprocess.resample_batch([vids[0], np.zeros((5, 7), np.float32)])
  with pytest.raises(ValueError, match="no videos"):
    preprocess.resample_batch([])


def test_l2_normalize():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float32)
  y = preprocess.l2_normalize(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y[0], [3 / 5.00001, 4 / 5.00001], rtol=1e-6)
  np.testing.assert_array_equal(y[1], [0.0, 0.0])  # zero rows stay zero (eps is added)
  np.testing.assert_allclose(y[2, 0], 1e-3 / (1e-3 + 1e-5), rtol=1e-6)


def test_split_concatenated():
  values = np.arange(10)
  parts = preprocess.split_concatenated(values, np.array([0, 3, 3, 10]))
  assert [p.tolist() for p in parts] == [[0, 1, 2], [], list(range(3, 10))]
  for bad in ([1, 10], [0, 9], [0, 5, 4, 10], [0.0, 10.0]):
    with pytest.raises(ValueError, match="offsets"):
      preprocess.split_concatenated(values, np.array(bad))


def test_pad_sequences_truncates_and_masks():
  seqs = [np.ones((3, 2)), np.ones((90, 2)) * 2]
  feat, mask = preprocess.pad_sequences(seqs, max_len=77)
  assert feat.shape == (2, 77, 2) and mask.shape == (2, 77)
  assert mask[0].sum() == 3 and mask[1].sum() == 77
  assert np.all(feat[0, 3:] == 0) and np.all(feat[1] == 2)
