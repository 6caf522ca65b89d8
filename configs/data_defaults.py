"""`config.data`: the data keys every benchmark config shares, from `DataConfig`'s defaults.

The keys and their meaning: prvr_jax/data/config.py (`DataConfig`); the synthetic benchmark's
`config.data.synthetic`: prvr_jax/data/synthetic.py (`SyntheticSpec`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from prvr_jax.data.config import DataConfig
from prvr_jax.data.synthetic import SyntheticSpec
from prvr_jax.errors import ConfigError
from prvr_jax.utils.config import section_dict


def synthetic_section(**overrides) -> ml_collections.ConfigDict:
  """`config.data.synthetic`: every SyntheticSpec field with its default, then `overrides`."""
  values = dataclasses.asdict(SyntheticSpec())
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ConfigError(f"unknown synthetic keys {unknown}")
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def data_section(name: str = "synthetic", **overrides) -> ml_collections.ConfigDict:
  """`config.data` for benchmark `name` with the reference's loader settings, then `overrides`."""
  data = ml_collections.ConfigDict(section_dict(DataConfig(name=name)))
  for key, value in overrides.items():
    if key not in data:
      raise ConfigError(f"unknown data key {key!r}")
    data[key] = value
  return data
