"""LayerNorm and softmax that compute in float32 but keep only compute-dtype activations for the
backward pass.

Why not flax's LayerNorm / jax.nn.softmax under bfloat16: both upcast to float32 (rightly), and
autodiff then saves the float32 intermediates ((x - mean), the normalised rows, the exponentials)
for the backward pass: three float32 (N, L, D) arrays per LayerNorm and a float32 (N, H, L, L)
array per softmax, whatever the compute dtype. Here each saves its compute-dtype input (or
output) and per-row float32 statistics, and the backward pass recomputes the rest in float32.
In float32 the forward values are flax's / jax's formulas (golden parity); gradients agree to
float32 round-off.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Row mean and 1/sqrt(var + eps) in float32, var = E[x^2] - E[x]^2 as flax computes it."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  mean, rstd = _stats(x, eps)
  y = (x.astype(jnp.float32) - mean) * (scale * rstd) + bias
  return y.astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, g):
  del eps
  x, mean, rstd, scale = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = g.astype(jnp.float32)
  rows = tuple(range(g.ndim - 1))
  dscale, dbias = jnp.sum(g * xhat, axis=rows), jnp.sum(g, axis=rows)
  gx = g * scale
  dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True)
               - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _add_layer_norm(x: jax.Array, delta: jax.Array, scale: jax.Array, bias: jax.Array,
                    eps: float) -> jax.Array:
  return _add_layer_norm_fwd(x, delta, scale, bias, eps)[0]


def _add_layer_norm_fwd(x, delta, scale, bias, eps):
  total = x.astype(jnp.float32) + delta.astype(jnp.float32)
  y, (_, mean, rstd, scale) = _layer_norm_fwd(total, scale, bias, eps)
  return y.astype(x.dtype), (x, delta, mean, rstd, scale)


def _add_layer_norm_bwd(eps, res, g):
  x, delta, mean, rstd, scale = res
  total = x.astype(jnp.float32) + delta.astype(jnp.float32)
  dtotal, dscale, dbias = _layer_norm_bwd(eps, (total, mean, rstd, scale), g)
  return dtotal.astype(x.dtype), dtotal.astype(delta.dtype), dscale, dbias


_add_layer_norm.defvjp(_add_layer_norm_fwd, _add_layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with float32 `scale` / `bias` (flax's names, so parameter trees
  are those of `flax.linen.LayerNorm`). (..., D) in any dtype -> (..., D) in `dtype`.

  Called as `(x, delta)` it normalises the residual sum x + delta ((..., D) each, broadcast).
  In float32 that is LayerNorm(x + delta), the sum saved for the backward pass. In a narrower
  dtype the sum is formed in float32 (not rounded to `dtype` first) and the backward pass
  re-forms it from x and delta: both are compute-dtype arrays, x usually saved anyway for the
  products that read it, where a saved sum is a float32 array on XLA:CPU (it computes a bfloat16
  sum in float32 and fuses the rounding into every reader, the backward one included).
  """

  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, delta: Optional[jax.Array] = None) -> jax.Array:
    dim = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
    dtype = jnp.dtype(self.dtype)
    if delta is None:
      return _layer_norm(x.astype(dtype), scale, bias, self.epsilon)
    if dtype == jnp.float32:
      return _layer_norm((x + delta).astype(dtype), scale, bias, self.epsilon)
    x = jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, delta.shape))
    return _add_layer_norm(x.astype(dtype), delta.astype(dtype), scale, bias, self.epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(logits: jax.Array, dtype: Any) -> jax.Array:
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_fwd(logits, dtype):
  p = _softmax(logits, dtype)
  # The zero-size array only carries the logits' dtype to the backward pass.
  return p, (p, jnp.zeros((0,), logits.dtype))


def _softmax_bwd(dtype, res, g):
  del dtype
  p, logits_dtype = res
  p32, g32 = p.astype(jnp.float32), g.astype(jnp.float32)
  dlogits = p32 * (g32 - jnp.sum(g32 * p32, axis=-1, keepdims=True))
  return (dlogits.astype(logits_dtype.dtype),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax_f32(logits: jax.Array, dtype: Any) -> jax.Array:
  """Softmax over the last axis in float32 (a bfloat16 exp-sum would shift attention weights by
  ~1e-2), the probabilities returned, and saved for the backward pass, in the compute `dtype`.
  (..., L) -> (..., L)."""
  return _softmax(logits, jnp.dtype(dtype))
