"""MSC losses: golden parity, padding invariance, random negatives, blocked TCPL, stop-gradients.

Every loss is called through `jax.jit` (one compile per shape), which is what training does and is
much faster on CPU than op-by-op dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from prvr_jax.losses import cbva, retrieval, tcpl

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)  # golden README, section 8

NCE = jax.jit(retrieval.nce_loss)
TRIPLET = jax.jit(retrieval.triplet_loss, static_argnames=("margin", "hard_pool_size"))
# Negative picks for a stack of keys: (..., hard, [pool,] keys) -> (num_keys, Q) / (num_keys, B).
NEG_VIDEOS = jax.jit(
    lambda s, l, qv, vv, hard, pool, keys: jax.vmap(lambda k: retrieval.sample_negative_videos(
        s, l, qv, vv, hard_negatives=hard, hard_pool_size=pool, key=k))(keys))  # pool traced: one compile
NEG_QUERIES = jax.jit(
    lambda s, l, qv, vv, hard, keys: jax.vmap(lambda k: retrieval.sample_negative_queries(
        s, l, qv, vv, hard_negatives=hard, key=k))(keys))
RKD_D = jax.jit(tcpl.rkd_distance)
RKD_A = jax.jit(tcpl.rkd_angle, static_argnums=3)
CONNECTIVITY = jax.jit(cbva.clip_connectivity, static_argnums=1)
CBVA_VIDEO = jax.jit(cbva.cbva_video_loss)
CBVA_MEAN = jax.jit(cbva.cbva_loss)
CLIP_COUNT = jax.jit(cbva.adaptive_clip_count)


def _ones(n: int) -> np.ndarray:
  # NumPy, not jnp: every eager jnp op is a separate compile, which dominates CPU test time.
  return np.ones((n,), bool)


def _labels(g) -> jax.Array:
  return jnp.asarray(g["batch/text_labels"], jnp.int32)


def _hard_triplet(scores, labels, qv, vv, margin=0.1):
  return TRIPLET(scores, labels, qv, vv, margin=margin, hard_negatives=jnp.asarray(True),
                 hard_pool_size=1, key=jax.random.key(0))


# ---------------------------------------------------------------- NumPy statements of the reference


def _np_nce(s: np.ndarray, labels: np.ndarray) -> float:
  """clip_nce as the reference computes it (videos without queries add 0 and count)."""
  s = s.astype(np.float64)
  lse = lambda x: np.log(np.sum(np.exp(x - x.max()))) + x.max()
  t2v = np.mean([lse(s[q]) - s[q, labels[q]] for q in range(len(s))])
  v2t = [lse(s[:, b]) - lse(s[labels == b, b]) if np.any(labels == b) else 0.0 for b in range(s.shape[1])]
  return float(t2v + np.mean(v2t))


def _np_connectivity(tokens: np.ndarray, thr: float) -> np.ndarray:
  """intra_diff with the reference's Warshall closure loop."""
  out = []
  for x in tokens.astype(np.float64):
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    a = x @ x.T > thr
    for k in range(len(a)):
      a |= a[:, k, None] & a[None, k, :]
    out.append(a[~np.eye(len(a), dtype=bool)].sum() / len(a) / (len(a) - 1))
  return np.array(out)


def _naive_angle(s: jax.Array, t: jax.Array) -> jax.Array:
  """The reference RKdAngle with explicit (Q, Q, D) differences; 0 * (1/0) avoided for zero rows."""

  def cosines(x):
    d = x[None, :, :] - x[:, None, :]  # d[i, j] = x_j - x_i
    sq = jnp.sum(d * d, axis=-1, keepdims=True)
    u = jnp.where(sq > 0, d / jnp.maximum(jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 1e-12), 0.0)
    return jnp.einsum("ijd,ikd->ijk", u, u, precision=jax.lax.Precision.HIGHEST)

  diff = jnp.abs(cosines(s) - jax.lax.stop_gradient(cosines(t)))
  return jnp.mean(jnp.where(diff < 1, 0.5 * diff * diff, diff - 0.5))


# ---------------------------------------------------------------- golden parity


