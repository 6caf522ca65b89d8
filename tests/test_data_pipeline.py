"""grain pipelines: batch contract, per-epoch shuffling, process shards, padding, checkpointing,
worker processes. Runs on a small synthetic dataset built once for the module."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import sys

import grain
import numpy as np
import pytest

from prvr_jax.data import pipeline
from prvr_jax.data.builders.factory import make_builder
from prvr_jax.data.config import DataConfig
from prvr_jax.data.preprocess import l2_normalize, resample_to_fixed_length
from prvr_jax.data.synthetic import SyntheticSpec

SPEC = SyntheticSpec(seed=5, num_train_videos=37, num_val_videos=11, num_test_videos=5, visual_dim=16,
                     text_dim=8, min_frames=12, max_frames=60)


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = make_builder(DataConfig(name="synthetic", synthetic=SPEC),
                                  tmp_path_factory.mktemp("tfds"), progress=False)
  tfds.display_progress_bar(False)
  builder.download_and_prepare()
  return str(builder.data_dir)


@pytest.fixture(scope="module")
def records(ddir):
  source = pipeline.RecordSource(ddir, "train")
  return [source[i] for i in range(len(source))]


def _valid_videos(batches):
  return [int(i) for b in batches for i in b["video_index"][b["video_valid"]]]


def test_train_batch_contract(ddir, records):
  info = pipeline.open_split(ddir, "train")
  ds = pipeline.train_dataset(ddir, batch_size=8, seed=3, num_epochs=1)
  c, l = info.max_captions, info.max_caption_tokens
  assert len(ds) == 5  # ceil(37 / 8)
  for k in range(len(ds)):
    b = ds[k]
    assert set(pipeline.TRAIN_KEYS) <= set(b)
    assert b["video_frames"].shape == (8, 128, 16) and b["video_frames"].dtype == np.float32
    assert b["video_valid"].shape == (8,) and b["video_valid"].dtype == bool
    assert b["text_feat"].shape == (8 * c, l, 8) and b["text_feat"].dtype == np.float32
    assert b["text_mask"].shape == (8 * c, l) and b["text_mask"].dtype == np.float32
    np.testing.assert_array_equal(b["text_labels"], np.repeat(np.arange(8, dtype=np.int32), c))
    assert b["text_labels"].dtype == np.int32
    assert b["query_valid"].shape == (8 * c,) and b["query_valid"].dtype == bool
    lengths = b["text_mask"].sum(1).astype(int)
    # Masks are prefixes; a query is valid iff it has tokens and its video is valid.
    np.testing.assert_array_equal(b["text_mask"], np.arange(l)[None] < lengths[:, None])
    np.testing.assert_array_equal(b["query_valid"], (lengths > 0) & np.repeat(b["video_valid"], c))
    for v in range(8):
      rec = records[b["video_index"][v]] if b["video_valid"][v] else None
      if rec is None:
        assert b["video_index"][v] == -1 and not b["query_valid"][v * c:(v + 1) * c].any()
        continue
      # Frames: resampled, NOT normalised (normalisation happens on the device).
      np.testing.assert_allclose(b["video_frames"][v], resample_to_fixed_length(rec["frames"], 128), rtol=1e-6)
      assert not np.allclose(np.linalg.norm(b["video_frames"][v], axis=-1), 1.0, atol=1e-2)
      caps = pipeline.split_captions(rec)
      for j, cap in enumerate(caps):
        q = v * c + j
        assert b["query_valid"][q] and lengths[q] == len(cap)
        assert b["query_index"][q] == info.caption_offsets[b["video_index"][v]] + j
        np.testing.assert_allclose(b["text_feat"][q, :len(cap)], l2_normalize(cap), rtol=1e-6, atol=1e-7)
        assert not b["text_feat"][q, len(cap):].any()
  assert b["video_valid"].sum() == 37 - 4 * 8  # the last batch is padded with invalid videos


def test_every_epoch_is_a_new_permutation(ddir):
  ds = pipeline.train_dataset(ddir, batch_size=8, seed=3, num_epochs=3)
  per_epoch = [_valid_videos([ds[k] for k in range(e * 5, (e + 1) * 5)]) for e in range(3)]
  for order in per_epoch:
    assert sorted(order) == list(range(37))  # every video exactly once per epoch
  assert per_epoch[0] != per_epoch[1] != per_epoch[2]
  again = pipeline.train_dataset(ddir, batch_size=8, seed=3, num_epochs=3)
  assert _valid_videos([again[k] for k in range(5)]) == per_epoch[0]  # deterministic per seed
  other = pipeline.train_dataset(ddir, batch_size=8, seed=4, num_epochs=1)
  assert _valid_videos([other[k] for k in range(5)]) != per_epoch[0]
  plain = pipeline.train_dataset(ddir, batch_size=8, shuffle=False, num_epochs=2)
  assert _valid_videos([plain[k] for k in range(5, 10)]) == list(range(37))
  dropped = pipeline.train_dataset(ddir, batch_size=8, seed=3, num_epochs=1, drop_remainder=True)
  assert len(dropped) == 4 and all(dropped[k]["video_valid"].all() for k in range(4))


def _shard(ddir, kind, index, count):
  """Valid ids one process sees in one pass, and its number of batches."""
  if kind == "train":
    ds = pipeline.train_dataset(ddir, batch_size=8, seed=1, num_epochs=1, process_index=index, process_count=count)
    return _valid_videos(ds), len(ds)
  if kind == "videos":
    ds = pipeline.eval_video_dataset(ddir, "val", batch_size=4, process_index=index, process_count=count)
    return _valid_videos(ds), len(ds)
  ds = pipeline.eval_query_dataset(ddir, "val", batch_size=6, process_index=index, process_count=count)
  return [int(i) for b in ds for i in b["query_index"][b["query_valid"]]], len(ds)


@pytest.mark.parametrize("kind", ["train", "videos", "queries"])
def test_two_process_shards_are_disjoint_and_cover_the_split(ddir, kind):
  info = pipeline.open_split(ddir, "train" if kind == "train" else "val")
  total = info.num_captions if kind == "queries" else info.num_videos
  (a, na), (b, nb) = _shard(ddir, kind, 0, 2), _shard(ddir, kind, 1, 2)
  assert na == nb  # every process runs the same number of steps
  assert not set(a) & set(b)
  assert sorted(a + b) == list(range(total))
  # The two shards together are exactly what one process sees in one pass.
  single, _ = _shard(ddir, kind, 0, 1)
  assert sorted(single) == sorted(a + b)


def test_shards_in_two_real_processes(ddir):
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
    (a, na), (b, nb) = pool.map(_shard, [ddir] * 2, ["train"] * 2, [0, 1], [2, 2])
  assert na == nb and not set(a) & set(b) and sorted(a + b) == list(range(37))


def test_eval_padding_scores_every_item_once(ddir):
  info = pipeline.open_split(ddir, "val")
  vds = pipeline.eval_video_dataset(ddir, "val", batch_size=4)
  batches = list(vds)
  assert len(batches) == 3 and all(b["video_frames"].shape == (4, 128, 16) for b in batches)
  assert _valid_videos(batches) == list(range(11))
  last = batches[-1]
  assert list(last["video_valid"]) == [True, True, True, False] and last["video_index"][-1] == -1
  durations = np.concatenate([b["duration"][b["video_valid"]] for b in batches])
  assert (durations > 0).all()
  qds = pipeline.eval_query_dataset(ddir, "val", batch_size=16)
  qb = list(qds)
  assert len(qb) == -(-info.num_captions // 16)
  idx = np.concatenate([b["query_index"][b["query_valid"]] for b in qb])
  gt = np.concatenate([b["gt_video_index"][b["query_valid"]] for b in qb])
  np.testing.assert_array_equal(idx, np.arange(info.num_captions))
  np.testing.assert_array_equal(gt, np.searchsorted(info.caption_offsets, idx, side="right") - 1)
  pad = qb[-1]
  assert (pad["query_index"][~pad["query_valid"]] == -1).all() and (pad["gt_video_index"][~pad["query_valid"]] == -1).all()


def test_iterator_state_restores_the_same_order(ddir):
  ds = pipeline.train_dataset(ddir, batch_size=8, seed=2)  # unbounded epochs
  it = pipeline.to_iterator(ds, num_threads=2)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON
  expected = [next(it) for _ in range(3)]  # crosses the epoch boundary at step 5
  restored = pipeline.to_iterator(pipeline.train_dataset(ddir, batch_size=8, seed=2), num_threads=1)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert {int(e) for b in expected for e in b["epoch"]} == {0, 1}


def test_restored_state_continues_with_another_process_count(ddir):
  one = pipeline.train_dataset(ddir, batch_size=8, seed=2)
  halves = [pipeline.train_dataset(ddir, batch_size=8, seed=2, process_index=p, process_count=2) for p in (0, 1)]
  for step in (3, 6):
    whole = one[step]["video_index"]
    np.testing.assert_array_equal(np.concatenate([h[step]["video_index"] for h in halves]), whole)


def test_more_captions_than_max_use_a_seeded_subset_per_epoch(ddir):
  info = pipeline.open_split(ddir, "train")
  counts = np.diff(info.caption_offsets)
  ds = pipeline.train_dataset(ddir, batch_size=8, seed=0, num_epochs=4, max_captions_per_video=2,
                              shuffle=False)
  chosen = {}  # (epoch, video) -> caption indices
  for k in range(len(ds)):
    b = ds[k]
    assert b["text_feat"].shape[0] == 16
    for v in range(8):
      if b["video_valid"][v]:
        vid = int(b["video_index"][v])
        q = b["query_index"][2 * v:2 * v + 2]
        q = q[q >= 0]
        assert len(q) == min(2, counts[vid])
        assert ((q >= info.caption_offsets[vid]) & (q < info.caption_offsets[vid + 1])).all()
        chosen[(int(b["epoch"][v]), vid)] = tuple(q)
  many = [v for v in range(37) if counts[v] > 2]
  assert many
  assert any(len({chosen[(e, v)] for e in range(4)}) > 1 for v in many)
  again = pipeline.train_dataset(ddir, batch_size=8, seed=0, num_epochs=4, max_captions_per_video=2, shuffle=False)
  np.testing.assert_array_equal(again[7]["query_index"], ds[7]["query_index"])


def test_caption_truncation():
  tokens = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
  norm = l2_normalize(tokens)
  np.testing.assert_allclose(pipeline.caption_token_features(tokens, 4), norm[:4], rtol=1e-6)  # reference
  kept = pipeline.caption_token_features(tokens, 4, keep_eos=True)
  np.testing.assert_allclose(kept, np.concatenate([norm[:3], norm[-1:]]), rtol=1e-6)
  np.testing.assert_allclose(pipeline.caption_token_features(tokens, 77), norm, rtol=1e-6)


def test_static_lengths_from_config(ddir):
  ds = pipeline.train_dataset(ddir, batch_size=4, max_captions_per_video=7, max_caption_tokens=12, num_epochs=1)
  b = ds[0]
  assert b["text_feat"].shape == (28, 12, 8) and b["text_mask"].shape == (28, 12)
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.train_dataset(ddir, batch_size=5, process_count=2)
  with pytest.raises(FileNotFoundError, match="prepare"):
    pipeline.train_dataset(ddir + "_missing", batch_size=4)


class _Probe(grain.transforms.Map):
  """Adds what the worker process has loaded to each batch."""

  def map(self, batch):
    heavy = sorted(m for m in ("flax", "optax", "prvr_jax.models", "prvr_jax.train", "prvr_jax.ops",
                               "prvr_jax.losses", "torch", "tensorflow") if m in sys.modules)
    backends = False
    if "jax" in sys.modules:
      from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

      backends = xla_bridge.backends_are_initialized()
    batch["probe"] = np.array(json.dumps(dict(heavy=heavy, backends=backends, pid=__import__("os").getpid())))
    return batch


def test_worker_processes_load_no_model_code(ddir):
  import jax  # the parent has JAX loaded and initialised; the spawned worker must not  # pylint: disable=g-import-not-at-top

  jax.devices()
  ds = pipeline.train_dataset(ddir, batch_size=8, seed=9, num_epochs=1).map(_Probe())
  it = pipeline.to_iterator(ds, num_threads=1, num_workers=1)
  try:
    got = [next(it) for _ in range(3)]
  finally:
    it.close()
  for b, k in zip(got, range(3)):
    probe = json.loads(str(b.pop("probe")))
    assert probe["pid"] != __import__("os").getpid()  # really another process
    assert probe["heavy"] == [] and probe["backends"] is False, probe
    want = pipeline.train_dataset(ddir, batch_size=8, seed=9, num_epochs=1)[k]
    for key in want:
      np.testing.assert_array_equal(b[key], want[key])
