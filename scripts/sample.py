"""Generate text from a trained checkpoint: the model is rebuilt from the config stored with the checkpoint.

python scripts/sample.py runs/default/checkpoints/step_000250 --prompt "def main(" --length 300
python scripts/sample.py runs/default --prompt "import "        # a run dir: its latest checkpoint
python scripts/sample.py runs/default --best --prompt "import " # its best (lowest validation loss)
python scripts/sample.py runs/default/checkpoints/best           # the same, by its pointer file
"""

from __future__ import annotations

import argparse
import sys

import torch

from cosformer.train.checkpoint import load_checkpoint_config, load_model_weights, resolve_checkpoint
from cosformer.train.data import decode, encode
from cosformer.train.tasks import task_class
from cosformer.train.tasks.lm import LMTask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", help="a checkpoint directory, a run directory (its latest checkpoint) or checkpoints/best|latest"
    )
    parser.add_argument("--best", action="store_true", help="the run directory's best checkpoint, not its latest")
    parser.add_argument("--prompt", default="\n", help="text to continue (encoded as UTF-8 bytes)")
    parser.add_argument("--length", type=int, default=256, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely bytes (0 = no filter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:
        path = resolve_checkpoint(args.checkpoint, best=args.best)
    except ValueError as e:
        parser.error(f"--best: {e}")
    cfg = load_checkpoint_config(path)
    if not issubclass(task_class(cfg.data.name), LMTask):
        parser.error(f"{path} was trained on data.name={cfg.data.name}, not a byte-level text corpus")
    if not args.prompt:
        parser.error("--prompt must not be empty")
    model = LMTask(cfg).build_model()
    load_model_weights(model, path)
    model.to(args.device).eval()

    torch.manual_seed(args.seed)
    prompt = encode(args.prompt).to(args.device)
    filter_args = {"filter_logits_fn": None}  # --top_k 0: the model's own distribution
    if args.top_k:
        filter_args = {"filter_logits_fn": "top_k", "filter_kwargs": {"k": args.top_k}}
    tokens = model.generate(prompt, args.length, temperature=args.temperature, **filter_args)
    print(args.prompt + decode(tokens.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
