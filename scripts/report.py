"""Turn runs' local logs into a results page: curves per variant, a markdown table, a sample grid (images).

    python scripts/report.py runs/sweeps/lm_attn_norm --out docs/results/lm_attn_norm
    python scripts/report.py runs/a runs/b --out docs/results/a_vs_b --title "cosine vs regular"

Each OUT_DIR is a run directory (metrics.jsonl + config.yaml) or any folder above some, such as a sweep root.
"""

import argparse
import sys
from pathlib import Path

from cosformer.report import write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="run directories or sweep roots")
    parser.add_argument("--out", default=None, help="report folder (default docs/results/<name of the first OUT_DIR>)")
    parser.add_argument("--title", default=None, help="title of the page and figures (default: the folder's name)")
    args = parser.parse_args(argv)

    out = Path(args.out) if args.out else Path("docs/results") / Path(args.out_dirs[0]).resolve().name
    try:
        report = write_report(args.out_dirs, out, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(report["table"])
    written = [report[k] for k in ("markdown", "curves", "json", "samples") if report[k] is not None]
    print(f"\n{len(report['runs'])} run(s); wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
