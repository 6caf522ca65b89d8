"""CLIP text and vision towers as flax linen modules, and jitted encoders over them.

The maths follows transformers' CLIPModel (pre-LayerNorm transformer blocks, causal + padding mask
in the text tower, class token + post-LayerNorm in the vision tower, bias-free projections), so a
Hugging Face checkpoint loaded by `prvr_jax.clip.load` gives the same embeddings. Submodule names
mirror the checkpoint's tensor names (see load.py).

Images are NHWC float32, already CLIP-normalised (see preprocess.py).

Compute dtype (`dtype`, a name in prvr_jax/utils/dtypes.py): float32 (the default; what the
parity tests check) or bfloat16, with float32 parameters cast per use. LayerNorm statistics,
attention logits and softmax stay float32, and every encoder output is float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prvr_jax.clip.config import ClipConfig, TextConfig, TowerConfig, VisionConfig
from prvr_jax.utils.dtypes import COMPUTE_DTYPES

Params = Any
PRECISIONS = ("highest", "default")


def compute_dtype(name: str) -> Any:
  """The jnp dtype of a COMPUTE_DTYPES name; ValueError naming the choices otherwise."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"CLIP dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
  return COMPUTE_DTYPES[name]


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


class Attention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections (all with bias)."""

  cfg: TowerConfig
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x: (N, L, D); mask: (N, 1, L, L) bool, True where a query may see a key, or None."""
    d, h = self.cfg.hidden_size, self.cfg.num_heads
    dense = functools.partial(nn.Dense, d, precision=self.precision, dtype=self.dtype)
    split = lambda t: t.reshape(*t.shape[:-1], h, d // h)
    q = split(dense(name="q_proj")(x))
    k = split(dense(name="k_proj")(x))
    v = split(dense(name="v_proj")(x))
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k, precision=self.precision,
                        preferred_element_type=jnp.float32) * (d // h) ** -0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhc->nqhc", weights, v, precision=self.precision)
    return dense(name="out_proj")(out.reshape(*x.shape[:-1], d))


class Mlp(nn.Module):
  """fc1 -> activation -> fc2."""

  cfg: TowerConfig
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, L, D) -> (N, L, D)."""
    dense = functools.partial(nn.Dense, precision=self.precision, dtype=self.dtype)
    x = dense(self.cfg.intermediate_size, name="fc1")(x)
    x = _ACTIVATIONS[self.cfg.activation](x)
    return dense(self.cfg.hidden_size, name="fc2")(x)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

  cfg: TowerConfig
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x: (N, L, D) -> (N, L, D)."""
    cfg = self.cfg
    # flax computes LayerNorm statistics in float32 whatever `dtype` is.
    ln = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    x = x + Attention(cfg, self.precision, self.dtype, name="self_attn")(
        ln(name="layer_norm1")(x), mask)
    return x + Mlp(cfg, self.precision, self.dtype, name="mlp")(ln(name="layer_norm2")(x))


