"""The training scores' hand-written gradient against autodiff of the plain formulation."""

import jax
import jax.numpy as jnp
import numpy as np

from prvr_jax.ops import similarity


def _autodiff_scores(queries, tokens):
  """Raw and cosine max-token scores as jnp ops (autodiff splits ties; no ties in this data)."""
  dots = jnp.einsum("qd,bld->qbl", queries, tokens)
  cosine = jnp.einsum("qd,bld->qbl", similarity.l2_normalize(queries), similarity.l2_normalize(tokens))
  return jnp.max(dots, axis=-1), jnp.max(cosine, axis=-1)


def _inputs(seed=0, q=12, b=5, length=7, dim=16):
  ks = jax.random.split(jax.random.key(seed), 4)
  queries = jax.random.normal(ks[0], (q, dim))
  tokens = jax.random.normal(ks[1], (b, length, dim))
  tokens = tokens.at[2, 4:].set(0.0)  # masked frames are zero rows
  cotangents = (jax.random.normal(ks[2], (q, b)), jax.random.normal(ks[3], (q, b)))
  return queries, tokens, cotangents


def test_training_scores_values_and_gradients_match_autodiff():
  queries, tokens, cotangents = _inputs()
  out, vjp = jax.vjp(similarity._raw_and_cosine_scores, queries, tokens)
  ref_out, ref_vjp = jax.vjp(_autodiff_scores, queries, tokens)
  np.testing.assert_allclose(out[0], ref_out[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[1], ref_out[1], rtol=1e-6, atol=1e-6)
  d_q, d_t = vjp(cotangents)
  ref_d_q, ref_d_t = ref_vjp(cotangents)
  np.testing.assert_allclose(d_q, ref_d_q, rtol=1e-5, atol=1e-5)
  valid = np.asarray(jnp.abs(tokens).sum(-1) > 0)
  # Autodiff's gradient at zero rows is NaN (0 * inf through the norm); the model discards it.
  np.testing.assert_allclose(np.asarray(d_t)[valid], np.asarray(ref_d_t)[valid], rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(d_t)))


def test_training_scores_gradient_goes_to_the_maximising_token_only():
  queries, tokens, _ = _inputs(seed=1, q=1, b=1)
  g_raw, g_cos = jnp.ones((1, 1)), jnp.zeros((1, 1))
  _, vjp = jax.vjp(similarity._raw_and_cosine_scores, queries, tokens)
  d_t = np.asarray(vjp((g_raw, g_cos))[1])
  best = int(jnp.argmax(jnp.einsum("qd,bld->qbl", queries, tokens)[0, 0]))
  nonzero_rows = np.nonzero(np.abs(d_t[0]).sum(-1))[0].tolist()
  assert nonzero_rows == [best]
  np.testing.assert_allclose(d_t[0, best], queries[0], rtol=1e-6)


def test_training_scores_under_jit_match_eval_scores():
  queries, tokens, _ = _inputs(seed=2)
  scores = jax.jit(similarity.training_scores)(queries, tokens[:, :3], tokens)
  np.testing.assert_allclose(scores["frame_scale_scores_"],
                             similarity.max_token_scores(queries, tokens, normalize=False),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores["frame_scale_scores"],
                             similarity.max_token_scores(queries, tokens, normalize=True),
                             rtol=1e-5, atol=1e-6)
