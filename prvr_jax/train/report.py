"""What a run reports: evaluations, eval_<split>.json, plots, the collapse diagnostics, and the
summary line `--mode=train` prints; `evaluate_run` is `--mode=eval`."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from prvr_jax.data import pipeline
from prvr_jax.eval import plots
from prvr_jax.eval.diagnostics import collapse_diagnostics
from prvr_jax.eval.evaluate import evaluate_split, write_eval_report
from prvr_jax.run import Run, is_chief, load_trained
from prvr_jax.train.metrics_log import METRICS_FILE
from prvr_jax.utils.files import atomic_write_text


def evaluate(run: Run, params: Any, split: str, progress: bool) -> dict[str, Any]:
  """`evaluate_split` of `params` on `split` of the run's dataset, over the run's mesh."""
  return evaluate_split(params, run.model, run.data, run.eval, run.dataset_dir, split,
                        mesh=run.mesh, progress=progress)


def _has_split(run: Run, split: str) -> bool:
  try:
    pipeline.open_split(run.dataset_dir, split)
    return True
  except pipeline.SplitNotFoundError:
    return False


def final_evaluation(run: Run, params: Any, progress: bool) -> dict[str, Any]:
  """Evaluates `params` on `eval.final_splits` and writes `eval_<split>.json`."""
  reports = {}
  for split in run.eval.final_splits:
    if not _has_split(run, split):
      logging.info("no %r split in %s: not evaluated", split, run.dataset_dir)
      continue
    report = evaluate(run, params, split, progress)
    reports[split] = report
    if is_chief():
      write_eval_report(report, run.workdir, split)
      print(f"{split}: R@1 {report['R@1']:.2f}  R@5 {report['R@5']:.2f}  R@10 {report['R@10']:.2f}  "
            f"R@100 {report['R@100']:.2f}  SumR {report['SumR']:.2f}", file=sys.stderr)
  return reports


def write_plots(run: Run, params: Any, reports: dict[str, Any]) -> list[str]:
  """Training curves, recall@k of each evaluated split and the collapse diagnostics as PNGs."""
  workdir = run.workdir
  paths = []
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if os.path.isfile(metrics_path):
    paths.append(plots.plot_training_curves(metrics_path, os.path.join(workdir, "training_curves.png")))
  for split, report in reports.items():
    paths.append(plots.plot_recall(report, os.path.join(workdir, f"recall_{split}.png")))
  if run.eval.diagnostics:
    split = run.data.val_split
    diag = collapse_diagnostics(params, run.model, run.data, run.dataset_dir, split,
                                max_queries=run.eval.diagnostics_max_queries)
    atomic_write_text(os.path.join(workdir, f"diagnostics_{split}.json"),
                      json.dumps(diag, indent=2, sort_keys=True, default=float) + "\n")
    paths.append(plots.plot_diagnostics(diag, os.path.join(workdir, f"diagnostics_{split}.png")))
  return paths


def summary_line(summary: dict[str, Any], workdir: str) -> str:
  """The one line `--mode=train` prints when it ends."""
  return (f"train: stopped ({summary['stopped']}) at step {summary['step']}; best val SumR "
          f"{summary['best_val_SumR']:.2f} at step {summary['best_step']}; "
          f"{summary['seconds_per_step']:.3f} s/step; outputs in {workdir}")


def evaluate_run(workdir: str, *, which: str = "best", progress: bool = True) -> dict[str, Any]:
  """`--mode=eval`: the run's best (or latest) checkpoint on `eval.final_splits`."""
  run, params, step = load_trained(workdir, which, with_data=True)
  logging.info("evaluating step %d of %s", step, workdir)
  reports = final_evaluation(run, params, progress)
  if is_chief():
    write_plots(run, params, reports)
  return dict(step=step, eval=reports)
