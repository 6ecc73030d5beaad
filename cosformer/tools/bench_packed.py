"""Packed-document attention (LM training on packed rows), forward and forward+backward: the op with segment ids vs
FlexAttention vs SDPA with a dense mask.

Per point: b rows of n tokens, each packing documents of one length L (or, with --random-lengths, of lengths drawn
uniformly from a range with a fixed seed; a row's last document is cut to fit), segment ids (b, n) int32,
non-decreasing; every variant computes cosine attention (scale 10), causal within each document:

    ours        cosine_sim_attention(q, k, v, causal=True, segment_ids=seg): key tiles of other documents are skipped
    flex        torch.compile(dynamic=False) of flex_attention(F.normalize(q), F.normalize(k), v, scale=10) with a
                BlockMask from create_block_mask(same document & q_idx >= kv_idx, b, None, n, n); compiled once, the
                normalisation inside the compiled function (inductor fuses it, as in a compiled model)
    sdpa_mask   F.scaled_dot_product_attention(F.normalize(q), F.normalize(k), v, attn_mask=(b, 1, n, n) bool,
                scale=10): what one writes without a packed-document kernel
    ours_dense  cosine_sim_attention(q, k, v, causal=True) over the whole row, no segment ids: NOT the same function
                (documents see each other), a cost reference for the kernel without tile skipping; never checked

The masks (the BlockMask, SDPA's bool mask) are built once per point, outside the timing; the normalisation of q and
k is inside it (it is part of the function computed). The compiled flex function specialises on shapes and grad
mode, not on the documents (its mask_mod reads the ids from a tensor), so one compilation serves every layout of a
shape. fwd is timed under torch.no_grad(); fwd+bwd is the forward then torch.autograd.grad(o, (q, k, v), do) with one
fixed random upstream gradient `do` (nothing accumulates into .grad).

Before timing, ours and flex are checked against sdpa_mask: output and dq, dk, dv, max |diff| relative to max |ref|
per tensor, within the tolerances of `cosformer.tools.benchmark`; a mismatch shows in the `ok` column. A variant
that fails (unavailable, out of memory, refused) reads n/a, its reason printed once; the table goes on.

Ratios: vs_flex = flex_ms / ours_ms, vs_sdpa_mask = sdpa_mask_ms / ours_ms (> 1: ours faster). TFLOP/s of ours count
only the visible pairs (query, key in one document, key not after the query): fwd = 4·d·h·pairs (QKᵀ and PV), fwd+bwd
= FWDBWD_FLOP_FACTOR (3.5) × that, the convention of `cosformer.tools.benchmark` (backward ≈ 2.5× forward).
Timing is `triton.testing.do_bench` medians on a GPU (under REPEAT_BELOW_MS every variant is timed in a second round
and keeps the lower median, as in `benchmark`); `--device cpu` is a smoke run of the pipeline on tiny defaults
(time.perf_counter medians, Triton interpreter if TRITON_INTERPRET=1): labelled so, and never written under docs/.

    python scripts/bench_packed.py                                 # n 8k/16k, d 64/128, L 512/1024/2048, h=8, b=1
    python scripts/bench_packed.py --quick --random-lengths --out-json $OUT/packed.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cosattn import cosine_sim_attention

from .benchmark import (
    DOCS,
    DTYPES,
    FWDBWD_FLOP_FACTOR,
    REPEAT_BELOW_MS,
    SCALE,
    TOLERANCE,
    bench_median,
    benchmark_device,
    cpu_median,
    environment,
    failure_reason,
    json_output,
    max_rel_diff,
    record_rows,
    right_aligned,
)

VARIANTS = ("ours", "flex", "sdpa_mask", "ours_dense")
CHECKED = ("ours", "flex")  # against sdpa_mask; ours_dense computes another function
MODES = ("fwd", "fwdbwd")
TENSORS = ("o", "dq", "dk", "dv")
# grids per preset: token counts n, head dims, fixed document lengths, the range of --random-lengths, heads
GRIDS = {
    "full": dict(ns=(8192, 16384), dims=(64, 128), doc_lens=(512, 1024, 2048), length_range=(512, 2048), heads=8),
    "quick": dict(ns=(8192, 16384), dims=(128,), doc_lens=(1024,), length_range=(512, 2048), heads=8),
    "smoke": dict(ns=(128,), dims=(16,), doc_lens=(32,), length_range=(16, 64), heads=2),
}
# the headline point: 16k tokens of 1k-token documents, d=128, forward+backward, ours at least this much faster
TARGET = dict(n=16384, doc_len=1024, d=128, mode="fwdbwd")
TARGET_VS_FLEX = 1.5
COLUMNS = ("b", "n", "h", "d", "doc", "mode", *(f"{v}_ms" for v in VARIANTS), "vs_flex", "vs_sdpa_mask")
COLUMNS += ("ours_tflops", "ok")
NA = "n/a"


# ---------------------------------------------------------------------------------------------------------------
# packed rows: segment ids, visible pairs, masks


def document_lengths(n: int, doc_len: int | None, *, length_range=None, generator=None) -> list[int]:
    """Lengths of the documents packed into one row of n tokens: doc_len each, or (doc_len None) drawn uniformly
    from the inclusive length_range (lo, hi) by `generator`; the last document is cut to fit the row."""
    lengths, total = [], 0
    while total < n:
        if doc_len is None:
            lo, hi = length_range
            length = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        else:
            length = doc_len
        lengths.append(min(length, n - total))
        total += lengths[-1]
    return lengths


def packed_segment_ids(b: int, n: int, doc_len: int | None, *, length_range=None, seed: int = 0, device=None):
    """(b, n) int32 segment ids 0, 0, …, 1, 1, … (non-decreasing): each row packs documents of `document_lengths`;
    random lengths are drawn row after row from one generator seeded with `seed` (the same ids on every run)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        lengths = torch.tensor(document_lengths(n, doc_len, length_range=length_range, generator=generator))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths))
    return torch.stack(rows).to(device)


