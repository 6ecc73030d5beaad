"""Decoding throughput of one attention layer: the op's split-KV decode path vs the op without it vs SDPA.

The tool is `cosformer.tools.bench_decode`; `--help` lists its options."""

import sys

from cosformer.tools.bench_decode import main

if __name__ == "__main__":
    sys.exit(main())
