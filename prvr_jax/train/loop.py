"""The training loop: sharded steps, logging, validation, checkpoints, resumption, early stopping.

`train_and_evaluate(config, workdir)` is what `--mode=train` runs and what tests and notebooks
call: it resolves the run once (`prvr_jax.run`), trains, then evaluates the best checkpoint and
writes the report (`train/report.py`). Every process runs the same code; process 0 alone writes
files other than checkpoints (Orbax coordinates those itself).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from prvr_jax import parallel
from prvr_jax.data import pipeline
from prvr_jax.errors import PrvrError
from prvr_jax.run import Run, RunConfig, abstract_state, initial_state, is_chief, make_optimizer
from prvr_jax.run import compute_changes, describe_runtime, resolve_run, runtime_info, write_config
from prvr_jax.train import checkpoint, report
from prvr_jax.train.metrics_log import MetricsLog
from prvr_jax.train.sharded_step import make_sharded_train_step


class NonFiniteLossError(PrvrError, RuntimeError):
  """The loss became NaN or inf; the message names the step and the last good checkpoint."""


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


class _Training:
  """One training session: the state, the data iterator, the checkpoints and the bookkeeping.

  `bookkeeping` (best_val_sumr, best_step, evals_since_best) is saved with every checkpoint. The
  metrics of a step are checked for NaN/inf one step late (`pending`), so the host never waits
  for a step before dispatching the next; they are checked at once before anything is logged,
  evaluated or saved.
  """

  def __init__(self, run: Run):
    self.run = run
    self.optimizer, schedule = make_optimizer(run)
    self.step_fn = make_sharded_train_step(run.model, run.loss, self.optimizer, run.mesh, schedule)
    self.local_videos = run.data.batch_size // jax.process_count()
    dataset = pipeline.train_from_config(run.data, run.dataset_dir, seed=run.config.seed,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count(),
                                         caption_text_length=run.model.caption_token_length,
                                         caption_context_length=run.model.caption_context_length)
    self.iterator = pipeline.iterator_from_config(run.data, dataset)
    self.manager = checkpoint.make_manager(run.workdir, keep=run.train.keep_checkpoints)
    self.bookkeeping = dict(best_val_sumr=-1.0, best_step=-1, evals_since_best=0)
    if self.manager.latest_step() is not None:
      self.step, self.state, data_state, self.bookkeeping = checkpoint.restore(
          self.manager, abstract_state(run, self.optimizer))
      self.iterator.set_state(data_state)
      self.last_saved = self.step
      logging.info("restored step %d from %s", self.step, checkpoint.checkpoint_dir(run.workdir))
    else:
      self.step, self.state, self.last_saved = 0, initial_state(run, self.optimizer), -1
    self.end = min(run.total_steps, run.train.max_steps or run.total_steps)
    self.log = MetricsLog(run.workdir, enabled=is_chief(), resume_step=self.step)
    self.base_key = jax.random.fold_in(jax.random.key(run.config.seed), 1)
    self.pending: Optional[tuple[int, dict]] = None  # the last step's metrics, not checked yet

  def save(self, val_sumr: Optional[float] = None) -> None:
    checkpoint.save(self.manager, self.step, self.state, self.iterator.get_state(),
                    self.bookkeeping, val_sumr)
    self.last_saved = self.step

  def check_finite(self, at_step: int, metrics: Mapping[str, Any]) -> None:
    # The gradient norm too: a finite loss with an inf gradient already poisons the parameters
    # that the next checkpoint would save.
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      where = checkpoint.checkpoint_dir(self.run.workdir)
      good = (f"the last good checkpoint is step {self.last_saved} in {where}"
              if self.last_saved >= 0 else "no checkpoint was saved yet")
      raise NonFiniteLossError(f"non-finite loss at step {at_step} (loss {loss}, gradient norm "
                               f"{grad_norm}); {good}")

  def check_pending(self) -> None:
    if self.pending is not None:
      self.check_finite(*self.pending)

  def train_step(self, bar: tqdm) -> None:
    """One optimisation step, then its metrics line every `log_every` steps."""
    epoch = self.step // self.run.steps_per_epoch
    arrays, _ = pipeline.split_batch(next(self.iterator))
    arrays["text_labels"] = parallel.globalize_text_labels(arrays["text_labels"], self.local_videos)
    batch = parallel.global_batch(arrays, self.run.mesh)
    hard = jnp.asarray(epoch >= self.run.train.hard_negative_start_epoch)
    self.state, metrics = self.step_fn(self.state, batch, self.base_key, hard)
    self.check_pending()
    self.step += 1
    self.pending = (self.step, metrics)
    if self.step % self.run.train.log_every == 0 or self.step == self.end:
      host = jax.device_get(metrics)
      self.check_finite(self.step, host)
      self.log.write_train(self.step, host)
      bar.set_postfix(loss=f"{float(host['loss']):.4f}", epoch=epoch)
    bar.update(1)

  def validate(self, bar: tqdm) -> float:
    """Val SumR of the current parameters; updates the best and the early-stopping count."""
    self.check_pending()
    split, b = self.run.data.val_split, self.bookkeeping
    result = report.evaluate(self.run, self.state.params, split, progress=False)
    val_sumr = float(result["SumR"])
    self.log.write_eval(self.step, split, result)
    if val_sumr > b["best_val_sumr"]:
      b.update(best_val_sumr=val_sumr, best_step=self.step, evals_since_best=0)
    else:
      b["evals_since_best"] += 1
    bar.write(f"step {self.step}: val SumR {val_sumr:.2f} MedR {result['MedR']:g} MnR "
              f"{result['MnR']:.2f} (best SumR {b['best_val_sumr']:.2f} at step {b['best_step']})")
    return val_sumr

  def train(self, progress: bool) -> str:
    """Steps until the end, early stopping or a signal; returns why it stopped."""
    run, stopped = self.run, "finished"
    eval_every = run.eval.every or run.steps_per_epoch
    bar = tqdm(total=self.end, initial=self.step, desc="train", unit="step",
               disable=not (progress and is_chief()), dynamic_ncols=True)
    with _StopSignal() as stop:
      while self.step < self.end:
        self.train_step(bar)
        val_sumr = None
        if self.step % eval_every == 0 or self.step == self.end:
          val_sumr = self.validate(bar)
        every = run.train.checkpoint_every
        if val_sumr is not None or (every and self.step % every == 0):
          self.check_pending()
          self.save(val_sumr)
        patience = run.train.early_stop_patience
        if patience and self.bookkeeping["evals_since_best"] >= patience:
          stopped = "early_stop"
          break
        if stop.any_process():
          stopped = "signal"
          break
      else:
        if self.end < run.total_steps:
          stopped = "max_steps"
    bar.close()
    self.check_pending()
    if self.last_saved != self.step:
      self.save()
    return stopped

  def best_params(self) -> Any:
    """The parameters of the best checkpoint by val SumR (the current ones when none is)."""
    best = checkpoint.best_step(self.manager)
    if best is None or best == self.step:
      return self.state.params
    _, best_state, _, _ = checkpoint.restore(self.manager, abstract_state(self.run, self.optimizer),
                                             best)
    return best_state.params

  def close(self) -> None:
    # Finish (or fail) in-flight async saves first: an interpreter exit under a running save
    # thread would leave a temporary directory and a second traceback.
    self.manager.wait_until_finished()
    self.manager.close()
    self.log.close()


def train_and_evaluate(config: Mapping[str, Any] | RunConfig, workdir: str, *,
                       progress: bool = True) -> dict[str, Any]:
  """Trains (resuming from `workdir` when it holds checkpoints), then evaluates the best checkpoint.

  Args:
    config: the run's config (a ConfigDict from configs/*.py, or its typed `RunConfig`).
    workdir: the run directory.
    progress: tqdm bars.

  Returns:
    summary dict: `step` reached, `stopped` ('finished', 'max_steps', 'early_stop', 'signal'),
    `best_val_SumR`, `best_step`, `steps_run`, `seconds_per_step`, and `eval` {split: report}
    of the final evaluation (empty after a signal).

  Raises:
    NonFiniteLossError: the loss became NaN/inf.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  run = resolve_run(config, workdir)
  if is_chief():
    print(describe_runtime(runtime_info(run.model)), flush=True)
    changes = compute_changes(run)
    if changes:
      print(changes, flush=True)
    write_config(run)
  training = _Training(run)
  start_time, start_step = time.time(), training.step
  try:
    stopped = training.train(progress)
  except BaseException:
    training.close()
    raise
  training.manager.wait_until_finished()
  steps_run = training.step - start_step
  summary = dict(step=training.step, stopped=stopped,
                 best_val_SumR=training.bookkeeping["best_val_sumr"],
                 best_step=training.bookkeeping["best_step"], steps_run=steps_run,
                 seconds_per_step=(time.time() - start_time) / max(steps_run, 1), eval={})
  if stopped == "signal":
    training.close()
    logging.warning("stopped by a signal at step %d; checkpoint saved in %s; run the same command "
                    "to resume", training.step, checkpoint.checkpoint_dir(workdir))
    return summary
  params = training.best_params()
  training.manager.close()
  summary["eval"] = report.final_evaluation(run, params, progress)
  training.log.close()
  if is_chief():
    report.write_plots(run, params, summary["eval"])
  return summary
