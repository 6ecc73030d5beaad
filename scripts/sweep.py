"""A wandb sweep file run locally: every grid point or a seeded random sample.

The tool is `cosformer.tools.sweep`; `--help` lists its options."""

import sys

from cosformer.tools.sweep import main

if __name__ == "__main__":
    sys.exit(main())
