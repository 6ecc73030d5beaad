"""Decoding throughput of one attention layer: new tokens against a KV cache, the op's split-KV decode path vs the op
without it vs PyTorch SDPA.

Per point (batch b, context n): q (b, h, q_len, d) against k, v (b, hk, n, d), views of a cache with room for more
positions (as `cosformer.attention.KVBuffer` hands them to the op), causal (bottom-right), under inference mode:

    split     cosine_sim_attention(q, k, v, causal=True): the decode path wherever `cosattn.decode.use_decode` takes it
    nosplit   the same call with `cosattn.decode.ENABLED = False`: the main forward
    sdpa      F.scaled_dot_product_attention(F.normalize(q), k̂, v, scale=10, enable_gqa=...), the cache holding
              normalised keys (a decoding peer normalises each key once, when it enters the cache)

tokens/s = b · q_len / median step time. Before timing, split and nosplit are checked against sdpa (max |diff|
relative to max |sdpa|, the tolerances of `cosformer.tools.benchmark`); a mismatch shows in the `ok` column.
Timing is `triton.testing.do_bench` medians on a GPU; `--device cpu` is a smoke run of the pipeline
(time.perf_counter medians, Triton interpreter if TRITON_INTERPRET=1): labelled so, and never written under docs/.

    python scripts/bench_decode.py                                    # contexts 1k–32k, batch 1/8/64
    python scripts/bench_decode.py --batches 1 --contexts 4096 32768 --out-json $OUT/decode.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cosattn import cosine_sim_attention, decode

from .benchmark import (
    DOCS,
    DTYPES,
    SCALE,
    TOLERANCE,
    bench_median,
    benchmark_device,
    cpu_median,
    environment,
    json_output,
    record_rows,
)

DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_BATCHES = (1, 8, 64)
VARIANTS = ("split", "nosplit", "sdpa")
COLUMNS = ("b", "n", "path", "split_ms", "nosplit_ms", "sdpa_ms", "split_tok_s", "vs_nosplit", "vs_sdpa", "ok")


def make_inputs(b, h, hk, n, q_len, d, dtype, device) -> dict:
    """q, and k, v as views of the first n positions of a cache with room for n + q_len (strided, like KVBuffer's);
    k_hat: the peer's cache of normalised keys."""
    q = torch.randn(b, h, q_len, d, device=device, dtype=dtype)
    cache = torch.randn(2, b, hk, n + q_len, d, device=device, dtype=dtype)
    k, v = cache[0, :, :, :n], cache[1, :, :, :n]
    return dict(q=q, k=k, v=v, k_hat=F.normalize(k, dim=-1))


def variants(x: dict) -> dict:
    q, k, v, k_hat = x["q"], x["k"], x["v"], x["k_hat"]
    gqa = q.shape[1] != k.shape[1]
    q_len, n = q.shape[2], k.shape[2]
    # SDPA's is_causal aligns top-left; bottom-right with one query is no mask at all
    sdpa_mask = None
    if q_len > 1:
        sdpa_mask = torch.ones(q_len, n, dtype=torch.bool, device=q.device).tril(n - q_len)

    def split():
        return cosine_sim_attention(q, k, v, causal=True)

    def nosplit():
        enabled = decode.ENABLED
        decode.ENABLED = False
        try:
            return cosine_sim_attention(q, k, v, causal=True)
        finally:
            decode.ENABLED = enabled

    def sdpa():
        return F.scaled_dot_product_attention(
            F.normalize(q, dim=-1), k_hat, v, attn_mask=sdpa_mask, scale=SCALE, enable_gqa=gqa
        )

    return dict(split=split, nosplit=nosplit, sdpa=sdpa)


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def bench_point(args, b: int, n: int, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    x = make_inputs(b, args.heads, args.kv_heads, n, args.q_len, args.dim_head, dtype, device)
    fns = variants(x)
    with torch.inference_mode():
        outs = {name: fn() for name, fn in fns.items()}
        diffs = {name: rel_diff(outs[name], outs["sdpa"]) for name in ("split", "nosplit")}
        if device.type == "cuda":
            ms = {name: bench_median(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms) for name, fn in fns.items()}
        else:
            ms = {name: cpu_median(fn, reps=args.smoke_reps) for name, fn in fns.items()}
    tokens = b * args.q_len
    return dict(
        b=b,
        n=n,
        h=args.heads,
        hk=args.kv_heads,
        d=args.dim_head,
        q_len=args.q_len,
        dtype=args.dtype,
        path="decode" if decode.use_decode(x["q"], x["k"]) else "main",
        **{f"{name}_ms": ms[name] for name in VARIANTS},
        **{f"{name}_tok_s": tokens / (ms[name] * 1e-3) for name in VARIANTS},
        vs_nosplit=ms["nosplit"] / ms["split"],
        vs_sdpa=ms["sdpa"] / ms["split"],
        max_rel_diff=diffs,
        ok=all(dv <= TOLERANCE[args.dtype] for dv in diffs.values()),
    )


def _cell(row: dict, col: str) -> str:
    value = row[col]
    if isinstance(value, bool):
        return "ok" if value else "MISMATCH"
    if isinstance(value, float):
        if col.endswith("_tok_s"):
            return f"{value:,.0f}"
        return f"{value:.4f}" if col.endswith("_ms") else f"{value:.2f}x"
    return str(value)


def format_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), help="cached keys n")
    ap.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim-head", type=int, default=128)
    ap.add_argument("--q-len", type=int, default=1, help="new tokens per step")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--smoke-reps", type=int, default=3, help="timed calls per variant on --device cpu")
    ap.add_argument("--out-json", type=Path, default=None, help="default (GPU): docs/benchmarks/decode-<gpu>.json")
    return ap


