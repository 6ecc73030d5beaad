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

`--tune` sweeps the split path's launch configuration instead: every combination of `--tune-waves` (SPLIT_WAVES),
`--tune-tile-keys` (BLOCK_N), `--tune-warps` and `--tune-stages` at every point, each checked against sdpa before
it is timed (a failing configuration, e.g. out of shared memory, is recorded with its reason). The JSON keeps every
configuration's time (default docs/benchmarks/decode-tune-<gpu>.json); printed last, per point the current rule and
the best configuration, then the configurations ranked by their geometric mean time relative to each point's best:
a rule must hold across points, and that column says which one does.

    python scripts/bench_decode.py --tune --batches 1 8 64 --contexts 8192 32768
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cosattn import cosine_sim_attention, decode

from .benchmark import (
    DOCS,
    DTYPES,
    SCALE,
    TIMERS,
    TOLERANCE,
    benchmark_device,
    check_and_time,
    environment,
    json_output,
    make_timer,
    max_rel_diff,
    rank_configurations,
    record_rows,
    right_aligned,
    sweep_points,
    timer_name,
)

DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_BATCHES = (1, 8, 64)
VARIANTS = ("split", "nosplit", "sdpa")
COLUMNS = ("b", "n", "path", "split_ms", "nosplit_ms", "sdpa_ms", "split_tok_s", "vs_nosplit", "vs_sdpa", "ok")
# what --tune sweeps: `cosattn.decode` constants, each with its command-line option
TUNED = {"waves": "SPLIT_WAVES", "tile_keys": "TILE_KEYS", "warps": "NUM_WARPS", "stages": "NUM_STAGES"}
TUNE_DEFAULTS = {"waves": (2, 4, 8, 16), "tile_keys": (64, 128), "warps": (4, 8), "stages": (2, 3, 4)}


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