@pytest.mark.parametrize("scores,key", [("out/clip_scale_scores_", "loss_parts/clip_nce_unweighted"),
                                        ("out/frame_scale_scores_", "loss_parts/frame_nce_unweighted")])
def test_nce_matches_golden(golden, scores, key):
  s = jnp.asarray(golden[scores])
  value = NCE(s, _labels(golden), _ones(s.shape[0]), _ones(s.shape[1]))
  np.testing.assert_allclose(float(value), float(golden[key]), **LOSS_TOL)


@pytest.mark.parametrize("scores,key", [("out/clip_scale_scores", "loss/clip_trip"),
                                        ("out/frame_scale_scores", "loss/frame_trip")])
def test_hard_triplet_matches_golden(golden, scores, key):
  s = jnp.asarray(golden[scores])
  value = _hard_triplet(s, _labels(golden), _ones(s.shape[0]), _ones(s.shape[1]))
  np.testing.assert_allclose(float(value), float(golden[key]), **LOSS_TOL)


def test_tcpl_terms_match_golden_for_any_tile_size(golden):
  s, t = jnp.asarray(golden["out/video_query"]), jnp.asarray(golden["out/clip_query"])
  q = _ones(s.shape[0])
  np.testing.assert_allclose(float(RKD_D(s, t, q)), float(golden["loss_parts/rkd_distance"]), **LOSS_TOL)
  for tile in (1, 3, 16, 64):  # 1: every tile a single entry; 3 pads Q; 64 > Q is one tile
    np.testing.assert_allclose(float(RKD_A(s, t, q, tile)), float(golden["loss_parts/rkd_angle"]), **LOSS_TOL)


def test_connectivity_and_clip_count_match_golden(golden):
  omega = CONNECTIVITY(jnp.asarray(golden["batch/clip_video_features"]), 0.8)
  assert omega.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(omega), golden["out/intra_diff"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(CLIP_COUNT(omega)), golden["cbva/clip_count"])


def test_cbva_matches_golden(golden):
  valid = np.arange(32)[None, :] < golden["cbva/clip_count"][:, None]
  loss, f2c, c2f = CBVA_VIDEO(jnp.asarray(golden["out/encoded_frame_feat"]), jnp.asarray(golden["cbva/final_segments"]),
                              jnp.asarray(golden["cbva/final_labels"]), valid)
  np.testing.assert_allclose(np.asarray(f2c), golden["cbva/per_video_f2c"], **LOSS_TOL)
  np.testing.assert_allclose(np.asarray(c2f), golden["cbva/per_video_c2f"], **LOSS_TOL)
  np.testing.assert_allclose(np.asarray(loss), golden["cbva/per_video_loss"], **LOSS_TOL)
  np.testing.assert_allclose(float(CBVA_MEAN(loss, _ones(loss.shape[0]))),
                             float(golden["loss_parts/vidlvl_unweighted"]), **LOSS_TOL)


# ---------------------------------------------------------------- NCE and triplet


def test_nce_against_numpy_with_a_video_without_queries():
  rng = np.random.default_rng(0)
  s = rng.normal(scale=3.0, size=(7, 4)).astype(np.float32)
  labels = np.array([0, 0, 1, 3, 3, 3, 1])  # video 2 has no query
  value = NCE(jnp.asarray(s), jnp.asarray(labels), _ones(7), _ones(4))
  np.testing.assert_allclose(float(value), _np_nce(s, labels), rtol=1e-5)


