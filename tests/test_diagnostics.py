"""Collapse diagnostics: Spearman with ties by hand, and the split diagnostics against numpy."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from prvr_jax.data import pipeline
from prvr_jax.eval import diagnostics as D
from prvr_jax.eval.bench_eval import random_params
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.video_inputs import prepare_video_inputs
from tests.test_evaluate import TINY_MODEL, build_tiny_dataset, tiny_config


def test_average_ranks_share_tied_positions():
  np.testing.assert_array_equal(D.average_ranks(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])
  np.testing.assert_array_equal(D.average_ranks(np.array([[3.0, 3.0, 3.0], [0.5, -1.0, 0.5]])),
                                [[2, 2, 2], [2.5, 1, 2.5]])


def test_spearman_by_hand_with_ties():
  # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
  # sum of products 4.5, sums of squares 4.5 and 5 -> 4.5 / sqrt(22.5).
  assert D.spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(
      4.5 / math.sqrt(22.5), abs=1e-12)
  x = np.random.default_rng(0).normal(size=50)
  assert D.spearman(x, np.exp(x)) == pytest.approx(1.0)  # any increasing map
  assert D.spearman(x, -x ** 3) == pytest.approx(-1.0)
  assert math.isnan(D.spearman(x, np.ones(50)))
  rows = D.spearman(np.stack([x, x]), np.stack([np.exp(x), -x]))
  np.testing.assert_allclose(rows, [1.0, -1.0])


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return build_tiny_dataset(tmp_path_factory.mktemp("diag_data"))


def _cos_pairs(x: np.ndarray) -> np.ndarray:
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return x @ x.T


def test_collapse_diagnostics_match_numpy(ddir):
  params = random_params(TINY_MODEL, 5)
  diag = D.collapse_diagnostics(params, TINY_MODEL, tiny_config(), ddir, "val", max_queries=20,
                                max_videos=6)
  assert diag["split"] == "val" and set(diag) == {"split", "query", "clip_token"}

  # Queries: the first 20 captions of the split, straight from the records.
  info = pipeline.open_split(ddir, "val")
  source = pipeline.RecordSource(ddir, "val")
  records = [source[i] for i in range(info.num_videos)]
  captions = [c for r in records for c in pipeline.split_captions(r)][:20]
  video = np.repeat(np.arange(info.num_videos), np.diff(info.caption_offsets))[:20]
  max_tokens = pipeline.resolve_max_tokens(info)
  feat, mask = pipeline._pad_captions(captions, 20, max_tokens, info.text_dim, False)  # pylint: disable=protected-access
  eos = np.stack([feat[i, int(mask[i].sum()) - 1] for i in range(20)])
  encode_query = lambda p, f, m: MSCNet(TINY_MODEL).apply({"params": p}, f, m, method=MSCNet.encode_query)
  learned, _ = jax.jit(encode_query)(params, feat, mask)
  gl, gc = _cos_pairs(np.asarray(learned, np.float64)), _cos_pairs(eos.astype(np.float64))
  upper = np.triu(np.ones((20, 20), bool), k=1)
  same = upper & (video[:, None] == video[None, :])
  q = diag["query"]
  assert q["num_queries"] == 20 and q["num_pairs"] == 190 and q["num_same_video_pairs"] == same.sum() > 0
  assert q["same_video_cos"]["clip"] == pytest.approx(gc[same].mean(), abs=1e-5)
  assert q["all_pairs_cos"]["clip"] == pytest.approx(gc[upper].mean(), abs=1e-5)
  assert q["same_video_cos"]["learned"] == pytest.approx(gl[same].mean(), abs=1e-4)
  assert q["all_pairs_cos"]["learned"] == pytest.approx(gl[upper].mean(), abs=1e-4)
  assert q["spearman_learned_vs_clip"] == pytest.approx(D.spearman(gl[upper], gc[upper]), abs=1e-3)
  assert -1 <= q["spearman_learned_vs_clip"] <= 1

  # Clip tokens: the first 6 videos.
  frames = np.stack([pipeline.resample_to_fixed_length(r["frames"], 128) for r in records[:6]])

  @jax.jit
  def encode_clips(p, frames):
    inputs = prepare_video_inputs(frames)
    return inputs["clip_video_features"], MSCNet(TINY_MODEL).apply(
        {"params": p}, inputs["clip_video_features"], inputs["merge_size"], method=MSCNet.encode_clips)

  given, tokens = encode_clips(params, frames)
  iu = np.triu_indices(32, k=1)
  lp = np.stack([_cos_pairs(np.asarray(t, np.float64))[iu] for t in tokens])
  ip = np.stack([_cos_pairs(np.asarray(t, np.float64))[iu] for t in given])
  t = diag["clip_token"]
  assert t["num_videos"] == 6 and t["pairs_per_video"] == 32 * 31 // 2
  assert t["within_video_cos"]["learned"] == pytest.approx(lp.mean(), abs=1e-4)
  assert t["within_video_cos"]["input"] == pytest.approx(ip.mean(), abs=1e-5)
  assert t["spearman_learned_vs_input"] == pytest.approx(np.mean(D.spearman(lp, ip)), abs=1e-3)
  assert t["spearman_learned_vs_input_pooled"] == pytest.approx(D.spearman(lp.ravel(), ip.ravel()), abs=1e-3)
  with pytest.raises(ValueError, match="max_queries"):
    D.collapse_diagnostics(params, TINY_MODEL, tiny_config(), ddir, "val", max_queries=1)
