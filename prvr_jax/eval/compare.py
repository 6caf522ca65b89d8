"""Which queries one evaluation fixes that another misses (the paper's Table A2 counts).

  python -m prvr_jax.eval.compare runs/synthetic/eval_test_queries.jsonl \
      runs/synthetic/eval_test_clip_baseline_queries.jsonl

Reads two per-query records files of the same split (`records.py`), matches them by caption id,
and counts at each cut-off k (default R@1 and R@10) the queries whose ground-truth video is in
the top k of A only ("A fixes"), of B only ("B fixes"), of both, and of neither. Prints a table,
or one JSON object with --json. Exit status 0, or 2 with one `error:` line for files that cannot
be compared (missing, not records, other captions or other ground truths).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from prvr_jax.eval.records import RecordsError, read_query_records

DEFAULT_KS: tuple[int, ...] = (1, 10)


def compare_records(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]],
                    ks: Sequence[int] = DEFAULT_KS, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
  """Counts of queries found at R@k by A only, B only, both, neither.

  Args:
    a, b: caption id -> record (`read_query_records`) of the same split.
    ks: cut-offs.
    names: what to call a and b in messages.

  Returns:
    {'queries': n, 'R@k': {'a_only', 'b_only', 'both', 'neither'} for each k}.

  Raises:
    RecordsError: the two hold other captions, or another ground-truth video for a caption.
  """
  if set(a) != set(b):
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    raise RecordsError(f"{names[0]} and {names[1]} hold other captions ({len(only_a)} only in "
                       f"{names[0]}, e.g. {only_a[:1]}; {len(only_b)} only in {names[1]}, e.g. "
                       f"{only_b[:1]}): compare records of the same split")
  for caption in a:
    if a[caption].get("video_id") != b[caption].get("video_id"):
      raise RecordsError(f"caption {caption!r}: ground-truth video {a[caption].get('video_id')!r} in "
                         f"{names[0]} but {b[caption].get('video_id')!r} in {names[1]}")
  out: dict[str, Any] = {"queries": len(a)}
  for k in ks:
    in_a = {c for c, r in a.items() if r["rank"]["fused"] <= k}
    in_b = {c for c, r in b.items() if r["rank"]["fused"] <= k}
    out[f"R@{k}"] = {"a_only": len(in_a - in_b), "b_only": len(in_b - in_a),
                     "both": len(in_a & in_b), "neither": len(set(a) - in_a - in_b)}
  return out


def format_table(counts: dict[str, Any], a_name: str, b_name: str) -> str:
  """The comparison as a small text table."""
  lines = [f"A: {a_name}", f"B: {b_name}", f"{counts['queries']} queries in both",
           f"{'':6s} {'A fixes':>8s} {'B fixes':>8s} {'both':>8s} {'neither':>8s}"]
  for key, c in counts.items():
    if key.startswith("R@"):
      lines.append(f"{key:6s} {c['a_only']:8d} {c['b_only']:8d} {c['both']:8d} {c['neither']:8d}")
  return "\n".join(lines)


def _ks(text: str) -> tuple[int, ...]:
  try:
    ks = tuple(int(k) for k in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--ks takes comma-separated integers, got {text!r}") from None
  if not ks or min(ks) < 1:
    raise argparse.ArgumentTypeError(f"--ks must be positive, got {text!r}")
  return ks


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m prvr_jax.eval.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("a", help="records file A (eval_<split>_queries.jsonl)")
  parser.add_argument("b", help="records file B, e.g. eval_<split>_clip_baseline_queries.jsonl")
  parser.add_argument("--ks", type=_ks, default=DEFAULT_KS, help="cut-offs, default 1,10")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  try:
    counts = compare_records(read_query_records(args.a), read_query_records(args.b), args.ks)
  except RecordsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(dict(counts, a=args.a, b=args.b)))
  else:
    print(format_table(counts, args.a, args.b))
  return 0


if __name__ == "__main__":
  sys.exit(main())
