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


def test_residual_layer_norm_in_float32_is_layer_norm_of_the_sum():
  x, params = _inputs()
  delta = jax.random.normal(jax.random.key(5), x.shape)
  ln = LayerNorm(epsilon=1e-5)
  np.testing.assert_array_equal(ln.apply(params, x, delta), ln.apply(params, x + delta))
  weight = jax.random.normal(jax.random.key(3), x.shape)
  g_pair = jax.grad(lambda p, a, b: jnp.sum(jnp.sin(ln.apply(p, a, b)) * weight),
                    argnums=(0, 1, 2))(params, x, delta)
  g_sum = jax.grad(lambda p, s: jnp.sum(jnp.sin(ln.apply(p, s)) * weight), argnums=(0, 1))(
      params, x + delta)
  for a, b in zip(jax.tree.leaves(g_pair[0]), jax.tree.leaves(g_sum[0])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(g_pair[1], g_sum[1])
  np.testing.assert_array_equal(g_pair[2], g_sum[1])


def test_residual_layer_norm_in_bfloat16_sums_in_float32_and_saves_no_float32_sum(capsys):
  x, params = _inputs()
  delta = jax.random.normal(jax.random.key(5), x.shape)
  xb, db = x.astype(jnp.bfloat16), delta.astype(jnp.bfloat16)
  ln16, ln32 = LayerNorm(epsilon=1e-5, dtype=jnp.bfloat16), LayerNorm(epsilon=1e-5)
  # The sum is not rounded to bfloat16 before normalising: the float32 LayerNorm of the exact sum
  # of the two bfloat16 inputs, rounded once.
  exact = ln32.apply(params, xb.astype(jnp.float32) + db.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(ln16.apply(params, xb, db), np.float32),
                                np.asarray(exact.astype(jnp.bfloat16), np.float32))
  weight = jax.random.normal(jax.random.key(3), x.shape)

  def loss(ln, dtype):
    return lambda p, a, b: jnp.sum(ln.apply(p, a.astype(dtype), b.astype(dtype))
                                   .astype(jnp.float32) * weight)

  g16 = jax.grad(loss(ln16, jnp.bfloat16), argnums=(0, 1, 2))(params, x, delta)
  g32 = jax.grad(loss(ln32, jnp.float32), argnums=(0, 1, 2))(
      params, xb.astype(jnp.float32), db.astype(jnp.float32))
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=2e-2 * np.abs(b).max())
  print_saved_residuals(loss(ln16, jnp.bfloat16), params, xb, db)
  saved = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
  assert not [l for l in saved if l.startswith("f32[4,6,32]") and "from a constant" not in l], saved
  assert sum(line.startswith("bf16[4,6,32]") for line in saved) == 2, saved  # x and delta
