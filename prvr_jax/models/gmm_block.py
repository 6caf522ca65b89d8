"""The DyGMM block: 8 Gaussian-prior attention branches mixed per position by a learned token."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prvr_jax.models.dropout import Dropout
from prvr_jax.models.layers import (MASKED_LOGIT_BIAS, FeedForward, Linear, LinearParams,
                                    backward_fenced, layer_norm, rows_dot, softmax_f32,
                                    transformer_layer)
from prvr_jax.models.remat import after, fence_after_cotangent, fenced_module


class WeightTokenAttention(nn.Module):
  """The reference `BertCrossAttention` of one learned token over each branch output.

  Factorised so no key or value projection of the L tokens is ever computed: per head h,
  q_h . (W_k o + b_k)_h = (W_k,h q_h) . o + b_k,h . q_h, and since the probabilities p sum to 1,
  sum_l p_l (W_v o_l + b_v) = W_v (sum_l p_l o_l) + b_v (with dropout, b_v times sum_l p_l).
  That is mathematically the reference layer at a fraction of its cost.
  """

  num_heads: int
  dropout: float
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, token: jax.Array, branches: Union[jax.Array, Sequence[jax.Array]],
               key_mask: Optional[jax.Array], deterministic: bool) -> jax.Array:
    """token: (D,); branches: (N, K, L, D) or K arrays (N, L, D); key_mask: (N, L) or None ->
    (N, K, D)."""
    if not isinstance(branches, (list, tuple)):
      branches = [branches[:, k] for k in range(branches.shape[1])]
    dtype = branches[0].dtype  # the compute dtype; the token and weights are float32 params
    token = token.astype(dtype)
    dim = token.shape[-1]
    heads, head_dim = self.num_heads, dim // self.num_heads
    q = Linear(dim, initializer_range=self.initializer_range, name="query")(token)
    wk, bk = (p.astype(dtype) for p in LinearParams(dim, dim, self.initializer_range, name="key")())
    wv, bv = (p.astype(dtype) for p in LinearParams(dim, dim, self.initializer_range, name="value")())
    q = q.reshape(heads, head_dim)
    key_dirs = jnp.einsum("ihd,hd->ih", wk.reshape(dim, heads, head_dim), q)  # (D, H)
    key_const = jnp.einsum("hd,hd->h", bk.reshape(heads, head_dim), q)  # (H,)
    # Per branch, never stacking the K branch outputs: a (N, K, L, D) copy (and its gradient)
    # costs more on CPU than these small products.
    # `rows_dot` keeps key_dirs' gradient free of activation copies; only the small
    # (N, K, L, H) logits are transposed.
    logits = jnp.stack([rows_dot(b, key_dirs) for b in branches], axis=1).astype(jnp.float32)
    logits = jnp.swapaxes(logits, -1, -2)  # (N, K, H, L)
    logits = logits + key_const[:, None].astype(jnp.float32)
    logits = logits / np.float32(np.sqrt(head_dim))
    if key_mask is not None:
      logits = logits + ((1.0 - key_mask) * MASKED_LOGIT_BIAS)[:, None, None, :]
    probs = softmax_f32(logits, dtype)
    probs = Dropout(self.dropout)(probs, deterministic=deterministic)
    pooled = jnp.stack([jnp.einsum("nhl,nli->nhi", probs[:, k], b) for k, b in enumerate(branches)],
                       axis=1)  # (N, K, H, D)
    ctx = jnp.einsum("nkhi,ihd->nkhd", pooled, wv.reshape(dim, heads, head_dim))
    ctx = ctx + bv.reshape(heads, head_dim) * probs.sum(-1)[..., None]
    ctx = ctx.reshape(ctx.shape[:2] + (dim,))
    ctx = Dropout(self.dropout)(ctx, deterministic=deterministic)
    x = layer_norm("norm1", dtype)(token, ctx)
    ffn = FeedForward(dim, self.dropout, self.initializer_range, name="ffn")(x, deterministic)
    ffn = Dropout(self.dropout)(ffn, deterministic=deterministic)
    return layer_norm("norm2", dtype)(x, ffn)


class DyGMMBlock(nn.Module):
  """8 parallel `TransformerLayer`s (no prior, then Gaussian widths), mixed per position.

  The shared weight token attends to each branch output; the 8 results go through
  Linear(D, D) -> ReLU -> dropout -> Linear(D, L), giving per-position logits over branches, and a
  softmax with temperature `sft_factor` weights the branch outputs.

  Branches are separate submodules unrolled inside jit: on CPU XLA runs them faster as plain 2-D
  matmuls than as one batched 5-D computation (see `python -m prvr_jax.bench block`).
  """

  length: int
  num_heads: int
  dropout: float
  sft_factor: float
  gauss_widths: Sequence[float]
  initializer_range: float = 0.02
  remat: str = "none"  # 'blocks': each branch rematerialised (see layers.transformer_layer)
  dtype: str = "float32"  # the compute dtype's name (the branches' fence depends on it)

  @nn.compact
  def __call__(self, x: jax.Array, weight_token: jax.Array, key_mask: Optional[jax.Array] = None,
               key_log_size: Optional[jax.Array] = None, *, deterministic: bool) -> jax.Array:
    """x: (N, L, D); weight_token: (D,); key_mask / key_log_size: (N, L) or None -> (N, L, D)."""
    if x.shape[1] != self.length:
      raise ValueError(f"DyGMMBlock built for length {self.length} got {x.shape[1]} tokens")
    widths = (None,) + tuple(self.gauss_widths)
    layer = transformer_layer(self.remat, self.dtype)
    fenced = backward_fenced(self.remat, self.dtype)
    outs: list[jax.Array] = []
    for k, w in enumerate(widths):
      # Fenced, the branches' backward passes run one after another (remat.after says why).
      inputs = after(x, outs[-1]) if (fenced and outs) else x
      outs.append(layer(self.num_heads, self.dropout, w, initializer_range=self.initializer_range,
                        name=f"branch{k}")(inputs, key_mask, key_log_size, deterministic))
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "branch_out", jnp.stack(outs, axis=1))  # (N, K, L, D)
    # In a narrow dtype the readers of the branch outputs are fenced too (models/remat.py,
    # `fenced_module`): unfenced, XLA:CPU keeps a float32 copy of every branch output, made for
    # the forward products and shared with the backward ones.
    narrow = self.dtype != "float32"
    mixer_attention = (fenced_module(WeightTokenAttention, remat_policy=None, static_argnums=(4,))
                       if narrow else WeightTokenAttention)
    tokens = mixer_attention(self.num_heads, self.dropout, self.initializer_range,
                             name="mixer_attention")(weight_token, outs, key_mask, deterministic)
    h = nn.relu(Linear(x.shape[-1], initializer_range=self.initializer_range, name="mixer1")(tokens))
    h = Dropout(self.dropout)(h, deterministic=deterministic)
    mix_logits = Linear(self.length, initializer_range=self.initializer_range, name="mixer2")(h)
    self.sow("intermediates", "mix_logits", mix_logits)  # (N, K, L)
    # The branch weights in float32, then in the compute dtype for the weighted sum.
    weights = softmax_f32(jnp.swapaxes(mix_logits, 1, 2).astype(jnp.float32) / self.sft_factor,
                          x.dtype)  # (N, L, K)
    mix = fence_after_cotangent(_weighted_sum) if narrow else _weighted_sum
    return mix(weights, tuple(outs))


def _weighted_sum(weights: jax.Array, outs: Sequence[jax.Array]) -> jax.Array:
  """sum_k weights[..., k] * outs[k]: weights (N, L, K), K arrays (N, L, D) -> (N, L, D)."""
  mixed = weights[..., 0, None] * outs[0]
  for k in range(1, len(outs)):
    mixed = mixed + weights[..., k, None] * outs[k]
  return mixed
