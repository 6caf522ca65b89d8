"""The embedded default: the synthetic PRVR benchmark (no downloads), sized for 2 CPU cores.

  python -m prvr_jax.main --config=configs/synthetic.py --workdir=/tmp/run

400 train / 100 val / 100 test videos of 2-6 events, 64-d 'visual' and 'CLIP' features; builds in
a couple of seconds, trains and evaluates in a few minutes. Sizes, noise and seed:
--config.data.synthetic.<key>=... (see prvr_jax/data/synthetic.py for the generative story). The
network is MSC's (8 DyGMM branches, OP-ToMe 128 -> 32, TCPL, adaptive CBVA) at hidden size 64.
"""

from __future__ import annotations

import ml_collections

from configs.common import (eval_section, loss_section, model_section, optim_section,
                            text_tower_section, train_section)
from configs.data_defaults import data_section


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # 32 videos x up to 6 captions keeps a step fast on 2 cores; 400 train videos = 13 steps/epoch.
  config.data = data_section("synthetic", batch_size=32, max_captions_per_video=6,
                             eval_video_batch_size=56, eval_query_batch_size=128)
  # Input sizes 0: taken from the dataset (64-d here).
  config.model = model_section(visual_input_size=0, query_input_size=0, dropout=0.1, sft_factor=0.09)
  config.model.hidden_size = 64
  config.loss = loss_section(margin=0.1, clip_nce_weight=0.05, frame_nce_weight=0.04, sim_thr=0.8)
  config.optim = optim_section(lr=1e-3)
  config.train = train_section(num_epochs=12)
  config.train.hard_negative_start_epoch = 4
  config.train.early_stop_patience = 4
  config.train.log_every = 5
  config.eval = eval_section()
  config.eval.diagnostics_max_queries = 500
  config.text_tower = text_tower_section()
  return config
