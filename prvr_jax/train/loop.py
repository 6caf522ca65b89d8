"""The training loop: data, sharded steps, logging, evaluation, checkpoints, resumption.

`train_and_evaluate(config, workdir)` is what `--mode=train` runs and what tests and notebooks
call. Every process runs the same code; process 0 alone writes files other than checkpoints
(Orbax coordinates those itself).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from prvr_jax import parallel
from prvr_jax.data import pipeline
from prvr_jax.losses.config import LossConfig
from prvr_jax.models import caption_tower as caption_tower_lib
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import init_params
from prvr_jax.train import checkpoint
from prvr_jax.train.metrics_log import MetricsLog
from prvr_jax.train.optim import make_optimizer, warmup_linear_schedule
from prvr_jax.train.sharded_step import make_sharded_train_step
from prvr_jax.train.step import TrainState, create_train_state


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class RunSetup:
  """What a run is built from (resolved once, shared by train and eval)."""

  config: ml_collections.ConfigDict
  dataset_dir: str
  model_cfg: ModelConfig
  loss_cfg: LossConfig
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  total_steps: int


def _is_chief() -> bool:
  return jax.process_index() == 0


def resolve_caption_tower(config: ml_collections.ConfigDict, info: pipeline.SplitInfo,
                          workdir: str) -> Optional[caption_tower_lib.CaptionTowerConfig]:
  """The in-model CLIP text tower of `config.text_tower` (None when `clip_dir` is empty).

  A run that already has one (its workdir's caption_tower.json) keeps it, so resuming or
  evaluating does not need the CLIP directory; a new run reads the checkpoint's config.json.
  """
  t = config.get("text_tower")
  if t is None or not t.clip_dir:
    return None
  kept = caption_tower_lib.read_from_workdir(workdir)
  if kept is not None:
    changed = [f"text_tower.{k}={getattr(t, k)!r} (the run has {getattr(kept, k)!r})"
               for k in ("features", "trainable_blocks") if getattr(t, k) != getattr(kept, k)]
    if changed:
      raise ValueError(f"{os.path.join(workdir, caption_tower_lib.WORKDIR_FILE)}: this workdir's run "
                       f"was built with another caption tower: {', '.join(changed)}; use a new workdir")
    return kept
  from prvr_jax.clip.config import read_config  # pylint: disable=import-outside-toplevel

  clip = read_config(t.clip_dir)
  max_tokens = pipeline.resolve_max_tokens(info, config.data.get("max_caption_tokens", 0))
  return caption_tower_lib.CaptionTowerConfig(
      text=clip.text, projection_dim=clip.projection_dim, features=t.features,
      trainable_blocks=int(t.trainable_blocks), max_query_tokens=max_tokens,
      truncate_keep_eos=bool(config.data.get("truncate_keep_eos", False)),
      source=os.path.abspath(t.clip_dir))


def resolve_model_config(config: ml_collections.ConfigDict, info: pipeline.SplitInfo,
                         caption_tower: Optional[caption_tower_lib.CaptionTowerConfig] = None
                         ) -> ModelConfig:
  """`config.model` with input sizes 0 taken from the dataset (the query width from the caption
  tower when there is one); a size that contradicts them is an error naming both."""
  model = dict(config.model)
  sizes = [("visual_input_size", info.video_dim, f"the dataset {info.dataset_dir} has")]
  if caption_tower is None:
    sizes.append(("query_input_size", info.text_dim, f"the dataset {info.dataset_dir} has"))
  else:
    sizes.append(("query_input_size", caption_tower.width,
                  f"the CLIP text tower of {caption_tower.source} gives"))
  for key, actual, where in sizes:
    if model[key] == 0:
      model[key] = actual
    elif model[key] != actual:
      raise ValueError(f"config.model.{key}={model[key]} but {where} {actual}-d features; set "
                       f"--config.model.{key}={actual} (or 0 = from data)")
  return ModelConfig.from_config_dict(model).replace_caption_tower(caption_tower)


def ensure_dataset(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared dataset of `config.data` (process 0 builds it when missing; others wait)."""
  dataset_dir = pipeline.dataset_dir_from_config(config, workdir)
  if not pipeline.is_prepared(dataset_dir) and _is_chief():
    from prvr_jax.data.prepare import prepare  # pylint: disable=import-outside-toplevel

    logging.info("dataset not found at %s: preparing it", dataset_dir)
    prepare(config, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("prvr_jax: dataset ready")
  return dataset_dir


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  """Prepares data if needed, resolves model/loss configs, builds the mesh, sizes the schedule."""
  mesh = parallel.make_data_mesh()
  parallel.check_divisible(config.data.batch_size, mesh, "data.batch_size")
  for key in ("eval_video_batch_size", "eval_query_batch_size"):
    parallel.check_divisible(config.data[key], mesh, f"data.{key}")
  dataset_dir = ensure_dataset(config, workdir)
  info = pipeline.open_split(dataset_dir, config.data.train_split)
  tower = resolve_caption_tower(config, info, workdir)
  model_cfg = resolve_model_config(config, info, tower)
  if tower is not None and _is_chief():
    caption_tower_lib.write_to_workdir(tower, workdir)
  with config.unlocked():
    config.model.visual_input_size = model_cfg.visual_input_size
    config.model.query_input_size = model_cfg.query_input_size
  loss_cfg = LossConfig.from_config_dict(config.loss)
  batch = config.data.batch_size
  if config.data.get("drop_remainder", False):
    steps_per_epoch = info.num_videos // batch
  else:
    steps_per_epoch = math.ceil(info.num_videos / batch)
  if steps_per_epoch < 1:
    raise ValueError(f"the train split of {dataset_dir} has {info.num_videos} videos, fewer than "
                     f"data.batch_size={batch} with data.drop_remainder=True")
  return RunSetup(config, dataset_dir, model_cfg, loss_cfg, mesh, steps_per_epoch,
                  steps_per_epoch * config.train.num_epochs)


def make_optimizer_from_config(config: ml_collections.ConfigDict, total_steps: int,
                               model_cfg: Optional[ModelConfig] = None
                               ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The configured optimiser with warm-up over `warmup_fraction` of the steps, then linear decay
  (frozen caption-tower parameters, if `model_cfg` has a tower, get no updates)."""
  o = config.optim
  schedule = warmup_linear_schedule(o.lr, total_steps, o.warmup_fraction)
  optimizer = make_optimizer(o.name, schedule, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
                             caption_tower=model_cfg.caption_tower if model_cfg else None)
  return optimizer, schedule


def initial_state(setup: RunSetup, optimizer: optax.GradientTransformation) -> TrainState:
  """Fresh replicated TrainState from `config.seed` (a caption tower starts from its CLIP
  checkpoint's weights)."""
  key = jax.random.fold_in(jax.random.key(setup.config.seed), 0)
  rep = parallel.replicated(setup.mesh)
  tower = setup.model_cfg.caption_tower
  if tower is None:
    init = jax.jit(lambda k: create_train_state(init_params(setup.model_cfg, k), optimizer),
                   out_shardings=rep)
    return init(key)
  clip_dir = setup.config.text_tower.clip_dir
  tower_params = caption_tower_lib.load_tower_params(clip_dir, tower)

  def init_with_tower(k, loaded):
    params = dict(init_params(setup.model_cfg, k))
    params[caption_tower_lib.PARAMS_KEY] = loaded
    return create_train_state(params, optimizer)

  # The weights are an argument, not constants folded into the program.
  return jax.jit(init_with_tower, out_shardings=rep)(key, tower_params)


def abstract_state(setup: RunSetup, optimizer: optax.GradientTransformation) -> Any:
  """Shapes and (replicated) shardings of the TrainState, for restoring onto this mesh."""
  shapes = jax.eval_shape(lambda k: create_train_state(init_params(setup.model_cfg, k), optimizer),
                          jax.random.key(0))
  return checkpoint.abstract_with_sharding(shapes, parallel.replicated(setup.mesh))


def resolved_setup(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  """The setup of a trained run from its resolved `config.json`, without touching the dataset
  (searching or converting a run works on a machine that does not hold its data).
  `steps_per_epoch` / `total_steps` are unknown there (0): restoring does not need them."""
  mesh = parallel.make_data_mesh()
  tower = None
  if config.get("text_tower") is not None and config.text_tower.clip_dir:
    tower = caption_tower_lib.read_from_workdir(workdir)
    if tower is None:
      raise checkpoint.CheckpointError(f"{os.path.join(workdir, caption_tower_lib.WORKDIR_FILE)}: "
                                       "missing; the run's config has a CLIP text tower "
                                       f"(text_tower.clip_dir={config.text_tower.clip_dir!r})")
  model_cfg = ModelConfig.from_config_dict(config.model).replace_caption_tower(tower)
  if not (model_cfg.visual_input_size and model_cfg.query_input_size):
    raise checkpoint.CheckpointError(f"{os.path.join(workdir, checkpoint.CONFIG_FILE)}: model input "
                                     "sizes are not resolved (0); is this a training workdir?")
  return RunSetup(config, "", model_cfg, LossConfig.from_config_dict(config.loss), mesh, 0, 0)


def load_trained(workdir: str, which: str = "best", *, with_data: bool = False,
                 step: Optional[int] = None) -> tuple[RunSetup, Any, int]:
  """(setup, params, step) of a trained run.

  Args:
    workdir: the training workdir.
    which: 'best' (by val SumR, falling back to the latest when no evaluation was saved) or
      'latest'; ignored when `step` is given.
    with_data: also open (and, when missing, prepare) the run's dataset, as evaluation needs.
    step: restore exactly this step.

  Raises:
    checkpoint.CheckpointError: no run, no such checkpoint, or a corrupt one.
  """
  config = checkpoint.read_config(workdir)
  setup = setup_run(config, workdir) if with_data else resolved_setup(config, workdir)
  optimizer, _ = make_optimizer_from_config(config, max(setup.total_steps, 1), setup.model_cfg)
  manager = checkpoint.make_manager(workdir, read_only=True)
  try:
    if step is None and which == "best":
      step = checkpoint.best_step(manager)
    elif step is not None and step not in manager.all_steps():
      kept = ", ".join(map(str, sorted(manager.all_steps()))) or "none"
      raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_dir(workdir)}: checkpoint step {step} "
                                       f"is not there (kept steps: {kept})")
    step, state, _, _ = checkpoint.restore(manager, abstract_state(setup, optimizer), step)
  finally:
    manager.close()
  return setup, state.params, step


class _StopSignal:
  """SIGTERM/SIGINT -> save and exit cleanly at the next step boundary."""

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def any_process(self) -> bool:
    """True when a signal reached any process (all processes agree, so all stop together)."""
    flag = np.int32(self.received is not None)
    if jax.process_count() > 1:
      flag = np.max(multihost_utils.process_allgather(flag))
    return bool(flag)


def _host_batch(batch: dict[str, np.ndarray], local_videos: int) -> dict[str, np.ndarray]:
  arrays, _ = pipeline.split_batch(batch)
  arrays["text_labels"] = parallel.globalize_text_labels(arrays["text_labels"], local_videos)
  return arrays


def _evaluate(setup: RunSetup, params: Any, split: str, progress: bool) -> dict[str, Any]:
  from prvr_jax.eval.evaluate import evaluate_split  # pylint: disable=import-outside-toplevel

  return evaluate_split(params, setup.model_cfg, setup.config, setup.dataset_dir, split,
                        mesh=setup.mesh, progress=progress)


def _has_split(setup: RunSetup, split: str) -> bool:
  try:
    pipeline.open_split(setup.dataset_dir, split)
    return True
  except KeyError:
    return False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True) -> dict[str, Any]:
  """Trains (resuming from `workdir` when it holds checkpoints), then evaluates the best checkpoint.

  Returns:
    summary dict: `step` reached, `stopped` ('finished', 'max_steps', 'early_stop', 'signal'),
    `best_val_SumR`, `best_step`, and `eval` {split: report} of the final evaluation.

  Raises:
    NonFiniteLossError: the loss became NaN/inf.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  setup = setup_run(config, workdir)
  config = setup.config
  if _is_chief():
    checkpoint.write_config(config, workdir)
  optimizer, schedule = make_optimizer_from_config(config, setup.total_steps, setup.model_cfg)
  step_fn = make_sharded_train_step(setup.model_cfg, setup.loss_cfg, optimizer, setup.mesh, schedule)
  local_videos = config.data.batch_size // jax.process_count()
  dataset = pipeline.train_from_config(config, setup.dataset_dir, process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       caption_text_length=setup.model_cfg.caption_token_length,
                                       caption_context_length=setup.model_cfg.caption_context_length)
  iterator = pipeline.iterator_from_config(config, dataset)
  manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
  loop = dict(best_val_sumr=-1.0, best_step=-1, evals_since_best=0)
  if manager.latest_step() is not None:
    step, state, data_state, loop = checkpoint.restore(manager, abstract_state(setup, optimizer))
    iterator.set_state(data_state)
    logging.info("restored step %d from %s", step, checkpoint.checkpoint_dir(workdir))
  else:
    step, state = 0, initial_state(setup, optimizer)
  end = setup.total_steps
  if config.train.max_steps:
    end = min(end, config.train.max_steps)
  log = MetricsLog(workdir, enabled=_is_chief(), resume_step=step)
  base_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  eval_every = config.eval.every or setup.steps_per_epoch
  ckpt_every = config.train.checkpoint_every
  last_saved, stopped = (step if manager.latest_step() is not None else -1), "finished"
  pending: Optional[tuple[int, dict]] = None  # the previous step's metrics, checked one step late

  def save(val_sumr: Optional[float] = None) -> None:
    nonlocal last_saved
    checkpoint.save(manager, step, state, iterator.get_state(), loop, val_sumr)
    last_saved = step

  def check_finite(at_step: int, metrics: dict) -> None:
    # The gradient norm too: a finite loss with an inf gradient already poisons the parameters
    # that the next checkpoint would save.
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      good = (f"the last good checkpoint is step {last_saved} in {checkpoint.checkpoint_dir(workdir)}"
              if last_saved >= 0 else "no checkpoint was saved yet")
      raise NonFiniteLossError(f"non-finite loss at step {at_step} (loss {loss}, gradient norm "
                               f"{grad_norm}); {good}")

  try:
    bar = tqdm(total=end, initial=step, desc="train", unit="step", disable=not (progress and _is_chief()),
               dynamic_ncols=True)
    start_time, start_step = time.time(), step
    with _StopSignal() as stop:
      while step < end:
        epoch = step // setup.steps_per_epoch
        batch = parallel.global_batch(_host_batch(next(iterator), local_videos), setup.mesh)
        hard = jnp.asarray(epoch >= config.train.hard_negative_start_epoch)
        state, metrics = step_fn(state, batch, base_key, hard)
        if pending is not None:
          check_finite(*pending)
        step += 1
        pending = (step, metrics)
        if step % config.train.log_every == 0 or step == end:
          host = jax.device_get(metrics)
          check_finite(step, host)
          log.write_train(step, host)
          bar.set_postfix(loss=f"{float(host['loss']):.4f}", epoch=epoch)
        bar.update(1)
        val_sumr = None
        if step % eval_every == 0 or step == end:
          check_finite(*pending)
          report = _evaluate(setup, state.params, config.data.val_split, progress=False)
          val_sumr = float(report["SumR"])
          log.write_eval(step, config.data.val_split, report)
          if val_sumr > loop["best_val_sumr"]:
            loop.update(best_val_sumr=val_sumr, best_step=step, evals_since_best=0)
          else:
            loop["evals_since_best"] += 1
          bar.write(f"step {step}: val SumR {val_sumr:.2f} (best {loop['best_val_sumr']:.2f} at "
                    f"step {loop['best_step']})")
        if val_sumr is not None or (ckpt_every and step % ckpt_every == 0):
          check_finite(*pending)
          save(val_sumr)
        patience = config.train.early_stop_patience
        if patience and loop["evals_since_best"] >= patience:
          stopped = "early_stop"
          break
        if stop.any_process():
          stopped = "signal"
          break
      else:
        if end < setup.total_steps:
          stopped = "max_steps"
    bar.close()
    if pending is not None:
      check_finite(*pending)
    if last_saved != step:
      save()
  except BaseException:
    # Finish (or fail) in-flight async saves before the exception leaves: an interpreter exit
    # under a running save thread would leave a temporary directory and a second traceback.
    manager.wait_until_finished()
    manager.close()
    log.close()
    raise
  manager.wait_until_finished()
  steps_run = step - start_step
  elapsed = time.time() - start_time
  summary = dict(step=step, stopped=stopped, best_val_SumR=loop["best_val_sumr"],
                 best_step=loop["best_step"], steps_run=steps_run,
                 seconds_per_step=elapsed / max(steps_run, 1), eval={})
  if stopped == "signal":
    manager.close()
    log.close()
    logging.warning("stopped by a signal at step %d; checkpoint saved in %s; run the same command "
                    "to resume", step, checkpoint.checkpoint_dir(workdir))
    return summary
  best = checkpoint.best_step(manager)
  if best is not None and best != step:
    _, best_state, _, _ = checkpoint.restore(manager, abstract_state(setup, optimizer), best)
    params = best_state.params
  else:
    params = state.params
  manager.close()
  summary["eval"] = final_evaluation(setup, params, workdir, progress)
  log.close()
  if _is_chief():
    write_plots(setup, params, workdir, summary["eval"], progress)
  return summary


def final_evaluation(setup: RunSetup, params: Any, workdir: str, progress: bool) -> dict[str, Any]:
  """Evaluates `params` on `config.eval.final_splits` and writes `eval_<split>.json`."""
  from prvr_jax.eval.evaluate import write_eval_report  # pylint: disable=import-outside-toplevel

  reports = {}
  for split in setup.config.eval.final_splits:
    if not _has_split(setup, split):
      logging.info("no %r split in %s: not evaluated", split, setup.dataset_dir)
      continue
    report = _evaluate(setup, params, split, progress)
    reports[split] = report
    if _is_chief():
      write_eval_report(report, workdir, split)
      print(f"{split}: R@1 {report['R@1']:.2f}  R@5 {report['R@5']:.2f}  R@10 {report['R@10']:.2f}  "
            f"R@100 {report['R@100']:.2f}  SumR {report['SumR']:.2f}", file=sys.stderr)
  return reports


def write_plots(setup: RunSetup, params: Any, workdir: str, reports: dict[str, Any],
                progress: bool) -> list[str]:
  """Training curves, recall@k of each evaluated split and the collapse diagnostics as PNGs."""
  from prvr_jax.eval import plots  # pylint: disable=import-outside-toplevel
  from prvr_jax.train.metrics_log import METRICS_FILE  # pylint: disable=import-outside-toplevel

  paths = []
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if os.path.isfile(metrics_path):
    paths.append(plots.plot_training_curves(metrics_path, os.path.join(workdir, "training_curves.png")))
  for split, report in reports.items():
    paths.append(plots.plot_recall(report, os.path.join(workdir, f"recall_{split}.png")))
  if setup.config.eval.diagnostics:
    from prvr_jax.eval.diagnostics import collapse_diagnostics  # pylint: disable=import-outside-toplevel
    from prvr_jax.utils.files import atomic_write_text  # pylint: disable=import-outside-toplevel
    import json  # pylint: disable=import-outside-toplevel

    split = setup.config.data.val_split
    diag = collapse_diagnostics(params, setup.model_cfg, setup.config, setup.dataset_dir, split,
                                max_queries=setup.config.eval.diagnostics_max_queries)
    atomic_write_text(os.path.join(workdir, f"diagnostics_{split}.json"),
                      json.dumps(diag, indent=2, sort_keys=True, default=float) + "\n")
    paths.append(plots.plot_diagnostics(diag, os.path.join(workdir, f"diagnostics_{split}.png")))
  return paths


def evaluate_run(workdir: str, *, which: str = "best", progress: bool = True) -> dict[str, Any]:
  """`--mode=eval`: the run's best (or latest) checkpoint on `config.eval.final_splits`."""
  setup, params, step = load_trained(workdir, which, with_data=True)
  logging.info("evaluating step %d of %s", step, workdir)
  reports = final_evaluation(setup, params, workdir, progress)
  if _is_chief():
    write_plots(setup, params, workdir, reports, progress)
  return dict(step=step, eval=reports)
