"""The search tool: index build (atomic, resumable), chunked top-k scoring, moments, raw text, CLI.

Most tests use a tiny random network (hidden 32, 2 heads, one Gaussian branch) whose input widths
equal the tiny CLIP's projection (P = 8); the end-to-end test trains a tiny synthetic run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import h5py
import jax
import numpy as np
import pytest

from prvr_jax import extract
from prvr_jax.data.preprocess import resample_boundaries
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import init_params
from prvr_jax.search import cli
from prvr_jax.search import index as index_lib
from prvr_jax.search import query as query_lib
from prvr_jax.search import text as text_lib
from prvr_jax.search.errors import SearchError
from prvr_jax.search.features import read_caption_features
from prvr_jax.search import ann as ann_lib
from prvr_jax.search.index_store import IndexReader, IndexWriter
from prvr_jax.search.model import from_params
from prvr_jax.search.token_store import SCALES, dequantize, quantize_int8
from tests.test_extract import checkpoint, write_video  # pylint: disable=unused-import  # fixture

P = 8  # the tiny CLIP's projection width (tests.test_extract.checkpoint)
TINY = ModelConfig(hidden_size=32, num_heads=2, visual_input_size=P, query_input_size=P,
                   dropout=0.1, input_dropout=0.1, gauss_widths=(0.5,))


@pytest.fixture(scope="module")
def model():
  return from_params(TINY, init_params(TINY, jax.random.key(0)))


def _write_features(path: pathlib.Path, videos: dict[str, np.ndarray], fps: float = 2.0,
                    attrs: bool = True) -> pathlib.Path:
  with h5py.File(path, "w") as f:
    for vid, frames in videos.items():
      ds = f.create_dataset(vid, data=np.asarray(frames, np.float32))
      if attrs:
        ds.attrs["duration"] = len(frames) / fps
        ds.attrs["fps"] = fps
  return path


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> pathlib.Path:
  """Seven videos of 5..199 random frames."""
  rng = np.random.RandomState(0)
  videos = {f"v{i}": rng.randn(rng.randint(5, 200), P) for i in range(7)}
  return _write_features(tmp_path_factory.mktemp("feat") / "videos.h5", videos)


# ----------------------------------------------------------------------------------------------
# Moments: a network that maps equal input rows to equal tokens in every branch.


def positionwise_params(cfg: ModelConfig, key: jax.Array):
  """Random parameters edited so that every encoder is the same row-wise map f.

  Zero positional tables, zero attention values and zero FFN outputs leave each encoder
  LayerNorm(LayerNorm(input_proj(x))) per row; the clip and frame input projections are copies of
  the query's. A query whose token rows all equal a frame row x then pools to f(x), which is exactly
  the token of every resampled row equal to x: cosine 1, the maximum. So the top-1 video and the best
  token of both branches are known without training (deterministic, unlike a trained tiny model).
  """
  params = init_params(cfg, key)

  def edit(path, leaf):
    names = [getattr(p, "key", None) for p in path]
    zero = (("attention" in names and "value" in names) or ("ffn" in names and "layer2" in names)
            or (names[0].endswith("_pos_embed") and names[-1] == "embedding"))
    return np.zeros_like(leaf) if zero else leaf

  params = jax.tree_util.tree_map_with_path(edit, params)
  params = dict(params)
  params["clip_input_proj"] = params["frame_input_proj"] = params["query_input_proj"]
  return params


def test_event_query_returns_its_video_and_moment(tmp_path):
  rng = np.random.RandomState(1)
  fps, videos, events = 2.0, {}, {}
  for i in range(5):
    lengths = rng.randint(12, 60, size=3)  # three events of constant features
    blocks = [np.tile(rng.randn(1, P), (n, 1)) for n in lengths]
    videos[f"vid{i}"] = np.concatenate(blocks)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for e in range(3):
      events[(f"vid{i}", e)] = (blocks[e][0], bounds[e] / fps, bounds[e + 1] / fps)
  path = _write_features(tmp_path / "events.h5", videos, fps)
  model = from_params(TINY, positionwise_params(TINY, jax.random.key(3)))
  index_lib.build_index(model, path, tmp_path / "index", chunk=2, progress=False)
  index = IndexReader(tmp_path / "index")
  keys = sorted(events)
  rows = [np.tile(events[k][0], (4, 1)) for k in keys]  # a 'caption' of the event's feature
  vectors = query_lib.encode_token_features(model, rows, batch=8)
  for clip_weight, branch in ((0.4, "frame"), (0.9, "clip")):
    results = query_lib.search_vectors(index, vectors, [str(k) for k in keys],
                                       clip_weight=clip_weight, frame_weight=1 - clip_weight,
                                       top_k=3)
    for k, hits in zip(keys, results):
      _, start, end = events[k]
      top = hits[0]
      assert top.video_id == k[0], (k, hits)
      assert top.branch == branch and top.clip_score > 0.999 and top.frame_score > 0.999
      assert top.start < end and top.end > start, (k, top)  # the moment overlaps the event
      if branch == "frame":  # the best row averages only the event's frames: inside it
        assert start - 1e-6 <= top.start < top.end <= end + 1e-6, (k, top)


# ----------------------------------------------------------------------------------------------
# Chunked scoring.


def _random_index(directory: pathlib.Path, n: int, chunk: int, dtype: str, rng,
                  ann_factory: str = "Flat") -> dict:
  """An index of random unit tokens and random spans, written without a model."""
  k_clips, f_frames, dim = 4, 6, 8
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  data = dict(clip=unit(rng.randn(n, k_clips, dim)).astype(np.float32),
              frame=unit(rng.randn(n, f_frames, dim)).astype(np.float32),
              clip_spans=np.sort(rng.rand(n, k_clips, 2) * 100, axis=-1).astype(np.float32),
              frame_spans=np.sort(rng.rand(n, f_frames, 2) * 100, axis=-1).astype(np.float32),
              ids=[f"video{i:03d}" for i in range(n)])
  settings = dict(model={"params_hash": "x"}, chunk_size=chunk, dtype=dtype, num_videos=n,
                  num_clips=k_clips, num_frames=f_frames, dim=dim, id_width=8)
  writer = IndexWriter(directory, settings)
  for c, s in enumerate(range(0, n, chunk)):
    sl = slice(s, s + chunk)
    m = len(data["ids"][sl])
    writer.write_chunk(c, dict(
        video_ids=np.asarray(data["ids"][sl]), durations=np.full(m, 100.0, np.float32),
        num_feature_frames=np.full(m, 10, np.int32), clip_tokens=data["clip"][sl],
        frame_tokens=data["frame"][sl], clip_rows=np.zeros((m, k_clips, 2), np.int32),
        clip_spans=data["clip_spans"][sl], frame_spans=data["frame_spans"][sl]))
  draft = writer.draft_manifest(writer.close_segment())
  draft["ann"] = ann_lib.build_faiss(IndexReader(directory, manifest=draft), 0,
                                     factory=ann_factory, progress=False)
  writer.finish(draft)
  if dtype != "float32":  # what the store holds: scores are exact on these
    index = IndexReader(directory)
    for key, name in (("clip", "clip_tokens"), ("frame", "frame_tokens")):
      arrays = index.rows(np.arange(n), (name,))
      data[key] = dequantize(arrays[name], arrays.get(SCALES[name]))
  return data


def _brute_force(data: dict, queries: np.ndarray, cw: float, fw: float):
  clip_sim = np.einsum("qd,nkd->qnk", queries, data["clip"])
  frame_sim = np.einsum("qd,nfd->qnf", queries, data["frame"])
  return clip_sim, frame_sim, cw * clip_sim.max(-1) + fw * frame_sim.max(-1)


@pytest.mark.parametrize("dtype,mode", [("float32", "exact"), ("float16", "exact"),
                                        ("int8", "exact"), ("int8", "ann")])
def test_topk_equals_brute_force(tmp_path, dtype, mode):
  rng = np.random.RandomState(2)
  n, chunk, cw, fw = 23, 5, 0.4, 0.6  # 5 does not divide 23: the last chunk is padded
  data = _random_index(tmp_path / "idx", n, chunk, dtype, rng)
  index = IndexReader(tmp_path / "idx")
  queries = rng.randn(7, 8)
  queries = (queries / np.linalg.norm(queries, axis=-1, keepdims=True)).astype(np.float32)
  clip_sim, frame_sim, fused = _brute_force(data, queries, cw, fw)
  clip, frame = clip_sim.max(-1), frame_sim.max(-1)
  for top_k in (6, 30):  # 30 > 23 videos: every video, once
    results = query_lib.search_vectors(index, queries, [f"q{i}" for i in range(7)],
                                       clip_weight=cw, frame_weight=fw, top_k=top_k, batch=3,
                                       mode=mode, candidates=30)
    for qi, hits in enumerate(results):
      order = np.argsort(-fused[qi], kind="stable")[:top_k]
      assert [h.video_id for h in hits] == [data["ids"][v] for v in order]
      assert [h.rank for h in hits] == list(range(1, len(order) + 1))
      for h, v in zip(hits, order):
        np.testing.assert_allclose([h.score, h.clip_score, h.frame_score],
                                   [fused[qi, v], clip[qi, v], frame[qi, v]], rtol=1e-5, atol=1e-6)
        use_clip = cw * clip[qi, v] > fw * frame[qi, v]
        assert h.branch == ("clip" if use_clip else "frame")
        span = (data["clip_spans"][v, clip_sim[qi, v].argmax()] if use_clip
                else data["frame_spans"][v, frame_sim[qi, v].argmax()])
        np.testing.assert_allclose([h.start, h.end], span)


def test_int8_tokens_keep_the_scores(tmp_path):
  """Per-token int8 moves cosines by < 1e-2 of their spread; top-10 lists barely change."""
  rng = np.random.RandomState(4)
  exact = _random_index(tmp_path / "f32", 200, 64, "float32", rng)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, s = quantize_int8(exact["frame"])
  np.testing.assert_allclose(dequantize(q, s), exact["frame"], atol=np.abs(exact["frame"]).max() / 254 + 1e-7)
  queries = unit(rng.randn(50, 8)).astype(np.float32)
  _, _, fused = _brute_force(exact, queries, 0.4, 0.6)
  quant = dict(exact, clip=dequantize(*quantize_int8(exact["clip"])),
               frame=dequantize(*quantize_int8(exact["frame"])))
  _, _, fused8 = _brute_force(quant, queries, 0.4, 0.6)
  assert np.abs(fused8 - fused).max() < 5e-3
  top = lambda f: [set(np.argsort(-row)[:10]) for row in f]
  assert np.mean([len(a & b) / 10 for a, b in zip(top(fused), top(fused8))]) >= 0.98


# ----------------------------------------------------------------------------------------------
# Index build: atomicity, resumption, settings, bad input.


def _store_files(directory: pathlib.Path) -> dict[str, np.ndarray]:
  return {p.name: np.load(p) for p in sorted((directory / "seg-000000").glob("*.npy"))}


def test_interrupted_build_is_refused_then_resumed(model, features, tmp_path, monkeypatch, capsys):
  out = tmp_path / "index"
  real_write = IndexWriter.write_chunk
  calls = []

  def crash_on_second(self, i, arrays):
    calls.append(i)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the build is killed while writing its second chunk
    real_write(self, i, arrays)

  monkeypatch.setattr(IndexWriter, "write_chunk", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    index_lib.build_index(model, features, out, chunk=3, progress=False)
  monkeypatch.undo()
  assert not (out / "manifest.json").exists() and (out / "seg-000000").is_dir()
  with pytest.raises(SearchError, match="unfinished index .* run the same `index` command again"):
    IndexReader(out)
  # The CLI refuses it before restoring any model: one line, exit status 2.
  assert cli.main(["query", "--index", str(out), "--text-features", str(features)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {out}: unfinished index") and "Traceback" not in err
  summary = index_lib.build_index(model, features, out, chunk=3, progress=False)
  assert (summary.reused, summary.encoded, summary.num_chunks) == (1, 2, 3)
  assert not (out / "build.json").exists() and not list(out.glob(".*.tmp"))
  fresh = tmp_path / "fresh"
  index_lib.build_index(model, features, fresh, chunk=3, progress=False)
  resumed, rebuilt = _store_files(out), _store_files(fresh)
  assert resumed.keys() == rebuilt.keys() and "frame_tokens.npy" in rebuilt
  for name, value in rebuilt.items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)
  again = index_lib.build_index(model, features, out, chunk=3, progress=False)
  assert (again.reused, again.encoded) == (3, 0) and "already complete" in again.text()
  # Other settings: refused, then rebuilt with overwrite.
  with pytest.raises(SearchError, match=r"finished index built with other settings \(chunk_size: 3 "
                                        r"there, 4 now\); pass --overwrite"):
    index_lib.build_index(model, features, out, chunk=4, progress=False)
  summary = index_lib.build_index(model, features, out, chunk=4, overwrite=True, progress=False)
  assert summary.encoded == 2 and IndexReader(out).chunk_size == 4


def test_index_contents_and_time_spans(model, features, tmp_path):
  index_lib.build_index(model, features, tmp_path / "i", chunk=4, dtype="float16", progress=False)
  index = IndexReader(tmp_path / "i")
  m = index.manifest
  assert (m["num_videos"], m["dim"], m["dtype"]) == (7, 32, "float16")
  assert m["model"]["query_input_size"] == P
  ids, durations = [], []
  for _, arrays in index.chunks():
    ids += list(arrays["video_ids"])
    assert arrays["clip_tokens"].dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(arrays["frame_tokens"].astype(np.float32), axis=-1),
                               1.0, atol=2e-3)
    d = arrays["durations"]
    durations += list(d)
    np.testing.assert_array_equal(d, arrays["num_feature_frames"] / 2.0)  # fps 2
    # Row r of 128 covers the frames it averages, [idx_r, max(idx_r+1, idx_r + 1)), frame f
    # covers [f, f + 1) / fps; clip tokens cover their rows' frames, in order.
    for v, t in enumerate(arrays["num_feature_frames"]):
      idx = resample_boundaries(int(t), 128)
      want = np.stack([idx[:-1], np.maximum(idx[1:], idx[:-1] + 1)], axis=-1) / 2.0
      np.testing.assert_allclose(arrays["frame_spans"][v], want, rtol=1e-6)
      rows = arrays["clip_rows"][v]
      np.testing.assert_allclose(arrays["clip_spans"][v, :, 0], want[rows[:, 0], 0], rtol=1e-6)
      np.testing.assert_allclose(arrays["clip_spans"][v, :, 1], want[rows[:, 1] - 1, 1], rtol=1e-6)
    spans = arrays["clip_spans"]
    assert np.all(spans[:, 0, 0] == 0) and np.all(spans[..., 1] > spans[..., 0])
    assert np.all(spans[:, 1:, 0] >= spans[:, :-1, 0])
    assert np.all(spans[..., 1] <= d[:, None] + 1e-5)
  assert ids == [f"v{i}" for i in range(7)]


def test_bad_inputs_are_one_clear_error(model, features, tmp_path):
  rng = np.random.RandomState(3)
  wide = _write_features(tmp_path / "wide.h5", {"a": rng.randn(9, P), "b": rng.randn(9, 5)})
  with pytest.raises(SearchError, match=r"wide.h5: videos have different feature widths: 'b' is "
                                        r"5-d, 'a' is 8-d"):
    index_lib.build_index(model, wide, tmp_path / "x", progress=False)
  narrow = _write_features(tmp_path / "narrow.h5", {"a": rng.randn(9, 5)})
  with pytest.raises(SearchError, match=r"narrow.h5: video 'a' has 5-d features but the model .* "
                                        r"takes 8-d video features"):
    index_lib.build_index(model, narrow, tmp_path / "x", progress=False)
  bare = _write_features(tmp_path / "bare.h5", {"a": rng.randn(9, P)}, attrs=False)
  with pytest.raises(SearchError, match=r"bare.h5: video 'a' has no 'duration' or 'fps' attribute.*"
                                        r"pass --fps"):
    index_lib.build_index(model, bare, tmp_path / "x", progress=False)
  assert index_lib.build_index(model, bare, tmp_path / "y", fps=3.0, progress=False).num_videos == 1
  nan = _write_features(tmp_path / "nan.h5", {"a": np.full((4, P), np.nan)})
  with pytest.raises(SearchError, match=r"nan.h5: video 'a': contains NaN or inf"):
    index_lib.build_index(model, nan, tmp_path / "z", progress=False)
  with pytest.raises(SearchError, match=r"missing.h5: video feature file not found"):
    index_lib.build_index(model, tmp_path / "missing.h5", tmp_path / "z", progress=False)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(SearchError, match=r"busy: not an index directory \(holds notes.txt\)"):
    index_lib.build_index(model, features, tmp_path / "busy", progress=False)
  captions = _write_features(tmp_path / "captions.h5", {"c1": rng.randn(4, P)}, attrs=False)
  with pytest.raises(SearchError, match=r"captions.h5: caption 'nope' not found in the file"):
    read_caption_features(captions, ["c1", "nope"])
  rows = [rng.randn(4, 5).astype(np.float32)]
  with pytest.raises(SearchError, match=r"q.h5: caption 'c' has shape \(4, 5\), the model .* takes "
                                        r"8-d token features"):
    query_lib.encode_token_features(model, rows, 4, ["c"], "q.h5")


def test_damaged_or_foreign_index_is_one_clear_error(model, features, tmp_path, capsys):
  assert cli.main(["query", "--index", str(tmp_path / "nope"), "--clip", str(tmp_path), "x"]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: {tmp_path / 'nope'}: index not found (build it with "
                 "`python -m prvr_jax.search index`)\n")
  out = tmp_path / "i"
  index_lib.build_index(model, features, out, chunk=3, progress=False)
  other = from_params(TINY, init_params(TINY, jax.random.key(9)), workdir="/runs/other", step=7)
  with pytest.raises(SearchError, match=r"built with \(in memory\) step -1, but the model given is "
                                        r"/runs/other step 7 with other parameters"):
    query_lib.search(IndexReader(out), other, np.zeros((1, 32), np.float32), ["q"])
  tokens = out / "seg-000000" / "frame_tokens.npy"
  saved = tokens.read_bytes()
  tokens.write_bytes(saved[:-100])  # truncated
  with pytest.raises(SearchError, match=r"frame_tokens.npy: \d+ bytes, the manifest recorded \d+ "
                                        r"\(truncated or replaced token file\)"):
    IndexReader(out)
  tokens.write_bytes(b"\x00" * len(saved))  # same size, header destroyed
  with pytest.raises(SearchError, match=r"frame_tokens.npy: unreadable token file \(corrupt or "
                                        r"truncated"):
    IndexReader(out)
  tokens.unlink()
  with pytest.raises(SearchError, match=r"frame_tokens.npy: token store file listed in the manifest "
                                        r"is missing; rebuild the index"):
    IndexReader(out)
  tokens.write_bytes(saved)
  # An ANN file of another index (same shapes, other tokens) is refused before any search.
  rng = np.random.RandomState(5)
  others = _write_features(tmp_path / "others.h5", {f"v{i}": rng.randn(30, P) for i in range(7)})
  index_lib.build_index(model, others, tmp_path / "j", chunk=3, progress=False)
  ann_file = next(out.glob("ann-*-frame.faiss"))
  own = ann_file.read_bytes()
  ann_file.write_bytes(next((tmp_path / "j").glob("ann-*-frame.faiss")).read_bytes())
  with pytest.raises(SearchError, match=r"ann-000000-frame.faiss: this ANN file is not the one the "
                                        r"manifest names .* does not match the token store"):
    query_lib.search(IndexReader(out), model, np.zeros((1, 32), np.float32), ["q"], mode="ann")
  ann_file.write_bytes(own)
  assert query_lib.search(IndexReader(out), model, np.ones((1, 32), np.float32), ["q"],
                          mode="ann")[0]
  (out / "manifest.json").write_text("{not json")
  with pytest.raises(SearchError, match=r"manifest.json: not a readable JSON file"):
    IndexReader(out)


# ----------------------------------------------------------------------------------------------
# Raw text queries (the in-model CLIP text tower) equal extracted caption features.


TEXTS = ("A man holds a brown dog.", "someone opens the door slowly", "cup")


@pytest.fixture(scope="module")
def extracted_captions(checkpoint, tmp_path_factory) -> list[np.ndarray]:
  """The token features `python -m prvr_jax.extract captions` writes for TEXTS."""
  directory = tmp_path_factory.mktemp("captions")
  captions = directory / "q.caption.txt"
  captions.write_text("".join(f"v#enc#{i} {t}\n" for i, t in enumerate(TEXTS)))
  feats = directory / "q.h5"
  assert extract.main(["captions", "--clip", str(checkpoint), "--captions", str(captions),
                       "--out", str(feats), "--quiet"]) == 0
  return [r for _, r in read_caption_features(feats, [f"v#enc#{i}" for i in range(len(TEXTS))])]


@pytest.fixture(scope="module")
def tower(checkpoint):
  return text_lib.load_text_tower(checkpoint)


def test_text_token_features_equal_extracted_ones(tower, extracted_captions):
  for got, want in zip(text_lib.text_token_features(tower, TEXTS, batch=2), extracted_captions):
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("max_tokens,keep_eos", [(0, False), (5, True), (5, False)])
def test_raw_text_queries_equal_extracted_caption_features(model, tower, extracted_captions,
                                                           max_tokens, keep_eos):
  rows = extracted_captions
  model = from_params(TINY, model.params, max_caption_tokens=max_tokens, truncate_keep_eos=keep_eos)
  from_file = query_lib.encode_token_features(model, rows, batch=2)
  from_text = text_lib.encode_texts(tower, model, TEXTS, batch=2)
  np.testing.assert_allclose(from_text, from_file, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(from_text, axis=-1), 1.0, atol=1e-5)
  if max_tokens:  # the first caption (9 tokens) is truncated: not the untruncated query
    full = query_lib.encode_token_features(from_params(TINY, model.params), rows[:1], batch=1)
    assert np.abs(full - from_file[:1]).max() > 1e-3


def test_text_tower_width_must_match_the_model(model, tower):
  hidden = dataclasses.replace(tower, kind="hidden")  # 16-d states, the model takes 8-d
  with pytest.raises(SearchError, match=r"gives 16-d hidden token features, the model .* takes 8-d"):
    text_lib.make_text_query_encoder(hidden, model)


# ----------------------------------------------------------------------------------------------
# End to end: raw videos -> extract -> tiny trained run -> index -> query (command lines).


def _train_tiny_run(workdir: pathlib.Path) -> None:
  from prvr_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from tests.train_helpers import tiny_config  # pylint: disable=import-outside-toplevel

  config = tiny_config()
  # The CLIP projection width: features extracted by the tiny CLIP fit the model.
  config.data.synthetic.visual_dim = config.data.synthetic.text_dim = P
  config.train.max_steps = 2
  config.eval.diagnostics = False
  train_and_evaluate(config, str(workdir), progress=False)


@pytest.mark.slow
def test_end_to_end_from_raw_videos(checkpoint, tmp_path, capsys):
  videos = tmp_path / "videos"
  videos.mkdir()
  for name, seconds in (("red_green", 2), ("long", 5), ("short", 1)):
    write_video(videos / f"{name}.mp4", seconds)
  feats = tmp_path / "videos.h5"
  assert extract.main(["videos", "--clip", str(checkpoint), "--videos", str(videos), "--fps", "2",
                       "--out", str(feats), "--quiet"]) == 0
  run = tmp_path / "run"
  _train_tiny_run(run)
  capsys.readouterr()
  index = tmp_path / "index"
  args = ["index", "--workdir", str(run), "--features", str(feats), "--out", str(index),
          "--chunk", "2", "--quiet"]
  assert cli.main(args) == 0
  assert "3 videos in 2 chunks (2 encoded" in capsys.readouterr().out
  assert cli.main(args) == 0 and "already complete" in capsys.readouterr().out
  queries = tmp_path / "queries.txt"
  queries.write_text("a red screen\n\nsomething green\n")
  assert cli.main(["query", "--index", str(index), "--clip", str(checkpoint), "a blue video",
                   "--queries", str(queries), "--top-k", "2", "--batch", "2"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(l["query"], l["rank"]) for l in lines] == [
      (q, r) for q in ("a blue video", "a red screen", "something green") for r in (1, 2)]
  durations = {"red_green": 2.0, "long": 5.0, "short": 1.0}
  for line in lines:
    assert set(line) == {"query", "rank", "video_id", "score", "clip_score", "frame_score", "start",
                         "end", "branch"}
    assert line["branch"] in ("clip", "frame")
    assert abs(line["score"] - (0.4 * line["clip_score"] + 0.6 * line["frame_score"])) < 1e-5
    assert 0 <= line["start"] < line["end"] <= durations[line["video_id"]] + 1e-3
  for a, b in zip(lines[::2], lines[1::2]):
    assert a["score"] >= b["score"] and a["video_id"] != b["video_id"]
  # The index grows from the command line; adding ids already there is one error line.
  assert cli.main(["add", "--index", str(index), "--features", str(feats), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {feats}: video 'long' is already in the index") and err.count("\n") == 1
  more = _write_features(tmp_path / "more.h5", {"extra": np.ones((6, P))})
  assert cli.main(["add", "--index", str(index), "--features", str(more), "--quiet"]) == 0
  assert "1 videos added; the index now holds 4 videos (generation 1)" in capsys.readouterr().out
  assert cli.main(["query", "--index", str(index), "--clip", str(checkpoint), "a blue video",
                   "--top-k", "4", "--mode", "ann"]) == 0
  ranked = [json.loads(line)["video_id"] for line in capsys.readouterr().out.splitlines()]
  assert sorted(ranked) == ["extra", "long", "red_green", "short"]
  # A run trained on extracted caption features needs the CLIP they came from.
  assert cli.main(["query", "--index", str(index), "a blue video"]) == 2
  assert "trained on extracted caption features: pass --clip" in capsys.readouterr().err
  # Bad input through the command line: one line on stderr, status 2.
  narrow = _write_features(tmp_path / "narrow.h5", {"a": np.ones((3, 5))})
  assert cli.main(["index", "--workdir", str(run), "--features", str(narrow), "--out",
                   str(tmp_path / "x"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "narrow.h5: video 'a' has 5-d features" in err and "Traceback" not in err
  assert cli.main(["index", "--workdir", str(tmp_path / "norun"), "--features", str(feats),
                   "--out", str(tmp_path / "x"), "--quiet"]) == 2
  assert "config.json not found: is" in capsys.readouterr().err
