"""End-to-end generation throughput of the model zoo: AutoregressiveWrapper.generate with a KV cache, eager and
compiled, cosine vs regular attention.

The tool is `cosformer.tools.bench_generate`; `--help` lists its options."""

import sys

from cosformer.tools.bench_generate import main

if __name__ == "__main__":
    sys.exit(main())
