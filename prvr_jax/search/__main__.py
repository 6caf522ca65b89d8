"""`python -m prvr_jax.search`: see cli.py."""

import sys

from prvr_jax.utils import host_memory

if __name__ == "__main__":
  host_memory.reexec_with_malloc_tunables()
  # After the re-exec: the command line's modules load JAX, which would otherwise load twice.
  from prvr_jax.search.cli import main  # pylint: disable=import-outside-toplevel

  sys.exit(main())
