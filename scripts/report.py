"""Run records (metrics.jsonl + config.yaml) -> a results page: tables, curves, sample grids.

The tool is `cosformer.tools.report`; `--help` lists its options."""

import sys

from cosformer.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
