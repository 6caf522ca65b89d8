"""The MSC retrieval network (GMMFormer-v2 backbone + the `vproj_clip` CBVA head)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prvr_jax.models.caption_tower import CaptionTower, caption_rows
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.gmm_block import DyGMMBlock
from prvr_jax.models.layers import (COMPUTE_DTYPES, InputProjection, Linear, PositionalEmbedding,
                                    transformer_layer)
from prvr_jax.ops.similarity import training_scores

# mask_logits' fill value for padded tokens in attention pooling (reference: -1e10).
POOL_MASK_FILL = -1e10


class MSCNet(nn.Module):
  """Encodes queries, clip tokens and frame tokens into a shared D-dim space.

  Inputs follow the reference batch: clip tokens are the 32 L2-normalised OP-ToMe tokens with their
  merge sizes (proportional attention), frames the 128 L2-normalised resampled rows with a mask,
  queries the L2-normalised CLIP token features with a mask, or (with `config.caption_tower`)
  tokenised caption text that the model's own CLIP text tower turns into those features.

  The encoders compute in `config.dtype` (float32 parameters, cast per use); every output is
  float32, so the score matrices, losses and CBVA's closure-ratio decisions are float32 always.
  """

  config: ModelConfig

  def setup(self):
    c = self.config
    init = c.initializer_range
    dtype = COMPUTE_DTYPES[c.dtype]
    self.query_input_proj = InputProjection(c.hidden_size, c.input_dropout, init, dtype)
    self.query_pos_embed = PositionalEmbedding(c.max_desc_len, c.input_dropout, init)
    self.query_encoder = transformer_layer(c.remat, c.dtype)(c.num_heads, c.dropout,
                                                             initializer_range=init)
    self.query_pool = Linear(1, use_bias=False, initializer_range=init)
    self.clip_input_proj = InputProjection(c.hidden_size, c.input_dropout, init, dtype)
    self.clip_pos_embed = PositionalEmbedding(c.max_ctx_len, c.input_dropout, init)
    self.clip_encoder = DyGMMBlock(c.num_clips, c.num_heads, c.dropout, c.sft_factor,
                                   c.gauss_widths, init, c.remat, c.dtype)
    self.frame_input_proj = InputProjection(c.hidden_size, c.input_dropout, init, dtype)
    self.frame_pos_embed = PositionalEmbedding(c.max_ctx_len, c.input_dropout, init)
    self.frame_encoder = DyGMMBlock(c.num_frames, c.num_heads, c.dropout, c.sft_factor,
                                    c.gauss_widths, init, c.remat, c.dtype)
    # The reference creates it with torch.randn and never re-initialises it: N(0, 1).
    self.weight_token = self.param("weight_token", nn.initializers.normal(1.0), (c.hidden_size,))
    self.vproj_clip = Linear(c.hidden_size, initializer_range=init)
    if c.caption_tower is not None:
      self.caption_tower = CaptionTower(c.caption_tower)

  def caption_inputs(self, inputs: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The query encoder's inputs and the TCPL teacher of a batch of captions.

    Args:
      inputs: either `text_feat` (Q, L, D_t) and `text_mask` (Q, L) (extracted token features,
        loader-treated), or, for a model with a caption tower, `caption_ids` (Q, L0) int32 and
        `caption_id_mask` (Q, L0) (tokenised text).

    Returns:
      text_feat (Q, L, D_t), text_mask (Q, L), teacher (Q, D_t): the caption's CLIP sentence
      embedding (its last valid row), from the frozen CLIP tower when the model runs one.
    """
    tower = self.config.caption_tower
    if tower is None:
      if "caption_ids" in inputs:
        raise ValueError("caption_ids given, but the model has no caption tower "
                         "(config.text_tower.clip_dir is empty)")
      return (inputs["text_feat"], inputs["text_mask"],
              last_token_features(inputs["text_feat"], inputs["text_mask"]))
    if "caption_ids" not in inputs:
      raise ValueError("the model runs a CLIP text tower on caption text: its inputs need "
                       "caption_ids / caption_id_mask, not text_feat")
    ids, id_mask = inputs["caption_ids"], inputs["caption_id_mask"]
    rows, teacher_rows = self.caption_tower(ids, id_mask)
    feat, mask = caption_rows(rows, id_mask, tower.max_query_tokens, tower.truncate_keep_eos)
    if teacher_rows is not rows:
      teacher_rows, _ = caption_rows(teacher_rows, id_mask, tower.max_query_tokens,
                                     tower.truncate_keep_eos)
    else:
      teacher_rows = feat
    return feat, mask, last_token_features(teacher_rows, mask)

  def encode_captions(self, inputs: dict[str, jax.Array],
                      deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Pooled query vectors (Q, D) (not normalised) and the TCPL teacher (Q, D_t) of captions
    given as in `caption_inputs`."""
    feat, mask, teacher = self.caption_inputs(inputs)
    pooled, _ = self.encode_query(feat, mask, deterministic)
    return pooled, teacher

  def encode_query(self, text_feat: jax.Array, text_mask: jax.Array,
                   deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """text_feat: (Q, L, D_t), text_mask: (Q, L) -> (pooled (Q, D), token states (Q, L, D)),
    both float32."""
    x = self.query_input_proj(text_feat, deterministic)
    x = self.query_pos_embed(x, deterministic)
    x = self.query_encoder(x, text_mask, None, deterministic)
    # Pooling in float32: its -1e10 fill and softmax are not for bfloat16.
    x = x.astype(jnp.float32)
    logits = self.query_pool(x)[..., 0]
    logits = logits * text_mask + (1.0 - text_mask) * POOL_MASK_FILL
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("ql,qld->qd", weights, x), x

  def encode_clips(self, clip_feat: jax.Array, merge_size: jax.Array,
                   deterministic: bool = True) -> jax.Array:
    """clip_feat: (B, K, D_v) normalised OP-ToMe tokens, merge_size: (B, K) -> (B, K, D) float32."""
    x = self.clip_input_proj(clip_feat, deterministic)
    x = self.clip_pos_embed(x, deterministic)
    x = self.clip_encoder(x, self.weight_token, None, jnp.log(merge_size),
                          deterministic=deterministic)
    return x.astype(jnp.float32)

  def encode_frames(self, frame_feat: jax.Array, frame_mask: jax.Array,
                    deterministic: bool = True) -> jax.Array:
    """frame_feat: (B, F, D_v), frame_mask: (B, F) -> (B, F, D) float32, zero at masked frames."""
    x = self.frame_input_proj(frame_feat, deterministic)
    x = self.frame_pos_embed(x, deterministic)
    x = self.frame_encoder(x, self.weight_token, frame_mask, None, deterministic=deterministic)
    return jnp.where(frame_mask[..., None] == 1.0, x.astype(jnp.float32), 0.0)

  def project_for_alignment(self, tokens: jax.Array) -> jax.Array:
    """The CBVA head `vproj_clip`. (..., D) -> (..., D)."""
    return self.vproj_clip(tokens)

  def encode_batch(self, batch: dict[str, jax.Array], deterministic: bool = True) -> dict[str, jax.Array]:
    """Every per-item encoding of a training batch (no query x video interaction).

    Args:
      batch: `clip_video_features` (B, K, D_v), `merge_size` (B, K), `frame_video_features`
        (B, F, D_v), `videos_mask` (B, F), and the captions as `caption_inputs` takes them.
      deterministic: disables dropout when True.

    Returns:
      dict with `video_query` (Q, D), `encoded_query` (Q, L, D), `teacher` (Q, D_t) (TCPL's
      CLIP sentence embeddings), `clip_tokens` (B, K, D),
      `frame_tokens` (B, F, D) and the CBVA projections `encoded_clip_feat` (B, K, D),
      `encoded_frame_feat` (B, F, D). Items are independent, so a batch split over devices can
      be encoded piecewise (the sharded step does) with the same result.
    """
    clip_tokens = self.encode_clips(batch["clip_video_features"], batch["merge_size"], deterministic)
    frame_tokens = self.encode_frames(batch["frame_video_features"], batch["videos_mask"],
                                      deterministic)
    text_feat, text_mask, teacher = self.caption_inputs(batch)
    video_query, encoded_query = self.encode_query(text_feat, text_mask, deterministic)
    return dict(
        video_query=video_query,
        encoded_query=encoded_query,
        teacher=teacher,
        clip_tokens=clip_tokens,
        frame_tokens=frame_tokens,
        encoded_clip_feat=self.project_for_alignment(clip_tokens),
        encoded_frame_feat=self.project_for_alignment(frame_tokens),
    )

  def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True) -> dict[str, Any]:
    """Forward pass on a training batch: `encode_batch` plus the four (Q, B) score matrices.

    Returns:
      `encode_batch`'s dict plus `clip_scale_scores`, `clip_scale_scores_` (unnormalised),
      `frame_scale_scores`, `frame_scale_scores_`.
    """
    out = self.encode_batch(batch, deterministic)
    out.update(training_scores(out["video_query"], out["clip_tokens"], out["frame_tokens"]))
    return out


def last_token_features(text_feat: jax.Array, text_mask: jax.Array) -> jax.Array:
  """The caption's CLIP sentence embedding: its last valid (EOS) token row.

  text_feat: (Q, L, D_t), text_mask: (Q, L) -> (Q, D_t). The TCPL teacher.
  """
  last = jnp.maximum(jnp.sum(text_mask, axis=-1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(text_feat, last[:, None, None], axis=1)[:, 0]


def init_params(config: ModelConfig, key: jax.Array, num_queries: int = 2,
                text_len: Optional[int] = None) -> Any:
  """Initialises the network's parameters from `key` (shapes only depend on `config`).

  With a caption tower, its parameters are random too: the training loop replaces them with the
  CLIP checkpoint's (`caption_tower.load_tower_params`).
  """
  text_len = text_len or min(8, config.max_desc_len)
  batch: dict[str, jax.Array] = dict(
      clip_video_features=jnp.zeros((1, config.num_clips, config.visual_input_size)),
      merge_size=jnp.ones((1, config.num_clips)),
      frame_video_features=jnp.zeros((1, config.num_frames, config.visual_input_size)),
      videos_mask=jnp.ones((1, config.num_frames)),
      text_feat=jnp.zeros((num_queries, text_len, config.query_input_size)),
      text_mask=jnp.ones((num_queries, text_len)),
  )
  if config.caption_tower is not None:
    length = config.caption_tower.token_length
    del batch["text_feat"], batch["text_mask"]
    batch["caption_ids"] = jnp.zeros((num_queries, length), jnp.int32)
    batch["caption_id_mask"] = jnp.ones((num_queries, length), jnp.int32)
  init = jax.jit(lambda k, b: MSCNet(config).init({"params": k}, b)["params"])
  return init(key, batch)