class Encoder(nn.Module):
  """EncoderLayers named layers_0 ... layers_{n-1}, run over any contiguous range of them.

  Attributes:
    cfg: the tower shape.
    precision: matmul precision.
    num_layers: layers held (None: cfg.num_layers).
    dtype: compute dtype.
  """

  cfg: TowerConfig
  precision: Any = None
  num_layers: Optional[int] = None
  dtype: Any = jnp.float32

  def setup(self):
    count = self.cfg.num_layers if self.num_layers is None else self.num_layers
    self.layers = [EncoderLayer(self.cfg, self.precision, self.dtype) for _ in range(count)]

  def __call__(self, x: jax.Array, mask: jax.Array | None, start: int = 0,
               stop: Optional[int] = None) -> jax.Array:
    """x: (N, L, D) -> (N, L, D) after layers [start, stop) (default: all)."""
    for layer in self.layers[start:stop]:
      x = layer(x, mask)
    return x


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(N, L) 1 on real tokens -> (N, 1, L, L) bool, True where a query may see a key."""
  length = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


class TextTower(nn.Module):
  """Token + position embeddings, causal encoder, final LayerNorm, EOS pooling.

  `embed`, `encoder` and `final_layer_norm` are also used one by one by the in-model caption
  tower (prvr_jax/models/caption_tower.py), which runs the encoder in two ranges.
  """

  cfg: TextConfig
  precision: Any = None
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    init = nn.initializers.normal(0.02)
    self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                                    dtype=self.dtype)
    self.position_embedding = self.param("position_embedding", init,
                                         (cfg.max_positions, cfg.hidden_size))
    self.encoder = Encoder(cfg, self.precision, dtype=self.dtype)
    self.final_layer_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(N, L) ids -> (N, L, D) token + position embeddings (compute dtype)."""
    positions = self.position_embedding[None, :input_ids.shape[1]].astype(self.dtype)
    return self.token_embedding(input_ids) + positions

  def blocks(self, x: jax.Array, mask: jax.Array, start: int = 0,
             stop: Optional[int] = None) -> jax.Array:
    """Encoder layers [start, stop) on (N, L, D) states; mask from `causal_padding_mask`."""
    return self.encoder(x, mask, start, stop)

  def final(self, x: jax.Array) -> jax.Array:
    """The final LayerNorm."""
    return self.final_layer_norm(x)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      input_ids: (N, L) int, L <= max_positions.
      attention_mask: (N, L) int or bool, 1 on real tokens.

    Returns:
      token states (N, L, D) after the final LayerNorm, pooled (N, D) at the EOS position
      (compute dtype).
    """
    x = self.final(self.blocks(self.embed(input_ids), causal_padding_mask(attention_mask)))
    if self.cfg.eos_token_id == 2:
      # Legacy configs (eos_token_id 2) pool at the largest id, which is EOS in CLIP's vocabulary;
      # transformers keeps that rule for them, and so do we.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax(input_ids == self.cfg.eos_token_id, axis=-1)
    pooled = x[jnp.arange(x.shape[0]), eos_pos]
    return x, pooled


class VisionTower(nn.Module):
  """Patch embedding (as a matmul), class token, positions, pre-LN, encoder, post-LN on class."""

  cfg: VisionConfig
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """Encodes images.

    Args:
      pixel_values: (N, H, W, C) float32 CLIP-normalised, H = W = image_size.

    Returns:
      pooled (N, D): post-LayerNorm class token (compute dtype).
    """
    cfg = self.cfg
    n, height, width, c = pixel_values.shape
    if (height, width, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"pixel_values must be (N, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}), got {pixel_values.shape}")
    p, g, d = cfg.patch_size, cfg.grid, cfg.hidden_size
    # A stride-p conv with a p x p kernel is a matmul over non-overlapping flattened patches.
    kernel = self.param("patch_embedding", nn.initializers.normal(0.02), (p, p, c, d))
    patches = pixel_values.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, g * g, p * p * c).astype(self.dtype)
    x = jnp.matmul(patches, kernel.reshape(p * p * c, d).astype(self.dtype),
                   precision=self.precision)
    cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,))
    pos = self.param("position_embedding", nn.initializers.normal(0.02), (g * g + 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype), x], axis=1)
    x = x + pos[None].astype(x.dtype)
    ln = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    x = ln(name="pre_layrnorm")(x)
    x = Encoder(cfg, self.precision, dtype=self.dtype, name="encoder")(x, None)
    return ln(name="post_layernorm")(x[:, 0])


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


class Clip(nn.Module):
  """Both towers and their bias-free projections to P (the contrastive logit scale is not needed
  to encode, so it is not a parameter here)."""

  cfg: ClipConfig
  precision: Any = None
  dtype: Any = jnp.float32

  def setup(self):
    self.text_model = TextTower(self.cfg.text, self.precision, self.dtype)
    self.vision_model = VisionTower(self.cfg.vision, self.precision, self.dtype)
    self.text_projection = nn.Dense(self.cfg.projection_dim, use_bias=False, precision=self.precision,
                                    dtype=self.dtype)
    self.visual_projection = nn.Dense(self.cfg.projection_dim, use_bias=False,
                                      precision=self.precision, dtype=self.dtype)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array):
    """(N, L) ids and mask -> (states (N, L, D), pooled (N, D), projected (N, P)), float32."""
    states, pooled = self.text_model(input_ids, attention_mask)
    return _f32(states), _f32(pooled), _f32(self.text_projection(pooled))

  def project_text_tokens(self, states: jax.Array) -> jax.Array:
    """(N, L, D) final-LN token states -> (N, L, P) through text_projection, float32."""
    return _f32(self.text_projection(states.astype(self.dtype)))

  def encode_image(self, pixel_values: jax.Array) -> jax.Array:
    """(N, H, W, C) normalised images -> projected (N, P), float32."""
    return _f32(self.visual_projection(self.vision_model(pixel_values)))

  def __call__(self, input_ids, attention_mask, pixel_values):
    """Both encoders (used by init so every parameter is created)."""
    return self.encode_text(input_ids, attention_mask), self.encode_image(pixel_values)


class ClipEncoders:
  """Jitted, pure encoders of one CLIP shape; params are passed in (init or `load.load_clip`).

  Attributes:
    config: the ClipConfig.
    module: the flax Clip module.
  """

  def __init__(self, config: ClipConfig, precision: str = "highest", dtype: str = "float32"):
    """Builds the encoders.

    Args:
      config: shapes.
      precision: 'highest' (full float32 matmuls, as PyTorch) or 'default' (the backend's
        fastest, e.g. TF32 on recent GPUs).
      dtype: compute dtype, a COMPUTE_DTYPES name (outputs are float32 either way).
    """
    if precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    self.config = config
    self.dtype = dtype
    self.module = Clip(config, jax.lax.Precision.HIGHEST if precision == "highest" else None,
                       compute_dtype(dtype))
    self.encode_text = jax.jit(self._encode_text)
    self.encode_image = jax.jit(self._encode_image)
    self.project_text_tokens = jax.jit(self._project_text_tokens)

  def init(self, rng: jax.Array) -> Params:
    """Random parameters {'params': ...} (for tests; real ones come from a checkpoint)."""
    t, v = self.config.text, self.config.vision
    ids = jnp.zeros((1, t.max_positions), jnp.int32)
    images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return jax.jit(self.module.init)(rng, ids, jnp.ones_like(ids), images)

  def _encode_text(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array):
    """Text tower.

    Args:
      params: {'params': ...}.
      input_ids: (N, L) int32 from the tokenizer (BOS ... EOS, padded).
      attention_mask: (N, L) 1 on BOS..EOS.

    Returns:
      token states (N, L, D) after the final LayerNorm, pooled (N, D) at EOS, projected (N, P).
    """
    return self.module.apply(params, input_ids, attention_mask, method=Clip.encode_text)

  def _encode_image(self, params: Params, pixel_values: jax.Array) -> jax.Array:
    """Vision tower: (N, H, W, C) CLIP-normalised float32 -> projected (N, P)."""
    return self.module.apply(params, pixel_values, method=Clip.encode_image)

  def _project_text_tokens(self, params: Params, states: jax.Array) -> jax.Array:
    """text_projection applied to every token: (N, L, D) -> (N, L, P)."""
    return self.module.apply(params, states, method=Clip.project_text_tokens)