def main(argv=None) -> int:
    """The command line (scripts/bench_decode.py): parse, run every point, write the JSON, print the table last."""
    args = build_parser().parse_args(argv)
    for name in ("contexts", "batches"):
        if any(v < 1 for v in getattr(args, name)):
            raise SystemExit(f"--{name} must be positive integers; got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads must be a multiple of --kv-heads; got {args.heads}, {args.kv_heads}")
    device = benchmark_device(args.device)
    meta = environment(device)
    meta.update(
        scale=SCALE,
        decode_max_q=decode.DECODE_MAX_Q,
        decode_min_n=decode.DECODE_MIN_N,
        timer="perf_counter median (smoke)" if meta["smoke"] else "triton.testing.do_bench median",
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    json_path = json_output(args.out_json, meta, lambda gpu: DOCS / "benchmarks" / f"decode-{gpu}.json")
    label = "SMOKE RUN on CPU (timings meaningless)" if meta["smoke"] else meta["gpu"]
    print(f"{label} | torch {meta['torch']} triton {meta['triton']} | {args.dtype} h={args.heads} "
          f"hk={args.kv_heads} d={args.dim_head} q_len={args.q_len}", flush=True)  # fmt: skip
    rows = []
    for b in args.batches:
        for n in args.contexts:
            row = bench_point(args, b, n, device)
            rows.append(row)
            print(f"b={b} n={n}: split {row['split_ms']:.4f} ms, {row['vs_nosplit']:.2f}x nosplit, "
                  f"{row['vs_sdpa']:.2f}x sdpa", flush=True)  # fmt: skip
            record_rows(json_path, meta, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record_rows(json_path, meta, rows, complete=True)
    if meta["smoke"]:
        print("SMOKE RUN on CPU: timings are perf_counter medians, not GPU numbers")
    geo = math.exp(sum(math.log(r["vs_nosplit"]) for r in rows) / len(rows))
    print(f"geomean speed-up of the split path over the op without it: {geo:.2f}x")
    print(format_table(rows))
    return 0
