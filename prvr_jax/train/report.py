"""What a run reports: evaluations, eval_<split>.json, per-query records, plots, the collapse
diagnostics, and the summary line `--mode=train` prints; `evaluate_run` is `--mode=eval`,
`evaluate_baseline` is `--mode=eval --baseline=clip`."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Mapping

import numpy as np

from prvr_jax import parallel
from prvr_jax.data import pipeline
from prvr_jax.errors import ConfigError
from prvr_jax.eval import clip_baseline, plots, records
from prvr_jax.eval.diagnostics import collapse_diagnostics
from prvr_jax.eval.evaluate import evaluate_split, evaluate_split_with_ranks, summary_text
from prvr_jax.eval.evaluate import write_eval_report
from prvr_jax.eval.moment_metrics import moment_ious
from prvr_jax.run import Run, RunConfig, ensure_dataset, is_chief, load_trained
from prvr_jax.train.metrics_log import METRICS_FILE
from prvr_jax.utils.files import atomic_write_text

BASELINES = ("clip",)


def evaluate(run: Run, params: Any, split: str, progress: bool) -> dict[str, Any]:
  """`evaluate_split` of `params` on `split` of the run's dataset, over the run's mesh."""
  return evaluate_split(params, run.model, run.data, run.eval, run.dataset_dir, split,
                        mesh=run.mesh, progress=progress)


def _has_split(dataset_dir: str, split: str) -> bool:
  try:
    pipeline.open_split(dataset_dir, split)
    return True
  except pipeline.SplitNotFoundError:
    return False


def output_name(split: str, baseline: str = "") -> str:
  """The name of a split's outputs: `<split>`, or `<split>_<baseline>_baseline`."""
  return f"{split}_{baseline}_baseline" if baseline else split


def write_split_outputs(workdir: str, dataset_dir: str, split: str, name: str,
                        report: Mapping[str, Any], results: Mapping[str, np.ndarray]) -> list[str]:
  """eval_<name>.json, eval_<name>_queries.jsonl, recall_<name>.png, ranks_<name>.png and, with
  moment annotations, iou_<name>.png; returns the paths."""
  paths = [write_eval_report(report, workdir, name)]
  rows = records.query_records(results, pipeline.read_split_names(dataset_dir, split))
  paths.append(records.write_query_records(os.path.join(workdir, f"eval_{name}_queries.jsonl"), rows))
  paths.append(plots.plot_recall(report, os.path.join(workdir, f"recall_{name}.png"), ranks=results))
  paths.append(plots.plot_rank_histogram(results, os.path.join(workdir, f"ranks_{name}.png"),
                                         num_videos=report["num_videos"], title=name))
  if "moment" in report:
    paths.append(plots.plot_iou_histogram(moment_ious(results), os.path.join(workdir, f"iou_{name}.png"),
                                          title=name))
  return paths


def final_evaluation(run: Run, params: Any, progress: bool) -> dict[str, Any]:
  """Evaluates `params` on `eval.final_splits` and writes each split's outputs
  (`write_split_outputs`)."""
  reports = {}
  for split in run.eval.final_splits:
    if not _has_split(run.dataset_dir, split):
      logging.info("no %r split in %s: not evaluated", split, run.dataset_dir)
      continue
    report, results = evaluate_split_with_ranks(params, run.model, run.data, run.eval,
                                                run.dataset_dir, split, mesh=run.mesh,
                                                progress=progress)
    reports[split] = report
    if is_chief():
      write_split_outputs(run.workdir, run.dataset_dir, split, split, report, results)
      print(f"{split}: {summary_text(report)}", file=sys.stderr)
  return reports


def write_plots(run: Run, params: Any, reports: dict[str, Any]) -> list[str]:
  """Training curves and the collapse diagnostics as PNGs (each split's recall, rank and IoU
  plots are written with its evaluation)."""
  del reports
  workdir = run.workdir
  paths = []
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if os.path.isfile(metrics_path):
    paths.append(plots.plot_training_curves(metrics_path, os.path.join(workdir, "training_curves.png")))
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


def evaluate_baseline(config: Mapping[str, Any] | RunConfig, workdir: str, baseline: str = "clip", *,
                      progress: bool = True) -> dict[str, Any]:
  """`--mode=eval --baseline=clip`: the CLIP zero-shot row on `eval.final_splits` of the config's
  dataset (prepared when missing, as training does; no trained run needed). Writes each split's
  outputs named `<split>_clip_baseline` (`write_split_outputs`) into `workdir`.

  Raises:
    ConfigError: an unknown baseline, or features that are not one space (`clip_baseline`).
  """
  if baseline not in BASELINES:
    raise ConfigError(f"--baseline must be one of {BASELINES}, got {baseline!r}")
  sections = config if isinstance(config, RunConfig) else RunConfig.from_config_dict(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_data_mesh()
  for key in ("eval_video_batch_size", "eval_query_batch_size"):
    parallel.check_divisible(getattr(sections.data, key), mesh, f"data.{key}")
  dataset_dir = ensure_dataset(sections.data, workdir)
  reports = {}
  for split in sections.eval.final_splits:
    if not _has_split(dataset_dir, split):
      logging.info("no %r split in %s: not evaluated", split, dataset_dir)
      continue
    report, results = clip_baseline.evaluate_split(sections.data, sections.eval, dataset_dir, split,
                                                   mesh=mesh, progress=progress)
    reports[split] = report
    if is_chief():
      name = output_name(split, baseline)
      write_split_outputs(workdir, dataset_dir, split, name, report, results)
      print(f"{name}: {summary_text(report)}", file=sys.stderr)
  return dict(baseline=baseline, eval=reports)
