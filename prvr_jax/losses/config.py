"""Static hyper-parameters of the MSC losses (a frozen, hashable dataclass)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from prvr_jax.errors import ConfigError
from prvr_jax.utils.config import checked_kwargs

# Clip counts the loss-side merge can stop at, in merge order (32 is "no merge").
CBVA_LEVELS: tuple[int, ...] = (20, 12, 8, 5)
# omega thresholds -> clip count: omega >= 0.8 -> 5, >= 0.6 -> 8, >= 0.4 -> 12, >= 0.2 -> 20, else 32.
CBVA_OMEGA_THRESHOLDS: tuple[tuple[float, int], ...] = ((0.8, 5), (0.6, 8), (0.4, 12), (0.2, 20))


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights and switches of the training objective (reference names in brackets).

  Attributes:
    margin: triplet hinge margin [margin].
    clip_nce_weight: weight of the clip-scale NCE [loss_factor[0]].
    frame_nce_weight: weight of the frame-scale NCE [loss_factor[1]].
    hard_pool_size: text->video negatives are drawn from this many hardest once hard negatives
      are on [hard_pool_size].
    use_tcpl: text-CLIP relational distillation on/off.
    tcpl_distance_weight: weight of the RKD distance term [rkd_d_coef].
    tcpl_angle_weight: weight of the RKD angle term [rkd_a_coef].
    tcpl_tile_size: edge of the (j, k) tiles the angle term's planes are cut into (only tiles on
      or above the diagonal are computed; memory O(Q^2)); 32 to 160 ran equally fast on a 2-core
      CPU at Q = 640.
    tcpl_scope: with the batch split over n devices, 'global' distils over all Q queries of the
      global batch (equal to one device; every device computes the O(Q^3) angle term), 'device'
      over each device's Q/n queries (O((Q/n)^3) each, averaged over devices; a different loss).
    use_cbva: cross-branch video alignment on/off.
    cbva_weight: weight of CBVA [vl_coef].
    adaptive_cbva: choose the clip count per video from omega (else always `cbva_fixed_clips`).
    cbva_fixed_clips: clip count when `adaptive_cbva` is off (one of 32, 20, 12, 8, 5).
    sim_thr: cosine threshold tau of the omega graph [sim_thr].
  """

  margin: float = 0.1
  clip_nce_weight: float = 0.05
  frame_nce_weight: float = 0.04
  hard_pool_size: int = 20
  use_tcpl: bool = True
  tcpl_distance_weight: float = 15.0
  tcpl_angle_weight: float = 30.0
  tcpl_tile_size: int = 64
  tcpl_scope: str = "global"
  use_cbva: bool = True
  cbva_weight: float = 0.1
  adaptive_cbva: bool = True
  cbva_fixed_clips: int = 32
  sim_thr: float = 0.8

  def __post_init__(self):
    if self.cbva_fixed_clips not in (32,) + CBVA_LEVELS:
      raise ConfigError(f"loss.cbva_fixed_clips must be one of 32, 20, 12, 8, 5; got {self.cbva_fixed_clips}")
    if self.tcpl_scope not in ("global", "device"):
      raise ConfigError(f"loss.tcpl_scope must be 'global' or 'device'; got {self.tcpl_scope!r}")
    if self.tcpl_tile_size < 1:
      raise ConfigError(f"loss.tcpl_tile_size must be >= 1; got {self.tcpl_tile_size}")
    if self.hard_pool_size < 1:
      raise ConfigError(f"loss.hard_pool_size must be >= 1; got {self.hard_pool_size}")

  @classmethod
  def from_config_dict(cls, cfg: Mapping[str, Any]) -> "LossConfig":
    """Builds from a mapping (e.g. `config.loss`); unknown keys are an error."""
    return cls(**checked_kwargs(cls, cfg, "loss"))
