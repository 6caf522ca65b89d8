"""The data-parallel train step: jit over a `data` mesh, the loss in `shard_map` with
cross-device negatives.

Per step:
  1. OP-ToMe and the encoders run on each device's videos and queries (plain jit: the batch
     arrays are split over `data`, so XLA partitions this per item; dropout bits are drawn for
     the global shape with partitionable threefry, hence independent of the device count).
  2. The loss runs in `shard_map`. Each device all-gathers the other devices' video tokens, scores
     its own queries against every video of the global batch, and all-gathers the score rows,
     the pooled queries and the masks. NCE, triplet (same key everywhere, so the same negatives)
     and global-scope TCPL are then computed on global arrays, identical on every device, and
     `pmean`-ed: the value is the single-device loss, and the cotangents 1/n of the n copies sum
     back (through the all-gathers' transposes, psum_scatter) to exactly the single-device
     gradient. CBVA is per video, so each device merges only its own videos and the sums are
     `psum`-ed before dividing by the global number of videos.
  3. `value_and_grad` is taken once, outside the shard_map; parameters are replicated, so their
     gradient is one all-reduce inserted by XLA (no second reduction).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from prvr_jax.losses.config import LossConfig
from prvr_jax.losses.total import cbva_parts, retrieval_terms, tcpl_terms, total_of
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.similarity import training_scores
from prvr_jax.parallel import DATA_AXIS, batch_sharding, replicated
from prvr_jax.train.step import TrainState, train_step_from_loss_fn

# Per-item arrays the loss needs: split over `data` along their leading axis.
_LOSS_INPUTS = ("video_query", "teacher", "text_labels", "query_valid", "clip_tokens",
                "frame_tokens", "encoded_clip_feat", "encoded_frame_feat", "video_valid",
                "clip_video_features", "merge_size", "merged_frame_label")


def _gather(x: jax.Array) -> jax.Array:
  return lax.all_gather(x, DATA_AXIS, axis=0, tiled=True)


def sharded_msc_loss(local: dict[str, jax.Array], key: jax.Array, hard_negatives: jax.Array,
                     cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Body of the shard_map: one device's share of the MSC loss (see the module docstring).

  Args:
    local: this device's `_LOSS_INPUTS` (Q_l queries, B_l videos); `text_labels` index the
      global batch's videos.
    key: PRNG key of the triplet negatives (replicated).
    hard_negatives: traced bool (replicated).
    cfg: loss configuration.

  Returns:
    (total, parts), both replicated: equal to `msc_loss` on the global batch.
  """
  scores_local = training_scores(local["video_query"], _gather(local["clip_tokens"]),
                                 _gather(local["frame_tokens"]))
  scores = {k: _gather(v) for k, v in scores_local.items()}
  labels, q_valid = _gather(local["text_labels"]), _gather(local["query_valid"])
  v_valid = _gather(local["video_valid"])
  parts = retrieval_terms(scores, labels, q_valid, v_valid, cfg, key, hard_negatives)
  if cfg.tcpl_scope == "global":
    parts.update(tcpl_terms(_gather(local["video_query"]), _gather(local["teacher"]), q_valid, cfg))
  else:
    parts.update(tcpl_terms(local["video_query"], local["teacher"], local["query_valid"], cfg))
  parts = {k: lax.pmean(v, DATA_AXIS) for k, v in parts.items()}
  parts.update(cbva_parts(local, local, local["video_valid"], cfg,
                          reduce_sum=functools.partial(lax.psum, axis_name=DATA_AXIS)))
  return total_of(parts), parts


def make_sharded_loss_fn(model_cfg: ModelConfig, loss_cfg: LossConfig,
                         mesh: Mesh) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """loss_fn(params, inputs, key, hard_negatives) -> (loss, parts) over `mesh`.

  `inputs`: `prepare_video_inputs` fields (B, ...) plus the captions (`text_feat` (Q, L, D_t)
  and `text_mask`, or `caption_ids` / `caption_id_mask` for a model with a caption tower),
  `text_labels` (Q,) (global video index), `query_valid` (Q,), `video_valid` (B,); B and Q must
  divide by the device count, and each device's queries must belong to its own videos (the
  loader's layout: C captions per video, video-major).
  """
  model = MSCNet(model_cfg)
  spec = {k: P(DATA_AXIS) for k in _LOSS_INPUTS}
  loss_in_mesh = jax.shard_map(functools.partial(sharded_msc_loss, cfg=loss_cfg), mesh=mesh,
                               in_specs=(spec, P(), P()), out_specs=(P(), P()))

  def loss_fn(params, inputs, key, hard_negatives):
    dropout_key, negatives_key = jax.random.split(key)
    out = model.apply({"params": params}, inputs, deterministic=False,
                      rngs={"dropout": dropout_key}, method=MSCNet.encode_batch)
    labels = inputs["text_labels"].astype(jnp.int32)
    local = dict(
        out, text_labels=labels,
        query_valid=inputs.get("query_valid", jnp.ones(labels.shape, bool)),
        video_valid=inputs.get("video_valid", jnp.ones(out["clip_tokens"].shape[:1], bool)),
        clip_video_features=inputs["clip_video_features"], merge_size=inputs["merge_size"],
        merged_frame_label=inputs["merged_frame_label"])
    local = {k: local[k] for k in _LOSS_INPUTS}
    return loss_in_mesh(local, negatives_key, jnp.asarray(hard_negatives, bool))

  return loss_fn


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