def test_random_negatives_are_valid_negatives_cover_the_pool_and_follow_the_key():
  rng = np.random.default_rng(2)
  q, b, keys = 20, 5, 400
  labels = np.concatenate([np.arange(b), rng.integers(0, b, q - b), [5, 6, 0]])  # + 3 padded queries
  qv = np.arange(q + 3) < q
  vv = np.arange(b + 2) < b  # + 2 padded videos
  scores = jnp.asarray(rng.uniform(-1, 1, size=(q + 3, b + 2)).astype(np.float32))
  args = (scores, jnp.asarray(labels), jnp.asarray(qv), jnp.asarray(vv))
  ks = jax.random.split(jax.random.key(7), keys)
  s = np.asarray(scores)
  neg_v = vv[None, :] & (labels[:, None] != np.arange(b + 2)[None, :])  # (Q, B)
  neg_q = qv[None, :] & (labels[None, :] != np.arange(b + 2)[:, None])  # (B, Q)

  for hard, pool in ((False, 2), (True, 3), (True, 50)):  # pool 1: the golden tests
    picks = np.asarray(NEG_VIDEOS(*args, jnp.asarray(hard), pool, ks))  # (keys, Q)
    for i in np.flatnonzero(qv):
      allowed = np.flatnonzero(neg_v[i])
      if hard:
        allowed = allowed[np.argsort(-s[i, allowed], kind="stable")[:pool]]
      assert set(picks[:, i]) == set(allowed), (hard, pool, i)  # only these, and all of them

  for hard in (False, True):
    picks = np.asarray(NEG_QUERIES(*args, jnp.asarray(hard), ks))  # (keys, B)
    for v in np.flatnonzero(vv):
      allowed = np.flatnonzero(neg_q[v])
      expected = {allowed[np.argmax(s[allowed, v])]} if hard else set(allowed)
      assert set(picks[:, v]) == expected, (hard, v)

  np.testing.assert_array_equal(np.asarray(NEG_VIDEOS(*args, jnp.asarray(False), 2, ks[:2])),
                                np.asarray(NEG_VIDEOS(*args, jnp.asarray(False), 2, ks[:2])))


