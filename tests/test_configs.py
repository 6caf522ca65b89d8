"""Every benchmark config loads and its model / loss sections build the static dataclasses."""

from __future__ import annotations

import importlib

import pytest

from prvr_jax.losses.config import LossConfig
from prvr_jax.models.config import ModelConfig

EXPECTED = {  # name: (tau, sft_factor, dropout, lr, margin, visual dim, text dim)
    "tvr": (0.8, 0.09, 0.2, 3e-4, 0.1, 768, 768),
    "activitynet": (0.8, 0.6, 0.31, 2.5e-4, 0.2, 768, 768),
    "charades": (0.85, 0.6, 0.25, 2e-4, 0.2, 768, 768),
    "qvhighlights": (0.7, 0.6, 0.31, 2.5e-4, 0.2, 2816, 512),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_config(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  model = ModelConfig.from_config_dict(cfg.model)
  loss = LossConfig.from_config_dict(cfg.loss)
  tau, sft, drop, lr, margin, vin, qin = EXPECTED[name]
  assert (loss.sim_thr, model.sft_factor, model.dropout, cfg.optim.lr, loss.margin) == (tau, sft, drop, lr, margin)
  assert (model.visual_input_size, model.query_input_size, model.hidden_size) == (vin, qin, 384)
  assert (loss.tcpl_distance_weight, loss.tcpl_angle_weight, loss.cbva_weight) == (15.0, 30.0, 0.1)
  assert cfg.data.name == name and cfg.data.batch_size % 8 == 0
  assert (cfg.train.num_epochs, cfg.train.hard_negative_start_epoch, cfg.train.early_stop_patience) == (100, 20, 10)


@pytest.mark.parametrize("name", sorted(EXPECTED) + ["synthetic"])
def test_every_config_has_the_run_keys_and_device_friendly_batches(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  for key in ("seed", "data.root", "train.max_steps", "train.log_every", "train.checkpoint_every",
              "eval.every", "loss.use_tcpl", "loss.use_cbva", "loss.adaptive_cbva", "model.use_op_tome",
              "loss.tcpl_scope", "text_tower.clip_dir", "text_tower.features",
              "text_tower.trainable_blocks"):
    node = cfg
    for part in key.split("."):
      assert part in node, f"{name}: missing {key}"
      node = node[part]
  for key in ("batch_size", "eval_video_batch_size", "eval_query_batch_size"):
    assert cfg.data[key] % 8 == 0, f"{name}: data.{key}={cfg.data[key]} does not run on 8 devices"
  # The synthetic demo uses the full MSC objective too (ablations switch it off explicitly).
  assert cfg.loss.use_tcpl and cfg.loss.use_cbva and cfg.loss.adaptive_cbva and cfg.model.use_op_tome
  # By default queries are the dataset's extracted caption features, as the authors train.
  assert cfg.text_tower.clip_dir == "" and cfg.text_tower.trainable_blocks == 0


def test_uniform_clips_need_frames_divisible_by_clips():
  with pytest.raises(ValueError, match="use_op_tome=False"):
    ModelConfig(num_frames=128, num_clips=30, use_op_tome=False)
