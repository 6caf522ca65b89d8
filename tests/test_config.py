"""Config dataclasses built from ml_collections sections."""

import pytest

from prvr_jax.losses.config import LossConfig
from prvr_jax.models.config import ModelConfig


def test_sections_build_and_reject_unknown_keys():
  m = ModelConfig.from_config_dict({"hidden_size": 64, "num_heads": 4, "gauss_widths": [1, 2]})
  assert m.hidden_size == 64 and m.gauss_widths == (1.0, 2.0)
  assert LossConfig.from_config_dict({"margin": 0.2, "use_tcpl": False}).margin == 0.2
  with pytest.raises(ValueError, match=r"unknown loss config keys: \['tau'\]"):
    LossConfig.from_config_dict({"tau": 0.8})
  with pytest.raises(ValueError, match="not a multiple"):
    ModelConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="cbva_fixed_clips"):
    LossConfig(cbva_fixed_clips=7)