def bench_point(args, b: int, n: int, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    x = make_inputs(b, args.heads, args.kv_heads, n, args.q_len, args.dim_head, dtype, device)
    fns = variants(x)
    with torch.inference_mode():
        outs = {name: fn() for name, fn in fns.items()}
        diffs = {name: max_rel_diff(outs[name], outs["sdpa"]) for name in ("split", "nosplit")}
        timer = make_timer(
            device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, smoke_reps=args.smoke_reps, kind=args.timer
        )
        ms = {name: timer(fn) for name, fn in fns.items()}
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


@contextlib.contextmanager
def decode_settings(**values):
    """Set `cosattn.decode`'s launch constants (names as in TUNED) for the block, restoring them after."""
    names = {TUNED[k]: v for k, v in values.items()}
    saved = {name: getattr(decode, name) for name in names}
    try:
        for name, value in names.items():
            setattr(decode, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(decode, name, value)


def current_rule() -> dict:
    return {key: getattr(decode, name) for key, name in TUNED.items()}


def tune_point(args, b: int, n: int, device: torch.device, on_row=None) -> list[dict]:
    """One row per configuration at (b, n): its time, or its failure, beside sdpa's and the current rule's times;
    `on_row(rows so far)` after each."""
    dtype = DTYPES[args.dtype]
    x = make_inputs(b, args.heads, args.kv_heads, n, args.q_len, args.dim_head, dtype, device)
    fns = variants(x)
    time = make_timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, smoke_reps=args.smoke_reps, kind=args.timer)
    base = dict(b=b, n=n, h=args.heads, hk=args.kv_heads, d=args.dim_head, q_len=args.q_len, dtype=args.dtype)
    rows = []
    with torch.inference_mode():
        ref = fns["sdpa"]()
        sdpa_ms, current_ms = time(fns["sdpa"]), time(fns["split"])
        grid = [getattr(args, f"tune_{key}") for key in TUNED]
        for values in itertools.product(*grid):
            config = dict(zip(TUNED, values))
            row = dict(base, **config, sdpa_ms=sdpa_ms, current_ms=current_ms)
            rows.append(check_and_time(row, decode_settings(**config), fns["split"], ref, time, TOLERANCE[args.dtype]))
            if on_row is not None:
                on_row(rows)
    return rows


def tune_summary(rows: list[dict], top: int = 8) -> str:
    """Per point: sdpa, the current rule, the best configuration; then the configurations ranked by their geometric
    mean time relative to each point's best (only those that ran at every point)."""
    best, ranked = rank_configurations(rows, ("b", "n"), tuple(TUNED))
    lines = [f"{'b':>3} {'n':>6} {'sdpa ms':>8} {'rule ms':>8} {'best ms':>8} {'rule/sdpa':>9} {'best/sdpa':>9}  best"]
    for p, r in best.items():
        if r is None:
            lines.append(f"{p[0]:>3} {p[1]:>6}  no configuration ran")
            continue
        cfg = ", ".join(f"{k} {r[k]}" for k in TUNED)
        lines.append(f"{p[0]:>3} {p[1]:>6} {r['sdpa_ms']:8.4f} {r['current_ms']:8.4f} {r['ms']:8.4f} "
                     f"{r['sdpa_ms'] / r['current_ms']:8.2f}x {r['sdpa_ms'] / r['ms']:8.2f}x  {cfg}")  # fmt: skip
    keys = ", ".join(TUNED)
    lines.append(f"configurations by geomean time / each point's best ({keys}; per point in the order above):")
    for geo, cfg, rel in ranked[:top]:
        lines.append(f"  {cfg}  {geo:.3f}  " + " ".join(f"{rel[p]:.2f}" for p in best))
    return "\n".join(lines)


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
    return right_aligned([list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in rows])


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
    ap.add_argument(
        "--timer",
        choices=list(TIMERS),
        default="wall",
        help="wall: triton's do_bench, host issue included where it exceeds the kernels' time (an eager step's "
        "view; default); device: the kernels alone, host issue hidden behind a GPU sleep (a CUDA-graph step's view)",
    )
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--smoke-reps", type=int, default=3, help="timed calls per variant on --device cpu")
    ap.add_argument("--out-json", type=Path, default=None, help="default (GPU): docs/benchmarks/decode-<gpu>.json")
    ap.add_argument("--tune", action="store_true", help="sweep the split path's launch configuration (see above)")
    for key, default in TUNE_DEFAULTS.items():
        flag = "--tune-" + key.replace("_", "-")
        ap.add_argument(flag, type=int, nargs="+", default=list(default), help=f"values of decode.{TUNED[key]}")
    return ap


def main(argv=None) -> int:
    """The command line (scripts/bench_decode.py): parse, run every point, write the JSON, print the table last."""
    args = build_parser().parse_args(argv)
    for name in ("contexts", "batches"):
        if any(v < 1 for v in getattr(args, name)):
            raise SystemExit(f"--{name} must be positive integers; got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads must be a multiple of --kv-heads; got {args.heads}, {args.kv_heads}")
    for key in TUNED:
        values = getattr(args, f"tune_{key}")
        if any(v < 1 for v in values):
            raise SystemExit(f"--tune-{key.replace('_', '-')} must be positive integers; got {values}")
    device = benchmark_device(args.device)
    meta = environment(device)
    meta.update(
        scale=SCALE,
        decode_max_q=decode.DECODE_MAX_Q,
        decode_min_n=decode.DECODE_MIN_N,
        timer=timer_name(meta["smoke"], args.timer),
        split_waves=decode.SPLIT_WAVES,
        tile_keys=decode.TILE_KEYS,
        num_warps=decode.NUM_WARPS,
        num_stages=decode.NUM_STAGES,
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    if args.tune:
        return _tune(args, device, meta)
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
    geo = statistics.geometric_mean(r["vs_nosplit"] for r in rows)
    print(f"geomean speed-up of the split path over the op without it: {geo:.2f}x")
    print(format_table(rows))
    return 0


def _tune(args, device: torch.device, meta: dict) -> int:
    meta.update(rule=current_rule(), tuned={key: getattr(args, f"tune_{key}") for key in TUNED})
    json_path = json_output(args.out_json, meta, lambda gpu: DOCS / "benchmarks" / f"decode-tune-{gpu}.json")
    label = "SMOKE RUN on CPU (timings meaningless)" if meta["smoke"] else meta["gpu"]
    print(f"{label} | tuning the decode path | rule {meta['rule']}", flush=True)
    rows = sweep_points(
        [(b, n) for b in args.batches for n in args.contexts],
        lambda p, record: tune_point(args, *p, device, record),
        lambda p: f"b={p[0]} n={p[1]}",
        json_path=json_path,
        meta=meta,
        device=device,
    )
    print(tune_summary(rows))
    return 0
