"""The Hopper (sm_90) Gluon backward against the Triton one: forward+backward device time, per launch configuration.

The tool is `cosformer.tools.bench_hopper`; `--help` lists its options."""

import sys

from cosformer.tools.bench_hopper import main

if __name__ == "__main__":
    sys.exit(main())
