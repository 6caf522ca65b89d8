"""Run with JAX_NUM_CPU_DEVICES=8 (tests/test_sharded_step.py does): prints one JSON line comparing
the sharded step on 8 devices with the single-device step on the same global batch."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax

from prvr_jax.bench import synthetic_batch
from prvr_jax.clip.config import TextConfig
from prvr_jax.losses.config import LossConfig
from prvr_jax.models.caption_tower import CaptionTowerConfig
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import init_params
from prvr_jax.ops.video_inputs import prepare_video_inputs
from prvr_jax.parallel import batch_sharding, make_data_mesh
from prvr_jax.train.sharded_step import make_sharded_loss_fn, make_sharded_train_step
from prvr_jax.train.step import create_train_state, make_loss_fn, make_train_step

TINY = ModelConfig(hidden_size=32, num_heads=4, visual_input_size=24, query_input_size=16,
                   max_desc_len=12, dropout=0.1, input_dropout=0.1, gauss_widths=(0.5,))


# The same network with a tiny CLIP text tower (random weights) whose top block trains.
TOWER = CaptionTowerConfig(
    text=TextConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                    activation="quick_gelu", layer_norm_eps=1e-5, vocab_size=100, max_positions=12,
                    eos_token_id=99),
    projection_dim=16, trainable_blocks=1, max_query_tokens=10)
TINY_TOWER = dataclasses.replace(TINY, caption_tower=TOWER)


def caption_ids(key: jax.Array, num: int, length: int) -> dict[str, jax.Array]:
  """Random tokenised captions of 3..length tokens: BOS (98), pieces, EOS (99), EOS padding."""
  n = jax.random.randint(key, (num, 1), 3, length + 1)
  pos = jnp.arange(length)[None, :]
  pieces = jax.random.randint(jax.random.fold_in(key, 1), (num, length), 1, 98)
  ids = jnp.where(pos == 0, 98, jnp.where(pos < n - 1, pieces, 99)).astype(jnp.int32)
  return dict(caption_ids=ids, caption_id_mask=(pos < n).astype(jnp.int32))


def max_abs(tree_a, tree_b) -> float:
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))


def main() -> None:
  assert jax.device_count() == 8, jax.device_count()
  mesh = make_data_mesh()
  cfg = LossConfig(hard_pool_size=2)
  params = init_params(TINY, jax.random.key(0))
  batch = synthetic_batch(8, jax.random.key(1), TINY, captions_per_video=3, caption_tokens=10)
  # Two padded queries and one padded video: masks must cross devices correctly too.
  batch["query_valid"] = jnp.ones((24,), bool).at[jnp.array([5, 23])].set(False)
  batch["video_valid"] = jnp.ones((8,), bool).at[6].set(False)
  batch["query_valid"] = batch["query_valid"] & jnp.repeat(batch["video_valid"], 3)
  inputs = dict(batch, **prepare_video_inputs(batch["video_frames"]))
  sharded_inputs = jax.device_put(inputs, batch_sharding(mesh))
  key = jax.random.key(5)
  report = {}
  for hard in (False, True):
    single = make_loss_fn(TINY, cfg)
    (l0, p0), g0 = jax.jit(jax.value_and_grad(lambda p: single(p, inputs, key, hard), has_aux=True))(params)
    sharded = make_sharded_loss_fn(TINY, cfg, mesh)
    (l1, p1), g1 = jax.jit(jax.value_and_grad(lambda p, x: sharded(p, x, key, hard), has_aux=True))(
        params, sharded_inputs)
    report[f"hard={hard}"] = dict(
        loss=[float(l0), float(l1)], parts_max_rel=max(abs(float(p0[k]) - float(p1[k])) / max(abs(float(p0[k])), 1.0) for k in p1),
        grad_max_abs=max_abs(g0, g1), grad_scale=max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)))
  # A whole optimiser step, jitted with shardings, against the single-device step.
  # Plain SGD: Adam would turn last-bit gradient differences of near-zero gradients into
  # full-size updates, which says nothing about the step.
  schedule = optax.constant_schedule(0.1)
  opt = optax.sgd(schedule)
  single_step = jax.jit(make_train_step(TINY, cfg, opt, schedule))
  s0 = create_train_state(params, opt)
  step = make_sharded_train_step(TINY, cfg, opt, mesh, schedule)
  # The sharded step donates its state: give it its own copy of the parameters.
  s1 = create_train_state(jax.tree.map(jnp.copy, params), opt)
  sharded_batch = jax.device_put(batch, batch_sharding(mesh))
  for _ in range(2):
    s0, m0 = single_step(s0, batch, key, jnp.asarray(False))
    s1, m1 = step(s1, sharded_batch, key, jnp.asarray(False))
  report["step"] = dict(loss=[float(m0["loss"]), float(m1["loss"])], params_max_abs=max_abs(s0.params, s1.params),
                        params_moved=max_abs(s0.params, params),
                        grad_norm=[float(m0["grad_norm"]), float(m1["grad_norm"])],
                        params_sharding=str(jax.tree.leaves(s1.params)[0].sharding.spec))
  # Per-device TCPL scope: runs, and is a different (smaller-scope) loss.
  dev = make_sharded_loss_fn(TINY, dataclasses.replace(cfg, tcpl_scope="device"), mesh)
  _, pd = jax.jit(lambda p, x: dev(p, x, key, False))(params, sharded_inputs)
  report["device_scope_tcpl"] = [float(p0["tcpl"]), float(pd["tcpl"])]
  # With the in-model CLIP text tower: token ids split over the devices, the tower's trained top
  # gets the single-device gradient too.
  tower_params = init_params(TINY_TOWER, jax.random.key(2))
  tower_inputs = {k: v for k, v in inputs.items() if k not in ("text_feat", "text_mask")}
  tower_inputs.update(caption_ids(jax.random.key(3), 24, TOWER.token_length))
  single = make_loss_fn(TINY_TOWER, cfg)
  (l0, p0), g0 = jax.jit(jax.value_and_grad(lambda p: single(p, tower_inputs, key, True), has_aux=True))(
      tower_params)
  sharded = make_sharded_loss_fn(TINY_TOWER, cfg, mesh)
  (l1, p1), g1 = jax.jit(jax.value_and_grad(lambda p, x: sharded(p, x, key, True), has_aux=True))(
      tower_params, jax.device_put(tower_inputs, batch_sharding(mesh)))
  top = lambda g: g["caption_tower"]["text_model"]["encoder"]["layers_1"]
  report["tower"] = dict(
      loss=[float(l0), float(l1)], grad_max_abs=max_abs(g0, g1),
      grad_scale=max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)),
      top_grad=max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(top(g0))))
  print(json.dumps(report))


if __name__ == "__main__":
  main()
