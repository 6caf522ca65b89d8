"""The model's dropout: Threefry-2x32 bits, keep rate, scaling, independence, flax integration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from prvr_jax.models import dropout


def test_threefry_matches_jax_and_the_published_known_answer():
  rng = np.random.default_rng(0)
  for _ in range(3):
    key = rng.integers(0, 2 ** 32, size=2, dtype=np.uint64).astype(np.uint32)
    count = rng.integers(0, 2 ** 32, size=64, dtype=np.uint64).astype(np.uint32)
    expected = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(count)))
    w0, w1 = dropout.threefry2x32(jnp.uint32(key[0]), jnp.uint32(key[1]), jnp.asarray(count[:32]),
                                  jnp.asarray(count[32:]))
    np.testing.assert_array_equal(np.concatenate([np.asarray(w0), np.asarray(w1)]), expected)
  # Random123's known-answer vector for Threefry-2x32-20 with key 0, counter 0.
  w0, w1 = dropout.threefry2x32(jnp.uint32(0), jnp.uint32(0), jnp.zeros((1,), jnp.uint32),
                                jnp.zeros((1,), jnp.uint32))
  assert (int(w0[0]), int(w1[0])) == (0x6B200159, 0x99BA4EFE)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.25])
def test_keep_rate_and_pairwise_independence(keep):
  shape = (64, 33, 250)  # last axis not a multiple of 4: the padded block is cut off
  mask = np.asarray(jax.jit(dropout.keep_mask, static_argnums=(1, 2))(jax.random.key(3), shape, keep))
  assert mask.shape == shape and mask.dtype == bool
  n = mask.size
  p = dropout.keep_threshold(keep) / 2 ** 16
  assert abs(p - keep) < 2 ** -16
  tol = 5 * np.sqrt(p * (1 - p) / n)  # 5 sigma
  assert abs(mask.mean() - p) < tol
  # Neighbours share a Threefry block (two 16-bit halves of one word, two words of one block) and
  # rows are consecutive counters: both kept must happen with probability p^2 everywhere.
  for a, b in [(mask[..., :-1], mask[..., 1:]), (mask[..., :-2], mask[..., 2:]),
               (mask[:, :-1], mask[:, 1:])]:
    both = (a & b).mean()
    assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / a.size)


def test_masks_differ_between_keys_and_are_reproducible():
  m = lambda k: np.asarray(dropout.keep_mask(jax.random.key(k), (16, 128), 0.9))
  np.testing.assert_array_equal(m(1), m(1))
  assert (m(1) != m(2)).mean() > 0.1




def test_module_scales_kept_values_and_is_identity_when_deterministic():
  x = jnp.arange(1, 4001, dtype=jnp.float32).reshape(40, 100)
  layer = dropout.Dropout(0.1)
  assert layer.apply({}, x, deterministic=True) is x
  y = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
  kept = y != 0
  scale = 2 ** 16 / dropout.keep_threshold(0.9)
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] * scale, rtol=1e-6)
  assert 0.85 < kept.mean() < 0.95
  # Expectation preserved exactly by the scale: the mean over many keys approaches x.
  keys = jax.random.split(jax.random.key(1), 400)
  ones = jnp.ones((4, 256))
  mean = jax.vmap(lambda k: layer.apply({}, ones, deterministic=False, rngs={"dropout": k}))(keys).mean()
  assert abs(float(mean) - 1.0) < 5 * np.sqrt(0.1 / 0.9 / (400 * 1024))
  np.testing.assert_array_equal(dropout.Dropout(0.0).apply({}, x, deterministic=False), x)
  assert float(jnp.abs(dropout.Dropout(1.0).apply({}, x, deterministic=False,
                                                   rngs={"dropout": jax.random.key(0)})).max()) == 0.0


def test_gradient_flows_through_kept_entries_only():
  x = jnp.ones((8, 64))
  layer = dropout.Dropout(0.3)
  rngs = {"dropout": jax.random.key(4)}
  grad = jax.grad(lambda v: jnp.sum(layer.apply({}, v, deterministic=False, rngs=rngs)))(x)
  y = layer.apply({}, x, deterministic=False, rngs=rngs)
  scale = 2 ** 16 / dropout.keep_threshold(0.7)
  np.testing.assert_allclose(np.asarray(grad), np.where(np.asarray(y) != 0, scale, 0.0), rtol=1e-6)