def test_random_triplet_never_uses_positives_or_padding():
  rng = np.random.default_rng(3)
  q, b = 30, 6
  labels = np.concatenate([rng.permutation(np.repeat(np.arange(b), q // b)), [0, 9]])
  pos = labels[:, None] == np.arange(b + 1)[None, :]
  # Positives 0.9, negatives <= -1, padding 50: with margin 0.5 only a positive or padded pick
  # can make a hinge positive.
  s = np.where(pos, 0.9, rng.uniform(-2, -1, size=(q + 2, b + 1))).astype(np.float32)
  s[q:, :] = 50.0
  s[:, b] = 50.0
  args = (jnp.asarray(s), jnp.asarray(labels), jnp.asarray(np.arange(q + 2) < q), jnp.asarray(np.arange(b + 1) < b))
  values = jax.vmap(lambda k: TRIPLET(*args, margin=0.5, hard_negatives=jnp.asarray(False), hard_pool_size=3,
                                      key=k))(jax.random.split(jax.random.key(1), 64))
  np.testing.assert_array_equal(np.asarray(values), 0.0)


def test_triplet_depends_only_on_the_key_and_hard_flag_does_not_recompile():
  rng = np.random.default_rng(4)
  q, b = 16, 6  # the golden shapes: the pool-1 check below reuses the parity tests' executable
  labels = np.arange(q, dtype=np.int32) % b
  scores = rng.uniform(-1, 1, size=(q, b)).astype(np.float32)
  trip = jax.jit(functools.partial(retrieval.triplet_loss, margin=0.3, hard_pool_size=2))
  run = lambda hard, seed: float(trip(scores, labels, _ones(q), _ones(b), hard_negatives=jnp.asarray(hard),
                                      key=jax.random.key(seed)))
  assert run(False, 0) == run(False, 0)
  assert run(False, 0) != run(False, 1)
  assert run(True, 0) != run(False, 0)
  assert trip._cache_size() == 1  # hard_negatives is traced: flipping it reuses the executable

  # Pool 1: deterministic hardest negatives, whatever the key; equals a NumPy statement.
  s = scores.astype(np.float64)
  pos = labels[:, None] == np.arange(b)[None]
  t2v = np.maximum(0, 0.1 + np.where(pos, -np.inf, s).max(1) - s[pos]).mean()
  v2t = np.mean([max(0.0, 0.1 + s[labels != v, v].max() - s[labels == v, v].mean()) for v in range(b)])
  for seed in (0, 5):
    np.testing.assert_allclose(float(TRIPLET(scores, labels, _ones(q), _ones(b), margin=0.1,
                                             hard_negatives=jnp.asarray(True), hard_pool_size=1,
                                             key=jax.random.key(seed))), t2v + v2t, rtol=1e-6)


# ---------------------------------------------------------------- TCPL


def _angle_data(q=13, d=24, dt=10, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(q, d)).astype(np.float32) + 3.0  # an offset: differences must not care
  s[5] = s[2] + 1e-3 * rng.normal(size=d)  # a near-duplicate pair
  s[9] = s[4]  # an exact duplicate: zero unit vector, as F.normalize gives
  t = rng.normal(size=(q, dt)).astype(np.float32)
  t[7] = t[3]
  return jnp.asarray(s), jnp.asarray(t)


def test_blocked_angle_equals_naive_values_and_gradients():
  s, t = _angle_data()
  q = _ones(s.shape[0])
  naive_val, naive_grad = jax.jit(jax.value_and_grad(_naive_angle))(s, t)
  ours = jax.jit(jax.value_and_grad(tcpl.rkd_angle, argnums=(0, 1)), static_argnums=3)
  # Tile 4 on 13 rows pads the plane to 16 x 16 (tile-size invariance: the golden test).
  value, (grad_s, grad_t) = ours(s, t, q, 4)
  np.testing.assert_allclose(float(value), float(naive_val), rtol=1e-5)
  # Finite despite the exact duplicate (no sqrt'(0)); the near-duplicate's direction is
  # ill-conditioned in float32, in the naive form as much as in ours.
  assert np.isfinite(np.asarray(grad_s)).all()
  np.testing.assert_allclose(np.asarray(grad_s), np.asarray(naive_grad), rtol=2e-3, atol=3e-5)
  assert np.abs(np.asarray(grad_t)).max() == 0.0  # teacher frozen


@pytest.mark.parametrize("tile", [5, 8, 64])
def test_tiled_angle_with_invalid_rows_equals_naive_on_the_valid_rows(tile):
  # 29 rows with 6 invalid ones spread over several tiles (tile 5 / 8: 6 / 4 tiles per side, the
  # last one padded), so the mirrored off-diagonal tiles and the padding are all exercised.
  s, t = _angle_data(q=29, d=16, dt=12, seed=3)
  valid = np.ones(29, bool)
  valid[[0, 6, 7, 13, 22, 28]] = False
  naive_val, naive_grad = jax.jit(jax.value_and_grad(_naive_angle))(s[valid], t[valid])
  ours = jax.jit(jax.value_and_grad(tcpl.rkd_angle), static_argnums=3)
  garbage = jnp.where(jnp.asarray(valid)[:, None], s, 1e6)  # invalid rows must not matter
  value, grad = ours(garbage, t, jnp.asarray(valid), tile)
  np.testing.assert_allclose(float(value), float(naive_val), rtol=1e-5)
  grad = np.asarray(grad)
  assert np.abs(grad[~valid]).max() == 0.0
  np.testing.assert_allclose(grad[valid], np.asarray(naive_grad), rtol=2e-3, atol=3e-5)


def _max_intermediate(jaxpr) -> int:
  """Largest array (in elements) produced anywhere in a jaxpr, sub-jaxprs included."""
  best = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      best = max(best, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
    for sub in jex_core.jaxprs_in_params(eqn.params):
      best = max(best, _max_intermediate(sub))
  return best


def test_angle_memory_is_quadratic_in_forward_and_backward():
  q, d, tile = 40, 24, 8
  s, t = np.ones((q, d), np.float32), np.ones((q, 6), np.float32)
  grad = jax.make_jaxpr(jax.grad(lambda x: tcpl.rkd_angle(x, t, _ones(q), tile)))(s)
  # Nothing of size Q^3 or Q^2 D: the largest arrays are the (Q, Q) planes and the
  # squared distances' (rows, Q, D) differences.
  assert _max_intermediate(grad.jaxpr) <= max(q * q, tcpl._DISTANCE_ROWS * q * d)


def test_distance_against_numpy():
  # Well-separated rows: the reference's Gram-form pdist (kept here) is only float32-accurate for those.
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(13, 24)).astype(np.float32))
  t = jnp.asarray(rng.normal(size=(13, 10)).astype(np.float32))
  s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)

  def norm_pdist(e):
    d = np.sqrt(np.maximum(((e[:, None] - e[None]) ** 2).sum(-1), 1e-12))
    np.fill_diagonal(d, 0)
    return d / d[d > 0].mean()

  diff = np.abs(norm_pdist(s64) - norm_pdist(t64))
  expected = np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean()
  np.testing.assert_allclose(float(RKD_D(s, t, _ones(s.shape[0]))), expected, rtol=1e-4)


# ---------------------------------------------------------------- CBVA


def test_connectivity_against_warshall_and_on_a_chain():
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(4, 12))
  tokens = (centres[rng.integers(0, 4, size=(3, 32))] + 0.35 * rng.normal(size=(3, 32, 12))).astype(np.float32)
  tokens[2, 20:] = 0.0  # zero tokens: no self-loop, connected to nothing
  np.testing.assert_allclose(np.asarray(CONNECTIVITY(jnp.asarray(tokens), 0.8)), _np_connectivity(tokens, 0.8),
                             atol=1e-6)

  # A chain: each token is similar only to its neighbours, yet all are connected (14/56 directly).
  angles = np.linspace(0, 1.2, 8)
  chain = np.stack([np.cos(angles), np.sin(angles)], -1)[None].astype(np.float32)
  apart = np.eye(8, 2, dtype=np.float32)[None]  # two orthogonal tokens and six zero tokens
  omega = CONNECTIVITY(np.concatenate([chain, apart]), 0.97)
  np.testing.assert_allclose(np.asarray(omega), [1.0, 0.0], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(CLIP_COUNT(np.array([0.0, 0.199, 0.2, 0.39, 0.4, 0.6,
                                                                                0.79, 0.8, 1.0]))),
                                [32, 32, 20, 20, 12, 8, 8, 5, 5])


def _cbva_data(seed=6, b=3, f=16, k=6, d=8):
  rng = np.random.default_rng(seed)
  frames = rng.normal(size=(b, f, d)).astype(np.float32)
  segs = rng.normal(size=(b, k, d)).astype(np.float32)
  counts = np.array([4, 6, 2])[:b]
  # Frames of video i are spread over its first counts[i] segments, in a scrambled order.
  labels = np.stack([rng.permutation(np.arange(f) % c) for c in counts])
  valid = np.arange(k)[None, :] < counts[:, None]
  segs = np.where(valid[..., None], segs, 0.0).astype(np.float32)
  return frames, segs, labels, valid


def test_cbva_stop_gradients():
  frames, segs, labels, valid = _cbva_data()
  part = lambda i: jax.jit(jax.grad(lambda f, s: jnp.sum(cbva.cbva_video_loss(f, s, labels, valid)[i]),
                                    argnums=(0, 1)))
  g_frames, g_segs = map(np.asarray, part(1)(frames, segs))  # f2c
  assert np.abs(g_segs).max() == 0.0 and np.abs(g_frames).max() > 0.0
  g_frames, g_segs = map(np.asarray, part(2)(frames, segs))  # c2f
  assert np.abs(g_frames).max() == 0.0
  assert np.abs(g_segs[valid]).max() > 0.0 and np.abs(g_segs[~valid]).max() == 0.0  # padding untouched


# ---------------------------------------------------------------- padding invariance (every loss)


def test_every_loss_ignores_padding(golden):
  # The golden batch (whose unpadded shapes the parity tests have already compiled), padded with
  # garbage: 3 queries (labels pointing at real and padded videos) and 2 videos. Values must not
  # move, and gradients must be finite and exactly zero on the padding.
  rng = np.random.default_rng(1)
  labels = np.asarray(golden["batch/text_labels"], np.int32)
  q, b = golden["out/clip_scale_scores"].shape
  qv, vv = np.arange(q + 3) < q, np.arange(b + 2) < b
  l_pad = np.concatenate([labels, [b, b + 1, 0]]).astype(np.int32)

  def retrieval_losses(clip_raw, clip_cos):
    nce = retrieval.nce_loss(clip_raw, l_pad, qv, vv)
    trip = retrieval.triplet_loss(clip_cos, l_pad, qv, vv, margin=0.1, hard_negatives=jnp.asarray(True),
                                  hard_pool_size=1, key=jax.random.key(0))
    return nce + trip, (nce, trip)

  padded = []
  for name in ("out/clip_scale_scores_", "out/clip_scale_scores"):
    x = np.full((q + 3, b + 2), 50.0, np.float32)
    x[:q, :b] = golden[name]
    padded.append(x)
  (_, (nce, trip)), grads = jax.jit(jax.value_and_grad(retrieval_losses, argnums=(0, 1), has_aux=True))(*padded)
  np.testing.assert_allclose(float(nce), float(NCE(golden["out/clip_scale_scores_"], labels, _ones(q), _ones(b))),
                             rtol=1e-6)
  np.testing.assert_allclose(float(trip), float(_hard_triplet(golden["out/clip_scale_scores"], labels, _ones(q),
                                                              _ones(b))), rtol=1e-6)
  for grad in map(np.asarray, grads):
    assert np.isfinite(grad).all() and np.abs(grad[q:]).max() == 0.0 and np.abs(grad[:, b:]).max() == 0.0

  student, teacher = golden["out/video_query"], golden["out/clip_query"]
  stu_pad = np.concatenate([student, np.full((3, student.shape[1]), 1e6, np.float32)])
  tea_pad = np.concatenate([teacher, np.full((3, teacher.shape[1]), np.inf, np.float32)])

  def tcpl_losses(x):
    dist, angle = tcpl.rkd_distance(x, tea_pad, qv), tcpl.rkd_angle(x, tea_pad, qv, 3)
    return dist + angle, (dist, angle)

  (_, (dist, angle)), g_student = jax.jit(jax.value_and_grad(tcpl_losses, has_aux=True))(stu_pad)
  np.testing.assert_allclose(float(dist), float(RKD_D(student, teacher, _ones(q))), rtol=1e-6)
  np.testing.assert_allclose(float(angle), float(RKD_A(student, teacher, _ones(q), 3)), rtol=1e-6)
  g_student = np.asarray(g_student)
  assert np.isfinite(g_student).all() and np.abs(g_student[q:]).max() == 0.0

  # CBVA: garbage in the padded segments (beyond each clip count, plus 2 more columns) and a padded
  # video without any valid segment.
  frames, segs = golden["out/encoded_frame_feat"], golden["cbva/final_segments"]
  seg_labels = golden["cbva/final_labels"]
  valid = np.arange(32)[None, :] < golden["cbva/clip_count"][:, None]
  ref = [np.asarray(x) for x in CBVA_VIDEO(frames, segs, seg_labels, valid)]
  big_valid = np.pad(valid, ((0, 1), (0, 2)))
  big_segs = 1e3 * rng.normal(size=(b + 1, 34, segs.shape[2])).astype(np.float32)
  big_segs[:b, :32][valid] = segs[valid]
  big_frames = np.concatenate([frames, np.full_like(frames[:1], 30.0)])
  big_labels = np.concatenate([seg_labels, np.zeros_like(seg_labels[:1])])
  video_valid = np.arange(b + 1) < b

  def cbva_losses(f, s):
    per_video = cbva.cbva_video_loss(f, s, big_labels, big_valid)
    return cbva.cbva_loss(per_video[0], video_valid), per_video

  (mean, out), (g_frames, g_segs) = jax.jit(jax.value_and_grad(cbva_losses, argnums=(0, 1), has_aux=True))(
      big_frames, big_segs)
  for r, o in zip(ref, map(np.asarray, out)):
    np.testing.assert_allclose(o[:b], r, rtol=1e-6)
    assert o[b] == 0.0
  np.testing.assert_allclose(float(mean), ref[0].mean(), rtol=1e-6)
  g_frames, g_segs = np.asarray(g_frames), np.asarray(g_segs)
  assert np.isfinite(g_frames).all() and np.isfinite(g_segs).all()
  assert np.abs(g_frames[b]).max() == 0.0 and np.abs(g_segs[~big_valid]).max() == 0.0
