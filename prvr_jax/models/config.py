"""Static hyper-parameters of the MSC retrieval network.

A frozen dataclass (hashable, so it can be a static argument of `jax.jit`) built from the
`model` section of an ml_collections config by `ModelConfig.from_config_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from prvr_jax.errors import ConfigError
from prvr_jax.models.caption_tower import CaptionTowerConfig
from prvr_jax.models.layers import COMPUTE_DTYPES, REMAT_POLICIES
from prvr_jax.utils.config import checked_kwargs

# ModelConfig fields that are resolved from other sections, not keys of `config.model`.
RESOLVED_FIELDS: tuple[str, ...] = ("caption_tower", "remat")
# Widths of the Gaussian priors of DyGMM branches 1..7 (branch 0 has none), in the reference order.
GAUSS_WIDTHS: tuple[float, ...] = (0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and regularisation of the network (reference names in brackets).

  Attributes:
    hidden_size: D, width of every encoder [hidden_size].
    num_heads: attention heads [n_heads].
    visual_input_size: D_v, frame feature width [visual_input_size].
    query_input_size: D_t, caption token feature width [query_input_size].
    max_desc_len: rows of the query positional table [max_desc_l].
    max_ctx_len: rows of the clip/frame positional tables [max_ctx_l].
    num_clips: clip tokens after OP-ToMe (the clip DyGMM block's length).
    num_frames: frame tokens (the frame DyGMM block's length) [map_size].
    sft_factor: softmax temperature of the DyGMM branch mixing.
    input_dropout: dropout of the input projections and positional embeddings [input_drop].
    dropout: attention-probability and hidden dropout [drop].
    initializer_range: std of the normal init of Linear / Embedding weights.
    gauss_widths: Gaussian prior widths of DyGMM branches 1..; branch 0 is plain attention.
    use_op_tome: clip tokens by OP-ToMe (MSC); False gives the GMMFormer-v2 baseline's clips,
      `num_frames / num_clips` consecutive frames averaged per clip (equal merge sizes).
    caption_tower: None = queries are caption token features (the authors' setup); else the
      model runs this CLIP text tower on tokenised caption text (resolved from
      `config.text_tower` by the training loop, not a `config.model` key).
    dtype: the encoders' compute dtype, 'float32' (the reference; golden parity) or 'bfloat16'
      (activations and matmuls; parameters, optimizer state, LayerNorm statistics, softmax,
      scores and losses stay float32).
    remat: 'none' or 'blocks' (every attention block / DyGMM branch recomputed in the backward
      pass); set from `config.train.remat` (RunConfig does it), not a `config.model` key.
  """

  hidden_size: int = 384
  num_heads: int = 4
  visual_input_size: int = 768
  query_input_size: int = 768
  max_desc_len: int = 77
  max_ctx_len: int = 128
  num_clips: int = 32
  num_frames: int = 128
  sft_factor: float = 0.09
  input_dropout: float = 0.2
  dropout: float = 0.2
  initializer_range: float = 0.02
  gauss_widths: tuple[float, ...] = GAUSS_WIDTHS
  use_op_tome: bool = True
  caption_tower: Optional[CaptionTowerConfig] = None
  dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    if self.dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"model.dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.dtype!r}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"train.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    if self.hidden_size % self.num_heads:
      raise ConfigError(
          f"model.hidden_size={self.hidden_size} is not a multiple of model.num_heads={self.num_heads}")
    if not self.use_op_tome and self.num_frames % self.num_clips:
      raise ConfigError(f"model.use_op_tome=False needs model.num_frames={self.num_frames} to be a "
                       f"multiple of model.num_clips={self.num_clips}")
    tower = self.caption_tower
    if tower is not None and tower.width != self.query_input_size:
      raise ConfigError(f"model.query_input_size={self.query_input_size} but the CLIP text tower of "
                       f"{tower.source or 'text_tower.clip_dir'} gives {tower.width}-d {tower.features} "
                       f"rows; set --config.model.query_input_size={tower.width} (or 0)")

  @property
  def caption_token_length(self) -> int:
    """Token ids per caption the model takes (0: it takes caption token features)."""
    return self.caption_tower.token_length if self.caption_tower is not None else 0

  @property
  def caption_context_length(self) -> int:
    """The tokenizer length whose first `caption_token_length` ids the model takes (0: none)."""
    return self.caption_tower.context_length if self.caption_tower is not None else 0

  def replace_caption_tower(self, caption_tower: Optional[CaptionTowerConfig]) -> "ModelConfig":
    """This config with another caption tower (None: none)."""
    return dataclasses.replace(self, caption_tower=caption_tower)

  @classmethod
  def from_config_dict(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a mapping (e.g. `config.model`), ignoring nothing: unknown keys are an error."""
    kwargs = checked_kwargs(cls, cfg, "model")
    if "caption_tower" in kwargs:
      raise ConfigError("config.model.caption_tower is not a config key: set config.text_tower.clip_dir")
    if "remat" in kwargs:
      raise ConfigError("config.model.remat is not a config key: set config.train.remat")
    if "gauss_widths" in kwargs:
      kwargs["gauss_widths"] = tuple(float(w) for w in kwargs["gauss_widths"])
    return cls(**kwargs)
