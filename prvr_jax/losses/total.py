"""The MSC training objective: NCE + triplet (both scales) + TCPL + CBVA, with a dict of parts.

`msc_objective` assembles it, once for every setting: on one device (`msc_loss`, the golden
parity) and inside the sharded step's shard_map, which passes its cross-device hooks.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from prvr_jax.losses import cbva, retrieval, tcpl
from prvr_jax.losses.config import LossConfig
from prvr_jax.ops import tome
from prvr_jax.ops.similarity import training_scores


def cbva_terms(out: dict[str, jax.Array], batch: dict[str, jax.Array], cfg: LossConfig) -> dict[str, jax.Array]:
  """Adaptive clip counts, the loss-side merge and the per-video CBVA losses.

  Args:
    out: model outputs with `encoded_clip_feat` (B, K, D) and `encoded_frame_feat` (B, F, D).
    batch: `clip_video_features` (B, K, D_v) (normalised OP-ToMe tokens), `merge_size` (B, K),
      `merged_frame_label` (B, F).
    cfg: loss configuration.

  Returns:
    dict with `omega` (B,), `clip_count` (B,) int32, the merge result fields `segments`
    (B, K, D), `sizes` (B, K), `labels` (B, F), `labels_per_level` (B, 4, F), `segment_valid`
    (B, K), and `per_video_loss`, `per_video_f2c`, `per_video_c2f` (B,).
  """
  clip_feat = batch["clip_video_features"]
  omega = cbva.clip_connectivity(clip_feat, cfg.sim_thr)
  if cfg.adaptive_cbva:
    count = cbva.adaptive_clip_count(omega)
  else:
    count = jnp.full(omega.shape, cfg.cbva_fixed_clips, jnp.int32)
  merged = tome.greedy_merge_levels(out["encoded_clip_feat"], clip_feat, batch["merge_size"],
                                    batch["merged_frame_label"], count)
  loss, f2c, c2f = cbva.cbva_video_loss(out["encoded_frame_feat"], merged.segments, merged.labels,
                                        merged.valid)
  return dict(omega=omega, clip_count=count, segments=merged.segments, sizes=merged.sizes,
              labels=merged.labels, labels_per_level=merged.labels_per_level,
              segment_valid=merged.valid, per_video_loss=loss, per_video_f2c=f2c,
              per_video_c2f=c2f)


def _identity(x: jax.Array) -> jax.Array:
  return x


def retrieval_terms(scores: dict[str, jax.Array], labels: jax.Array, q_valid: jax.Array,
                    v_valid: jax.Array, cfg: LossConfig, key: jax.Array,
                    hard_negatives: jax.Array,
                    triplet_ranks: Optional[Mapping[str, retrieval.TripletRanks]] = None
                    ) -> dict[str, jax.Array]:
  """NCE and triplet losses of both scales on the (Q, B) score matrices.

  Args:
    scores: the four (Q, B) matrices of `training_scores`.
    labels: (Q,) int32 video of each query; q_valid (Q,) / v_valid (B,) bool masks.
    cfg: loss configuration.
    key: PRNG key of the random triplet negatives.
    hard_negatives: traced bool.
    triplet_ranks: optional given negative draws of the 'clip' and 'frame' triplet losses
      (replaying another code's random negatives); drawn from `key` when None.

  Returns:
    `clip_nce`, `frame_nce` (weighted), their `*_unweighted`, `clip_trip`, `frame_trip` scalars.
  """
  clip_key, frame_key = jax.random.split(key)
  parts: dict[str, jax.Array] = {}
  parts["clip_nce_unweighted"] = retrieval.nce_loss(scores["clip_scale_scores_"], labels, q_valid, v_valid)
  parts["frame_nce_unweighted"] = retrieval.nce_loss(scores["frame_scale_scores_"], labels, q_valid, v_valid)
  parts["clip_nce"] = cfg.clip_nce_weight * parts["clip_nce_unweighted"]
  parts["frame_nce"] = cfg.frame_nce_weight * parts["frame_nce_unweighted"]
  trip = dict(margin=cfg.margin, hard_negatives=hard_negatives, hard_pool_size=cfg.hard_pool_size)
  ranks = triplet_ranks or {}
  parts["clip_trip"] = retrieval.triplet_loss(scores["clip_scale_scores"], labels, q_valid, v_valid,
                                              key=clip_key, ranks=ranks.get("clip"), **trip)
  parts["frame_trip"] = retrieval.triplet_loss(scores["frame_scale_scores"], labels, q_valid, v_valid,
                                               key=frame_key, ranks=ranks.get("frame"), **trip)
  return parts


def tcpl_terms(video_query: jax.Array, teacher: jax.Array, q_valid: jax.Array,
               cfg: LossConfig) -> dict[str, jax.Array]:
  """TCPL on pooled queries (Q, D) against CLIP sentence features (Q, D_t): `tcpl` (weighted),
  `tcpl_distance`, `tcpl_angle` scalars (zeros when TCPL is off)."""
  if not cfg.use_tcpl:
    zero = jnp.zeros((), jnp.float32)
    return dict(tcpl_distance=zero, tcpl_angle=zero, tcpl=zero)
  distance = tcpl.rkd_distance(video_query, teacher, q_valid)
  angle = tcpl.rkd_angle(video_query, teacher, q_valid, cfg.tcpl_tile_size)
  return dict(tcpl_distance=distance, tcpl_angle=angle,
              tcpl=cfg.tcpl_distance_weight * distance + cfg.tcpl_angle_weight * angle)


def cbva_parts(out: dict[str, jax.Array], batch: dict[str, jax.Array], v_valid: jax.Array,
               cfg: LossConfig, reduce_sum: Callable[[jax.Array], jax.Array] = _identity
               ) -> dict[str, jax.Array]:
  """CBVA averaged over valid videos: `cbva` (weighted), `cbva_unweighted`, `clip_count`.

  `reduce_sum` turns sums over this batch's videos into sums over the global batch (identity on
  one device, `psum` over the data axis when the batch is split): CBVA is per video, so each
  device only merges and scores its own videos.
  """
  if not cfg.use_cbva:
    zero = jnp.zeros((), jnp.float32)
    return dict(cbva_unweighted=zero, cbva=zero, clip_count=zero)
  terms = cbva_terms(out, batch, cfg)
  num_valid = jnp.maximum(reduce_sum(jnp.sum(v_valid.astype(jnp.float32))), 1.0)
  loss = reduce_sum(jnp.sum(jnp.where(v_valid, terms["per_video_loss"], 0.0))) / num_valid
  count = terms["clip_count"].astype(jnp.float32)
  mean_count = reduce_sum(jnp.sum(jnp.where(v_valid, count, 0.0))) / num_valid
  return dict(cbva_unweighted=loss, cbva=cfg.cbva_weight * loss, clip_count=mean_count)


def total_of(parts: dict[str, jax.Array]) -> jax.Array:
  """The training objective from its weighted parts."""
  return (parts["clip_nce"] + parts["clip_trip"] + parts["frame_nce"] + parts["frame_trip"]
          + parts["tcpl"] + parts["cbva"])


class CrossDevice(NamedTuple):
  """How one device's share of a batch reaches the global batch: the hooks `msc_objective` takes.

  Attributes:
    gather: (n, ...) this device's rows -> (n * devices, ...) the global batch's, in device order.
    mean: a value computed on every device -> its mean over the devices.
    sum: a sum over this device's items -> the sum over every device's.
  """

  gather: Callable[[jax.Array], jax.Array]
  mean: Callable[[jax.Array], jax.Array]
  sum: Callable[[jax.Array], jax.Array]


ONE_DEVICE = CrossDevice(gather=_identity, mean=_identity, sum=_identity)


def loss_inputs(out: dict[str, jax.Array], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The per-item arrays the objective reads (every one has the batch's items on axis 0).

  Args:
    out: `MSCNet.encode_batch` outputs (`video_query` (Q, D), `teacher` (Q, D_t), `clip_tokens`
      (B, K, D), `frame_tokens` (B, F, D), `encoded_clip_feat` (B, K, D), `encoded_frame_feat`
      (B, F, D)).
    batch: `text_labels` (Q,) int, the prepared video inputs `clip_video_features` (B, K, D_v),
      `merge_size` (B, K), `merged_frame_label` (B, F), and optional `query_valid` (Q,) /
      `video_valid` (B,) bool masks (all valid when absent).

  Returns:
    dict of those arrays (labels as int32, masks filled in).
  """
  labels = batch["text_labels"].astype(jnp.int32)
  items = {k: out[k] for k in ("video_query", "teacher", "clip_tokens", "frame_tokens",
                               "encoded_clip_feat", "encoded_frame_feat")}
  items.update({k: batch[k] for k in ("clip_video_features", "merge_size", "merged_frame_label")})
  items.update(text_labels=labels,
               query_valid=batch.get("query_valid", jnp.ones(labels.shape, bool)),
               video_valid=batch.get("video_valid", jnp.ones(out["clip_tokens"].shape[:1], bool)))
  return items


