"""A CLIP text tower inside the retrieval model: raw caption tokens -> the query encoder's inputs.

The authors train on caption token features extracted once by a frozen CLIP text tower (the rows
BOS ... EOS after the final LayerNorm, through `text_projection`), and TCPL's teacher is the EOS
row, the caption's CLIP sentence embedding. With `config.text_tower.clip_dir` set, the model runs
that tower itself on token ids tokenised in the loader:

  * frozen (`trainable_blocks = 0`): every tower output passes through `stop_gradient`, so the
    query side computes exactly what it computes from `python -m prvr_jax.extract captions`
    features of the same checkpoint (tests/test_caption_tower.py checks it);
  * `trainable_blocks = N > 0`: the last N blocks, the final LayerNorm and the projection are
    trained; the blocks below stay frozen (their output is a `stop_gradient` boundary, so no
    gradient is computed for them). TCPL must keep distilling from the frozen CLIP, so the
    tower also holds an untouched copy of its top part (`frozen_top`) that turns the shared
    frozen hidden states into the teacher's rows.

The loader's caption treatment (row L2 normalisation with its 1e-5, truncation to the run's caption
length, zero padding) is applied on device by `caption_rows`, identically for student and teacher.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from prvr_jax.clip.config import CLIP_CONTEXT_LENGTH, TextConfig
from prvr_jax.clip.load import load_clip
from prvr_jax.clip.model import Encoder, TextTower, causal_padding_mask, compute_dtype
from prvr_jax.errors import ConfigError
from prvr_jax.ops.video_inputs import data_l2_normalize
from prvr_jax.utils.dtypes import COMPUTE_DTYPES
from prvr_jax.utils.files import atomic_write_text

FEATURES = ("projected", "hidden")
# Name of the tower's subtree in MSCNet's params.
PARAMS_KEY = "caption_tower"


@dataclasses.dataclass(frozen=True)
class CaptionTowerConfig:
  """The in-model CLIP text tower (frozen, hashable: part of the static ModelConfig).

  Attributes:
    text: the CLIP text tower's shape (from the checkpoint's config.json).
    projection_dim: P, width of `text_projection`.
    features: 'projected' (rows through text_projection, width P; what `extract captions`
      writes by default and the authors' files hold) or 'hidden' (final-LayerNorm states, width D).
    trainable_blocks: 0 = frozen; N = the last N blocks, final LayerNorm and projection train.
    max_query_tokens: rows the query encoder sees (the loader's caption length L).
    truncate_keep_eos: a caption longer than L keeps its first L - 1 rows and its EOS row.
    source: the checkpoint directory the tower was initialised from (for messages only).
    dtype: the tower's compute dtype (`config.text_tower.dtype`, a COMPUTE_DTYPES name); its rows
      are float32 either way.
  """

  text: TextConfig
  projection_dim: int
  features: str = "projected"
  trainable_blocks: int = 0
  max_query_tokens: int = CLIP_CONTEXT_LENGTH
  truncate_keep_eos: bool = False
  source: str = ""
  dtype: str = "float32"

  def __post_init__(self):
    if self.dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"text_tower.dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.dtype!r}")
    if self.features not in FEATURES:
      raise ConfigError(f"text_tower.features must be one of {FEATURES}, got {self.features!r}")
    if not 0 <= self.trainable_blocks <= self.text.num_layers:
      raise ConfigError(f"text_tower.trainable_blocks={self.trainable_blocks} must be in "
                       f"[0, {self.text.num_layers}] (the tower of {self.source or 'the checkpoint'} "
                       f"has {self.text.num_layers} blocks)")
    if self.max_query_tokens < 2:
      raise ConfigError(f"the caption length must be >= 2 (BOS and EOS), got {self.max_query_tokens}")

  @property
  def width(self) -> int:
    """D_t, the width of the rows fed to the query encoder."""
    return self.projection_dim if self.features == "projected" else self.text.hidden_size

  @property
  def context_length(self) -> int:
    """The tokenizer's length (BOS ... EOS, EOS kept when truncating): CLIP's 77, or the tower's
    positions if it has fewer (as `extract captions` tokenises)."""
    return self.text.context_length

  @property
  def token_length(self) -> int:
    """Token ids per caption the model takes: the first `token_length` of the `context_length`
    ids. The tower is causal, so the rows the query encoder keeps (the first max_query_tokens)
    do not depend on later ids; only a kept EOS row (truncate_keep_eos) needs them all."""
    if self.truncate_keep_eos:
      return self.context_length
    return min(self.context_length, self.max_query_tokens)

  def to_dict(self) -> dict[str, Any]:
    """JSON-able form (see `from_dict`)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CaptionTowerConfig":
    """Inverse of `to_dict`."""
    d = dict(d)
    return cls(text=TextConfig(**d.pop("text")), **d)


def caption_rows(states: jax.Array, attention_mask: jax.Array, max_tokens: int,
                 keep_eos: bool) -> tuple[jax.Array, jax.Array]:
  """The loader's caption treatment on device: row normalisation, truncation, zero padding.

  Args:
    states: (N, L0, D_t) token rows, valid on BOS .. EOS.
    attention_mask: (N, L0) 1 on BOS .. EOS.
    max_tokens: rows kept (static).
    keep_eos: a caption longer than max_tokens keeps its first max_tokens - 1 rows and its EOS
      row (else its first max_tokens rows), as `pipeline.caption_token_features`.

  Returns:
    text_feat (N, L, D_t) and text_mask (N, L) float32, L = min(max_tokens, L0).
  """
  length = min(max_tokens, states.shape[1])
  n = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)[:, None]
  j = jnp.arange(length, dtype=jnp.int32)[None, :]
  if keep_eos:  # a long caption's last kept row is its EOS row
    src = jnp.where((n > length) & (j == length - 1), n - 1, j)
  else:
    src = jnp.broadcast_to(j, (states.shape[0], length))
  feat = jnp.take_along_axis(data_l2_normalize(states), src[..., None], axis=1)
  mask = (j < jnp.minimum(n, length)).astype(jnp.float32)
  return feat * mask[..., None], mask


class _FrozenTop(nn.Module):
  """An untouched copy of the tower's top: its last `count` blocks, final LayerNorm, projection."""

  cfg: TextConfig
  count: int
  projection_dim: Optional[int]
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.cfg, num_layers=self.count, dtype=self.dtype)
    self.final_layer_norm = nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.dtype)
    if self.projection_dim is not None:
      self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.final_layer_norm(self.encoder(x, mask))
    return self.text_projection(x) if self.projection_dim is not None else x


