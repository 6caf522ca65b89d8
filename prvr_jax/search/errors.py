"""The one error type of the search tool: bad input, named by file and item."""

from __future__ import annotations

from prvr_jax.errors import PrvrError


class SearchError(PrvrError, ValueError):
  """A file or item the search tool cannot use; the message names the file and the item.

  The CLI prints the message alone (no traceback) and exits with status 2.
  """
