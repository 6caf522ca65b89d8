"""The MSC ablation on a config (default: the synthetic benchmark), several seeds, one table.

  python -m prvr_jax.ablation --workdir=runs/ablation --seeds=0,1,2 --epochs=5

Variants are cumulative, as in the paper: the GMMFormer-v2 baseline (uniform clips, no TCPL, no
CBVA), +TCPL, +CBVA (fixed 32 clips), +OP-ToMe, +adaptive CBVA (= MSC). Each run trains with
`train_and_evaluate` into `<workdir>/<variant>_seed<k>`, sharing one prepared dataset; the table
(mean ± std of test R@1/R@5/R@10/R@100/SumR over seeds) goes to `<workdir>/ablation.md` and the
raw numbers to `<workdir>/ablation.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from prvr_jax.utils import host_memory
from prvr_jax.utils.files import atomic_write_text

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "Where runs and the table go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (data stays the same).")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Override train.num_epochs (0: keep the config's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split of the table.")

# name -> (use_tcpl, use_cbva, use_op_tome, adaptive_cbva)
VARIANTS: dict[str, tuple[bool, bool, bool, bool]] = {
    "baseline": (False, False, False, False),
    "+TCPL": (True, False, False, False),
    "+CBVA": (True, True, False, False),
    "+OP-ToMe": (True, True, True, False),
    "+adaptive (MSC)": (True, True, True, True),
}
METRICS = ("R@1", "R@5", "R@10", "R@100", "SumR")


def variant_config(base: Any, name: str, seed: int, epochs: int, data_dir: str) -> Any:
  """`base` with the switches of variant `name`, training seed `seed` and a shared data_dir."""
  config = base.copy_and_resolve_references()
  tcpl, cbva, op_tome, adaptive = VARIANTS[name]
  config.loss.use_tcpl, config.loss.use_cbva, config.loss.adaptive_cbva = tcpl, cbva, adaptive
  config.loss.cbva_fixed_clips = 32
  config.model.use_op_tome = op_tome
  config.seed = seed
  config.data.data_dir = data_dir
  config.eval.diagnostics = False
  if epochs:
    config.train.num_epochs = epochs
  return config


def table(results: dict[str, list[dict[str, float]]], split: str) -> str:
  """Markdown table of mean ± std per variant."""
  lines = [f"| variant ({split}) | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
  for name, runs in results.items():
    cells = []
    for m in METRICS:
      values = np.array([r[m] for r in runs])
      cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
  # Here, not at the top: grain workers re-import __main__ and must not load JAX, and nothing
  # heavy should load before the malloc re-exec of the `__main__` block.
  from prvr_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(_WORKDIR.value)
  data_dir = os.path.join(workdir, "tfds")
  results: dict[str, list[dict[str, float]]] = {}
  timings = {}
  for name in VARIANTS:
    for seed in (int(s) for s in _SEEDS.value):
      config = variant_config(_CONFIG.value, name, seed, _EPOCHS.value, data_dir)
      config.eval.final_splits = (_SPLIT.value,)
      run_dir = os.path.join(workdir, f"{name.replace(' ', '_').replace('+', 'plus_')}_seed{seed}")
      start = time.time()
      summary = train_and_evaluate(config, run_dir, progress=False)
      timings[f"{name}/{seed}"] = time.time() - start
      report = summary["eval"][_SPLIT.value]
      results.setdefault(name, []).append({m: float(report[m]) for m in METRICS})
      print(f"{name} seed {seed}: SumR {report['SumR']:.2f} ({timings[f'{name}/{seed}']:.0f} s)",
            file=sys.stderr, flush=True)
  text = table(results, _SPLIT.value)
  atomic_write_text(os.path.join(workdir, "ablation.md"), text)
  atomic_write_text(os.path.join(workdir, "ablation.json"),
                    json.dumps(dict(results=results, seconds=timings), indent=2) + "\n")
  print(text)


if __name__ == "__main__":
  host_memory.reexec_with_malloc_tunables()
  app.run(main)
