"""Charades-STA: the reference's per-dataset values (authors' CLIP features by default).

  python -m prvr_jax.main --config=configs/charades.py --config.data.root=DIR --workdir=W --mode=prepare
"""

from __future__ import annotations

import ml_collections

from configs.common import loss_section, model_section, optim_section, train_section
from configs.data_defaults import data_section


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 9527
  config.data = data_section("charades")
  config.model = model_section(visual_input_size=768, query_input_size=768, dropout=0.25, sft_factor=0.6)
  config.loss = loss_section(margin=0.2, clip_nce_weight=0.02, frame_nce_weight=0.04, sim_thr=0.85)
  config.optim = optim_section(lr=0.0002)
  config.train = train_section()
  return config