def msc_objective(items: dict[str, jax.Array], cfg: LossConfig, key: jax.Array,
                  hard_negatives: jax.Array | bool, cross: CrossDevice = ONE_DEVICE,
                  triplet_ranks: Optional[Mapping[str, retrieval.TripletRanks]] = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MSC objective: every term, assembled once for one device and for a split batch.

  Queries are scored against every video of the global batch (`cross.gather` of the video
  tokens) and the score rows gathered, so NCE, the triplet loss (same key on every device, hence
  the same negatives) and global-scope TCPL see global arrays; their values are then
  `cross.mean`-ed, so that the cotangents of the n identical copies sum back to the gradient of
  one. CBVA is per video: each device merges its own videos, and the sums are `cross.sum`-ed.
  With `ONE_DEVICE` every hook is the identity. A new loss term goes here (and into `total_of`).

  Args:
    items: `loss_inputs` of this device's share (Q_l queries, B_l videos); `text_labels` index
      the global batch's videos.
    cfg: loss configuration (static).
    key: PRNG key of the random triplet negatives (the same on every device).
    hard_negatives: traced bool, hardest-pool negatives when True.
    cross: the cross-device hooks (`ONE_DEVICE`, or `train.sharded_step.DATA_PARALLEL` inside a
      shard_map over the data axis).
    triplet_ranks: optional given triplet negative draws (see `retrieval_terms`).

  Returns:
    (total, parts), both equal on every device: the weighted terms `clip_nce`, `clip_trip`,
    `frame_nce`, `frame_trip`, `tcpl`, `cbva`, the unweighted `clip_nce_unweighted`,
    `frame_nce_unweighted`, `tcpl_distance`, `tcpl_angle`, `cbva_unweighted`, and `clip_count`
    (mean adaptive clip count).
  """
  hard_negatives = jnp.asarray(hard_negatives, bool)
  scores = training_scores(items["video_query"], cross.gather(items["clip_tokens"]),
                           cross.gather(items["frame_tokens"]))
  scores = {k: cross.gather(v) for k, v in scores.items()}
  labels, q_valid = cross.gather(items["text_labels"]), cross.gather(items["query_valid"])
  v_valid = cross.gather(items["video_valid"])
  parts = retrieval_terms(scores, labels, q_valid, v_valid, cfg, key, hard_negatives,
                          triplet_ranks)
  if cfg.tcpl_scope == "global":
    parts.update(tcpl_terms(cross.gather(items["video_query"]), cross.gather(items["teacher"]),
                            q_valid, cfg))
  else:
    parts.update(tcpl_terms(items["video_query"], items["teacher"], items["query_valid"], cfg))
  parts = {k: cross.mean(v) for k, v in parts.items()}
  parts.update(cbva_parts(items, items, items["video_valid"], cfg, reduce_sum=cross.sum))
  return total_of(parts), parts


def msc_loss(out: dict[str, jax.Array], batch: dict[str, jax.Array], cfg: LossConfig,
             key: jax.Array, hard_negatives: jax.Array | bool,
             triplet_ranks: Optional[Mapping[str, retrieval.TripletRanks]] = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`msc_objective` on one device from the model's outputs and the batch (see `loss_inputs`;
  the score matrices are formed from the tokens, so outputs without them work too).
  `triplet_ranks`: optional given triplet negative draws (see `retrieval_terms`)."""
  return msc_objective(loss_inputs(out, batch), cfg, key, hard_negatives,
                       triplet_ranks=triplet_ranks)