class CaptionTower(nn.Module):
  """Token ids -> (student rows, teacher rows) of the CLIP text tower (see the module docstring)."""

  config: CaptionTowerConfig

  def setup(self):
    c = self.config
    projected = c.features == "projected"
    dtype = compute_dtype(c.dtype)
    self.text_model = TextTower(c.text, dtype=dtype)
    if projected:
      self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=dtype)
    if c.trainable_blocks:
      self.frozen_top = _FrozenTop(c.text, c.trainable_blocks, c.projection_dim if projected else None,
                                   dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes tokenised captions.

    Args:
      input_ids: (N, L0) int32 from `ClipTokenizer` (BOS ... EOS, EOS ids as padding).
      attention_mask: (N, L0) 1 on BOS .. EOS.

    Returns:
      (rows, teacher_rows), both (N, L0, D_t) float32: the rows fed to the query encoder
      (trainable when trainable_blocks > 0) and the frozen CLIP's rows (gradient stopped; the
      same array when the tower is frozen).
    """
    c = self.config
    n_layers = c.text.num_layers
    split = n_layers - c.trainable_blocks
    mask = causal_padding_mask(attention_mask)
    # Frozen blocks: no gradient flows below this point, so none is computed for them.
    hidden = jax.lax.stop_gradient(
        self.text_model.blocks(self.text_model.embed(input_ids), mask, 0, split))
    rows = self.text_model.final(self.text_model.blocks(hidden, mask, split, n_layers))
    if c.features == "projected":
      rows = self.text_projection(rows)
    rows = rows.astype(jnp.float32)
    if not c.trainable_blocks:
      rows = jax.lax.stop_gradient(rows)
      return rows, rows
    return rows, jax.lax.stop_gradient(self.frozen_top(hidden, mask).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Parameters: from a CLIP checkpoint, and which of them train.


def tower_params_from_clip(clip_params: Mapping[str, Any], config: CaptionTowerConfig) -> dict[str, Any]:
  """The `caption_tower` subtree of MSCNet's params from a CLIP checkpoint's params.

  Args:
    clip_params: `prvr_jax.clip.load.load_clip(...)[1]` ({'params': ...}; the text tower is enough).
    config: the tower config.

  Returns:
    Nested dict of arrays: `text_model` (as in the checkpoint), `text_projection` when
    features='projected', and `frozen_top` (copies of the top blocks, final LayerNorm and
    projection) when trainable_blocks > 0.
  """
  p = clip_params["params"]
  out: dict[str, Any] = {"text_model": jax.tree.map(np.array, dict(p["text_model"]))}
  projected = config.features == "projected"
  if projected:
    out["text_projection"] = jax.tree.map(np.array, dict(p["text_projection"]))
  if config.trainable_blocks:
    split = config.text.num_layers - config.trainable_blocks
    layers = p["text_model"]["encoder"]
    top = {"encoder": {f"layers_{i}": jax.tree.map(np.array, layers[f"layers_{split + i}"])
                       for i in range(config.trainable_blocks)},
           "final_layer_norm": jax.tree.map(np.array, p["text_model"]["final_layer_norm"])}
    if projected:
      top["text_projection"] = jax.tree.map(np.array, p["text_projection"])
    out["frozen_top"] = top
  return out


def load_tower_params(clip_dir: str | os.PathLike, config: CaptionTowerConfig) -> dict[str, Any]:
  """`tower_params_from_clip` of a local Hugging Face CLIP checkpoint (errors name the file)."""

  clip_config, clip_params = load_clip(clip_dir, towers=("text",))
  if clip_config.text != config.text or clip_config.projection_dim != config.projection_dim:
    raise ConfigError(f"{clip_dir}: its text tower ({clip_config.text}, projection "
                     f"{clip_config.projection_dim}) is not the one this run was built with "
                     f"({config.text}, projection {config.projection_dim})")
  return tower_params_from_clip(clip_params, config)


def is_trainable(path: tuple[str, ...], config: Optional[CaptionTowerConfig]) -> bool:
  """Whether the MSCNet parameter at `path` (a flattened params key) is trained."""
  if not path or path[0] != PARAMS_KEY:
    return True
  if config is None or not config.trainable_blocks or len(path) < 2:
    return False
  if path[1] == "text_projection":
    return True
  if path[1] != "text_model" or len(path) < 3:
    return False
  if path[2] == "final_layer_norm":
    return True
  if path[2] == "encoder" and len(path) > 3 and path[3].startswith("layers_"):
    return int(path[3].split("_")[1]) >= config.text.num_layers - config.trainable_blocks
  return False


def trainable_labels(params: Any, config: Optional[CaptionTowerConfig]) -> Any:
  """A params-shaped tree of 'train' / 'freeze' labels (for `optax.multi_transform`)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: "train" if is_trainable(tuple(path), config) else "freeze" for path in flat})


# ----------------------------------------------------------------------------------------------
# The resolved tower config, kept with a run.

WORKDIR_FILE = "caption_tower.json"


def write_to_workdir(config: CaptionTowerConfig, workdir: str | os.PathLike) -> None:
  """Keeps the resolved tower config with the run, so that restoring needs no CLIP directory."""

  atomic_write_text(pathlib.Path(workdir) / WORKDIR_FILE, json.dumps(config.to_dict(), indent=1) + "\n")


def read_from_workdir(workdir: str | os.PathLike) -> Optional[CaptionTowerConfig]:
  """The run's tower config, or None when the run has none."""
  path = pathlib.Path(workdir) / WORKDIR_FILE
  if not path.is_file():
    return None
  try:
    return CaptionTowerConfig.from_dict(json.loads(path.read_text()))
  except (json.JSONDecodeError, TypeError, KeyError) as e:
    raise ConfigError(f"{path}: not a caption tower config: {e}") from None
