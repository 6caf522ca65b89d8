"""Two-stage search (ANN candidates + exact re-score), the growing index and its crash safety.

Tiny indexes (hundreds of videos) of the tiny random network of test_search.py; the figures at
100,000 videos come from `python -m prvr_jax.bench search`, not from tests.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from prvr_jax.models.msc import init_params
from prvr_jax.search import ann as ann_lib
from prvr_jax.search import cli
from prvr_jax.search import index as index_lib
from prvr_jax.search import maintain
from prvr_jax.search import query as query_lib
from prvr_jax.search.errors import SearchError
from prvr_jax.search.index_store import STALL_ENV, IndexReader
from prvr_jax.search.model import from_params
from tests.test_search import TINY, P, _write_features

ROOT = pathlib.Path(__file__).resolve().parents[1]
IVF = "IVF16,PQ16x4fs"  # a real IVF-PQ on the tiny network's 32-d tokens (Flat below 20k tokens)


def _videos(rng, prefix: str, n: int) -> dict[str, np.ndarray]:
  """Videos of 2-4 events of near-constant features (structure for OP-ToMe and the ANN)."""
  out = {}
  for i in range(n):
    events = rng.randn(rng.randint(2, 5), P)
    lengths = rng.randint(4, 30, size=len(events))
    frames = np.concatenate([np.tile(e, (k, 1)) for e, k in zip(events, lengths)])
    out[f"{prefix}{i:04d}"] = frames + 0.3 * rng.randn(*frames.shape)
  return out


@pytest.fixture(scope="module")
def model():
  return from_params(TINY, init_params(TINY, jax.random.key(0)))


@pytest.fixture(scope="module")
def built(model, tmp_path_factory) -> pathlib.Path:
  """A 200-video index with an IVF-PQ ANN."""
  directory = tmp_path_factory.mktemp("ann")
  feats = _write_features(directory / "videos.h5", _videos(np.random.RandomState(0), "v", 200))
  index_lib.build_index(model, feats, directory / "index", chunk=64, progress=False,
                        ann_factory=IVF)
  return directory / "index"


def _queries(index: IndexReader, n: int, seed: int) -> np.ndarray:
  """Query vectors near a random frame token of a random video (as a matching caption is)."""
  rng = np.random.default_rng(seed)
  videos = np.sort(rng.choice(index.num_rows, n, replace=False))
  tokens = index.rows(videos, ("frame_tokens",))["frame_tokens"].astype(np.float32)
  q = tokens[np.arange(n), rng.integers(0, tokens.shape[1], n)]
  q = q + 0.5 * rng.standard_normal(q.shape) / np.sqrt(q.shape[1])
  return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _top(index, queries, mode, **knobs) -> list[list[str]]:
  hits = query_lib.search_vectors(index, queries, ["q"] * len(queries), clip_weight=0.4,
                                  frame_weight=0.6, top_k=10, mode=mode, **knobs)
  return [[h.video_id for h in row] for row in hits]


def _copy(built: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  out = tmp_path / "index"
  shutil.copytree(built, out)
  return out


def test_ann_returns_the_exact_top10(built):
  index = IndexReader(built)
  assert index.manifest["ann"]["factories"] == {"clip": IVF, "frame": IVF}
  assert query_lib.choose_mode(index) == "exact"  # 200 videos: below EXACT_BELOW
  queries = _queries(index, 64, 1)
  exact = _top(index, queries, "exact")
  same = np.mean([a == e for a, e in zip(_top(index, queries, "ann"), exact)])
  assert same >= 0.95, same
  # Fewer candidates and cells: recall drops, so the knobs reach the ANN.
  few = _top(index, queries, "ann", candidates=10, nprobe=1)
  assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(few, exact)]) < same


def test_grow_remove_compact_retrain(model, built, tmp_path):
  out = _copy(built, tmp_path)
  rng = np.random.RandomState(7)
  new = _write_features(tmp_path / "new.h5", _videos(rng, "w", 40))
  summary = maintain.add_videos(model, new, out, progress=False)
  assert (summary.changed, summary.num_videos, summary.generation) == (40, 240, 1)
  index = IndexReader(out)
  assert index.num_rows == 240 and [s["name"] for s in index.manifest["segments"]] == [
      "seg-000000", "seg-000001"]
  queries = _queries(index, 32, 2)
  exact = _top(index, queries, "exact")
  assert any(v.startswith("w") for row in exact for v in row)  # the new videos are found
  assert np.mean([a == e for a, e in zip(_top(index, queries, "ann"), exact)]) >= 0.9
  # Adding an id that is there: one error naming the file, the id and the index; nothing written.
  again = _write_features(tmp_path / "again.h5", {"v0003": rng.randn(9, P), "z": rng.randn(9, P)})
  with pytest.raises(SearchError, match=r"again.h5: video 'v0003' is already in the index .*index "
                                        r"\(1 of the file's 2 ids are\)"):
    maintain.add_videos(model, again, out, progress=False)
  wide = _write_features(tmp_path / "wide.h5", {"z": rng.randn(9, P + 1)})
  with pytest.raises(SearchError, match=r"wide.h5: video 'z' has 9-d features but the model .* "
                                        r"takes 8-d"):
    maintain.add_videos(model, wide, out, progress=False)
  assert IndexReader(out).generation == 1
  # Remove: never returned again, by either mode; unknown or repeated ids are errors.
  gone = sorted({row[0] for row in exact[:5]})
  maintain.remove_videos(out, gone)
  index = IndexReader(out)
  assert index.num_videos == 240 - len(gone)
  for mode in ("exact", "ann"):
    assert not set(gone) & {v for row in _top(index, queries, mode) for v in row}
  want = [[v for v in row if v not in gone] for row in exact]
  assert [row[:len(w)] for row, w in zip(_top(index, queries, "exact"), want)] == want
  with pytest.raises(SearchError, match=r"video 'nope' is not in the index"):
    maintain.remove_videos(out, ["nope"])
  with pytest.raises(SearchError, match=rf"video '{gone[0]}' was already removed"):
    maintain.remove_videos(out, [gone[0]])
  with pytest.raises(SearchError, match=r"removed, until `search compact`"):
    maintain.add_videos(model, _write_features(tmp_path / "g.h5", {gone[0]: rng.randn(9, P)}), out,
                        progress=False)
  before = _top(index, queries, "exact")
  # Compact: the removed rows are gone from disk, results unchanged; then re-train the quantisers.
  maintain.compact(out, progress=False)
  index = IndexReader(out)
  assert (index.num_rows, index.manifest["removed"]) == (240 - len(gone), [])
  assert _top(index, queries, "exact") == before
  summary = maintain.retrain(out, progress=False)
  index = IndexReader(out)
  assert index.manifest["ann"]["factories"] == {  # the defaults for this size
      "clip": "Flat",
      "frame": ann_lib.default_factory(index.num_rows * 128 // ann_lib.DEFAULT_POOLS["frame"], 32)}
  assert np.mean([a == e for a, e in zip(_top(index, queries, "ann"), before)]) >= 0.9
  # Only the current and the previous generation's files are kept.
  names = {p.name for p in out.iterdir()}
  assert names == {"manifest.json", "seg-000002", f"ann-{summary.generation:06d}-clip.faiss",
                   f"ann-{summary.generation:06d}-frame.faiss",
                   f"ann-{summary.generation - 1:06d}-clip.faiss",
                   f"ann-{summary.generation - 1:06d}-frame.faiss"}


def _fingerprints(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


ADD_SCRIPT = """
import sys, jax
from prvr_jax.models.msc import init_params
from prvr_jax.search import maintain
from prvr_jax.search.model import from_params
from tests.test_search import TINY
model = from_params(TINY, init_params(TINY, jax.random.key(0)))
maintain.add_videos(model, sys.argv[1], sys.argv[2], progress=False)
print("added")
"""


@pytest.mark.parametrize("stage", [pytest.param("add:encoded", marks=pytest.mark.slow), "add:ann"])
def test_killed_add_leaves_the_index_unchanged(model, built, tmp_path, stage):
  out = _copy(built, tmp_path)
  new = _write_features(tmp_path / "new.h5", _videos(np.random.RandomState(8), "w", 20))
  before = _fingerprints(out)
  queries = _queries(IndexReader(out), 16, 3)
  results = _top(IndexReader(out), queries, "ann")
  env = dict(os.environ, **{STALL_ENV: stage}, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen([sys.executable, "-c", ADD_SCRIPT, str(new), str(out)], cwd=ROOT,
                          env=env, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stderr.readline()  # the process prints this when it reaches the stage
    assert line.strip() == f"stalled at {stage}", line
    written = {p.name for p in out.iterdir()}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  # The killed add had written new files (a segment, ANN files) but no manifest names them.
  assert written - set(before) - {"seg-000000"}
  index = IndexReader(out)
  assert index.num_rows == 200 and index.generation == 0
  assert _top(index, queries, "ann") == results
  assert {k: v for k, v in _fingerprints(out).items() if k in before} == before
  # The next add cleans up what the killed one left and succeeds.
  assert maintain.add_videos(model, new, out, progress=False).num_videos == 220
  assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_command_line_maintenance_errors_are_one_line(tmp_path, capsys):
  """--mode ann on an index without ANN, remove of an unknown id: one line, exit 2."""
  rng = np.random.RandomState(9)
  feats = _write_features(tmp_path / "v.h5", _videos(rng, "v", 5))
  model = from_params(TINY, init_params(TINY, jax.random.key(0)))
  index_lib.build_index(model, feats, tmp_path / "i", chunk=64, progress=False, ann="none")
  assert cli.main(["query", "--index", str(tmp_path / "i"), "--clip", str(tmp_path), "--mode",
                   "ann", "x"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "built without an ANN index (--ann none)" in err
  assert err.count("\n") == 1
  assert cli.main(["remove", "--index", str(tmp_path / "i"), "nope"]) == 2
  assert capsys.readouterr().err == f"error: {tmp_path / 'i'}: video 'nope' is not in the index\n"
  assert cli.main(["remove", "--index", str(tmp_path / "i"), "v0001"]) == 0
  assert "1 videos removed; the index now holds 4 videos" in capsys.readouterr().out


def test_milvus_backend_matches_faiss(model, tmp_path):
  pytest.importorskip("milvus_lite")
  feats = _write_features(tmp_path / "v.h5", _videos(np.random.RandomState(11), "v", 64))
  out, faiss_out, uri = tmp_path / "index", tmp_path / "faiss", tmp_path / "milvus.db"
  summary = index_lib.build_index(model, feats, out, chunk=64, progress=False, ann="milvus",
                                  milvus_uri=str(uri))
  index_lib.build_index(model, feats, faiss_out, chunk=64, progress=False)
  assert summary.num_videos == 64
  mil = IndexReader(out)
  assert mil.manifest["ann"]["backend"] == "milvus" and uri.exists()
  queries = _queries(mil, 16, 4)
  exact = _top(mil, queries, "exact")
  assert exact == _top(IndexReader(faiss_out), queries, "ann")
  assert np.mean([a == e for a, e in zip(_top(mil, queries, "ann"), exact)]) >= 0.95
  # Grows and shrinks like the FAISS index.
  new = _write_features(tmp_path / "new.h5", _videos(np.random.RandomState(10), "w", 10))
  maintain.add_videos(model, new, out, progress=False)
  maintain.remove_videos(out, [exact[0][0]])
  mil = IndexReader(out)
  got = _top(mil, queries, "ann")
  assert exact[0][0] not in {v for row in got for v in row}
  assert np.mean([a == e for a, e in zip(got, _top(mil, queries, "exact"))]) >= 0.9
  # A collection that does not hold the store's tokens is refused.
  from pymilvus import MilvusClient  # pylint: disable=import-outside-toplevel

  client = MilvusClient(str(uri))
  client.delete(mil.manifest["ann"]["collections"]["clip"], filter="video < 3")
  client.close()
  with pytest.raises(SearchError, match=r"holds \d+ tokens, the token store \d+: the ANN does not "
                                        r"match the token store"):
    IndexReader(out).ann()
