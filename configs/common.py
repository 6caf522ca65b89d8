"""Shared pieces of the benchmark configs: model, loss, optimiser, training and eval sections.

Every section is built from the defaults of its frozen dataclass (each default is stated once,
there; the keys are documented there too):

  config.model       prvr_jax.models.config.ModelConfig
  config.loss        prvr_jax.losses.config.LossConfig
  config.optim       prvr_jax.train.config.OptimConfig
  config.train       prvr_jax.train.config.TrainConfig
  config.eval        prvr_jax.eval.config.EvalConfig
  config.text_tower  prvr_jax.train.config.TextTowerConfig
  config.data        prvr_jax.data.config.DataConfig (configs/data_defaults.py)

`get_config()` of each benchmark file starts from these and overrides the reference's per-dataset
values.
"""

from __future__ import annotations

import ml_collections

from configs.data_defaults import data_section
from prvr_jax.eval.config import EvalConfig
from prvr_jax.losses.config import LossConfig
from prvr_jax.models.config import RESOLVED_FIELDS, ModelConfig
from prvr_jax.train.config import OptimConfig, TextTowerConfig, TrainConfig
from prvr_jax.utils.config import section_dict


def model_section(visual_input_size: int = 768, query_input_size: int = 768, dropout: float = 0.2,
                  sft_factor: float = 0.09) -> ml_collections.ConfigDict:
  """`config.model`: the fields of `ModelConfig` (the caption tower comes from `text_tower`, remat
  from `train`)."""
  model = ModelConfig(visual_input_size=visual_input_size, query_input_size=query_input_size,
                      sft_factor=sft_factor, input_dropout=dropout, dropout=dropout)
  return ml_collections.ConfigDict(section_dict(model, exclude=RESOLVED_FIELDS))


def loss_section(margin: float = 0.1, clip_nce_weight: float = 0.05, frame_nce_weight: float = 0.04,
                 sim_thr: float = 0.8) -> ml_collections.ConfigDict:
  """`config.loss`: the fields of `LossConfig` (TVR values by default)."""
  return ml_collections.ConfigDict(section_dict(LossConfig(
      margin=margin, clip_nce_weight=clip_nce_weight, frame_nce_weight=frame_nce_weight,
      sim_thr=sim_thr)))


def optim_section(lr: float = OptimConfig.lr) -> ml_collections.ConfigDict:
  """`config.optim`: BertAdam (reference) or AdamW, warm-up then linear decay."""
  return ml_collections.ConfigDict(section_dict(OptimConfig(lr=lr)))


def train_section(num_epochs: int = TrainConfig.num_epochs) -> ml_collections.ConfigDict:
  """`config.train`: the loop (see `TrainConfig`)."""
  return ml_collections.ConfigDict(section_dict(TrainConfig(num_epochs=num_epochs)))


def text_tower_section() -> ml_collections.ConfigDict:
  """`config.text_tower`: where the query encoder's caption token features come from."""
  return ml_collections.ConfigDict(section_dict(TextTowerConfig()))


def eval_section() -> ml_collections.ConfigDict:
  """`config.eval`: validation, final evaluation, score fusion (see `EvalConfig`)."""
  return ml_collections.ConfigDict(section_dict(EvalConfig()))


def benchmark_config(name: str, *, visual_input_size: int = 768, query_input_size: int = 768,
                     dropout: float, sft_factor: float, margin: float, clip_nce_weight: float,
                     frame_nce_weight: float, sim_thr: float, lr: float,
                     visual_feature: str = "clip") -> ml_collections.ConfigDict:
  """A real benchmark's run config from the values the reference sets per dataset."""
  config = ml_collections.ConfigDict()
  config.seed = 9527
  config.data = data_section(name, visual_feature=visual_feature)
  config.model = model_section(visual_input_size=visual_input_size, query_input_size=query_input_size,
                               dropout=dropout, sft_factor=sft_factor)
  config.loss = loss_section(margin=margin, clip_nce_weight=clip_nce_weight,
                             frame_nce_weight=frame_nce_weight, sim_thr=sim_thr)
  config.optim = optim_section(lr=lr)
  config.train = train_section()
  config.eval = eval_section()
  config.text_tower = text_tower_section()
  return config