def visible_pairs(segment_ids: torch.Tensor) -> int:
    """(query, key) pairs visible under causal-within-document attention, summed over the batch: a document of m
    tokens holds m(m+1)/2 (its positions need not be contiguous: each pair of them is visible in one order)."""
    total = 0
    for row in segment_ids:
        counts = torch.unique(row, return_counts=True)[1].long()
        total += int((counts * (counts + 1) // 2).sum())
    return total


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(b, 1, n, n) bool, True = may attend: same document and key not after the query (SDPA's attn_mask)."""
    n = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def packed_flops(pairs: int, h: int, d: int, mode: str) -> float:
    """FLOPs over the visible pairs only: QKᵀ and PV, 2·d each per pair and head; backward 2.5× forward."""
    return 4.0 * d * h * pairs * (FWDBWD_FLOP_FACTOR if mode == "fwdbwd" else 1.0)


# ---------------------------------------------------------------------------------------------------------------
# variants


def document_causal(segment_ids: torch.Tensor):
    """FlexAttention's mask_mod: same document and kv_idx <= q_idx; the ids are read from the tensor (an input of
    the compiled graph, not a constant, so another layout of the same shape reuses the compilation)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return mask_mod


@functools.cache
def compiled_flex():
    """The compiled flex variant, created once per process. dynamic=False: one specialisation per shape and grad
    mode, so a full grid holds 8 and a few options more; the recompile limit (8 by default, then dynamo falls back to
    the unfused eager path, silently slow) is raised for them."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))

    def cosine_flex(q, k, v, block_mask):
        return flex_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, block_mask=block_mask, scale=SCALE)

    return torch.compile(cosine_flex, dynamic=False)


def make_variants(x: dict, errors: dict) -> dict:
    """name -> forward closure of x's q, k, v, for every variant whose set-up (masks, compilation wrapper) worked;
    the failures go to `errors`."""
    q, k, v, seg = x["q"], x["k"], x["v"], x["seg"]
    b, _, n, _ = q.shape

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = create_block_mask(document_causal(seg), b, None, n, n, device=seg.device)
        fn = compiled_flex()
        return lambda: fn(q, k, v, block_mask)

    def sdpa_mask():
        mask = document_mask(seg)

        def forward():
            qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            return F.scaled_dot_product_attention(qn, kn, v, attn_mask=mask, scale=SCALE)

        return forward

    fns = {
        "ours": lambda: cosine_sim_attention(q, k, v, causal=True, scale=SCALE, segment_ids=seg),
        "flex": attempt(errors, "flex", flex),
        "sdpa_mask": attempt(errors, "sdpa_mask", sdpa_mask),
        "ours_dense": lambda: cosine_sim_attention(q, k, v, causal=True, scale=SCALE),
    }
    return {name: fn for name, fn in fns.items() if fn is not None}


def make_run(forward, x: dict, mode: str):
    """The timed closure: the forward under no_grad, or forward + backward through autograd.grad."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return (forward(),)

        return run
    inputs = (x["q"], x["k"], x["v"])

    def run():
        o = forward()
        return (o, *torch.autograd.grad(o, inputs, x["do"]))

    return run


# ---------------------------------------------------------------------------------------------------------------
# running a point


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # tensors held by a caught exception's frames go before empty_cache
        with contextlib.suppress(RuntimeError):  # a broken context raises here too; the next call reports it
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def attempt(errors: dict, name: str, fn, *args):
    """fn(*args), or None with the reason in errors[name] (the first one kept): one variant's failure is one n/a."""
    try:
        return fn(*args)
    except Exception as e:
        errors.setdefault(name, failure_reason(e))
        if torch.cuda.is_available():
            _free(torch.device("cuda"))  # an out-of-memory failure leaves its blocks cached
        return None


def time_variants(runs: dict, errors: dict, timer, repeat_below_ms: float) -> dict:
    """name -> median ms (None: failed). Each run is called once first (compilation, autotuning) outside the
    timing; if any time is under repeat_below_ms (host-sensitive), all are timed again in the same order and each
    keeps its lower median."""
    ms = {}
    for name, run in runs.items():
        warm = attempt(errors, name, run)
        ms[name] = None if warm is None else attempt(errors, name, timer, run)
        del warm
    if any(t is not None and t < repeat_below_ms for t in ms.values()):
        for name, run in runs.items():
            if ms[name] is not None:
                again = attempt(errors, name, timer, run)
                ms[name] = ms[name] if again is None else min(ms[name], again)
    return ms


def bench_point(args, n: int, d: int, doc_len: int | None, device: torch.device, timer, repeat_below_ms) -> list[dict]:
    """One (n, d, documents) point: the check, then a row per mode."""
    dtype = DTYPES[args.dtype]
    seg = packed_segment_ids(args.batch, n, doc_len, length_range=args.length_range, seed=args.seed, device=device)
    shape = (args.batch, args.heads, n, d)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    x = dict(q=q, k=k, v=v, seg=seg, do=torch.randn(shape, device=device, dtype=dtype))
    errors: dict[str, str] = {}
    fns = make_variants(x, errors)

    # the check: one forward+backward of each checked variant against sdpa_mask (also their first compilation);
    # a variant that fails it is not timed
    outs = {name: attempt(errors, name, make_run(fns[name], x, "fwdbwd")) for name in (*CHECKED, "sdpa_mask")
            if name in fns}  # fmt: skip
    fns = {name: fn for name, fn in fns.items() if name not in outs or outs[name] is not None}
    ref = outs.pop("sdpa_mask", None)
    diffs = {}
    if ref is not None:
        diffs = {
            name: dict(zip(TENSORS, (max_rel_diff(a, r) for a, r in zip(out, ref))))
            for name, out in outs.items()
            if out is not None
        }
    del outs, ref
    tol = TOLERANCE[args.dtype]
    ok_by = {name: max(diff.values()) <= tol for name, diff in diffs.items()}

    pairs = visible_pairs(seg)
    rows = []
    for mode in args.modes:
        mode_errors = dict(errors)
        ms = time_variants({name: make_run(fn, x, mode) for name, fn in fns.items()}, mode_errors, timer,
                           repeat_below_ms)  # fmt: skip
        ms = {name: ms.get(name) for name in VARIANTS}
        ours = ms["ours"]
        flops = packed_flops(pairs, args.heads, d, mode)
        rows.append(
            dict(
                b=args.batch,
                n=n,
                h=args.heads,
                d=d,
                dtype=args.dtype,
                doc_len=doc_len,
                length_range=list(args.length_range) if doc_len is None else None,
                docs=sum(len(torch.unique(row)) for row in seg),
                visible_pairs=pairs,
                density=pairs / (args.batch * n * n),
                mode=mode,
                flops=flops,
                **{f"{name}_ms": ms[name] for name in VARIANTS},
                vs_flex=ms["flex"] / ours if ours and ms["flex"] else None,
                vs_sdpa_mask=ms["sdpa_mask"] / ours if ours and ms["sdpa_mask"] else None,
                vs_dense=ms["ours_dense"] / ours if ours and ms["ours_dense"] else None,
                ours_tflops=flops / (ours * 1e-3) / 1e12 if ours else None,
                max_rel_diff=diffs,
                ok_by_variant=ok_by,
                ok=all(ok_by.values()) if "ours" in ok_by else None,
                errors={name: reason for name, reason in mode_errors.items() if ms.get(name) is None},
            )
        )
    del x, q, k, v, fns
    _free(device)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# table and the target line


def doc_label(row: dict) -> str:
    return "rand" if row["doc_len"] is None else str(row["doc_len"])


def _cell(row: dict, col: str) -> str:
    if col == "doc":
        return doc_label(row)
    if col == "mode":
        return "fwd+bwd" if row["mode"] == "fwdbwd" else row["mode"]
    if col == "ok":
        if row["ok"] is None:
            return "-"
        bad = [name for name, good in row["ok_by_variant"].items() if not good]
        return "MISMATCH " + ",".join(bad) if bad else "ok"
    value = row[col]
    if value is None:
        return NA
    if col.endswith("_ms"):
        return f"{value:.3f}"
    if col.startswith("vs_"):
        return f"{value:.2f}x"
    if col == "ours_tflops":
        return f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    return right_aligned([list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in rows])


def target_line(rows: list[dict]) -> str:
    """The headline point's fwd+bwd ratio over flex, and whether it reaches TARGET_VS_FLEX."""
    what = f"n={TARGET['n']} tokens of {TARGET['doc_len']}-token documents, d={TARGET['d']}, fwd+bwd"
    hits = [r for r in rows if all(r[key] == value for key, value in TARGET.items())]
    if not hits:
        return f"target ({what}): not in this run's grid"
    lines = []
    for r in hits:
        head = f"target ({what}, h={r['h']}, b={r['b']}, {r['dtype']}): ours vs flex"
        if r["vs_flex"] is None:
            reason = r["errors"].get("flex") or r["errors"].get("ours") or "not timed"
            lines.append(f"{head} {NA} ({reason})")
        else:
            met = "met" if r["vs_flex"] >= TARGET_VS_FLEX else "NOT met"
            lines.append(
                f"{head} {r['vs_flex']:.2f}x = {r['flex_ms']:.3f} / {r['ours_ms']:.3f} ms "
                f"(target >= {TARGET_VS_FLEX}x: {met})"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    full, quick = GRIDS["full"], GRIDS["quick"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help=f"cpu: a smoke run, never written to docs/, grid defaults {GRIDS['smoke']}",
    )
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--ns", type=int, nargs="+", help=f"tokens per row (default {full['ns']}; --quick {quick['ns']})")
    ap.add_argument("--dim-heads", type=int, nargs="+", help=f"head dims (default {full['dims']})")
    ap.add_argument(
        "--doc-lens", type=int, nargs="*", help=f"fixed document lengths (default {full['doc_lens']}; may be empty)"
    )
    ap.add_argument("--random-lengths", action="store_true", help="add documents of random lengths, per (n, d)")
    ap.add_argument(
        "--length-range", type=int, nargs=2, metavar=("LO", "HI"), help=f"of --random-lengths ({full['length_range']})"
    )
    ap.add_argument("--seed", type=int, default=0, help="of the random lengths")
    ap.add_argument("--batch", type=int, default=1, help="packed rows b")
    ap.add_argument("--heads", type=int, default=None, help=f"(default {full['heads']})")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--quick", action="store_true", help=f"n {quick['ns']}, d {quick['dims']}, L {quick['doc_lens']}")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--smoke-reps", type=int, default=3, help="timed calls per variant on --device cpu")
    ap.add_argument("--out-json", type=Path, default=None, help="default (GPU): docs/benchmarks/packed-<gpu>.json")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Options, with the unset grid options filled from the preset: smoke on CPU (tiny), quick, or full."""
    args = build_parser().parse_args(argv)
    preset = GRIDS["smoke" if args.device == "cpu" else "quick" if args.quick else "full"]
    for name, key in (("ns", "ns"), ("dim_heads", "dims"), ("doc_lens", "doc_lens"), ("length_range", "length_range")):
        if getattr(args, name) is None:
            setattr(args, name, list(preset[key]))
    args.heads = preset["heads"] if args.heads is None else args.heads
    for name in ("ns", "dim_heads", "doc_lens"):
        if any(v < 1 for v in getattr(args, name)):
            raise SystemExit(f"--{name.replace('_', '-')} must be positive integers; got {getattr(args, name)}")
    lo, hi = args.length_range
    if not 1 <= lo <= hi:
        raise SystemExit(f"--length-range must be 1 <= LO <= HI; got {lo} {hi}")
    if args.batch < 1 or args.heads < 1:
        raise SystemExit(f"--batch and --heads must be positive; got {args.batch}, {args.heads}")
    if not args.doc_lens and not args.random_lengths:
        raise SystemExit("no documents to pack: give --doc-lens or --random-lengths")
    return args


def grid(args) -> list[tuple[int, int, int | None]]:
    """(n, d, doc_len) points, doc_len None for random lengths; one shape's points consecutive."""
    docs = [*args.doc_lens, *([None] if args.random_lengths else [])]
    return [(n, d, doc) for n in args.ns for d in args.dim_heads for doc in docs]


def main(argv=None) -> int:
    """The command line (scripts/bench_packed.py): parse, run every point, write the JSON, print the table last."""
    args = parse_args(argv)
    device = benchmark_device(args.device)
    meta = environment(device)
    meta.update(
        scale=SCALE,
        flops=f"4·d·h·(visible pairs) forward, x{FWDBWD_FLOP_FACTOR:g} forward+backward",
        target={**TARGET, "vs_flex": TARGET_VS_FLEX},
        timer="perf_counter median (smoke)"
        if meta["smoke"]
        else f"triton.testing.do_bench median; under {REPEAT_BELOW_MS:g} ms the lower of two rounds",
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    json_path = json_output(args.out_json, meta, lambda gpu: DOCS / "benchmarks" / f"packed-{gpu}.json")
    if device.type == "cuda":
        timer = functools.partial(bench_median, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        repeat_below_ms = REPEAT_BELOW_MS
    else:
        timer, repeat_below_ms = functools.partial(cpu_median, reps=args.smoke_reps), 0.0
    points = grid(args)
    label = "SMOKE RUN on CPU (timings meaningless)" if meta["smoke"] else meta["gpu"]
    print(f"{label} | torch {meta['torch']} triton {meta['triton']} | {args.dtype} b={args.batch} h={args.heads} "
          f"| {len(points)} points x {len(args.modes)} modes", flush=True)  # fmt: skip
    rows, reported, t0 = [], set(), time.perf_counter()
    for n, d, doc_len in points:
        point_rows = bench_point(args, n, d, doc_len, device, timer, repeat_below_ms)
        rows += point_rows
        for row in point_rows:
            for name, reason in row["errors"].items():
                if (name, reason) not in reported:  # each reason once, not once per point
                    reported.add((name, reason))
                    print(f"{name}: {NA} ({reason})", flush=True)
            ratio = _cell(row, "vs_flex")
            print(f"[{time.perf_counter() - t0:5.0f}s] n={n} d={d} doc={doc_label(row)} {_cell(row, 'mode')}: "
                  f"ours {_cell(row, 'ours_ms')} ms, {ratio} flex, {_cell(row, 'vs_sdpa_mask')} sdpa_mask, "
                  f"{_cell(row, 'ok')}", flush=True)  # fmt: skip
        record_rows(json_path, meta, rows)
    record_rows(json_path, meta, rows, complete=True)
    if meta["smoke"]:
        print("SMOKE RUN on CPU: timings are perf_counter medians, not GPU numbers")
    rated = [r["vs_flex"] for r in rows if r["mode"] == "fwdbwd" and r["vs_flex"]]
    if rated:
        geo = statistics.geometric_mean(rated)
        print(f"fwd+bwd, ours vs flex: geomean {geo:.2f}x, worst {min(rated):.2f}x over {len(rated)} points")
    print(format_table(rows))
    print(target_line(rows))
    return 0
