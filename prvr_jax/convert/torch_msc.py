"""The converter's command line, and the reader of the authors' PyTorch checkpoint files.

  python -m prvr_jax.convert.torch_msc --golden FILE.npz   # full-pipeline parity report
  python -m prvr_jax.convert.torch_msc --ckpt best.ckpt --out params.msgpack [--num-heads 4]

`--ckpt` reads a `.ckpt`/`.pth` file written by the authors' training script (a dict with a
`state_dict` entry, or a bare state_dict) with torch's safe `weights_only` loader and converts it
(`state_dict.convert`); `--golden` runs `golden_parity.run_parity` on a golden file.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Mapping, Optional

import numpy as np
from flax import serialization

from prvr_jax.convert.golden_parity import print_report, run_parity
from prvr_jax.convert.state_dict import ConversionError, convert, to_numpy
from prvr_jax.errors import PrvrError
from prvr_jax.utils.files import atomic_write_bytes


def load_torch_checkpoint(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a state_dict from an authors' `.ckpt`/`.pth` file with torch's `weights_only` loader.

  Raises ConversionError (naming the file) when torch is missing, the file is unreadable or not a
  checkpoint of the expected form.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"checkpoint file not found: {path}")
  try:
    # Here, not at the top: torch is a test-only dependency (requirements-test.txt), needed only
    # to read the authors' files.
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(f"reading {path} needs torch (pip install torch); {e}") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt or unsafe files
    raise ConversionError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f"{path} holds {type(obj).__name__}, not a state_dict")
  bad = [k for k, v in obj.items() if not hasattr(v, "shape")]
  if bad:
    raise ConversionError(f"{path}: entry {bad[0]!r} is not a tensor")
  return {k: to_numpy(v, f"{path}:{k}") for k, v in obj.items()}


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m prvr_jax.convert.torch_msc", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--golden", help="golden .npz file: run the full parity check against it")
  src.add_argument("--ckpt", help="authors' .ckpt/.pth checkpoint to convert")
  parser.add_argument("--out", help="with --ckpt: write params here (flax msgpack)")
  parser.add_argument("--num-heads", type=int, default=4)
  parser.add_argument("--sft-factor", type=float, default=None,
                      help="with --ckpt: DyGMM softmax temperature (default: the checkpoint's config, else 0.09)")
  args = parser.parse_args(argv)
  try:
    if args.golden:
      rows = run_parity(args.golden)
      return 0 if print_report(rows) else 1
    state_dict = load_torch_checkpoint(args.ckpt)
    sft = args.sft_factor if args.sft_factor is not None else 0.09
    config, params = convert(state_dict, num_heads=args.num_heads, sft_factor=sft)
    print(f"converted {len(state_dict)} tensors from {args.ckpt}: {config}")
    if args.out:
      atomic_write_bytes(args.out, serialization.msgpack_serialize(params))
      print(f"wrote {args.out}")
    return 0
  except PrvrError as e:  # a missing, corrupt or unexpected file; the message names it
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
