"""The compute dtypes a network may run in (`config.model.dtype`, `config.text_tower.dtype`,
`extract --dtype`), by name. Parameters are float32 whichever is chosen."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
