"""Building the frozen config dataclasses from ml_collections sections, and back."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from prvr_jax.errors import ConfigError


def checked_kwargs(cls: type, cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
  """`cfg` as keyword arguments of dataclass `cls`; an unknown key is an error naming `section`.

  Keys `cfg` lacks take the dataclass's defaults (a config.json written before a key existed
  still loads).
  """
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(cfg) - fields
  if unknown:
    raise ConfigError(f"unknown {section} config keys: {sorted(unknown)}")
  return dict(cfg)


class Section:
  """Mixin of a config dataclass built from its `config.<SECTION>`."""

  SECTION: ClassVar[str]

  @classmethod
  def from_config_dict(cls, cfg: Mapping[str, Any]) -> Any:
    """Builds from the section; unknown keys are an error, missing ones take the defaults."""
    return cls(**checked_kwargs(cls, cfg, cls.SECTION))


def section_dict(instance: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  """A config dataclass as the plain dict of its `config.<section>` (nested dataclasses too).

  The configs/*.py files build their sections from the dataclasses' defaults with this, so each
  default is stated once: in the dataclass.
  """
  values = dataclasses.asdict(instance)
  for name in exclude:
    del values[name]
  return values
