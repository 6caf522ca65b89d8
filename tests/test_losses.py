"""Every loss against the golden file, plus padding, blocking, randomness and stop-gradient checks."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from prvr_jax.losses import cbva, retrieval, tcpl

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)


def _all(n):
  return jnp.ones((n,), bool)


@pytest.fixture(scope="module")
def g(golden):
  return golden


def _labels(g):
  return jnp.asarray(g["batch/text_labels"], jnp.int32)


@pytest.mark.parametrize("scores,key", [("out/clip_scale_scores_", "loss_parts/clip_nce_unweighted"),
                                        ("out/frame_scale_scores_", "loss_parts/frame_nce_unweighted")])
def test_nce_matches_golden(g, scores, key):
  s = jnp.asarray(g[scores])
  value = retrieval.nce_loss(s, _labels(g), _all(s.shape[0]), _all(s.shape[1]))
  np.testing.assert_allclose(float(value), float(g[key]), **LOSS_TOL)


@pytest.mark.parametrize("scores,key", [("out/clip_scale_scores", "loss/clip_trip"),
                                        ("out/frame_scale_scores", "loss/frame_trip")])
def test_hardest_negative_triplet_matches_golden(g, scores, key):
  s = jnp.asarray(g[scores])
  value = retrieval.triplet_loss(s, _labels(g), _all(s.shape[0]), _all(s.shape[1]), margin=0.1,
                                 hard_negatives=jnp.asarray(True), hard_pool_size=1, key=jax.random.key(0))
  np.testing.assert_allclose(float(value), float(g[key]), **LOSS_TOL)


def test_tcpl_terms_match_golden(g):
  s, t = jnp.asarray(g["out/video_query"]), jnp.asarray(g["out/clip_query"])
  q = _all(s.shape[0])
  np.testing.assert_allclose(float(tcpl.rkd_distance(s, t, q)), float(g["loss_parts/rkd_distance"]), **LOSS_TOL)
  for block in (1, 5, 16, 64):
    np.testing.assert_allclose(float(tcpl.rkd_angle(s, t, q, block)), float(g["loss_parts/rkd_angle"]), **LOSS_TOL)


def test_connectivity_and_clip_count_match_golden(g):
  omega = cbva.clip_connectivity(jnp.asarray(g["batch/clip_video_features"]), 0.8)
  np.testing.assert_allclose(np.asarray(omega), g["out/intra_diff"], atol=1e-6)
  np.testing.assert_array_equal(cbva.adaptive_clip_count(omega), g["cbva/clip_count"])


def test_cbva_matches_golden(g):
  count = jnp.asarray(g["cbva/clip_count"])
  valid = jnp.arange(32)[None, :] < count[:, None]
  loss, f2c, c2f = cbva.cbva_video_loss(jnp.asarray(g["out/encoded_frame_feat"]),
                                        jnp.asarray(g["cbva/final_segments"]),
                                        jnp.asarray(g["cbva/final_labels"]), valid)
  np.testing.assert_allclose(np.asarray(f2c), g["cbva/per_video_f2c"], **LOSS_TOL)
  np.testing.assert_allclose(np.asarray(c2f), g["cbva/per_video_c2f"], **LOSS_TOL)
  np.testing.assert_allclose(np.asarray(loss), g["cbva/per_video_loss"], **LOSS_TOL)
  np.testing.assert_allclose(float(cbva.cbva_loss(loss, _all(loss.shape[0]))),
                             float(g["loss_parts/vidlvl_unweighted"]), **LOSS_TOL)


def test_transitive_closure_on_a_chain():
  # Tokens along a chain: each is similar only to its neighbours, yet all are connected.
  angles = np.linspace(0, 1.2, 8)
  chain = np.stack([np.cos(angles), np.sin(angles)], -1)[None].astype(np.float32)
  apart = np.eye(8, 2, dtype=np.float32)[None]  # two orthogonal tokens and six zero tokens
  omega = cbva.clip_connectivity(jnp.asarray(np.concatenate([chain, apart])), 0.97)
  assert float(omega[0]) == pytest.approx(1.0, abs=1e-6)  # the direct edges alone give 14/56
  assert float(omega[1]) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_array_equal(cbva.adaptive_clip_count(jnp.array([0.0, 0.2, 0.39, 0.4, 0.6, 0.8, 1.0])),
                                [32, 20, 20, 12, 8, 5, 5])


def _naive_angle(s, t):
  def angles(x):
    d = x[None, :, :] - x[:, None, :]
    sq = jnp.sum(d * d, axis=-1, keepdims=True)
    n = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))  # the reference's normalize, with a NaN-free gradient
    u = jnp.where(sq > 0, d / jnp.maximum(n, 1e-12), 0.0)
    return jnp.einsum("ijd,ikd->ijk", u, u)
  return jnp.mean(tcpl.smooth_l1(angles(s), jax.lax.stop_gradient(angles(t))))


def test_blocked_angle_equals_naive_values_and_gradients():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(13, 24)).astype(np.float32) + 3.0  # an offset that centring removes
  s[5] = s[2] + 1e-3 * rng.normal(size=24)  # a near-duplicate pair
  t = rng.normal(size=(13, 10)).astype(np.float32)
  t[7] = t[3]  # an exact duplicate in the teacher
  s, t = jnp.asarray(s), jnp.asarray(t)
  q = _all(13)
  ours = lambda x: tcpl.rkd_angle(x, t, q, block_size=4)
  np.testing.assert_allclose(float(ours(s)), float(_naive_angle(s, t)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(ours)(s)), np.asarray(jax.grad(lambda x: _naive_angle(x, t))(s)),
                             rtol=2e-3, atol=3e-5)  # the near-duplicate's direction is ill-conditioned in float32
  assert float(jnp.abs(jax.grad(lambda y: tcpl.rkd_angle(s, y, q, 4))(t)).max()) == 0.0  # teacher frozen


def test_losses_ignore_padding():
  rng = np.random.default_rng(1)
  q, b = 9, 4
  scores = rng.uniform(-1, 1, size=(q, b)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 2])
  student = rng.normal(size=(q, 16)).astype(np.float32)
  teacher = rng.normal(size=(q, 8)).astype(np.float32)
  # Pad with 3 queries and 2 videos of garbage.
  s_pad = np.full((q + 3, b + 2), 50.0, np.float32)
  s_pad[:q, :b] = scores
  l_pad = np.concatenate([labels, [4, 5, 0]])
  qv = jnp.asarray(np.arange(q + 3) < q)
  vv = jnp.asarray(np.arange(b + 2) < b)
  stu_pad = np.concatenate([student, 100 * np.ones((3, 16), np.float32)])
  tea_pad = np.concatenate([teacher, -7 * np.ones((3, 8), np.float32)])
  key = jax.random.key(3)
  np.testing.assert_allclose(float(retrieval.nce_loss(jnp.asarray(s_pad), jnp.asarray(l_pad), qv, vv)),
                             float(retrieval.nce_loss(jnp.asarray(scores), jnp.asarray(labels), _all(q), _all(b))),
                             rtol=1e-6)
  hard = dict(margin=0.2, hard_negatives=jnp.asarray(True), hard_pool_size=1, key=key)
  np.testing.assert_allclose(float(retrieval.triplet_loss(jnp.asarray(s_pad), jnp.asarray(l_pad), qv, vv, **hard)),
                             float(retrieval.triplet_loss(jnp.asarray(scores), jnp.asarray(labels), _all(q), _all(b), **hard)),
                             rtol=1e-6)
  np.testing.assert_allclose(float(tcpl.rkd_distance(jnp.asarray(stu_pad), jnp.asarray(tea_pad), qv)),
                             float(tcpl.rkd_distance(jnp.asarray(student), jnp.asarray(teacher), _all(q))), rtol=1e-5)
  np.testing.assert_allclose(float(tcpl.rkd_angle(jnp.asarray(stu_pad), jnp.asarray(tea_pad), qv, 5)),
                             float(tcpl.rkd_angle(jnp.asarray(student), jnp.asarray(teacher), _all(q), 5)), rtol=1e-5)
  per_video = jnp.array([1.0, 2.0, 3.0, 1e6])
  assert float(cbva.cbva_loss(per_video, jnp.array([True, True, True, False]))) == pytest.approx(2.0)


def test_random_negatives_are_negatives_and_keyed():
  rng = np.random.default_rng(2)
  q, b = 40, 6
  labels = jnp.asarray(rng.integers(0, b, q))
  pos = np.asarray(retrieval.positive_mask(labels, b))
  scores = jnp.asarray(np.where(pos, 0.9, rng.uniform(-1, 0.5, size=(q, b))).astype(np.float32))
  args = (scores, labels, _all(q), _all(b))
  kw = dict(margin=0.5, hard_negatives=jnp.asarray(False), hard_pool_size=3)
  a = retrieval.triplet_loss(*args, key=jax.random.key(0), **kw)
  assert float(a) == float(retrieval.triplet_loss(*args, key=jax.random.key(0), **kw))
  assert float(a) != float(retrieval.triplet_loss(*args, key=jax.random.key(1), **kw))
  # Positives score 0.9 and the margin is 0.5: a positive picked as negative would add > 0.5.
  # Every negative is < 0.5, so each hinge is < 0.5 + 0.5 - 0.9 = 0.1; both directions < 0.2.
  assert float(a) < 0.2
  # Hard pool of 1 equals the deterministic hardest negative whatever the key.
  kw_hard = dict(margin=0.5, hard_negatives=jnp.asarray(True), hard_pool_size=1)
  assert float(retrieval.triplet_loss(*args, key=jax.random.key(0), **kw_hard)) == \
      float(retrieval.triplet_loss(*args, key=jax.random.key(9), **kw_hard))


def test_cbva_stop_gradients():
  rng = np.random.default_rng(3)
  frames = jnp.asarray(rng.normal(size=(2, 16, 8)).astype(np.float32))
  segs = jnp.asarray(rng.normal(size=(2, 6, 8)).astype(np.float32))
  labels = jnp.asarray(np.repeat(np.arange(4), 4)[None].repeat(2, 0))
  valid = jnp.asarray(np.arange(6)[None] < np.array([[4], [4]]))
  f2c = lambda f, s: jnp.sum(cbva.cbva_video_loss(f, s, labels, valid)[1])
  c2f = lambda f, s: jnp.sum(cbva.cbva_video_loss(f, s, labels, valid)[2])
  assert float(jnp.abs(jax.grad(f2c, argnums=1)(frames, segs)).max()) == 0.0
  assert float(jnp.abs(jax.grad(f2c, argnums=0)(frames, segs)).max()) > 0.0
  assert float(jnp.abs(jax.grad(c2f, argnums=0)(frames, segs)).max()) == 0.0
  g_seg = jax.grad(c2f, argnums=1)(frames, segs)
  assert float(jnp.abs(g_seg[:, :4]).max()) > 0.0 and float(jnp.abs(g_seg[:, 4:]).max()) == 0.0
