"""Per-kernel device times and host vs device time per call, ours vs the peer.

The tool is `cosformer.tools.profiling`; `--help` lists its options."""

import sys

from cosformer.tools.profiling import main

if __name__ == "__main__":
    sys.exit(main())
