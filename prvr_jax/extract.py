"""CLIP feature extraction from raw videos and caption files, in the authors' HDF5 layout.

  python -m prvr_jax.extract videos --clip DIR --videos DIR_OR_LISTFILE --fps F --out FILE.h5 \\
      [--batch 64] [--max-items N] [--precision highest|default] [--dtype float32|bfloat16]
  python -m prvr_jax.extract captions --clip DIR --captions FILE.caption.txt --out FILE.h5 \\
      [--batch 256] [--text-features projected|hidden] [--max-items N] [--dtype ...]

--clip is a local Hugging Face CLIPModel directory (config.json + model.safetensors, or a sharded
index). Videos: one (T, P) float32 dataset per video id (file stem), T = ceil(duration * fps),
attributes duration (s), fps, num_decoded_frames, source. Captions: one (L, P) dataset per caption
id, rows [BOS] ... [EOS] (see prvr_jax/clip/text_features.py). Runs resume: ids already in --out are
skipped; see prvr_jax/clip/feature_store.py for the crash-safe writing.

Exit status: 0 all listed items are in the output, 1 some items failed (listed in the summary),
2 the run could not start (bad arguments, checkpoint, list or output).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from prvr_jax.errors import PrvrError
from prvr_jax.utils import host_memory


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m prvr_jax.extract", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--clip", required=True, help="local CLIPModel checkpoint directory")
  common.add_argument("--out", required=True, help="output .h5 file (resumed if it exists)")
  common.add_argument("--max-items", type=int, default=None, help="only the first N items")
  common.add_argument("--precision", choices=("highest", "default"), default="highest",
                      help="float32 matmul precision: highest (as PyTorch) or the backend default")
  common.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the tower's compute dtype (float32 parameters; features are stored "
                           "as float32 either way, and a resumed file keeps one dtype)")
  common.add_argument("--quiet", action="store_true", help="no progress bar")
  v = sub.add_parser("videos", parents=[common], help="frame embeddings of video files")
  v.add_argument("--videos", required=True, help="directory of videos, or a file listing them")
  v.add_argument("--fps", type=float, required=True, help="frames sampled per second")
  v.add_argument("--batch", type=int, default=64, help="frames per device batch")
  c = sub.add_parser("captions", parents=[common], help="token features of a caption file")
  c.add_argument("--captions", required=True, help="<c><split>.caption.txt file")
  c.add_argument("--batch", type=int, default=256, help="captions per device batch")
  c.add_argument("--text-features", choices=("projected", "hidden"), default="projected",
                 help="projected: rows through text_projection (EOS row = CLIP text embedding); "
                      "hidden: final-LayerNorm states")
  return p


def run(args: argparse.Namespace):
  """Runs one parsed command; returns its Summary (raises the errors `main` reports)."""
  # pylint: disable=import-outside-toplevel
  # Here, not at the top: this module is `__main__`, and JAX imported before the malloc re-exec
  # of its `__main__` block would load twice (--help stays instant too).
  from prvr_jax.clip.load import load_clip
  from prvr_jax.clip.model import ClipEncoders
  from prvr_jax.clip.text_features import extract_captions
  from prvr_jax.clip.video_features import ExtractError, extract_videos
  from prvr_jax.text.tokenizer import ClipTokenizer
  # pylint: enable=import-outside-toplevel

  if args.max_items is not None and args.max_items <= 0:
    raise ExtractError(f"--max-items must be > 0, got {args.max_items}")
  towers = ("vision",) if args.command == "videos" else ("text",)
  config, params = load_clip(args.clip, towers=towers)
  encoders = ClipEncoders(config, precision=args.precision, dtype=args.dtype)
  info = {"clip_checkpoint": str(args.clip)}
  if args.command == "videos":
    return extract_videos(encoders, params, args.videos, args.fps, args.out, batch=args.batch,
                          max_items=args.max_items, info=info, progress=not args.quiet)
  tokenizer = ClipTokenizer(max_length=config.text.context_length)
  if config.text.vocab_size < tokenizer.vocab_size:
    raise ExtractError(f"{args.clip}: text vocab_size {config.text.vocab_size} is smaller than the "
                       f"CLIP tokenizer's {tokenizer.vocab_size}: not a CLIP text tower")
  return extract_captions(encoders, params, tokenizer, args.captions, args.out, batch=args.batch,
                          text_features=args.text_features, max_items=args.max_items, info=info,
                          progress=not args.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command line entry point; returns the exit status (see the module docstring)."""
  args = _parser().parse_args(argv)
  try:
    summary = run(args)
  except PrvrError as e:  # stops the run before or outside any single item; names the file
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary.text())
  return 1 if summary.failed else 0


if __name__ == "__main__":
  host_memory.reexec_with_malloc_tunables()
  sys.exit(main())
