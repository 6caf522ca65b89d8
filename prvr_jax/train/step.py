"""The jitted training step: on-device OP-ToMe, forward, MSC losses, backward, optimiser update."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from prvr_jax.losses.config import LossConfig
from prvr_jax.losses.total import loss_inputs, msc_objective
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.video_inputs import prepare_video_inputs


@flax.struct.dataclass
class TrainState:
  """Everything a step updates: a plain pytree (checkpointable, shardable)."""

  step: jax.Array
  params: Any
  opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """Wraps initial params and a fresh optimiser state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def make_loss_fn(model_cfg: ModelConfig, loss_cfg: LossConfig,
                 objective: Optional[Callable[..., tuple[jax.Array, dict]]] = None
                 ) -> Callable[..., tuple[jax.Array, dict]]:
  """Returns loss_fn(params, batch, key, hard_negatives, deterministic=False) -> (loss, parts).

  `batch` holds prepared video inputs (see `prepare_video_inputs`) and the text fields. The
  network encodes every item; `objective(items, key, hard_negatives)` turns their `loss_inputs`
  into (loss, parts): by default the one-device `msc_objective` (the sharded step passes it
  wrapped in a shard_map).
  """
  model = MSCNet(model_cfg)
  if objective is None:
    objective = lambda items, key, hard: msc_objective(items, loss_cfg, key, hard)

  def loss_fn(params, batch, key, hard_negatives, deterministic: bool = False):
    dropout_key, negatives_key = jax.random.split(key)
    out = model.apply({"params": params}, batch, deterministic=deterministic,
                      rngs={"dropout": dropout_key}, method=MSCNet.encode_batch)
    return objective(loss_inputs(out, batch), negatives_key, jnp.asarray(hard_negatives, bool))

  return loss_fn


def train_step_from_loss_fn(loss_fn: Callable[..., tuple[jax.Array, dict]], model_cfg: ModelConfig,
                            optimizer: optax.GradientTransformation,
                            learning_rate: optax.Schedule | None = None) -> Callable[..., tuple[TrainState, dict]]:
  """train_step(state, batch, base_key, hard_negatives) -> (state, metrics) around `loss_fn`.

  `loss_fn(params, inputs, key, hard_negatives) -> (loss, parts)` takes the batch with the
  prepared video inputs added. `batch`: `video_frames` (B, 128, D_v) un-normalised resampled
  frames, `text_feat` (Q, L, D_t), `text_mask` (Q, L), `text_labels` (Q,), optional
  `query_valid` (Q,) / `video_valid` (B,). The step's randomness is `fold_in(base_key,
  state.step)`, so it does not depend on how many devices run it.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array], base_key: jax.Array,
                 hard_negatives: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    inputs = dict(batch)
    inputs.update(prepare_video_inputs(batch["video_frames"], use_op_tome=model_cfg.use_op_tome))
    key = jax.random.fold_in(base_key, state.step)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, inputs, key, hard_negatives)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(parts, loss=loss, grad_norm=optax.tree.norm(grads))
    if learning_rate is not None:
      metrics["lr"] = learning_rate(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_train_step(model_cfg: ModelConfig, loss_cfg: LossConfig,
                    optimizer: optax.GradientTransformation,
                    learning_rate: optax.Schedule | None = None) -> Callable[..., tuple[TrainState, dict]]:
  """The single-device step (see `train_step_from_loss_fn`). Not jitted here: callers jit."""
  return train_step_from_loss_fn(make_loss_fn(model_cfg, loss_cfg), model_cfg, optimizer, learning_rate)
