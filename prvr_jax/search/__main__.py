"""`python -m prvr_jax.search`: see cli.py."""

import sys

from prvr_jax.search.cli import main
from prvr_jax.utils import host_memory

if __name__ == "__main__":
  host_memory.reexec_with_malloc_tunables()
  sys.exit(main())
