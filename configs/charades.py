"""Charades-STA: the reference's per-dataset values (authors' CLIP features by default).

  python -m prvr_jax.main --config=configs/charades.py --config.data.root=DIR --workdir=W --mode=prepare
"""

from __future__ import annotations

import ml_collections

from configs.common import benchmark_config


def get_config() -> ml_collections.ConfigDict:
  return benchmark_config("charades", dropout=0.25, sft_factor=0.6, margin=0.2,
                          clip_nce_weight=0.02, frame_nce_weight=0.04, sim_thr=0.85, lr=2e-4)
