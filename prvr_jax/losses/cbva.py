"""Cross-Branch Video Alignment (CBVA): adaptive clip count and the frame<->clip contrastive loss.

The clip count of a video comes from omega, the connectivity of its clip-token similarity graph
(`clip_connectivity`, the reference model's `intra_diff`). The loss-side merge that produces the
segments lives in `prvr_jax.ops.tome`; this module scores frames against the merged segments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from prvr_jax.losses.config import CBVA_OMEGA_THRESHOLDS

NORMALIZE_EPS = 1e-12  # F.normalize's eps
RATIO_EPS = 1e-8  # the reference's stabiliser in counts and in the f2c ratio


def clip_connectivity(clip_tokens: jax.Array, sim_thr: float) -> jax.Array:
  """omega: fraction of ordered off-diagonal clip pairs connected in the similarity graph.

  Edges join clips whose cosine similarity exceeds `sim_thr` (self-loops included, as in the
  reference); "connected" is the transitive closure, here by ceil(log2 K) boolean squarings
  (after t squarings every path of up to 2^t edges is closed, and K - 1 edges always suffice).

  Args:
    clip_tokens: (B, K, D_v) clip tokens (normalised again here).
    sim_thr: cosine threshold tau (static or traced).

  Returns:
    (B,) float32 omega in [0, 1].
  """
  k = clip_tokens.shape[1]
  norm = jnp.linalg.norm(clip_tokens, axis=-1, keepdims=True)
  x = clip_tokens / jnp.maximum(norm, NORMALIZE_EPS)
  sim = jnp.einsum("bid,bjd->bij", x, x, precision=lax.Precision.HIGHEST)
  # 0/1 in float32: a matmul counts two-step paths, and counts <= K are exact at any matmul
  # precision (bf16 included), so the squarings need no HIGHEST.
  reach = (sim > sim_thr).astype(jnp.float32)
  for _ in range(max(1, (k - 1).bit_length())):
    two_step = jnp.einsum("bij,bjk->bik", reach, reach)
    reach = jnp.maximum(reach, (two_step > 0.5).astype(jnp.float32))
  off_diagonal = ~jnp.eye(k, dtype=bool)
  connected = jnp.sum(jnp.where(off_diagonal, reach, 0.0), axis=(1, 2))
  # The reference divides a float32 count by the Python float K(K-1) + 1e-9, i.e. by float32 K(K-1).
  return connected / jnp.float32(k * (k - 1) + 1e-9)


def adaptive_clip_count(omega: jax.Array) -> jax.Array:
  """Clip count of each video from its omega.

  omega >= 0.8 -> 5, >= 0.6 -> 8, >= 0.4 -> 12, >= 0.2 -> 20, else 32 (`CBVA_OMEGA_THRESHOLDS`).

  Args:
    omega: (B,) float.

  Returns:
    (B,) int32.
  """
  count = jnp.full(omega.shape, 32, jnp.int32)
  # Lowest threshold first, so a higher threshold that also holds overrides it.
  for threshold, clips in reversed(CBVA_OMEGA_THRESHOLDS):
    count = jnp.where(omega >= threshold, jnp.int32(clips), count)
  return count


def cbva_video_loss(frame_feats: jax.Array, segments: jax.Array, labels: jax.Array,
                    segment_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-video frame->clip and clip->frame contrastive losses (the reference's stage I).

  pos[l, k] = labels[l] == k over valid segments k only; invalid segments (padding past the
  video's clip count) take part in neither positives nor negatives.
  f2c: S = F sg(Seg)^T, E = exp(S - sg(max over valid k)), p / n = mean of E over positive /
  negative segments (count + 1e-8), f2c = -mean_l log(p / (p + n + 1e-8)).
  c2f: S = sg(F) Seg^T, E = exp(S - sg(max over l)), per valid segment p / n = mean of E over its
  positive / negative frames (count + 1e-8), c2f = -mean_{valid k} log(p / (p + n)) (no 1e-8 in
  this ratio, as in the reference). sg = stop_gradient.

  Args:
    frame_feats: (B, F, D) projected frame tokens (`encoded_frame_feat`).
    segments: (B, K, D) merged projected clip segments; rows past the clip count are padding.
    labels: (B, F) int segment index of each frame.
    segment_valid: (B, K) bool.

  Returns:
    (loss, f2c, c2f), each (B,) float32, loss = f2c + c2f. A video without valid segments gets 0.
  """
  labels = jnp.asarray(labels)
  segment_valid = jnp.asarray(segment_valid)
  k = segments.shape[1]
  valid = segment_valid[:, None, :]  # (B, 1, K)
  pos = (labels[:, :, None] == jnp.arange(k, dtype=labels.dtype)[None, None, :]) & valid
  neg = ~pos & valid
  posf = pos.astype(jnp.float32)
  negf = neg.astype(jnp.float32)
  has_segment = jnp.any(segment_valid, axis=1)  # (B,)

  # Frame -> clip: gradient into the frames only.
  s = jnp.einsum("bfd,bkd->bfk", frame_feats, lax.stop_gradient(segments),
                 precision=lax.Precision.HIGHEST)
  row_max = jnp.max(jnp.where(valid, s, -jnp.inf), axis=2, keepdims=True)
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  # Masking the exponent (not its result) keeps padded segments from overflowing exp, whose
  # inf would turn into NaN in the backward pass even when where-masked afterwards.
  e = jnp.exp(jnp.where(valid, s - row_max, -jnp.inf))
  p = jnp.sum(e * posf, axis=2) / (jnp.sum(posf, axis=2) + RATIO_EPS)  # (B, F)
  n = jnp.sum(e * negf, axis=2) / (jnp.sum(negf, axis=2) + RATIO_EPS)
  # A video without valid segments has p = 0: ratio 1 there, before the log, keeps it finite.
  ratio = jnp.where(has_segment[:, None], p / (p + n + RATIO_EPS), 1.0)
  f2c = -jnp.mean(jnp.log(ratio), axis=1)

  # Clip -> frame: gradient into the segments only.
  s = jnp.einsum("bfd,bkd->bfk", lax.stop_gradient(frame_feats), segments,
                 precision=lax.Precision.HIGHEST)
  col_max = lax.stop_gradient(jnp.max(s, axis=1, keepdims=True))
  e = jnp.exp(s - col_max)
  p = jnp.sum(e * posf, axis=1) / (jnp.sum(posf, axis=1) + RATIO_EPS)  # (B, K)
  n = jnp.sum(e * negf, axis=1) / (jnp.sum(negf, axis=1) + RATIO_EPS)
  # Padded segments have p = n = 0: give them ratio 1 (log 0) before the log, not after.
  ratio = jnp.where(segment_valid, p / jnp.where(segment_valid, p + n, 1.0), 1.0)
  num_valid = jnp.maximum(jnp.sum(segment_valid, axis=1), 1).astype(jnp.float32)
  c2f = -jnp.sum(jnp.where(segment_valid, jnp.log(ratio), 0.0), axis=1) / num_valid
  return f2c + c2f, f2c, c2f


def cbva_loss(per_video: jax.Array, video_valid: jax.Array) -> jax.Array:
  """Mean of the per-video CBVA losses over valid videos (unweighted; the caller applies vl_coef).

  Args:
    per_video: (B,) per-video losses.
    video_valid: (B,) bool.

  Returns:
    scalar float32.
  """
  total = jnp.sum(jnp.where(video_valid, per_video, 0.0))
  return total / jnp.maximum(jnp.sum(video_valid), 1).astype(jnp.float32)
