"""TVR: the reference's per-dataset values (authors' CLIP features by default).

  python -m prvr_jax.main --config=configs/tvr.py --config.data.root=DIR --workdir=W --mode=prepare
"""

from __future__ import annotations

import ml_collections

from configs.common import benchmark_config


def get_config() -> ml_collections.ConfigDict:
  return benchmark_config("tvr", dropout=0.2, sft_factor=0.09, margin=0.1, clip_nce_weight=0.05,
                          frame_nce_weight=0.04, sim_thr=0.8, lr=3e-4)
