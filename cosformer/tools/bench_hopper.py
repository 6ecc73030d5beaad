"""The Hopper (sm_90) backward in Gluon (`cosattn.hopper`) against the Triton backward, side by side in one process.

Per point (b, h, hk, n, d, causal, layout), q, k, v, dO random in --dtype, in layout bnhd ((b, n, h, d) storage seen
through a transpose, as the model zoo passes them) or bhnd (contiguous):

    triton    forward + backward through cosine_sim_attention with `hopper.HOPPER_BWD = False`
    gluon     the same with `hopper.HOPPER_BWD = True`, once per variant: the configured launch configurations
              (`hopper.DKDV_CONFIG[d]`, `hopper.DQ_CONFIG[d]`, each (BLOCK_M, BLOCK_N, warps, buffers)), then, unless
              --no-alternatives, each of DKDV_ALT[d] with the configured dq pass and each of DQ_ALT[d] with the
              configured dk/dv pass; the configurations are patched for the variant and restored after it

Before it is timed every variant's dq, dk, dv are checked against a run of the Triton path on fp32 copies of the
inputs: err = the largest of ‖g − ref‖ / ‖ref‖ over the three, and a variant is ok when err <= 1.5·err_triton + 1e-4
(err_triton: the Triton path's own, in --dtype). A variant that mismatches is not timed; one that raises (out of
shared memory, a compile error) is recorded as FAILED with its reason, and the run goes on. `hopper.backward` is
wrapped with a counter for the run: a variant under which the op did not take the Hopper path is recorded as
"not eligible", not timed. For the run `cosattn.ops.K_INLINE_MAX_WORK` is 0 (restored after), so the forward
normalises k by its pre-pass at every size, which the Hopper path needs: small points are eligible too.

Timing is `cosformer.tools.benchmark.device_median` (CUDA events behind a GPU sleep: the kernels alone, host issue
hidden). speed-up = triton_ms / gluon_ms (> 1: the Gluon backward wins). Needs an sm_90 GPU, not the interpreter;
elsewhere the tool says so and exits with status 2. The JSON is rewritten after every point.

    python scripts/bench_hopper.py                                     # the default points, every variant
    python scripts/bench_hopper.py --points 4x16x16x4096x128x0xbhnd --no-alternatives --out-json $OUT/hopper.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

import torch

from cosattn import cosine_sim_attention, ops

from .benchmark import DOCS, DTYPES, CudaClock, device_median, environment, json_output, record_rows, right_aligned

# alternatives per head dim, (BLOCK_M, BLOCK_N, warps, buffers), for the dk/dv and the dq pass
DKDV_ALT = {64: [(64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3)], 128: [(64, 128, 8, 2), (32, 128, 8, 2)]}
DQ_ALT = {64: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)], 128: [(128, 64, 8, 2), (64, 64, 4, 2)]}
POINTS = [  # b, h, hk, n, d, causal, layout
    (16, 8, 8, 1024, 64, True, "bnhd"),
    (2, 8, 8, 8192, 64, True, "bnhd"),
    (4, 8, 8, 16384, 64, False, "bhnd"),
    (4, 16, 16, 4096, 128, False, "bhnd"),
    (4, 16, 16, 16384, 128, False, "bhnd"),
    (4, 16, 16, 16384, 128, True, "bhnd"),
    (4, 16, 4, 4096, 128, True, "bhnd"),
]
LAYOUTS = ("bnhd", "bhnd")
BENCH_DTYPES = ("bf16", "fp16")
TIMER = "device_median: kernels alone, host hidden"
REQUIREMENT = "bench_hopper needs a CUDA GPU of compute capability 9.0 (sm_90, Hopper) and cosattn.hopper"
POINT_FORMAT = "BxHxHKxNxDxCAUSALxLAYOUT, e.g. 16x8x8x1024x64x1xbnhd (CAUSAL 0 or 1, LAYOUT bnhd or bhnd)"
COLUMNS = tuple("b h hk n d causal layout dkdv dq err_triton err_gluon ok triton_ms gluon_ms speedup".split())


def parse_point(text: str) -> tuple:
    """ "16x8x8x1024x64x1xbnhd" → (16, 8, 8, 1024, 64, True, "bnhd"): b, h, hk, n, d, causal, layout."""
    parts = text.strip().lower().split("x")
    if len(parts) != 7:
        raise argparse.ArgumentTypeError(f"expected {POINT_FORMAT}; got {text!r}")
    *sizes, layout = parts
    try:
        b, h, hk, n, d, causal = (int(s) for s in sizes)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer sizes in {POINT_FORMAT}; got {text!r}") from None
    if min(b, h, hk, n, d) < 1 or h % hk:
        raise argparse.ArgumentTypeError(f"sizes must be positive with h a multiple of hk; got {text!r}")
    if causal not in (0, 1):
        raise argparse.ArgumentTypeError(f"CAUSAL must be 0 or 1; got {text!r}")
    if layout not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"LAYOUT must be one of {', '.join(LAYOUTS)}; got {text!r}")
    return b, h, hk, n, d, bool(causal), layout


def format_point(point: tuple) -> str:
    b, h, hk, n, d, causal, layout = point
    return f"{b}x{h}x{hk}x{n}x{d}x{int(causal)}x{layout}"


def variants(d: int, dkdv_config: dict, dq_config: dict, alternatives: bool) -> list[tuple]:
    """(dkdv, dq) launch configurations to run at head dim d: the configured pair first, then (with `alternatives`)
    each dk/dv alternative with the configured dq and each dq alternative with the configured dk/dv, without
    repeats; none where the head dim has no configuration."""
    if d not in dkdv_config or d not in dq_config:
        return []
    base = (tuple(dkdv_config[d]), tuple(dq_config[d]))
    out = [base]
    if alternatives:
        out += [(tuple(c), base[1]) for c in DKDV_ALT.get(d, [])]
        out += [(base[0], tuple(c)) for c in DQ_ALT.get(d, [])]
    return list(dict.fromkeys(out))


def requirement_problem() -> str | None:
    """Why this machine cannot run the tool (None if it can)."""
    if not torch.cuda.is_available():
        return f"{REQUIREMENT}; no CUDA device is visible"
    capability = tuple(torch.cuda.get_device_capability())
    if capability != (9, 0):
        return f"{REQUIREMENT}; this device ({torch.cuda.get_device_name()}) is sm_{capability[0]}{capability[1]}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return f"{REQUIREMENT}, not the Triton interpreter; unset TRITON_INTERPRET"
    try:
        importlib.import_module("cosattn.hopper")
    except Exception as e:  # an ImportError, or a Triton whose Gluon lacks the Hopper API in another way
        return f"{REQUIREMENT}; importing cosattn.hopper failed ({type(e).__name__}: {e})"
    return None


@contextlib.contextmanager
def hopper_run(hopper):
    """For the run: `hopper.backward` counted (yields the list of its calls' q shapes), the forward's in-loop k
    normalisation off (`ops.K_INLINE_MAX_WORK = 0`); both, and HOPPER_BWD and the configurations, restored after."""
    calls: list = []
    real = hopper.backward

    def counted(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return real(*args, **kwargs)

    saved = (hopper.HOPPER_BWD, dict(hopper.DKDV_CONFIG), dict(hopper.DQ_CONFIG), ops.K_INLINE_MAX_WORK)
    hopper.backward, ops.K_INLINE_MAX_WORK = counted, 0
    try:
        yield calls
    finally:
        hopper.backward = real
        hopper.HOPPER_BWD, ops.K_INLINE_MAX_WORK = saved[0], saved[3]
        hopper.DKDV_CONFIG.clear(), hopper.DKDV_CONFIG.update(saved[1])
        hopper.DQ_CONFIG.clear(), hopper.DQ_CONFIG.update(saved[2])


def bench_point(
    point: tuple, hopper, calls: list, *, dtype: str, alternatives: bool, clock, on_row, device: str = "cuda"
) -> list[dict]:
    """One row per variant at `point` (see the module doc); `on_row(rows so far)` after each. `calls`: the list that
    `hopper_run` appends a call of `hopper.backward` to."""
    b, h, hk, n, d, causal, layout = point

    def make(heads):
        if layout == "bnhd":
            return torch.randn(b, n, heads, d, device=device, dtype=DTYPES[dtype]).transpose(1, 2)
        return torch.randn(b, heads, n, d, device=device, dtype=DTYPES[dtype])

    q, k, v, do = make(h), make(hk), make(hk), make(h)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def fb(q=q, k=k, v=v, do=do):
        q.grad = k.grad = v.grad = None
        cosine_sim_attention(q, k, v, causal=causal).backward(do)
        return q.grad, k.grad, v.grad

    hopper.HOPPER_BWD = False
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = [t.clone() for t in fb(q32, k32, v32, do.float())]
    err = lambda got: max(((g.float() - r).norm() / r.norm()).item() for g, r in zip(got, ref))  # noqa: E731
    e_tri = err([t.clone() for t in fb()])
    t_tri = device_median(fb, clock=clock)
    base = dict(b=b, h=h, hk=hk, n=n, d=d, causal=causal, layout=layout, dtype=dtype)
    todo = variants(d, hopper.DKDV_CONFIG, hopper.DQ_CONFIG, alternatives)
    if not todo:
        row = dict(base, dkdv_cfg=None, dq_cfg=None, configured=True, err_triton=e_tri, err_gluon=None,
                   status="not eligible", ok=False, triton_ms=t_tri, gluon_ms=None, speedup=None,
                   error=f"no Hopper launch configuration for head dim {d}")  # fmt: skip
        on_row([row])
        return [row]
    rows = []
    saved = dict(hopper.DKDV_CONFIG), dict(hopper.DQ_CONFIG)
    for dkdv_cfg, dq_cfg in todo:
        row = dict(base, dkdv_cfg=list(dkdv_cfg), dq_cfg=list(dq_cfg), configured=(dkdv_cfg, dq_cfg) == todo[0])
        row.update(err_triton=e_tri, err_gluon=None, triton_ms=t_tri, gluon_ms=None, speedup=None)
        hopper.DKDV_CONFIG[d], hopper.DQ_CONFIG[d] = dkdv_cfg, dq_cfg
        hopper.HOPPER_BWD = True
        try:
            before = len(calls)
            grads = [t.clone() for t in fb()]
            if len(calls) == before:
                row.update(status="not eligible", ok=False)
            else:
                e = err(grads)
                ok = e <= 1.5 * e_tri + 1e-4
                row.update(err_gluon=e, status="ok" if ok else "MISMATCH", ok=ok)
                if ok:
                    t = device_median(fb, clock=clock)
                    row.update(gluon_ms=t, speedup=t_tri / t)
        except Exception as ex:  # noqa: BLE001 - a variant the GPU cannot run is a result, not the end of the run
            row.update(status="FAILED", ok=False, gluon_ms=None, speedup=None,
                       error=f"{type(ex).__name__}: {str(ex)[-300:]}")  # fmt: skip
        finally:
            hopper.HOPPER_BWD = False
            hopper.DKDV_CONFIG.update(saved[0]), hopper.DQ_CONFIG.update(saved[1])
        rows.append(row)
        on_row(rows)
    return rows


def _cfg(cfg) -> str:
    return "-" if cfg is None else "x".join(map(str, cfg))


def _cell(row: dict, col: str) -> str:
    value = row.get(col)
    if col in ("dkdv", "dq"):
        return _cfg(row[f"{col}_cfg"])
    if col == "ok":
        return row["status"]
    if col == "causal":
        return str(int(value))
    if value is None:
        return "-"
    if col.startswith("err_"):
        return f"{value:.2e}"
    if col.endswith("_ms"):
        return f"{value:.4f}"
    if col == "speedup":
        return f"{value:.3f}x"
    return str(value)


def format_table(rows: list[dict]) -> str:
    return right_aligned([list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in rows])


def _describe(row: dict) -> str:
    line = f"{format_point(tuple(row[k] for k in 'b h hk n d causal layout'.split()))} "
    line += f"dkdv {_cfg(row['dkdv_cfg'])} dq {_cfg(row['dq_cfg'])}: {row['status']}"
    if row["err_gluon"] is not None:
        line += f", err {row['err_gluon']:.2e} (triton {row['err_triton']:.2e})"
    if row["speedup"] is not None:
        line += f", {row['gluon_ms']:.4f} ms vs triton {row['triton_ms']:.4f} ms, {row['speedup']:.3f}x"
    if row.get("error"):
        line += f" | {row['error']}"
    return line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--points",
        type=parse_point,
        nargs="+",
        default=list(POINTS),
        metavar="POINT",
        help=f"{POINT_FORMAT} (default: {' '.join(format_point(p) for p in POINTS)})",
    )
    ap.add_argument("--dtype", choices=list(BENCH_DTYPES), default="bf16")
    ap.add_argument(
        "--alternatives",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the DKDV_ALT / DQ_ALT variants (default); --no-alternatives: only the configured pair",
    )
    ap.add_argument("--out-json", type=Path, default=None, help="default: docs/benchmarks/hopper-bwd-<gpu>.json")
    return ap


def main(argv=None) -> int:
    """The command line (scripts/bench_hopper.py): parse, check the machine (status 2 if it cannot run the tool), run
    every point, write the JSON, print the table last."""
    args = build_parser().parse_args(argv)
    problem = requirement_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    hopper = importlib.import_module("cosattn.hopper")
    device = torch.device("cuda")
    meta = environment(device)
    meta.update(
        dtype=args.dtype,
        timer=TIMER,
        k_inline_max_work=0,
        dkdv_config={str(d): list(c) for d, c in hopper.DKDV_CONFIG.items()},
        dq_config={str(d): list(c) for d, c in hopper.DQ_CONFIG.items()},
        alternatives=args.alternatives,
        points=[format_point(p) for p in args.points],
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    json_path = json_output(args.out_json, meta, lambda gpu: DOCS / "benchmarks" / f"hopper-bwd-{gpu}.json")
    print(f"{meta['gpu']} | torch {meta['torch']} triton {meta['triton']} | {args.dtype} | {TIMER}", flush=True)
    torch.manual_seed(0)
    clock = CudaClock()
    rows: list[dict] = []

    def on_row(point_rows):  # the JSON keeps every variant timed before an interruption
        print(_describe(point_rows[-1]), flush=True)
        record_rows(json_path, meta, rows + point_rows)

    with hopper_run(hopper) as calls:
        for point in args.points:
            rows += bench_point(
                point, hopper, calls, dtype=args.dtype, alternatives=args.alternatives, clock=clock, on_row=on_row
            )
            record_rows(json_path, meta, rows)
            torch.cuda.empty_cache()
    record_rows(json_path, meta, rows, complete=True)
    print(format_table(rows))
    return 0
