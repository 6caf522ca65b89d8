"""Building the frozen config dataclasses from ml_collections sections."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def checked_kwargs(cls: type, cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
  """`cfg` as keyword arguments of dataclass `cls`; an unknown key is an error naming `section`."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(cfg) - fields
  if unknown:
    raise ValueError(f"unknown {section} config keys: {sorted(unknown)}")
  return dict(cfg)
