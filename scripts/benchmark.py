"""The op against the same function through PyTorch's fastest kernels.

The tool is `cosformer.tools.benchmark`; `--help` lists its options."""

import sys

from cosformer.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
