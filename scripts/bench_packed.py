"""Packed-document attention, forward and forward+backward: the op with segment ids vs FlexAttention vs SDPA with a
dense mask (and the op without segment ids, as a cost reference).

The tool is `cosformer.tools.bench_packed`; `--help` lists its options."""

import sys

from cosformer.tools.bench_packed import main

if __name__ == "__main__":
    sys.exit(main())
