"""The project's exception types for bad input: one base class, so entry points catch only these.

A `PrvrError` is something the user can fix (a missing file, a bad config value, a corrupt
checkpoint, an unknown id); its message names the file and the item. `python -m prvr_jax.main`,
`extract`, `search` and `convert.torch_msc` print it as one `error:` line and exit with status 2.
Every other exception is a bug and leaves with its traceback.

Subclasses also derive from the builtin type they replace (ValueError, RuntimeError, ...), so code
that caught the builtin keeps working. Each lives next to the code that raises it
(`data.formats.DataError`, `train.checkpoint.CheckpointError`, `search.errors.SearchError`, ...);
the general ones are here.
"""

from __future__ import annotations


class PrvrError(Exception):
  """Bad input a user can fix; the message names the file (or config key) and the item."""


class ConfigError(PrvrError, ValueError):
  """A config key or value that cannot be used; the message names the key."""
