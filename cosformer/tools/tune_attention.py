"""Launch-configuration sweep of the op's main kernels: the forward, the backward's dk/dv pass and its dq pass.

`cosattn.ops.launch_config(kernel, ...)` gives each kernel its (BLOCK_M, BLOCK_N, num_warps, num_stages). This
tool replaces one kernel's configuration at a time, for every combination of `--block-m`, `--block-n`, `--warps`
and `--stages`, and times the call that kernel belongs to: the forward alone for `fwd`, forward + backward for
`dkdv` and `dq` (the other kernels keep their configuration, so the difference between rows is that kernel's).
Before timing, each configuration's output (and gradients) are checked against the current configuration's, so a
configuration that computes something else is never ranked. One that cannot run (shared memory, registers) is
recorded with its reason.

Points: `--shapes` b x h x n x d, causal or not; `--layout bnhd` makes q, k, v and the upstream gradient views of
(b, n, h, d) projections, as the model zoo hands them to the op (the training step's layout), `bhnd` contiguous.

    python scripts/tune_attention.py --kernels dkdv dq --shapes 16x8x1024x64 --causal 1 --layout bnhd
    python scripts/tune_attention.py --kernels fwd --shapes 4x16x4096x128 4x16x16384x128

Timing (`--timer device`, the default) is the kernels' alone: each sample's calls are queued behind a GPU sleep
that outlasts their host issue (`benchmark.device_median`). At the training shapes a call's host time exceeds its
kernels', so do_bench (`--timer wall`) would rank the host's noise, as a first sweep did (NOTES).

Printed last, per kernel: per point the current configuration's time and the best, then the configurations ranked
by their geometric mean time relative to each point's best (`benchmark.rank_configurations`). The JSON keeps every
row (default docs/benchmarks/tune-<gpu>.json). `--device cpu` is a smoke run of the pipeline (the interpreter
ignores launch configurations): labelled so, and never written under docs/.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path

import torch

from cosattn import cosine_sim_attention, ops

from .benchmark import (
    DOCS,
    DTYPES,
    TIMERS,
    TOLERANCE,
    benchmark_device,
    check_and_time,
    environment,
    json_output,
    make_timer,
    rank_configurations,
    sweep_points,
    timer_name,
)

# a kernel name as the tool takes it -> the names `launch_config` is asked for (pointer and descriptor variants)
KERNELS = {"fwd": ("fwd", "fwd_tma"), "dkdv": ("dkdv",), "dq": ("dq", "dq_tma")}
CONFIG_KEYS = ("block_m", "block_n", "warps", "stages")
POINT_KEYS = ("b", "h", "n", "d", "causal")
GRID_DEFAULTS = {"block_m": (32, 64, 128), "block_n": (32, 64, 128), "warps": (4, 8), "stages": (2, 3, 4)}


@contextlib.contextmanager
def kernel_config(kernel: str, config: tuple):
    """Within the block, `ops.launch_config` answers `config` for `kernel` (and its variants), the rest as before."""
    names = KERNELS[kernel]
    original = ops.launch_config

    def patched(name, d_pad, dtype, causal):
        return config if name in names else original(name, d_pad, dtype, causal)

    ops.launch_config = patched
    try:
        yield
    finally:
        ops.launch_config = original


@contextlib.contextmanager
def recorded_configs():
    """Yields a dict that records, by kernel name, each configuration `ops.launch_config` answers within the block."""
    original = ops.launch_config
    seen: dict = {}

    def recording(name, d_pad, dtype, causal):
        seen[name] = config = tuple(original(name, d_pad, dtype, causal))
        return config

    ops.launch_config = recording
    try:
        yield seen
    finally:
        ops.launch_config = original


def make_inputs(b, h, n, d, dtype, layout: str, device) -> dict:
    """q, k, v (requiring grad) and the upstream gradient, (b, h, n, d), contiguous or views of (b, n, h, d)."""

    def tensor():
        if layout == "bnhd":
            return torch.randn(b, n, h, d, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, device=device, dtype=dtype)

    q, k, v = (tensor().requires_grad_() for _ in range(3))
    return dict(q=q, k=k, v=v, do=tensor())


def run_fn(x: dict, causal: bool, kernel: str):
    """What is timed: the forward (no graph kept) for `fwd`, forward + backward otherwise; returns the outputs."""
    q, k, v, do = x["q"], x["k"], x["v"], x["do"]
    if kernel == "fwd":

        def fwd():
            with torch.no_grad():
                return (cosine_sim_attention(q, k, v, causal=causal),)

        return fwd

    def fwd_bwd():
        o = cosine_sim_attention(q, k, v, causal=causal)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    return fwd_bwd


def tune_point(args, kernel: str, shape: tuple, causal: bool, device: torch.device, on_row=None) -> list[dict]:
    """One row per configuration; `on_row(rows so far)` after each (the JSON is rewritten, so a run stopped by a time
    limit keeps every configuration it timed)."""
    b, h, n, d = shape
    dtype = DTYPES[args.dtype]
    x = make_inputs(b, h, n, d, dtype, args.layout, device)
    fn = run_fn(x, causal, kernel)
    timer = make_timer(
        device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, smoke_reps=args.smoke_reps, kind=args.timer
    )
    with recorded_configs() as seen:
        ref = fn()
    # the kernel's configuration as the op chose it (pointer or descriptor variant); absent if it did not launch
    current = next((seen[name] for name in KERNELS[kernel] if name in seen), None)
    current_ms = timer(fn)
    base = dict(kernel=kernel, b=b, h=h, n=n, d=d, causal=causal, layout=args.layout, dtype=args.dtype)
    base.update(current=list(current) if current is not None else None, current_ms=current_ms)
    rows = []
    for config in itertools.product(*(getattr(args, key) for key in CONFIG_KEYS)):
        row = dict(base, **dict(zip(CONFIG_KEYS, config)))
        rows.append(check_and_time(row, kernel_config(kernel, config), fn, ref, timer, TOLERANCE[args.dtype]))
        if on_row is not None:
            on_row(rows)
    return rows


def summary(rows: list[dict], top: int = 8) -> str:
    lines = []
    for kernel in KERNELS:
        krows = [r for r in rows if r["kernel"] == kernel]
        if not krows:
            continue
        best, ranked = rank_configurations(krows, POINT_KEYS, CONFIG_KEYS)
        lines.append(f"{kernel}: point (b, h, n, d, causal), current configuration and ms, best configuration and ms")
        for p, r in best.items():
            cur = next(x for x in krows if tuple(x[k] for k in POINT_KEYS) == p)
            if r is None:
                lines.append(f"  {p}  current {cur['current']} {cur['current_ms']:.4f}  no configuration ran")
                continue
            cfg = tuple(r[k] for k in CONFIG_KEYS)
            gain = cur["current_ms"] / r["ms"]
            lines.append(
                f"  {p}  current {cur['current']} {cur['current_ms']:.4f}  best {cfg} {r['ms']:.4f} ({gain:.2f}x)"
            )
        lines.append(f"  by geomean time / each point's best ({', '.join(CONFIG_KEYS)}):")
        for geo, cfg, rel in ranked[:top]:
            lines.append(f"    {cfg}  {geo:.3f}  " + " ".join(f"{rel[p]:.2f}" for p in best))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    ap.add_argument("--shapes", nargs="+", default=["16x8x1024x64"], help="b x h x n x d")
    ap.add_argument("--causal", choices=["0", "1", "both"], default="1")
    ap.add_argument("--layout", choices=["bnhd", "bhnd"], default="bnhd")
    for key, default in GRID_DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=int, nargs="+", default=list(default))
    ap.add_argument(
        "--timer",
        choices=list(TIMERS),
        default="device",
        help="device: the kernels alone, host issue hidden behind a GPU sleep (default; at the training shapes a "
        "call's host time exceeds its kernels', and do_bench would rank the host); wall: triton's do_bench",
    )
    ap.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench's warm-up (--timer wall)")
    ap.add_argument("--rep-ms", type=float, default=50.0, help="do_bench's repetition time (--timer wall)")
    ap.add_argument("--smoke-reps", type=int, default=1, help="timed calls per configuration on --device cpu")
    ap.add_argument("--out-json", type=Path, default=None, help="default (GPU): docs/benchmarks/tune-<gpu>.json")
    return ap


def _shape(text: str) -> tuple:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--shapes must be b x h x n x d with positive sizes, e.g. 16x8x1024x64; got {text!r}")
    return tuple(map(int, parts))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shapes = [_shape(s) for s in args.shapes]
    for key in CONFIG_KEYS:
        if any(v < 1 for v in getattr(args, key)):
            raise SystemExit(f"--{key.replace('_', '-')} must be positive integers; got {getattr(args, key)}")
    causals = {"0": [False], "1": [True], "both": [False, True]}[args.causal]
    device = benchmark_device(args.device)
    meta = environment(device)
    meta.update(
        timer=timer_name(meta["smoke"], args.timer),
        layout=args.layout,
        grid={key: getattr(args, key) for key in CONFIG_KEYS},
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    json_path = json_output(args.out_json, meta, lambda gpu: DOCS / "benchmarks" / f"tune-{gpu}.json")
    label = "SMOKE RUN on CPU (timings meaningless)" if meta["smoke"] else meta["gpu"]
    print(f"{label} | torch {meta['torch']} triton {meta['triton']} | {args.dtype}, layout {args.layout}", flush=True)
    points = [(kernel, shape, causal) for kernel in args.kernels for shape in shapes for causal in causals]
    rows = sweep_points(
        points,
        lambda p, record: tune_point(args, *p, device, record),
        lambda p: f"{p[0]} {'x'.join(map(str, p[1]))} causal={int(p[2])}",
        json_path=json_path,
        meta=meta,
        device=device,
    )
    print(summary(rows))
    return 0
