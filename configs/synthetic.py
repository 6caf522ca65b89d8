"""The embedded default: the synthetic PRVR benchmark (no downloads), sized for 2 CPU cores.

  python -m prvr_jax.main --config=configs/synthetic.py --workdir=/tmp/run --mode=prepare

400 train / 100 val / 100 test videos of 2-6 events, 64-d 'visual' and 'CLIP' features; builds in
a couple of seconds. Sizes, noise and seed: --config.data.synthetic.<key>=... (see
prvr_jax/data/synthetic.py for the generative story).
"""

from __future__ import annotations

import ml_collections

from configs.data_defaults import data_section


def get_config() -> ml_collections.ConfigDict:
  """Run config with the data section filled in (model / loss / train keys: see the lead's files)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # 32 videos x up to 6 captions keeps a step fast on 2 cores; 400 train videos = 13 steps/epoch.
  config.data = data_section("synthetic", batch_size=32, max_captions_per_video=6,
                             eval_video_batch_size=50, eval_query_batch_size=128)
  return config
