"""The MSC training objective: NCE + triplet (both scales) + TCPL + CBVA, with a dict of parts."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from prvr_jax.losses import cbva, retrieval, tcpl
from prvr_jax.losses.config import LossConfig
from prvr_jax.ops import tome


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
                    hard_negatives: jax.Array) -> dict[str, jax.Array]:
  """NCE and triplet losses of both scales on the (Q, B) score matrices.

  Args:
    scores: the four (Q, B) matrices of `training_scores`.
    labels: (Q,) int32 video of each query; q_valid (Q,) / v_valid (B,) bool masks.
    cfg: loss configuration.
    key: PRNG key of the random triplet negatives.
    hard_negatives: traced bool.

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
  parts["clip_trip"] = retrieval.triplet_loss(scores["clip_scale_scores"], labels, q_valid, v_valid,
                                              key=clip_key, **trip)
  parts["frame_trip"] = retrieval.triplet_loss(scores["frame_scale_scores"], labels, q_valid, v_valid,
                                               key=frame_key, **trip)
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


def batch_masks(batch: dict[str, jax.Array], num_videos: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(labels (Q,) int32, query_valid (Q,), video_valid (B,)); absent masks mean all valid."""
  labels = batch["text_labels"].astype(jnp.int32)
  q_valid = batch.get("query_valid", jnp.ones(labels.shape, bool))
  v_valid = batch.get("video_valid", jnp.ones((num_videos,), bool))
  return labels, q_valid, v_valid


def msc_loss(out: dict[str, jax.Array], batch: dict[str, jax.Array], cfg: LossConfig,
             key: jax.Array, hard_negatives: jax.Array | bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its parts on one device.

  Args:
    out: `MSCNet` outputs (score matrices (Q, B), `video_query` (Q, D), `teacher` (Q, D_t), the
      TCPL teacher (the caption's EOS token feature), CBVA projections).
    batch: model inputs plus `text_labels` (Q,) int, optional `query_valid` (Q,) and
      `video_valid` (B,) bool masks (all valid when absent).
    cfg: loss configuration (static).
    key: PRNG key of the random triplet negatives.
    hard_negatives: traced bool, hardest-pool negatives when True.

  Returns:
    (total, parts) where parts holds the weighted terms `clip_nce`, `clip_trip`, `frame_nce`,
    `frame_trip`, `tcpl`, `cbva`, the unweighted `clip_nce_unweighted`, `frame_nce_unweighted`,
    `tcpl_distance`, `tcpl_angle`, `cbva_unweighted`, and `clip_count` (mean adaptive clip count).
  """
  labels, q_valid, v_valid = batch_masks(batch, out["clip_scale_scores"].shape[1])
  hard_negatives = jnp.asarray(hard_negatives, bool)
  parts = retrieval_terms(out, labels, q_valid, v_valid, cfg, key, hard_negatives)
  parts.update(tcpl_terms(out["video_query"], out["teacher"], q_valid, cfg))
  parts.update(cbva_parts(out, batch, v_valid, cfg))
  return total_of(parts), parts
