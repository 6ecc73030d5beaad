"""Train a cosformer model: parse -> build -> train -> close.

    python scripts/train.py --config configs/default.yaml
    accelerate launch scripts/train.py --config configs/enwik8/cosine.yaml train.lr=3e-4 model.depth=12
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py --config configs/enwik8/cosine.yaml

`--config` may repeat (a later file overrides an earlier one); every other argument is a dotted override
`section.key=value` (also accepted as `--section.key=value`, the form wandb sweep agents pass with `${args}`).
"""

from __future__ import annotations

import argparse
import sys

from cosformer.train.checkpoint import CheckpointError
from cosformer.train.config import ConfigError, load_config
from cosformer.train.data import ChecksumError, DataUnavailableError
from cosformer.train.trainer import NonFiniteLossError, Trainer


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    args, unknown = parser.parse_known_args(argv)
    bad = [u for u in unknown if "=" not in u]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like section.key=value")
    return args.config, args.overrides + unknown


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or stopped by a signal after saving), 1 the run failed (non-finite loss, data
    unavailable), 2 the config or the checkpoint to resume from was refused, 130 stopped by a second signal."""
    configs, overrides = parse_args(argv)
    try:
        cfg = load_config(configs, overrides)
        trainer = Trainer(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except (DataUnavailableError, ChecksumError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    try:
        trainer.train()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped at once by a second signal, without saving (see above for the checkpoint)", file=sys.stderr)
        return 130
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
