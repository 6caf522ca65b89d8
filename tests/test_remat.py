"""The cotangent fence (models/remat.py): same values and gradients, and less memory where XLA:CPU
would otherwise keep what remat or bfloat16 was meant to free."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from prvr_jax.models.gmm_block import DyGMMBlock
from prvr_jax.models.layers import TransformerLayer, backward_fenced, transformer_layer
from prvr_jax.models.remat import after, fence_after_cotangent

N, D, H, BLOCKS = 1024, 128, 512, 6


def _mlp_block(w, x):
  w1, w2 = w
  return x + jnp.tanh(jax.nn.gelu(x @ w1) @ w2)


def _grad_fn(block):
  def loss(ws, x):
    for w in ws:
      x = block(w, x)
    return jnp.sum(x * x)

  return jax.jit(jax.grad(loss))


def _mlp_inputs():
  keys = jax.random.split(jax.random.key(0), 2 * BLOCKS + 1)
  ws = [(jax.random.normal(keys[2 * i], (D, H)) * 0.05, jax.random.normal(keys[2 * i + 1], (H, D)) * 0.05)
        for i in range(BLOCKS)]
  return ws, jax.random.normal(keys[-1], (N, D))


def _temp_bytes(fn, *args) -> int:
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_fenced_checkpoint_frees_memory_with_bit_equal_gradients():
  ws, x = _mlp_inputs()
  plain = _grad_fn(_mlp_block)
  fenced = _grad_fn(fence_after_cotangent(
      jax.checkpoint(_mlp_block, policy=jax.checkpoint_policies.nothing_saveable)))
  for g, gf in zip(jax.tree.leaves(plain(ws, x)), jax.tree.leaves(fenced(ws, x))):
    np.testing.assert_array_equal(np.asarray(gf), np.asarray(g))
  # Six blocks' (N, H) activations saved without remat; with it, their inputs and one block's
  # recomputation at a time.
  assert _temp_bytes(fenced, ws, x) <= 0.5 * _temp_bytes(plain, ws, x)


def test_fence_without_recomputation_stores_bfloat16_residuals():
  """XLA:CPU upcasts bfloat16 products; unfenced, the float32 copy of each saved activation is
  what stays alive until the backward pass."""
  ws, x = _mlp_inputs()
  ws = jax.tree.map(lambda a: a.astype(jnp.bfloat16), ws)
  x = x.astype(jnp.bfloat16)
  plain = _grad_fn(_mlp_block)
  fenced = _grad_fn(fence_after_cotangent(_mlp_block))
  for g, gf in zip(jax.tree.leaves(plain(ws, x)), jax.tree.leaves(fenced(ws, x))):
    np.testing.assert_array_equal(np.asarray(gf, np.float32), np.asarray(g, np.float32))
  assert _temp_bytes(fenced, ws, x) <= 0.8 * _temp_bytes(plain, ws, x)


def test_after_is_the_identity_and_orders_the_backward_pass():
  x = jnp.array([[-0.0, 0.0, 1.5, -2.25]])
  prev = {"a": jnp.array([-3.0, 7.0]), "b": jnp.arange(3)}
  y = after(x, prev)
  np.testing.assert_array_equal(np.signbit(np.asarray(y)), np.signbit(np.asarray(x)))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  # The dependence is real (a non-finite `prev` shows through), not folded to a constant.
  assert np.isnan(np.asarray(after(x, jnp.array([jnp.inf])))).all()
  # Gradients through it are the identity's.
  g = jax.grad(lambda x, p: jnp.sum(after(x, p) ** 2), argnums=(0, 1))(x, prev["a"])
  np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(2 * x))
  np.testing.assert_array_equal(np.asarray(g[1]), np.zeros(2))


@pytest.mark.parametrize("remat,dtype", [("blocks", "float32"), ("none", "bfloat16"),
                                         ("blocks", "bfloat16")])
def test_fenced_transformer_layer_equals_the_plain_one(remat, dtype):
  assert backward_fenced(remat, dtype)
  compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  x = jax.random.normal(jax.random.key(1), (4, 16, 32), compute)
  mask = jnp.ones((4, 16), bool).at[1, 12:].set(False)
  plain, fenced = TransformerLayer(4, 0.2, 0.5), transformer_layer(remat, dtype)(4, 0.2, 0.5)
  params = plain.init(jax.random.key(2), x, mask, None, True)
  # Same parameter tree and initial values from the same key.
  fenced_params = fenced.init(jax.random.key(2), x, mask, None, True)
  flat, flat_f = traverse_util.flatten_dict(params), traverse_util.flatten_dict(fenced_params)
  assert flat.keys() == flat_f.keys()
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat_f[k]), np.asarray(flat[k]))

  # A random projection: sum(y ** 2) of a post-LN output is nearly constant (gradients ~0).
  r = jax.random.normal(jax.random.key(4), x.shape)

  def loss(module):
    def f(p, x):
      y = module.apply(p, x, mask, None, False, rngs={"dropout": jax.random.key(3)})
      return jnp.sum(y.astype(jnp.float32) * r)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  (v, (gp, gx)), (vf, (gpf, gxf)) = loss(plain)(params, x), loss(fenced)(params, x)
  np.testing.assert_array_equal(np.asarray(vf), np.asarray(v))
  # float32: round-off only (the recomputation may fuse differently). bfloat16: unfenced, XLA
  # removes the f32 -> bf16 -> f32 round trip of saved activations (excess precision allowed),
  # so the backward pass reads unrounded values; fenced it reads the bfloat16 ones the program
  # names. Both are bfloat16 training; they agree to bfloat16 resolution.
  tol = 1e-5 if dtype == "float32" else 3e-2
  for g, gf in zip(jax.tree.leaves((gx, gp)), jax.tree.leaves((gxf, gpf))):
    g, gf = np.asarray(g, np.float32), np.asarray(gf, np.float32)
    np.testing.assert_allclose(gf, g, rtol=0, atol=tol * np.abs(g).max())


def test_rematerialised_dygmm_block_holds_less_than_half_the_memory():
  """The 8 parallel branches: fenced alone, all 8 recompute at once when their cotangents arrive
  together; `after` chains them, so one branch's activations are live at a time."""
  x = jax.random.normal(jax.random.key(0), (16, 64, 96))
  token = jnp.ones((96,))
  mask = jnp.ones((16, 64))
  temps, grads = {}, {}
  for remat in ("none", "blocks"):
    block = DyGMMBlock(64, 4, 0.1, 0.09, (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0), remat=remat)
    params = block.init({"params": jax.random.key(1)}, x, token, mask, deterministic=True)

    def loss(p, x, block=block):
      y = block.apply(p, x, token, mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
      return jnp.sum(y * jnp.sin(jnp.arange(y.size).reshape(y.shape)))

    fn = jax.jit(jax.grad(loss))
    temps[remat] = _temp_bytes(fn, params, x)
    grads[remat] = fn(params, x)
  for g, gr in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["blocks"])):
    g, gr = np.asarray(g), np.asarray(gr)
    np.testing.assert_allclose(gr, g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
  assert temps["blocks"] <= 0.5 * temps["none"], temps


def test_bfloat16_residuals_pass_the_fence_bit_for_bit():
  """Narrow residuals are fenced through their integer bits: signed zeros, subnormals, infinities
  and the largest values come out of the backward pass unchanged."""
  tiny = float(jnp.finfo(jnp.bfloat16).smallest_subnormal)
  big = float(jnp.finfo(jnp.bfloat16).max)
  x = jnp.array([-0.0, 0.0, tiny, -tiny, 1.0 / 3.0, -big, big, jnp.inf, -jnp.inf], jnp.bfloat16)
  ct = jnp.ones_like(x)
  square = lambda v: v * v  # its pullback saves v; the gradient 2 v ct shows v's bits
  _, pull = jax.vjp(square, x)
  _, pull_fenced = jax.vjp(fence_after_cotangent(square), x)
  want, got = np.asarray(pull(ct)[0], np.float32), np.asarray(pull_fenced(ct)[0], np.float32)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_bfloat16_dygmm_block_stores_bfloat16_activations():
  """The residual sums before each LayerNorm, the attention probabilities and the branch outputs
  read by the mixer are kept as bfloat16, not as the float32 values XLA:CPU computes them from
  (before: 0.70x of float32 here; the parameter-sized float32 temporaries are the same in both)."""
  x32 = jax.random.normal(jax.random.key(0), (8, 128, 128))
  token, mask = jnp.ones((128,)), jnp.ones((8, 128)).at[1, 100:].set(0.0)
  temps, params, grads = {}, {}, {}
  for dtype in ("float32", "bfloat16"):
    block = DyGMMBlock(128, 4, 0.1, 0.09, (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0), dtype=dtype)
    x = x32.astype(dtype)
    params[dtype] = block.init({"params": jax.random.key(1)}, x, token, mask, deterministic=True)
    r = jnp.sin(jnp.arange(x.size).reshape(x.shape))

    def loss(p, x, block=block, r=r):
      y = block.apply(p, x, token, mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
      return jnp.sum(y.astype(jnp.float32) * r)

    fn = jax.jit(jax.grad(loss))
    temps[dtype] = _temp_bytes(fn, params[dtype], x)
    grads[dtype] = fn(params[dtype], x)
  # The fenced mixer keeps the parameter tree and initial values.
  flat32 = traverse_util.flatten_dict(params["float32"])
  flat16 = traverse_util.flatten_dict(params["bfloat16"])
  assert flat32.keys() == flat16.keys()
  for k in flat32:
    np.testing.assert_array_equal(np.asarray(flat16[k]), np.asarray(flat32[k]))
  # Same dropout masks, so the bfloat16 gradients are the float32 ones at bfloat16 resolution.
  g32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads["float32"])])
  g16 = np.concatenate([np.ravel(np.asarray(g, np.float32))
                        for g in jax.tree.leaves(grads["bfloat16"])])
  assert np.corrcoef(g32, g16)[0, 1] > 0.99
  assert temps["bfloat16"] <= 0.65 * temps["float32"], temps
