"""Building blocks of the GMMFormer-v2 / MSC encoders as flax linen modules.

Every module is pure (init/apply); dropout draws from the 'dropout' rng stream and is off when
`deterministic=True`. Linear and embedding weights are initialised N(0, initializer_range),
biases 0, LayerNorm (1, 0), as the reference's `reset_parameters` does.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prvr_jax.models.dropout import Dropout
from prvr_jax.models.norms import LayerNorm, softmax_f32
from prvr_jax.models.remat import fenced_module
from prvr_jax.utils.dtypes import COMPUTE_DTYPES  # re-exported: the models' dtype names

LAYER_NORM_EPS = 1e-5
# Additive logit bias of masked keys; the reference uses -1e4, not -inf, and parity depends on it.
MASKED_LOGIT_BIAS = -10000.0


def normal_init(stddev: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=stddev)


def rows_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel as one 2-D product over all leading axes. (..., in) x (in, out) -> (..., out).

  Why 2-D: autodiff then forms the kernel gradient as one (rows, in)^T (rows, out) dot, which
  XLA:CPU runs without copies. With the leading axes kept, it first transposes the (N, L, in)
  activations to (in, N*L) in a slow strided loop (about 15% of the B = 128 train step).
  """
  return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(x.shape[:-1] + kernel.shape[-1:])


