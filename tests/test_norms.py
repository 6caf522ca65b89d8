"""models/norms.py: LayerNorm and softmax equal to flax / jax in float32, and keeping only
compute-dtype activations for the backward pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from prvr_jax.models.norms import LayerNorm, softmax_f32


def _inputs():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 6, 32))
  scale = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (32,))
  bias = 0.1 * jax.random.normal(jax.random.key(2), (32,))
  return x, {"params": {"scale": scale, "bias": bias}}


def test_layer_norm_equals_flax_in_float32_values_and_gradients():
  x, params = _inputs()
  ours, flax_ln = LayerNorm(epsilon=1e-5), nn.LayerNorm(epsilon=1e-5)
  np.testing.assert_array_equal(ours.apply(params, x), flax_ln.apply(params, x))
  weight = jax.random.normal(jax.random.key(3), x.shape)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * weight)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_flax = jax.grad(loss(flax_ln), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_softmax_equals_jax_in_float32_values_and_gradients():
  logits = 4.0 * jax.random.normal(jax.random.key(0), (3, 5, 7))
  np.testing.assert_array_equal(softmax_f32(logits, jnp.float32), jax.nn.softmax(logits, axis=-1))
  weight = jax.random.normal(jax.random.key(1), logits.shape)
  ours = jax.grad(lambda z: jnp.sum(softmax_f32(z, jnp.float32) ** 2 * weight))(logits)
  ref = jax.grad(lambda z: jnp.sum(jax.nn.softmax(z, axis=-1) ** 2 * weight))(logits)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)  # cancellation in p (g - <g, p>)


def test_bfloat16_backward_keeps_no_float32_activation(capsys):
  x, params = _inputs()
  x = x.astype(jnp.bfloat16)
  ln = LayerNorm(epsilon=1e-5, dtype=jnp.bfloat16)

  weight = jax.random.normal(jax.random.key(3), x.shape)

  def f(p, x):  # linear after the softmax, so only the two layers save anything
    y = ln.apply(p, x)
    return jnp.sum(softmax_f32(y.astype(jnp.float32), jnp.bfloat16).astype(jnp.float32) * weight)

  print_saved_residuals(f, params, x)
  saved = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
  assert saved
  # float32 residuals are only parameters and per-row statistics (..., 1), never (4, 6, 32).
  assert not [l for l in saved if l.startswith("f32[4,6,32]") and "from a constant" not in l], saved
  assert any(line.startswith("bf16[4,6,32]") for line in saved)
