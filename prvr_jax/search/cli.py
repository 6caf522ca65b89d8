"""Search your own videos with a trained MSC model: build an index, then query it.

  python -m prvr_jax.search index --workdir RUN --features videos.h5 --out INDEX \\
      [--chunk 256] [--which best|latest] [--dtype float16|float32|int8] [--fps F] [--overwrite]
      [--ann faiss|milvus|none] [--ann-factory FAISS_FACTORY] [--milvus-uri URI]
  python -m prvr_jax.search query --index INDEX --clip CLIP_DIR "a man holds a dog" \\
      [--queries FILE] [--top-k 10] [--batch 64] [--text-kind projected|hidden] [--workdir RUN]
      [--mode auto|exact|ann] [--nprobe 16] [--candidates 100]
  python -m prvr_jax.search query --index INDEX --text-features captions.h5 [CAPTION_ID ...]
  python -m prvr_jax.search query --index INDEX "a man holds a dog"   # model with its own CLIP tower
  python -m prvr_jax.search add --index INDEX --features more_videos.h5 [--workdir RUN] [--fps F]
  python -m prvr_jax.search remove --index INDEX VIDEO_ID [VIDEO_ID ...]
  python -m prvr_jax.search compact --index INDEX [--retrain]
  python -m prvr_jax.search retrain --index INDEX [--ann-factory FAISS_FACTORY]
  python -m prvr_jax.search serve --index INDEX --clip CLIP_DIR [--videos DIR] [--host 127.0.0.1] \\
      [--port 8080] [--max-k 50] [--max-batch 32] [--max-wait-ms 5] [--max-query-chars 1000] \\
      [--mode auto|exact|ann] [--nprobe 16] [--candidates 100]

`index` encodes every video of a feature file (`python -m prvr_jax.extract videos`) with a trained
run's model into memory-mapped token arrays and builds the ANN index of each branch; an
interrupted build resumes when run again. `add`, `remove`, `compact` and `retrain` change an
index atomically (an interrupted one leaves the previous index as it was). `query` restores the model the index
was built with (the manifest names its workdir and step), encodes the queries (raw text through
the CLIP text tower of --clip, precomputed caption features of --text-features, or raw text through
the model's own CLIP text tower when it was trained with one) and prints one
JSON line per result:
  {"query", "rank", "video_id", "score", "clip_score", "frame_score", "start", "end", "branch"}
(start / end in seconds; see prvr_jax/search/query.py for the scores and the moment).
`serve` keeps the model and index loaded and answers the same results over HTTP, with a web page
(see prvr_jax/search/server.py for the routes).

Exit status: 0 done, 2 bad input (one message naming the file and the item, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Optional, Sequence

from prvr_jax.errors import PrvrError
from prvr_jax.search import ann as ann_lib
from prvr_jax.search import maintain
from prvr_jax.search import query as query_lib
from prvr_jax.search import restore
from prvr_jax.search.errors import SearchError
from prvr_jax.search.features import read_caption_features
from prvr_jax.search.index import build_index, check_ann_backend
from prvr_jax.search.index_store import IndexReader
from prvr_jax.search.model import load_search_model
from prvr_jax.search.query import hit_line
from prvr_jax.search.server import Limits, serve
from prvr_jax.search.service import SearchSettings
from prvr_jax.search.text import encode_texts, encode_texts_with_model_tower, load_text_tower


def _add_query_options(p: argparse.ArgumentParser) -> None:
  """The options of `query` and `serve`: how the index's model and CLIP are restored, and how the
  index is searched."""
  p.add_argument("--text-kind", choices=("projected", "hidden"), default="projected",
                 help="--clip token features: as the training captions were extracted")
  p.add_argument("--workdir", default=None,
                 help="restore the model from here instead of the workdir the index names")
  p.add_argument("--precision", choices=("highest", "default"), default="highest",
                 help="CLIP float32 matmul precision")
  p.add_argument("--mode", choices=query_lib.MODES, default="auto",
                 help="exact scan, or ANN candidates re-scored exactly (auto: ann from "
                      f"{query_lib.EXACT_BELOW} videos on)")
  p.add_argument("--nprobe", type=int, default=None,
                 help=f"ANN: IVF cells visited per query (default {ann_lib.DEFAULT_NPROBE})")
  p.add_argument("--candidates", type=int, default=None,
                 help="ANN: videos per branch and query re-scored exactly (default "
                      f"{ann_lib.DEFAULT_CANDIDATES})")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m prvr_jax.search", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  i = sub.add_parser("index", help="encode the videos of a feature file into an index")
  i.add_argument("--workdir", required=True, help="trained run (python -m prvr_jax.main --workdir)")
  i.add_argument("--features", required=True, help="video features .h5 (prvr_jax.extract videos)")
  i.add_argument("--out", required=True, help="index directory (an unfinished one is resumed)")
  i.add_argument("--chunk", type=int, default=256, help="videos per encoding batch and chunk file")
  i.add_argument("--which", choices=("best", "latest"), default="best",
                 help="checkpoint: best val SumR (default) or latest")
  i.add_argument("--dtype", choices=("float16", "float32", "int8"), default="float16",
                 help="stored token precision (int8: one scale per token, half of float16)")
  i.add_argument("--fps", type=float, default=None,
                 help="feature frame rate, for videos without 'duration'/'fps' attributes")
  i.add_argument("--overwrite", action="store_true",
                 help="rebuild when --out holds an index built with other settings")
  i.add_argument("--quiet", action="store_true", help="no progress bar")
  _ann_arguments(i)
  q = sub.add_parser("query", help="search an index; prints JSON lines")
  q.add_argument("text", nargs="*", help="queries (raw text with --clip, caption ids with "
                                         "--text-features)")
  q.add_argument("--index", required=True, help="index directory")
  # Neither for a model trained with its own CLIP text tower (config.text_tower): queries are text.
  src = q.add_mutually_exclusive_group()
  src.add_argument("--clip", help="CLIP checkpoint directory: queries are raw text")
  src.add_argument("--text-features", help="caption features .h5 (prvr_jax.extract captions): "
                                           "queries are caption ids (default: all of them)")
  q.add_argument("--queries", help="file with one query per line (blank lines skipped)")
  q.add_argument("--top-k", type=int, default=10, help="results per query")
  q.add_argument("--batch", type=int, default=64, help="queries per device batch")
  _add_query_options(q)
  a = sub.add_parser("add", help="append the videos of a feature file to an index")
  a.add_argument("--index", required=True, help="index directory")
  a.add_argument("--features", required=True, help="video features .h5 of new video ids")
  a.add_argument("--workdir", default=None,
                 help="restore the model from here instead of the workdir the index names")
  a.add_argument("--fps", type=float, default=None, help="as for `index`")
  a.add_argument("--quiet", action="store_true", help="no progress bar")
  r = sub.add_parser("remove", help="remove videos from an index (until compact: tombstones)")
  r.add_argument("--index", required=True, help="index directory")
  r.add_argument("ids", nargs="+", help="video ids")
  c = sub.add_parser("compact", help="rewrite an index without its removed videos")
  c.add_argument("--index", required=True, help="index directory")
  c.add_argument("--retrain", action="store_true", help="also train new ANN quantisers")
  c.add_argument("--quiet", action="store_true", help="no progress bar")
  t = sub.add_parser("retrain", help="train new ANN quantisers on the current tokens")
  t.add_argument("--index", required=True, help="index directory")
  t.add_argument("--ann-factory", default=None, help="FAISS index factory string (default: "
                                                     "chosen for the current size)")
  t.add_argument("--quiet", action="store_true", help="no progress bar")
  s = sub.add_parser("serve", help="a search service and web page (until Ctrl-C)")
  s.add_argument("--index", required=True, help="index directory")
  s.add_argument("--clip", help="CLIP checkpoint directory (runs trained on extracted captions)")
  s.add_argument("--videos", help="directory of the video files: the page plays them and shows "
                                  "thumbnails (only files whose stem is an indexed id are served)")
  s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this "
                                                     "machine only)")
  s.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
  s.add_argument("--max-k", type=int, default=50, help="most results a query may ask for")
  s.add_argument("--max-batch", type=int, default=32,
                 help="queries per encoder call, shared by concurrent requests (and per POST)")
  s.add_argument("--max-wait-ms", type=float, default=5.0,
                 help="how long a request waits for others to share its encoder call")
  s.add_argument("--max-query-chars", type=int, default=1000, help="characters per query")
  _add_query_options(s)
  s.add_argument("--access-log", action="store_true", help="log every request")
  return p


def _ann_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--ann", choices=("faiss", "milvus", "none"), default="faiss",
                 help="candidate index: FAISS in process (default), a Milvus collection, or none "
                      "(exact search only)")
  p.add_argument("--ann-factory", default=None,
                 help="FAISS index factory string (default: IVF + 4-bit PQ fast-scan sized to "
                      "the collection, Flat when small)")
  p.add_argument("--milvus-uri", default=None,
                 help="with --ann milvus: a Milvus server URI or a milvus-lite .db file")


def _read_queries(args: argparse.Namespace) -> list[str]:

  queries = []
  for k, text in enumerate(args.text):
    if not text.strip():
      raise SearchError(f"query {k + 1} on the command line is empty")
    queries.append(text.strip())
  if args.queries:
    path = pathlib.Path(args.queries)
    try:
      lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise SearchError(f"{path}: cannot read the query file: {e}") from None
    queries += [line.strip() for line in lines if line.strip()]
    if not queries:
      raise SearchError(f"{path}: no queries in the file")
  return queries


def _check_positive(args: argparse.Namespace, *names: str) -> None:
  """Bad numbers are reported before the (slow) model restore."""

  for name in names:
    value = getattr(args, name)
    if value is not None and not value > 0:
      raise SearchError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def run_index(args: argparse.Namespace):
  """`index`: returns the IndexSummary."""

  _check_positive(args, "chunk", "fps")
  check_ann_backend(args.ann, args.milvus_uri)
  model = load_search_model(args.workdir, args.which)
  return build_index(model, args.features, args.out, chunk=args.chunk, dtype=args.dtype,
                     fps=args.fps, overwrite=args.overwrite, progress=not args.quiet,
                     ann=args.ann, ann_factory=args.ann_factory, milvus_uri=args.milvus_uri)


def run_query(args: argparse.Namespace):
  """`query`: returns the hits (lists per query)."""

  _check_positive(args, "top_k", "batch", "nprobe", "candidates")
  queries = _read_queries(args)
  index = IndexReader(args.index)  # checked before the (slow) model restore
  if query_lib.choose_mode(index, args.mode) == "ann":
    index.ann()  # the ANN files are checked against the token store before the restore too
  workdir = restore.index_workdir(index, args.workdir)
  own_tower = restore.has_own_text_tower(workdir)
  if own_tower and (args.clip or args.text_features):
    raise SearchError(f"{workdir}: the model runs its own CLIP text tower on query text; drop "
                      f"{'--clip' if args.clip else '--text-features'} and pass the queries as text")
  if not own_tower and not (args.clip or args.text_features):
    raise SearchError(f"{workdir}: the model was trained on extracted caption features: pass --clip "
                      "CLIP_DIR (raw text queries) or --text-features FILE (caption features)")
  if not queries and not args.text_features:
    raise SearchError("no query given: pass query texts or --queries FILE")
  # Query inputs are read before the (slow) model restore, so their errors come at once.
  if args.clip:

    tower = load_text_tower(args.clip, args.text_kind, args.precision)
  elif args.text_features:
    items = read_caption_features(args.text_features, queries or None)
    names = [cid for cid, _ in items]
  model = restore.restore_index_model(index, workdir)
  if own_tower:

    vectors, names = encode_texts_with_model_tower(model, queries, args.batch), queries
  elif args.clip:
    vectors, names = encode_texts(tower, model, queries, args.batch), queries
  else:
    vectors = query_lib.encode_token_features(model, [rows for _, rows in items], args.batch,
                                              names, args.text_features)
  return query_lib.search(index, model, vectors, names, top_k=args.top_k, batch=args.batch,
                          mode=args.mode, nprobe=args.nprobe, candidates=args.candidates)


def run_add(args: argparse.Namespace):
  """`add`: returns the OperationSummary."""
  _check_positive(args, "fps")
  index = IndexReader(args.index)
  model = restore.restore_index_model(index, restore.index_workdir(index, args.workdir))
  return maintain.add_videos(model, args.features, args.index, fps=args.fps, progress=not args.quiet)


def run_maintenance(args: argparse.Namespace):
  """`remove`, `compact`, `retrain`: returns the OperationSummary."""
  if args.command == "remove":
    return maintain.remove_videos(args.index, args.ids)
  if args.command == "compact":
    return maintain.compact(args.index, retrain=args.retrain, progress=not args.quiet)
  return maintain.retrain(args.index, factory=args.ann_factory, progress=not args.quiet)


def run_serve(args: argparse.Namespace) -> int:
  """`serve`: returns the exit status once the server has stopped (130: Ctrl-C while loading)."""
  _check_positive(args, "max_k", "max_batch", "max_query_chars", "nprobe", "candidates")
  if not 0 <= args.port <= 65535:
    raise SearchError(f"--port must be in [0, 65535], got {args.port}")
  if not args.max_wait_ms >= 0:
    raise SearchError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
  limits = Limits(max_query_chars=args.max_query_chars, max_k=args.max_k,
                  max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
  try:
    serve(args.index, clip=args.clip, text_kind=args.text_kind, precision=args.precision,
          workdir=args.workdir, videos=args.videos, host=args.host, port=args.port,
          limits=limits, access_log=args.access_log,
          settings=SearchSettings(args.mode, args.nprobe, args.candidates))
  except KeyboardInterrupt:  # before the server took over Ctrl-C: nothing was served yet
    print("interrupted while loading; not served", file=sys.stderr)
    return 130
  return 0


def _print_hits(results) -> None:
  for hits in results:
    for h in hits:
      print(json.dumps(hit_line(h), ensure_ascii=False))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command line entry point; returns the exit status (see the module docstring)."""
  args = _parser().parse_args(argv)
  # Restoring a run logs orbax / TFDS notices through absl; the tool's own output is enough.
  absl_logger = logging.getLogger("absl")
  previous_level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    if args.command == "index":
      print(run_index(args).text())
    elif args.command == "query":
      _print_hits(run_query(args))
    elif args.command == "add":
      print(run_add(args).text())
    elif args.command == "serve":
      return run_serve(args)
    else:
      print(run_maintenance(args).text())
  except PrvrError as e:  # bad input; the message names the file (and the item)
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    absl_logger.setLevel(previous_level)
  return 0
