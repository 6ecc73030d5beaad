"""Launch-configuration sweep of the op's forward, dk/dv and dq kernels.

The tool is `cosformer.tools.tune_attention`; `--help` lists its options."""

import sys

from cosformer.tools.tune_attention import main

if __name__ == "__main__":
    sys.exit(main())
