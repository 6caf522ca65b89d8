"""BertAdam as an Optax chain against a step-by-step NumPy statement of the reference update."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from prvr_jax.convert import state_dict
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import init_params
from prvr_jax.train import optim


def _reference_bert_adam(params, grads_seq, lr, total, warmup, wd, decay):
  """The reference algorithm, one tensor at a time, in float64."""
  m = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x, np.float64) for k, x in params.items()}
  p = {k: x.astype(np.float64) for k, x in params.items()}
  for step, grads in enumerate(grads_seq):
    progress = step / total
    mult = progress / warmup if progress < warmup else max((progress - 1.0) / (warmup - 1.0), 0.0)
    for k in p:
      g = grads[k].astype(np.float64)
      norm = np.sqrt((g ** 2).sum())
      g = g * min(1.0, 1.0 / (norm + 1e-6))
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.999 * v[k] + 0.001 * g * g
      update = m[k] / (np.sqrt(v[k]) + 1e-6)
      if decay[k]:
        update = update + wd * p[k]
      p[k] = p[k] - lr * mult * update
  return p


def test_bert_adam_matches_reference_update():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                  "bias": rng.normal(size=(3,)).astype(np.float32)},
            "b": {"scale": rng.normal(size=(5,)).astype(np.float32)}}
  decay = {"a": {"kernel": True, "bias": False}, "b": {"scale": True}}
  grads_seq = [jax.tree_util.tree_map(lambda x: (3.0 * rng.normal(size=x.shape)).astype(np.float32), params)
               for _ in range(6)]
  total, warmup, lr, wd = 10, 0.2, 1e-2, 0.01
  opt = optim.bert_adam(optim.warmup_linear_schedule(lr, total, warmup), weight_decay=wd, decay_mask=decay)
  state = opt.init(params)
  p = jax.tree_util.tree_map(jnp.asarray, params)
  for i, g in enumerate(grads_seq):
    updates, state = opt.update(g, state, p)
    if i == 0:  # schedule(0) = 0: the reference's first update does not move the weights
      assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates))
    p = optax.apply_updates(p, updates)
  flat = lambda t: traverse_util.flatten_dict(t, sep="/")
  ref = _reference_bert_adam(flat(params), [flat(g) for g in grads_seq], lr, total, warmup, wd, flat(decay))
  for k, value in flat(p).items():
    np.testing.assert_allclose(value, ref[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_warmup_linear_schedule_shape():
  s = optim.warmup_linear_schedule(1.0, 100, 0.1)
  np.testing.assert_allclose([s(0), s(5), s(10), s(55), s(100), s(120)], [0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("total,warmup", [(80, 0.01), (100, 0.01), (60, 0.1), (7, 0.0), (1000, 0.3)])
def test_warmup_linear_schedule_equals_the_reference_float64_values(total, warmup):
  """Every step's rate is the reference's float64 value to float32 rounding, the last steps too
  (where 1 - step / total cancels) and at the warm-up boundary (step / total == warmup)."""
  def reference(step):  # the authors' WarmupLinearSchedule.get_lr_ in float64
    p = step / total
    return p / warmup if p < warmup else max((p - 1.0) / (warmup - 1.0), 0.0)

  s = optim.warmup_linear_schedule(3e-4, total, warmup)
  steps = np.arange(total + 3)
  np.testing.assert_allclose(np.asarray(jax.vmap(s)(steps)), [3e-4 * reference(int(t)) for t in steps],
                             rtol=3e-7, atol=0)


def test_reference_decay_mask_follows_torch_names():
  cfg = ModelConfig(hidden_size=16, num_heads=2, visual_input_size=8, query_input_size=8)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  mask = traverse_util.flatten_dict(optim.reference_decay_mask(shapes), sep="/")
  assert mask["vproj_clip/kernel"] and not mask["vproj_clip/bias"]
  # torch names "*.LayerNorm.weight" are exempt ...
  assert not mask["clip_input_proj/layer_norm/scale"] and not mask["query_pos_embed/layer_norm/scale"]
  # ... but the transformer norms are called norm1/norm2 there, so the reference decays them.
  assert mask["query_encoder/norm1/scale"] and mask["frame_encoder/branch3/norm2/scale"]
  assert mask["weight_token"] and mask["query_pos_embed/embedding"]
  assert sum(mask.values()) == 146 and len(mask) == 299


def test_one_decay_rule_is_the_references_and_covers_the_caption_tower():
  """By our names, the rule equals the reference's by torch names (tested on the whole network),
  and a CLIP text tower's biases and LayerNorms are exempt too."""
  cfg = ModelConfig(hidden_size=16, num_heads=2, visual_input_size=8, query_input_size=8)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  mask = traverse_util.flatten_dict(optim.reference_decay_mask(shapes))
  by_torch_name = {path: not ("bias" in name or "LayerNorm" in name)
                   for path, (name, _) in state_dict.torch_name_index(shapes).items()}
  assert mask == by_torch_name
  tower = {"caption_tower": {"text_model": {
      "final_layer_norm": {"scale": 0, "bias": 0},
      "encoder": {"layers_0": {"layer_norm1": {"scale": 0}, "mlp": {"fc1": {"kernel": 0, "bias": 0}}}}},
      "text_projection": {"kernel": 0}}}
  got = traverse_util.flatten_dict(optim.reference_decay_mask(tower), sep="/")
  assert {k for k, v in got.items() if v} == {
      "caption_tower/text_model/encoder/layers_0/mlp/fc1/kernel", "caption_tower/text_projection/kernel"}


def test_make_optimizer_rejects_unknown():
  import pytest
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
    optim.make_optimizer("sgd", 1e-3)
