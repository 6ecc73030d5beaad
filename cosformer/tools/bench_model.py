"""Training-step throughput of the model zoo: cosine vs regular attention, same model otherwise.

A 12-layer, 512-dim, 8-head decoder (dim_head 64, vocab 256, post-LN defaults) is trained on random tokens with a
fixed token budget per step (16k), so seq 1024 runs batch 16 and seq 8192 runs batch 2. One step is forward +
backward under bf16 autocast + an AdamW step (fused on CUDA; `--no-optimizer` leaves it out). After warm-up steps
(which also absorb Triton autotuning), each step is timed with CUDA events and the median is reported, with the
peak allocated memory of the case.

    python scripts/bench_model.py --out runs/bench_model.json             # GPU, < 3 minutes on an H100
    python scripts/bench_model.py --device cpu --tiny --out /tmp/bm.json  # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import triton

from cosformer import AutoregressiveWrapper, Decoder, TransformerWrapper, compile_model

FULL = dict(depth=12, dim=512, heads=8, dim_head=64, seqs=(1024, 8192), tokens_per_step=16384, steps=20, warmup=5)
TINY = dict(depth=2, dim=64, heads=2, dim_head=32, seqs=(64, 128), tokens_per_step=256, steps=3, warmup=1)
VOCAB = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny model and short sequences (CPU smoke test)")
    p.add_argument("--attn", nargs="+", default=["cosine", "regular"], choices=["cosine", "regular"])
    p.add_argument("--seqs", nargs="+", type=int, help="sequence lengths (default 1024 8192; tiny: 64 128)")
    p.add_argument("--tokens-per-step", type=int, help="batch = tokens_per_step // seq (default 16384)")
    p.add_argument("--steps", type=int, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5)")
    p.add_argument("--no-optimizer", action="store_true", help="time forward + backward only")
    p.add_argument("--no-autocast", action="store_true", help="run in float32 instead of bf16 autocast")
    p.add_argument("--compile", action="store_true", help="cosformer.compile_model (torch.compile, fullgraph)")
    p.add_argument(
        "--dynamic",
        choices=["auto", "true", "false"],
        default="auto",
        help="with --compile: dynamic shapes (auto: on a new shape)",
    )
    p.add_argument("--mode", default=None, help="with --compile: torch.compile mode, e.g. reduce-overhead")
    return p.parse_args(argv)


def build_model(attn: str, seq: int, cfg: dict) -> AutoregressiveWrapper:
    layers = Decoder(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"], dim_head=cfg["dim_head"], attn=attn)
    return AutoregressiveWrapper(TransformerWrapper(num_tokens=VOCAB, max_seq_len=seq, attn_layers=layers))


def run_case(attn: str, seq: int, cfg: dict, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    batch = max(1, cfg["tokens_per_step"] // seq)
    model = build_model(attn, seq, cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = None if args.no_optimizer else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    forward = model
    if args.compile:
        dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
        forward = compile_model(model, dynamic=dynamic, mode=args.mode)
    x = torch.randint(0, VOCAB, (batch, seq + 1), device=device)  # the wrapper predicts x[:, 1:] from x[:, :-1]

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast):
            loss = forward(x)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(cfg["warmup"]):
        step()
    times_ms = []
    for _ in range(cfg["steps"]):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize(device)
            times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = step()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    median_ms = statistics.median(times_ms)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return dict(
        attn=attn,
        seq=seq,
        batch=batch,
        params=params,
        step_ms=median_ms,
        step_ms_all=times_ms,
        tokens_per_s=batch * seq / (median_ms / 1e3),
        peak_mib=peak_mib,
        final_loss=loss.item(),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    for key in ("seqs", "tokens_per_step", "steps", "warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is visible; use --device cpu --tiny")

    results = []
    for seq in cfg["seqs"]:
        for attn in args.attn:
            try:
                results.append(run_case(attn, seq, cfg, args))
            except torch.OutOfMemoryError:
                results.append(dict(attn=attn, seq=seq, error="out of memory"))
            if args.device == "cuda":
                torch.cuda.empty_cache()

    meta = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        optimizer_step="none" if args.no_optimizer else "AdamW",
        precision="fp32" if args.no_autocast else "bf16 autocast",
        compile=args.compile,
        model=dict(depth=cfg["depth"], dim=cfg["dim"], heads=cfg["heads"], dim_head=cfg["dim_head"], vocab=VOCAB),
        tokens_per_step=cfg["tokens_per_step"],
        steps=cfg["steps"],
        warmup=cfg["warmup"],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))

    step_desc = "fwd+bwd" + ("" if args.no_optimizer else "+AdamW")
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['precision']} | {step_desc}")
    print(f"{'attn':<8} {'seq':>6} {'batch':>5} {'step ms':>9} {'tokens/s':>12} {'peak MiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['attn']:<8} {r['seq']:>6} {r['error']}")
            continue
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(
            f"{r['attn']:<8} {r['seq']:>6} {r['batch']:>5} {r['step_ms']:>9.2f} {r['tokens_per_s']:>12,.0f} {peak:>9}"
        )
    by_key = {(r["attn"], r["seq"]): r for r in results if "error" not in r}
    for seq in cfg["seqs"]:
        if ("cosine", seq) in by_key and ("regular", seq) in by_key:
            ratio = by_key[("cosine", seq)]["tokens_per_s"] / by_key[("regular", seq)]["tokens_per_s"]
            print(f"seq {seq}: cosine / regular tokens/s = {ratio:.2f}x")
    print(f"wrote {args.out}")
    return 0
