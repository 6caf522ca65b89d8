"""Entry point: flags only; the work lives in importable functions.

  python -m prvr_jax.main                                   # synthetic benchmark: train + eval
  python -m prvr_jax.main --config=configs/tvr.py --config.data.root=DIR --workdir=runs/tvr
  python -m prvr_jax.main --config=... --workdir=W --mode=eval
  python -m prvr_jax.main --config=... --workdir=W --mode=eval --baseline=clip   # CLIP zero-shot

Modes: `prepare` (build the dataset of `config.data`, write `<workdir>/prepare_summary.json`),
`train` (prepare when needed, train with resumption from `<workdir>`, evaluate the best checkpoint,
write plots), `eval` (evaluate a trained workdir's best checkpoint, or with --baseline=clip the CLIP
zero-shot row of the config's dataset, no training needed). Multi-process runs are started
by launch/*.sh, which set PRVR_COORDINATOR_ADDRESS / PRVR_NUM_PROCESSES / PRVR_PROCESS_ID or
PRVR_DISTRIBUTED=auto (see prvr_jax/parallel.py).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from prvr_jax.errors import ConfigError, PrvrError
from prvr_jax.utils import host_memory

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (datasets, checkpoints, metrics, "
                               "plots); default runs/<config.data.name>.")
_MODE = flags.DEFINE_enum("mode", "train", ["prepare", "train", "eval"], "What to do.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "--mode=eval: which checkpoint to evaluate.")
_BASELINE = flags.DEFINE_enum("baseline", None, ["clip"],
                              "--mode=eval: evaluate a baseline that needs no trained run instead "
                              "(clip: CLIP zero-shot, the caption's EOS feature against the video's "
                              "frames and OP-ToMe clips), written as eval_<split>_clip_baseline.json.")


def run(config, workdir: str, mode: str, checkpoint: str = "best", baseline: str | None = None) -> int:
  """Runs one mode; returns the process exit code.

  A user error (`PrvrError`: bad input, a bad config value, a missing or corrupt checkpoint, a
  non-finite loss) is one `error:` line and status 2; any other exception is a bug and leaves
  with its traceback.
  """
  try:
    _run_mode(config, workdir, mode, checkpoint, baseline)
  except PrvrError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _run_mode(config, workdir: str, mode: str, checkpoint: str, baseline: str | None) -> None:
  if baseline and mode != "eval":
    raise ConfigError(f"--baseline={baseline} goes with --mode=eval, not --mode={mode}")
  # pylint: disable=import-outside-toplevel
  # Imported here, not at the top: grain workers re-import __main__ and must not load JAX, and
  # nothing heavy should load before the malloc re-exec of the `__main__` block.
  from prvr_jax.data.config import DataConfig
  from prvr_jax.data.prepare import prepare

  if mode == "prepare":
    prepare(DataConfig.from_config_dict(config.data), workdir)
    return
  from prvr_jax import parallel
  from prvr_jax.train import loop, report
  # pylint: enable=import-outside-toplevel

  parallel.initialize_distributed()
  if mode == "train":
    summary = loop.train_and_evaluate(config, workdir)
    print(report.summary_line(summary, workdir), file=sys.stderr)
  elif baseline:
    report.evaluate_baseline(config, workdir, baseline)
  else:
    report.evaluate_run(workdir, which=checkpoint)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and TFDS log every save and read at INFO; progress bars and summaries say what matters.
    absl_logging.set_verbosity(absl_logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.data.name)
  distributed = bool(os.environ.get("PRVR_NUM_PROCESSES") or os.environ.get("PRVR_DISTRIBUTED"))
  try:
    code = run(config, workdir, _MODE.value, _CHECKPOINT.value, _BASELINE.value)
  except Exception:  # pylint: disable=broad-except  # a bug: its traceback, then the exit below
    if not distributed:
      raise
    traceback.print_exc()
    code = 1
  if distributed:
    # After jax.distributed started, a normal interpreter exit can wait forever on the other
    # processes' collectives; leave at once with the code (logs are flushed first).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  host_memory.reexec_with_malloc_tunables()
  app.run(main)