class Linear(nn.Module):
  """y = x W + b with the reference's initialisation. (..., in) -> (..., features).

  Parameters `kernel` (in, features) (the transpose of torch's weight) and `bias` (features,).
  """

  features: int
  use_bias: bool = True
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", normal_init(self.initializer_range), (x.shape[-1], self.features))
    # The compute dtype follows the activations: float32 master weights, cast per use.
    y = rows_dot(x, kernel.astype(x.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
    return y


class LinearParams(nn.Module):
  """Holds a Linear layer's (kernel (in, out), bias (out,)) without applying it.

  Used where the layer is applied in a factorised form (the DyGMM weight-token cross-attention).
  """

  in_features: int
  features: int
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", normal_init(self.initializer_range),
                        (self.in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return kernel, bias


def layer_norm(name: str, dtype: Any = jnp.float32) -> LayerNorm:
  """LayerNorm (statistics in float32) whose output is `dtype`; see models/norms.py."""
  return LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class InputProjection(nn.Module):
  """The reference `LinearLayer`: LayerNorm(in) -> dropout -> Linear(in, D) -> ReLU.

  (..., in) float32 -> (..., features) in `dtype`, the encoder's compute dtype: the LayerNorm
  reads the float32 inputs and emits `dtype`, and every later layer follows its input's dtype.
  """

  features: int
  dropout: float
  initializer_range: float = 0.02
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    x = layer_norm("layer_norm", self.dtype)(x)
    x = Dropout(self.dropout)(x, deterministic=deterministic)
    x = Linear(self.features, initializer_range=self.initializer_range, name="linear")(x)
    return nn.relu(x)


class PositionalEmbedding(nn.Module):
  """Trainable positional table added to the input, then LayerNorm and dropout.

  (N, L, D) -> (N, L, D), L <= max_len.
  """

  max_len: int
  dropout: float
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    length, dim = x.shape[-2], x.shape[-1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} exceeds the positional table size {self.max_len}")
    table = self.param("embedding", normal_init(self.initializer_range), (self.max_len, dim))
    x = layer_norm("layer_norm", x.dtype)(x + table[:length].astype(x.dtype))
    return Dropout(self.dropout)(x, deterministic=deterministic)


def gaussian_prior(length: int, width: float) -> np.ndarray:
  """The multiplicative Gaussian attention prior of GMMFormer, (L, L) float32.

  g[i, j] = exp(-(j/(L-1) - i/L)^2 / (2 s^2)), s = max(width, 1e-2) / 9, each row scaled to max 1.
  Computed in float32 step by step as the reference does so the constants match bit for bit.
  """
  centre = (np.arange(length, dtype=np.float32) / np.float32(length))[:, None]
  positions = np.linspace(0.0, 1.0, length, dtype=np.float32)[None, :]
  sigma = np.float32(max(width, 1e-2)) / np.float32(9.0)
  peak = np.float32(0.3989422804014327) / sigma
  g = peak * np.exp(-((positions - centre) ** 2) / (np.float32(2.0) * sigma ** 2))
  return (g / g.max(axis=-1, keepdims=True)).astype(np.float32)


class MultiHeadAttention(nn.Module):
  """BERT self-attention with the GMMFormer Gaussian prior and ToMe proportional attention.

  logits = (q k^T / sqrt(d_h)) * G_w  (if `gauss_width`), + -1e4 on masked keys,
  + log(key size) (if `key_log_size`); softmax over keys; dropout on the probabilities.
  """

  num_heads: int
  dropout: float
  gauss_width: Optional[float] = None
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: Optional[jax.Array], key_log_size: Optional[jax.Array],
               deterministic: bool) -> jax.Array:
    """x: (N, L, D); key_mask: (N, L) {0,1} or None; key_log_size: (N, L) or None -> (N, L, D)."""
    n, length, dim = x.shape
    head_dim = dim // self.num_heads
    proj = lambda name: Linear(dim, initializer_range=self.initializer_range, name=name)
    # Heads-major (N, H, L, d_h) copies, then plain batched matmuls: XLA:CPU otherwise fuses the
    # head transposes into the two attention dots and runs them 2-2.5x slower.
    heads = lambda t: jnp.transpose(t.reshape(n, length, self.num_heads, head_dim), (0, 2, 1, 3))
    q, k, v = heads(proj("query")(x)), heads(proj("key")(x)), heads(proj("value")(x))
    # Logits accumulate and stay float32 (prior, masks, softmax); only q, k, v and the
    # probabilities fed to the second product are in the compute dtype.
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
    logits = logits / np.float32(np.sqrt(head_dim))
    if self.gauss_width is not None:
      logits = logits * jnp.asarray(gaussian_prior(length, self.gauss_width))
    if key_mask is not None:
      logits = logits + ((1.0 - key_mask) * MASKED_LOGIT_BIAS)[:, None, None, :]
    if key_log_size is not None:
      logits = logits + key_log_size[:, None, None, :]
    probs = softmax_f32(logits, x.dtype)
    probs = Dropout(self.dropout)(probs, deterministic=deterministic)
    ctx = jnp.matmul(probs, v)  # (N, H, L, d_h)
    return jnp.transpose(ctx, (0, 2, 1, 3)).reshape(n, length, dim)


class FeedForward(nn.Module):
  """Linear(D, hidden) -> ReLU -> dropout -> Linear(hidden, D). (..., D) -> (..., D)."""

  hidden: int
  dropout: float
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    h = nn.relu(Linear(self.hidden, initializer_range=self.initializer_range, name="layer1")(x))
    h = Dropout(self.dropout)(h, deterministic=deterministic)
    return Linear(x.shape[-1], initializer_range=self.initializer_range, name="layer2")(h)


class TransformerLayer(nn.Module):
  """The reference `BertAttention`: post-LN self-attention + FFN (D -> 4D -> D).

  x = LN1(x + drop(SA(x))); x = LN2(x + drop(FFN(x))). (N, L, D) -> (N, L, D).
  """

  num_heads: int
  dropout: float
  gauss_width: Optional[float] = None
  ffn_multiplier: int = 4
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: Optional[jax.Array] = None,
               key_log_size: Optional[jax.Array] = None,
               deterministic: Optional[bool] = None) -> jax.Array:
    # `deterministic` may come positionally: the rematerialised form (`transformer_layer`) takes
    # it as a static positional argument, since jax.checkpoint would trace a keyword one.
    if deterministic is None:
      raise TypeError("TransformerLayer needs deterministic=True or False")
    att = MultiHeadAttention(self.num_heads, self.dropout, self.gauss_width,
                             self.initializer_range, name="attention")(
                                 x, key_mask, key_log_size, deterministic)
    att = Dropout(self.dropout)(att, deterministic=deterministic)
    x = layer_norm("norm1", x.dtype)(x, att)
    ffn = FeedForward(self.ffn_multiplier * x.shape[-1], self.dropout, self.initializer_range,
                      name="ffn")(x, deterministic)
    ffn = Dropout(self.dropout)(ffn, deterministic=deterministic)
    return layer_norm("norm2", x.dtype)(x, ffn)


# The remat policy of `config.train.remat = "blocks"`: nothing inside a block is saved for the
# backward pass, only its inputs; the block's forward pass runs again during the backward. Why
# not `dots_with_no_batch_dims_saveable`: the 2-D Linear products (q, k, v, the 4D-wide FFN
# hidden layer) are most of a block's activations, so saving them would keep most of the memory
# that remat is there to free; the recomputation costs about one more forward pass per block.
REMAT_POLICIES: dict[str, Any] = {"none": None, "blocks": jax.checkpoint_policies.nothing_saveable}


def backward_fenced(remat: str, dtype: str) -> bool:
  """Whether `transformer_layer(remat, dtype)` runs behind the cotangent fence (models/remat.py):
  when it is rematerialised, or computes in a dtype narrower than float32."""
  return remat != "none" or dtype != "float32"


def transformer_layer(remat: str, dtype: str = "float32") -> type:
  """TransformerLayer, or the same layer behind the cotangent fence (`backward_fenced`):
  rematerialised under `REMAT_POLICIES[remat]` for remat 'blocks', only fenced for remat 'none'
  in bfloat16. Equal parameters, outputs and gradients, less saved memory.

  Call a fenced form with every argument positional: (x, key_mask, key_log_size, deterministic),
  shapes as `TransformerLayer`.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}")
  if not backward_fenced(remat, dtype):
    return TransformerLayer
  # Argument 0 is the module itself, so `deterministic` is 4. Not plain `nn.remat`: on XLA:CPU
  # that frees nothing (models/remat.py says why).
  return fenced_module(TransformerLayer, static_argnums=(4,), remat_policy=REMAT_POLICIES[remat])
