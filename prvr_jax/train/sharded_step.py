"""The data-parallel train step: jit over a `data` mesh, the loss in `shard_map` with
cross-device negatives.

Per step:
  1. OP-ToMe and the encoders run on each device's videos and queries (plain jit: the batch
     arrays are split over `data`, so XLA partitions this per item; dropout bits are drawn for
     the global shape with partitionable threefry, hence independent of the device count).
  2. The loss runs in `shard_map`: the one assembly of the objective (`losses.total.msc_objective`)
     with the data axis's hooks (`DATA_PARALLEL`). Each device all-gathers the other devices'
     video tokens, scores its own queries against every video of the global batch, and
     all-gathers the score rows, the pooled queries and the masks. NCE, triplet (same key
     everywhere, so the same negatives) and global-scope TCPL are then computed on global arrays,
     identical on every device, and `pmean`-ed: the value is the single-device loss, and the
     cotangents 1/n of the n copies sum back (through the all-gathers' transposes, psum_scatter)
     to exactly the single-device gradient. CBVA is per video, so each device merges only its own
     videos and the sums are `psum`-ed before dividing by the global number of videos.
  3. `value_and_grad` is taken once, outside the shard_map; parameters are replicated, so their
     gradient is one all-reduce inserted by XLA (no second reduction).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from prvr_jax.losses.config import LossConfig
from prvr_jax.losses.total import CrossDevice, msc_objective
from prvr_jax.models.config import ModelConfig
from prvr_jax.parallel import DATA_AXIS, batch_sharding, replicated
from prvr_jax.train.step import TrainState, make_loss_fn, train_step_from_loss_fn

# The objective's cross-device hooks inside a shard_map over the data axis.
DATA_PARALLEL = CrossDevice(
    gather=functools.partial(lax.all_gather, axis_name=DATA_AXIS, axis=0, tiled=True),
    mean=functools.partial(lax.pmean, axis_name=DATA_AXIS),
    sum=functools.partial(lax.psum, axis_name=DATA_AXIS))


def make_sharded_loss_fn(model_cfg: ModelConfig, loss_cfg: LossConfig,
                         mesh: Mesh) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """loss_fn(params, inputs, key, hard_negatives) -> (loss, parts) over `mesh`.

  `inputs`: `prepare_video_inputs` fields (B, ...) plus the captions (`text_feat` (Q, L, D_t)
  and `text_mask`, or `caption_ids` / `caption_id_mask` for a model with a caption tower),
  `text_labels` (Q,) (global video index), `query_valid` (Q,), `video_valid` (B,); B and Q must
  divide by the device count, and each device's queries must belong to its own videos (the
  loader's layout: C captions per video, video-major). The value equals the one-device loss on
  the global batch.
  """

  def objective(items, key, hard_negatives):
    return msc_objective(items, loss_cfg, key, hard_negatives, DATA_PARALLEL)

  # Every per-item input is split over `data` along its leading axis; key and switch replicated.
  in_mesh = jax.shard_map(objective, mesh=mesh, in_specs=(P(DATA_AXIS), P(), P()),
                          out_specs=(P(), P()))
  return make_loss_fn(model_cfg, loss_cfg, objective=in_mesh)


def make_sharded_train_step(model_cfg: ModelConfig, loss_cfg: LossConfig,
                            optimizer: optax.GradientTransformation, mesh: Mesh,
                            learning_rate: optax.Schedule | None = None
                            ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Jitted train_step(state, batch, base_key, hard_negatives) -> (state, metrics) over `mesh`.

  `batch` (arrays split over `data`): `video_frames` (B, F, D_v) un-normalised resampled frames,
  `text_feat` (Q, L, D_t) and `text_mask` (Q, L) (or `caption_ids` / `caption_id_mask`),
  `text_labels` (Q,) global video index,
  `query_valid` (Q,), `video_valid` (B,). The state is replicated; the step's key is
  `fold_in(base_key, state.step)`. The state argument is donated.
  """
  train_step = train_step_from_loss_fn(make_sharded_loss_fn(model_cfg, loss_cfg, mesh), model_cfg,
                                      optimizer, learning_rate)
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, data, rep, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))
