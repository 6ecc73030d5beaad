"""Run a wandb sweep file locally: every grid point (or a seeded random sample), sequentially or one per GPU.

    python scripts/sweep.py configs/sweeps/lm_attn_norm.yaml --dry-run
    python scripts/sweep.py configs/sweeps/lm_attn_norm.yaml --gpus 0,1,2,3 train.max_steps=50

The same file runs online with `wandb sweep configs/sweeps/lm_attn_norm.yaml` + `wandb agent <id>`.
Runs land in <out-root>/<sweep name>/<run name>; finished runs are skipped, so rerunning resumes the sweep.
Then: python scripts/report.py runs/sweeps/lm_attn_norm --out docs/results/lm_attn_norm
"""

import argparse
import sys

from cosformer.config import Config
from cosformer.sweep import config_keys, load_sweep, parse_overrides, run_sweep, summary_table, unknown_parameters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="sweep file in wandb's format (configs/sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. train.max_steps=50")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids: one run per GPU at a time")
    parser.add_argument("--out-root", default="runs/sweeps", help="runs go to <out-root>/<sweep name>/<run name>")
    parser.add_argument("--max-runs", type=int, default=None, help="first N grid points, or N random samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random sweep's sample")
    args = parser.parse_intermixed_args(argv)

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] or None
    try:
        sweep = load_sweep(args.file)
        extra = parse_overrides(args.overrides)
        known = config_keys(Config)
        unknown = unknown_parameters(sweep, known) + [k for k in extra if k not in known]
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} in {args.file} or the overrides")
        results = run_sweep(
            sweep, args.out_root, extra, gpus=gpus, max_runs=args.max_runs, seed=args.seed, dry_run=args.dry_run
        )
    except (OSError, ValueError) as e:  # a bad file or override: say so before any run starts
        parser.error(str(e))
    if args.dry_run:
        return 0
    print(f"\nsweep {sweep.name} ({args.out_root}/{sweep.name})")
    print(summary_table(results, sweep.metric))
    failed = [r.run.name for r in results if r.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
