"""Training-step throughput of the model zoo, cosine vs regular attention.

The tool is `cosformer.tools.bench_model`; `--help` lists its options."""

import sys

from cosformer.tools.bench_model import main

if __name__ == "__main__":
    sys.exit(main())
