"""The MSC training objective: NCE + triplet (both scales) + TCPL + CBVA, with a dict of parts."""

from __future__ import annotations

from typing import Any

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


def msc_loss(out: dict[str, jax.Array], batch: dict[str, jax.Array], cfg: LossConfig,
             key: jax.Array, hard_negatives: jax.Array | bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its parts.

  Args:
    out: `MSCNet` outputs (score matrices (Q, B), `video_query` (Q, D), CBVA projections).
    batch: model inputs plus `text_labels` (Q,) int, optional `query_valid` (Q,) and
      `video_valid` (B,) bool masks (all valid when absent), and `text_feat`/`text_mask` for the
      TCPL teacher (the caption's EOS token feature).
    cfg: loss configuration (static).
    key: PRNG key of the random triplet negatives.
    hard_negatives: traced bool, hardest-pool negatives when True.

  Returns:
    (total, parts) where parts holds the weighted terms `clip_nce`, `clip_trip`, `frame_nce`,
    `frame_trip`, `tcpl`, `cbva`, the unweighted `clip_nce_unweighted`, `frame_nce_unweighted`,
    `tcpl_distance`, `tcpl_angle`, `cbva_unweighted`, and `clip_count` (mean adaptive clip count).
  """
  from prvr_jax.models.msc import last_token_features  # pylint: disable=import-outside-toplevel

  labels = batch["text_labels"].astype(jnp.int32)
  q_valid = batch.get("query_valid", jnp.ones(labels.shape, bool))
  num_videos = out["clip_scale_scores"].shape[1]
  v_valid = batch.get("video_valid", jnp.ones((num_videos,), bool))
  hard_negatives = jnp.asarray(hard_negatives, bool)
  clip_key, frame_key = jax.random.split(key)
  zero = jnp.zeros((), jnp.float32)

  parts: dict[str, jax.Array] = {}
  parts["clip_nce_unweighted"] = retrieval.nce_loss(out["clip_scale_scores_"], labels, q_valid, v_valid)
  parts["frame_nce_unweighted"] = retrieval.nce_loss(out["frame_scale_scores_"], labels, q_valid, v_valid)
  parts["clip_nce"] = cfg.clip_nce_weight * parts["clip_nce_unweighted"]
  parts["frame_nce"] = cfg.frame_nce_weight * parts["frame_nce_unweighted"]
  trip = dict(margin=cfg.margin, hard_negatives=hard_negatives, hard_pool_size=cfg.hard_pool_size)
  parts["clip_trip"] = retrieval.triplet_loss(out["clip_scale_scores"], labels, q_valid, v_valid,
                                              key=clip_key, **trip)
  parts["frame_trip"] = retrieval.triplet_loss(out["frame_scale_scores"], labels, q_valid, v_valid,
                                               key=frame_key, **trip)
  if cfg.use_tcpl:
    teacher = last_token_features(batch["text_feat"], batch["text_mask"])
    parts["tcpl_distance"] = tcpl.rkd_distance(out["video_query"], teacher, q_valid)
    parts["tcpl_angle"] = tcpl.rkd_angle(out["video_query"], teacher, q_valid, cfg.tcpl_block_size)
    parts["tcpl"] = (cfg.tcpl_distance_weight * parts["tcpl_distance"]
                     + cfg.tcpl_angle_weight * parts["tcpl_angle"])
  else:
    parts["tcpl_distance"] = parts["tcpl_angle"] = parts["tcpl"] = zero
  if cfg.use_cbva:
    terms = cbva_terms(out, batch, cfg)
    parts["cbva_unweighted"] = cbva.cbva_loss(terms["per_video_loss"], v_valid)
    parts["cbva"] = cfg.cbva_weight * parts["cbva_unweighted"]
    count = terms["clip_count"].astype(jnp.float32)
    parts["clip_count"] = jnp.sum(jnp.where(v_valid, count, 0.0)) / jnp.maximum(jnp.sum(v_valid), 1)
  else:
    parts["cbva_unweighted"] = parts["cbva"] = parts["clip_count"] = zero
  total = (parts["clip_nce"] + parts["clip_trip"] + parts["frame_nce"] + parts["frame_trip"]
           + parts["tcpl"] + parts["cbva"])
  return total, parts
