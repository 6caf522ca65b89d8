"""Cross-Branch Video Alignment (CBVA): adaptive clip count and the frame<->clip contrastive loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from prvr_jax.losses.config import CBVA_OMEGA_THRESHOLDS

NORMALIZE_EPS = 1e-12


def clip_connectivity(clip_tokens: jax.Array, sim_thr: float) -> jax.Array:
  """omega: fraction of ordered off-diagonal clip pairs connected in the similarity graph.

  Edges join clips whose cosine similarity exceeds `sim_thr` (the diagonal included, as in the
  reference); connectivity is the transitive closure, by repeated boolean squaring.

  Args:
    clip_tokens: (B, K, D_v) OP-ToMe tokens.
    sim_thr: threshold tau.

  Returns:
    (B,) float32 omega in [0, 1].
  """
  k = clip_tokens.shape[1]
  x = clip_tokens / jnp.maximum(jnp.linalg.norm(clip_tokens, axis=-1, keepdims=True), NORMALIZE_EPS)
  sim = jnp.einsum("bid,bjd->bij", x, x, precision=lax.Precision.HIGHEST)
  reach = (sim > sim_thr).astype(jnp.float32)
  for _ in range(max(1, (k - 1).bit_length())):  # paths of length up to 2^t after t squarings
    reach = jnp.maximum(reach, (jnp.einsum("bij,bjk->bik", reach, reach) > 0).astype(jnp.float32))
  off = 1.0 - jnp.eye(k, dtype=jnp.float32)
  connected = jnp.sum(reach * off, axis=(1, 2))
  return connected / jnp.float32(k * (k - 1) + 1e-9)


def adaptive_clip_count(omega: jax.Array) -> jax.Array:
  """(B,) omega -> (B,) int32 clip count: >=0.8 -> 5, >=0.6 -> 8, >=0.4 -> 12, >=0.2 -> 20, else 32."""
  count = jnp.full(omega.shape, 32, jnp.int32)
  for threshold, clips in reversed(CBVA_OMEGA_THRESHOLDS):  # later (higher) thresholds win
    count = jnp.where(omega >= threshold, clips, count)
  return count


def cbva_video_loss(frame_feats: jax.Array, segments: jax.Array, labels: jax.Array,
                    segment_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-video frame->clip and clip->frame contrastive losses.

  Args:
    frame_feats: (B, F, D) vproj'd frame tokens.
    segments: (B, K, D) merged vproj'd clip segments (rows past the count are padding).
    labels: (B, F) int segment of each frame.
    segment_valid: (B, K) bool.

  Returns:
    (loss, f2c, c2f), each (B,); loss = f2c + c2f. f2c sees the segments as constants, c2f the
    frames (the reference's detach on each side).
  """
  k = segments.shape[1]
  valid = segment_valid[:, None, :]  # (B, 1, K)
  pos = (labels[:, :, None] == jnp.arange(k)[None, None, :]) & valid
  neg = (~pos) & valid
  posf, negf = pos.astype(frame_feats.dtype), neg.astype(frame_feats.dtype)

  s = jnp.einsum("bfd,bkd->bfk", frame_feats, lax.stop_gradient(segments))
  row_max = lax.stop_gradient(jnp.max(jnp.where(valid, s, -jnp.inf), axis=2, keepdims=True))
  e = jnp.where(valid, jnp.exp(s - row_max), 0.0)
  p = jnp.sum(e * posf, axis=2) / (jnp.sum(posf, axis=2) + 1e-8)
  n = jnp.sum(e * negf, axis=2) / (jnp.sum(negf, axis=2) + 1e-8)
  f2c = -jnp.mean(jnp.log(p / (p + n + 1e-8)), axis=1)

  s = jnp.einsum("bfd,bkd->bfk", lax.stop_gradient(frame_feats), segments)
  col_max = lax.stop_gradient(jnp.max(s, axis=1, keepdims=True))
  e = jnp.exp(s - col_max)
  p = jnp.sum(e * posf, axis=1) / (jnp.sum(posf, axis=1) + 1e-8)  # (B, K)
  n = jnp.sum(e * negf, axis=1) / (jnp.sum(negf, axis=1) + 1e-8)
  seg_ok = segment_valid
  ratio = jnp.where(seg_ok, p / jnp.where(seg_ok, p + n, 1.0), 1.0)
  c2f = -jnp.sum(jnp.where(seg_ok, jnp.log(ratio), 0.0), axis=1) / jnp.maximum(jnp.sum(seg_ok, axis=1), 1)
  return f2c + c2f, f2c, c2f


def cbva_loss(per_video: jax.Array, video_valid: jax.Array) -> jax.Array:
  """Mean of the per-video CBVA losses over valid videos. (B,), (B,) -> scalar."""
  return jnp.sum(jnp.where(video_valid, per_video, 0.0)) / jnp.maximum(jnp.sum(video_valid), 1)
