"""Entry point: flags only; the work lives in importable functions.

  python -m prvr_jax.main --config=configs/synthetic.py --workdir=/tmp/run --mode=prepare

Modes implemented so far: `prepare` (build the dataset of `config.data`, write
`<workdir>/prepare_summary.json`). Training and evaluation modes come with the training loop.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (summaries, datasets, checkpoints).")
_MODE = flags.DEFINE_enum("mode", "prepare", ["prepare"], "What to do.")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  # Imported here: grain workers re-import __main__, and must not pull in JAX-heavy modules.
  from prvr_jax.data.formats import DataError  # pylint: disable=import-outside-toplevel
  from prvr_jax.data.prepare import prepare  # pylint: disable=import-outside-toplevel
  try:
    prepare(_CONFIG.value, _WORKDIR.value)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
