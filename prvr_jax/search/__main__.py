"""`python -m prvr_jax.search`: see cli.py."""

import sys

from prvr_jax.search.cli import main

if __name__ == "__main__":
  sys.exit(main())
