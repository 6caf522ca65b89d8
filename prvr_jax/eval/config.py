"""`config.eval` as a frozen dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from prvr_jax.errors import ConfigError
from prvr_jax.utils.config import Section, checked_kwargs


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
  """Validation during training, the final evaluation and the score fusion.

  Attributes:
    every: steps between validation runs (0 = at the end of every epoch).
    clip_weight, frame_weight: fusion of the clip- and frame-scale scores (0.4 / 0.6).
    final_splits: splits evaluated with the best checkpoint when training ends, and by
      --mode=eval (a split the dataset lacks is skipped with a message).
    diagnostics: also compute the semantic-collapse diagnostics (and their plot) at the end.
    diagnostics_max_queries: queries used by the diagnostics.
  """

  SECTION = "eval"

  every: int = 0
  clip_weight: float = 0.4
  frame_weight: float = 0.6
  final_splits: tuple[str, ...] = ("val", "test")
  diagnostics: bool = True
  diagnostics_max_queries: int = 2000

  def __post_init__(self):
    if self.every < 0:
      raise ConfigError(f"eval.every must be >= 0, got {self.every}")

  @classmethod
  def from_config_dict(cls, cfg: Mapping[str, Any]) -> "EvalConfig":
    """Builds from `config.eval`; unknown keys are an error, missing ones take the defaults."""
    kwargs = checked_kwargs(cls, cfg, cls.SECTION)
    if "final_splits" in kwargs:
      kwargs["final_splits"] = tuple(str(s) for s in kwargs["final_splits"])
    return cls(**kwargs)
