"""On-device preparation of the network's video inputs from 128 resampled frames."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prvr_jax.ops import tome

# The data pipeline's normalisation: x / (||x|| + eps) (not F.normalize's max(||x||, eps)).
DATA_NORM_EPS = 1e-5
OP_TOME_TARGETS: tuple[int, ...] = (80, 52, 32)


def data_l2_normalize(x: jax.Array, eps: float = DATA_NORM_EPS) -> jax.Array:
  """x / (||x|| + eps) over the last axis. (..., D) -> (..., D)."""
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


def uniform_clips(frames: jax.Array, num_clips: int) -> tome.OpTomeResult:
  """The baseline's clips: consecutive equal groups of F / num_clips frames, averaged.

  frames: (B, F, D_v) -> OpTomeResult with tokens (B, K, D_v), sizes (B, K), labels (B, F),
  spans (B, K, 2) and no per-level outputs.
  """
  b, f, d = frames.shape
  if f % num_clips:
    raise ValueError(f"{f} frames do not split into {num_clips} equal clips")
  width = f // num_clips
  tokens = jnp.mean(frames.reshape(b, num_clips, width, d), axis=2)
  starts = jnp.arange(num_clips, dtype=jnp.int32) * width
  spans = jnp.broadcast_to(jnp.stack([starts, starts + width], axis=-1), (b, num_clips, 2))
  labels = jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32) // width, (b, f))
  sizes = jnp.full((b, num_clips), float(width), frames.dtype)
  return tome.OpTomeResult(tokens, sizes, labels, spans, (), ())


def prepare_video_inputs(frames: jax.Array, targets: tuple[int, ...] = OP_TOME_TARGETS,
                         use_op_tome: bool = True) -> dict[str, jax.Array]:
  """OP-ToMe (or uniform clips) and normalisation of a batch of resampled videos.

  Args:
    frames: (B, F, D_v) un-normalised resampled frame features (F = 128).
    targets: OP-ToMe schedule (static); its last entry is the clip count K.
    use_op_tome: False replaces OP-ToMe by `uniform_clips` with K = targets[-1] (static).

  Returns:
    dict with `clip_video_features` (B, K, D_v) normalised merged tokens, `merge_size` (B, K),
    `merged_frame_label` (B, F) int32, `clip_spans` (B, K, 2) int32 [start, end) frames,
    `frame_video_features` (B, F, D_v) normalised frames and `videos_mask` (B, F) ones.
  """
  merged = tome.op_tome(frames, targets) if use_op_tome else uniform_clips(frames, targets[-1])
  return dict(
      clip_video_features=data_l2_normalize(merged.tokens),
      merge_size=merged.sizes,
      merged_frame_label=merged.labels,
      clip_spans=merged.spans,
      frame_video_features=data_l2_normalize(frames),
      videos_mask=jnp.ones(frames.shape[:2], frames.dtype),
  )
