"""Benchmark cosine-similarity attention against the same function through PyTorch's fastest kernels.

Ours:  cosattn.cosine_sim_attention(q, k, v, causal=c)          (l2norm of q, k fused; scale 10)
Peer:  F.scaled_dot_product_attention(F.normalize(q), F.normalize(k), v, scale=10, is_causal=c)
       through SDPA's backends: "auto" (default dispatch), "cudnn", "flash" (and "efficient", "math" on request),
       each pinned with torch.nn.attention.sdpa_kernel. A backend that refuses a case is recorded as null.
Ref:   cosattn.attention_reference in the same dtype (materialises the i×j logits), up to --ref-max-n.

Per point the row reports ratio = peer_ms / ours_ms with peer = the fastest backend that ran, TFLOP/s with
fwd = 4·b·h·n²·d (×0.5 causal, ×3.5 for forward+backward; the mask case counts the dense work), and peak memory
above what the inputs already held. Before any timing, ours is checked against each peer backend (output and,
for fwd+bwd, dq/dk/dv; ‖diff‖ relative to ‖peer‖) and judged by the closest one, since backends
differ among themselves by their own rounding; a mismatch is flagged in the `ok` column, because a benchmark of
a wrong kernel is worthless.

SDPA's is_causal is aligned top-left and ours bottom-right; they agree because the grid uses q_len == k_len.

Timing is `triton.testing.do_bench` medians (with an L2 flush between runs). Points where anything runs under
REPEAT_BELOW_MS are host-sensitive (a call's host time is as large as its GPU time, and the machine's CPU speed
drifts over seconds), so ours and every peer backend are timed in a second round after the first, in the same
order, and each keeps the lower of its two medians: a slow spell that covered only one side no longer decides the
ratio. `--device cpu` is a smoke run of the whole pipeline with time.perf_counter medians: labelled as such and
never written under docs/.

The command line is scripts/benchmark.py (this module's `main`):

    python scripts/benchmark.py                      # full grid: bf16+fp16, 2 shapes, 5 lengths, extras
    python scripts/benchmark.py --quick              # a first look: bf16, n ∈ {1024, 4096}
    timeout 590 python scripts/benchmark.py --out-json $OUT/h100.json --time-budget 480
    python scripts/benchmark.py --replot docs/benchmarks/nvidia-h200.json   # redraw the PNG from the JSON

The JSON is rewritten after every point, and SIGTERM (from `timeout`) ends the run early but still prints the
table, so a run cut short keeps what it measured.
"""

import argparse
import contextlib
import datetime
import gc
import inspect
import itertools
import json
import math
import os
import re
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cosattn import attention_reference, cosine_sim_attention

DOCS = Path("docs")  # relative: results belong to the checkout the command is run from (resolved when used)

SCALE = 10.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# max |ours − peer| relative to max |peer|, per tensor
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
DEFAULT_BACKENDS = ("auto", "cudnn", "flash")
MODES = ("fwd", "fwdbwd")
FWDBWD_FLOP_FACTOR = 3.5  # backward ≈ 2.5× forward: five i×j matmuls against the forward's two

DEFAULT_DTYPES = ("bf16", "fp16")
DEFAULT_SHAPES = ((4, 8, 8, 64), (4, 16, 16, 128))  # (b, h, hk, d)
DEFAULT_NS = (1024, 2048, 4096, 8192, 16384)
QUICK_DTYPES = ("bf16",)
QUICK_NS = (1024, 4096)
GQA_SHAPE = (4, 16, 4, 128)
MASKED_FRACTION = 0.25
ASSUMED_TFLOPS = 400.0  # for the up-front time estimate only
UNSUPPORTED = "unsupported"

TABLE_COLUMNS = (
    "dtype case b h d n causal mode ours_ms peer_ms peer_backend ratio ours_tflops peer_tflops ours_mib peer_mib ok"
).split()


@dataclass(frozen=True)
class Point:
    dtype: str
    b: int
    h: int
    hk: int
    d: int
    n: int
    causal: bool
    mode: str  # "fwd" | "fwdbwd"
    case: str = "dense"  # "dense" | "mask" (25% of keys padded) | "gqa"

    @property
    def shape(self) -> str:
        heads = f"{self.h}" if self.hk == self.h else f"{self.h}/{self.hk}"
        return f"{self.b}x{heads}x{self.d}"

    @property
    def label(self) -> str:
        return f"{self.dtype} {self.case} {self.shape} n={self.n} causal={int(self.causal)} {self.mode}"

    @classmethod
    def of_row(cls, row: dict) -> "Point":
        return cls(**{f: row[f] for f in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------------------------
# pure pieces: flops, grid, rows, table, summary, JSON


def attention_flops(b: int, h: int, n: int, d: int, *, causal: bool, mode: str) -> float:
    """FLOPs of one call on q_len == k_len == n: two n×n×d matmuls per head forward (QKᵀ and PV)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    flops = 4.0 * b * h * n * n * d
    if causal:
        flops *= 0.5
    if mode == "fwdbwd":
        flops *= FWDBWD_FLOP_FACTOR
    return flops


def point_flops(p: Point) -> float:
    return attention_flops(p.b, p.h, p.n, p.d, causal=p.causal, mode=p.mode)


def tflops(p: Point, ms: float | None) -> float | None:
    if ms is None or ms <= 0:
        return None
    return point_flops(p) / (ms * 1e-3) / 1e12


def build_grid(dtypes, shapes, ns, causals, modes, *, extras: bool = True) -> list[Point]:
    """Dense points for every combination, then the extra cases: key padding on each shape (non-causal only: SDPA
    takes no explicit mask together with is_causal) and GQA (h=16, hk=4, d=128)."""
    points = [
        Point(dt, b, h, hk, d, n, c, m, "dense" if hk == h else "gqa")
        for dt, (b, h, hk, d), n, c, m in itertools.product(dtypes, shapes, ns, causals, modes)
    ]
    if extras:
        for dt in dtypes:
            dense_shapes = [s for s in shapes if s[1] == s[2]] if False in causals else []
            for (b, h, _, d), n, m in itertools.product(dense_shapes, ns, modes):
                points.append(Point(dt, b, h, h, d, n, False, m, "mask"))
            b, h, hk, d = GQA_SHAPE
            points += [Point(dt, b, h, hk, d, n, c, m, "gqa") for n, c, m in itertools.product(ns, causals, modes)]
    return list(dict.fromkeys(points))  # drop repeats, keep order


def estimate_seconds(points, *, n_peers: int, ref_max_n: int, warmup_ms: float, rep_ms: float, tflops_=None) -> float:
    """Rough wall time: per implementation a check run, do_bench (5 estimate runs + warmup + rep) and a memory
    run; the O(n²) reference counted as 3× slower. Compilation and autotuning are not included."""
    rate = (tflops_ or ASSUMED_TFLOPS) * 1e12
    total_ms = 0.0
    for p in points:
        t = point_flops(p) / rate * 1e3
        per_impl = 8 * t + warmup_ms + rep_ms
        total_ms += (1 + n_peers) * per_impl
        if p.n <= ref_max_n:
            total_ms += 3 * per_impl
    return total_ms / 1e3


def make_row(
    p: Point,
    *,
    ours_ms,
    peer_all: dict,
    ours_mib=None,
    peer_mib_all: dict | None = None,
    ref_ms=None,
    ref_mib=None,
    max_abs_diff=None,
    max_rel_diff=None,
    errors: dict | None = None,
) -> dict:
    """One result row: the fastest peer backend that ran is the peer; ratio = peer_ms / ours_ms (> 1: ours wins)."""
    ran = {k: v for k, v in peer_all.items() if v is not None}
    peer_backend = min(ran, key=ran.get) if ran else None
    peer_ms = ran[peer_backend] if ran else None
    ratio = peer_ms / ours_ms if (peer_ms is not None and ours_ms) else None
    peer_mib = (peer_mib_all or {}).get(peer_backend) if peer_backend else None
    ok = None if max_rel_diff is None else bool(max_rel_diff <= TOLERANCE[p.dtype])
    row = asdict(p)
    row.update(
        ours_ms=ours_ms,
        peer_ms=peer_ms,
        peer_backend=peer_backend,
        peer_all=dict(peer_all),
        ratio=ratio,
        ours_tflops=tflops(p, ours_ms),
        peer_tflops=tflops(p, peer_ms),
        ours_mib=ours_mib,
        peer_mib=peer_mib,
        peer_mib_all=dict(peer_mib_all or {}),
        ref_ms=ref_ms,
        ref_mib=ref_mib,
        max_abs_diff=max_abs_diff,
        max_rel_diff=max_rel_diff,
        ok=ok,
        errors=dict(errors or {}),
    )
    return row


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ok_cell(row: dict) -> str:
    if row.get("ours_ms") is None and row.get("errors", {}).get("ours"):
        return "ERR"
    if row.get("ok") is None:
        return "-"
    return "ok" if row["ok"] else f"DIFF {row['max_rel_diff']:.1e}"


_NUMBER_FORMAT = {
    **dict.fromkeys(("ours_ms", "peer_ms"), ".3f"),
    "ratio": ".2f",
    **dict.fromkeys(("ours_tflops", "peer_tflops", "ours_mib", "peer_mib"), ".1f"),
}


def _cell(r: dict, col: str) -> str:
    if col == "h":
        return f"{r['h']}" if r["hk"] == r["h"] else f"{r['h']}/{r['hk']}"
    if col == "causal":
        return str(int(r["causal"]))
    if col == "ok":
        return _ok_cell(r)
    if col in _NUMBER_FORMAT:
        return _fmt(r[col], _NUMBER_FORMAT[col])
    return "-" if r[col] is None else str(r[col])


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table, one line per row, columns TABLE_COLUMNS."""
    cells = [[_cell(r, col) for col in TABLE_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(TABLE_COLUMNS)]
    left = {"dtype", "case", "mode", "peer_backend", "ok"}

    def line(values):
        return "  ".join(v.ljust(w) if c in left else v.rjust(w) for c, v, w in zip(TABLE_COLUMNS, values, widths))

    return "\n".join(
        [line(TABLE_COLUMNS).rstrip(), "  ".join("-" * w for w in widths), *(line(c).rstrip() for c in cells)]
    )


def summary_line(rows: list[dict]) -> str:
    """Worst ratio and where, the share of points at ≥ 1.0× (and ≥ 1.3× at n=1024), memory and correctness."""
    rated = [r for r in rows if r["ratio"] is not None]
    if not rated:
        return f"summary: no point with both ours and a peer timed ({len(rows)} rows)"
    worst = min(rated, key=lambda r: r["ratio"])
    at_par = sum(r["ratio"] >= 1.0 for r in rated)
    short = [r for r in rated if r["n"] == 1024]
    parts = [
        f"summary: worst ratio {worst['ratio']:.2f} at {Point.of_row(worst).label} (peer {worst['peer_backend']})",
        f"{at_par}/{len(rated)} points ({at_par / len(rated):.0%}) at >= 1.0x",
    ]
    if short:
        parts.append(f"{sum(r['ratio'] >= 1.3 for r in short)}/{len(short)} n=1024 points at >= 1.3x")
    mem = [r for r in rated if r["ours_mib"] is not None and r["peer_mib"] is not None]
    if mem:
        parts.append(f"{sum(r['ours_mib'] <= r['peer_mib'] for r in mem)}/{len(mem)} with memory <= peer")
    bad = sum(r["ok"] is False for r in rows)
    parts.append(f"{bad} correctness warnings" if bad else "all checked outputs within tolerance")
    untimed = len(rows) - len(rated)
    if untimed:
        parts.append(f"{untimed} rows without a ratio")
    return "; ".join(parts)


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def benchmark_device(name: str) -> torch.device:
    """The device a benchmark tool runs on, by its --device value; cuda without a visible GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible (use --device cpu for a smoke run)")
    return torch.device(name)


def environment(device: torch.device) -> dict:
    import triton

    smoke = device.type != "cuda"
    gpu = torch.cuda.get_device_name(device) if not smoke else "cpu (smoke run)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": smoke,
    }


def _finite(obj):
    """NaN / inf → null: strict JSON (the `ok` field already says the point failed its check)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    """Atomic write, so a run killed mid-way leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite({**meta, "rows": rows}), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def right_aligned(lines: list[list[str]]) -> str:
    """Text columns, each right-justified to its widest cell, two spaces apart: the tools' tables."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def record_rows(path: Path | None, meta: dict, rows: list[dict], *, complete: bool = False) -> None:
    """The rows so far (after every point, so that an interrupted run keeps them) or all of them (`complete`, said on
    the console), marked accordingly; nothing when there is no JSON path (a CPU smoke run given none)."""
    if path is None:
        return
    write_json(path, {**meta, "complete": complete}, rows)
    if complete:
        print(f"wrote {path}", flush=True)


MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward + backward"}
CASE_NAMES = {"dense": "", "gqa": " GQA", "mask": " key-padding mask"}
MARKERS = "osD^vP*X"


def plot_title(meta: dict) -> str:
    label = "SMOKE RUN on CPU (timings meaningless)" if meta.get("smoke") else meta.get("gpu", "unknown GPU")
    return f"{label}: cosine_sim_attention vs SDPA(normalize(q), normalize(k))"


def plot(rows: list[dict], path: Path, title: str):
    """Ratio vs n, a panel per (dtype, mode): dtypes in rows, modes in columns, all on one y scale. In every panel a
    (case, shape) has the same colour and marker, solid lines are causal and dashed ones not, so each of a panel's
    lines is named by one legend for the figure; guides at 1.0× (parity) and 1.3×. Returns the Figure."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D

    rated = [r for r in rows if r["ratio"] is not None]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rated)] or list(DEFAULT_DTYPES[:1])
    modes = [m for m in MODES if any(r["mode"] == m for r in rated)] or list(MODES)
    case_order = list(CASE_NAMES)
    series = sorted(
        {(r["case"], Point.of_row(r).shape, r["h"] * r["d"]) for r in rated},
        key=lambda s: (case_order.index(s[0]) if s[0] in case_order else len(case_order), s[2], s[1]),
    )
    names = {(case, shape): f"{shape}{CASE_NAMES.get(case, ' ' + case)}" for case, shape, _ in series}
    style = {key: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, key in enumerate(names)}

    with matplotlib.rc_context({"font.size": 11}):  # read when the text is drawn: the whole figure sits in it
        fig = Figure(figsize=(6.2 * len(modes), 3.9 * len(dtypes) + 1.4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(dtypes), len(modes), squeeze=False, sharex=True, sharey=True)
        for (i, dtype), (j, mode) in itertools.product(enumerate(dtypes), enumerate(modes)):
            ax = axes[i][j]
            lines: dict[tuple, list] = {}
            for r in rated:
                if (r["dtype"], r["mode"]) == (dtype, mode):
                    key = (r["case"], Point.of_row(r).shape, bool(r["causal"]))
                    lines.setdefault(key, []).append((r["n"], r["ratio"]))
            for (case, shape, causal), pts in sorted(lines.items()):
                pts.sort()
                color, marker = style[(case, shape)]
                label = f"{names[(case, shape)]} {'causal' if causal else 'full'}"
                ax.plot(*zip(*pts), "-" if causal else "--", color=color, marker=marker, ms=5, lw=1.6, label=label)
            ax.axhline(1.0, color="black", linewidth=1)
            ax.axhline(1.3, color="gray", linewidth=1, linestyle=":")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dtype}, {MODE_NAMES.get(mode, mode)}")
            ax.grid(True, alpha=0.3)
            if i == len(dtypes) - 1:
                ax.set_xlabel("sequence length n")
        fig.supylabel("peer ms / ours ms  (peer: the fastest SDPA backend)")
        # legend rows: the shapes' colours, then the line styles and guides
        shapes = [Line2D([], [], color=c, marker=m, ms=5, label=names[key]) for key, (c, m) in style.items()]
        styles = [
            Line2D([], [], color="dimgray", linestyle="-", label="causal"),
            Line2D([], [], color="dimgray", linestyle="--", label="full (not causal)"),
            Line2D([], [], color="black", linewidth=1, label="1.0×: as fast as the peer"),
            Line2D([], [], color="gray", linewidth=1, linestyle=":", label="1.3×"),
        ]
        ncol = max(len(shapes), len(styles))
        blank = Line2D([], [], alpha=0, label=" ")
        shapes, styles = (row + [blank] * (ncol - len(row)) for row in (shapes, styles))
        handles = [h for pair in zip(shapes, styles) for h in pair]  # the legend fills column by column
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, title="b x h x d")
        fig.suptitle(title, fontsize="large")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def replot(json_path: Path, png_path: Path | None = None) -> Path:
    """Redraw a benchmark JSON's plot (beside it, as a run writes it, unless png_path) without rerunning it."""
    data = json.loads(Path(json_path).read_text())
    png_path = png_path or Path(json_path).with_suffix(".png")
    plot(data["rows"], png_path, plot_title(data))
    return png_path


# ---------------------------------------------------------------------------------------------------------------
# timing and memory


def rank_configurations(rows: list[dict], point_keys: tuple, config_keys: tuple):
    """For a launch-configuration sweep (`bench_decode --tune`, `tune_attention`): rows carry the point's keys, the
    configuration's keys and "ms" (None where the configuration failed). Returns (best row per point, ranking): the
    ranking is [(geomean of ms / the point's best ms, configuration tuple, {point: ratio})], lowest first, over the
    configurations that ran at every point. A rule must hold across points; the ranking says which one does."""
    point = lambda r: tuple(r[k] for k in point_keys)  # noqa: E731
    points = sorted({point(r) for r in rows})
    timed = [r for r in rows if r.get("ms")]
    best = {p: min((r for r in timed if point(r) == p), key=lambda r: r["ms"], default=None) for p in points}
    by_config: dict = {}
    for r in timed:
        by_config.setdefault(tuple(r[k] for k in config_keys), {})[point(r)] = r["ms"] / best[point(r)]["ms"]
    ranked = sorted(
        (statistics.geometric_mean(rel.values()), cfg, rel) for cfg, rel in by_config.items() if len(rel) == len(points)
    )
    return best, ranked


def max_rel_diff(outs, refs) -> float:
    """max |a − r| / max |r| for a tensor, or the largest over a tuple of them (outputs and gradients)."""
    as_tuple = lambda t: t if isinstance(t, tuple) else (t,)  # noqa: E731
    return max(
        ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
        for a, r in zip(as_tuple(outs), as_tuple(refs))
    )


TIMERS = ("wall", "device")
TIMER_NAMES = {
    "wall": "triton.testing.do_bench median",
    "device": "device time: median of CUDA-event samples queued behind a GPU sleep (host issue hidden)",
}


def make_timer(
    device: torch.device, *, warmup_ms: float, rep_ms: float, smoke_reps: int, kind: str = "wall"
) -> Callable:
    """fn -> median ms. On a GPU, `kind` "wall" is do_bench (the host's issue time shows where it exceeds the
    kernels'), "device" is `device_median` (the kernels alone). On the CPU, perf_counter (a smoke run's)."""
    if kind not in TIMERS:
        raise ValueError(f"timer kind must be one of {TIMERS}; got {kind!r}")
    if device.type != "cuda":
        return lambda fn: cpu_median(fn, reps=smoke_reps)
    if kind == "device":
        clock = CudaClock()  # one per timer: the sleep is calibrated once, not once per timed function
        return lambda fn: device_median(fn, clock=clock)
    return lambda fn: bench_median(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)


def timer_name(smoke: bool, kind: str) -> str:
    return "perf_counter median (smoke)" if smoke else TIMER_NAMES[kind]


class CudaClock:
    """What `device_median` needs of the GPU; a test substitutes a simulated one."""

    def __init__(self):
        self._cycles_per_ms = None

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def perf_ms(self) -> float:
        return time.perf_counter() * 1e3

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def sleep_ms(self, ms: float) -> None:
        """Keep the GPU busy for about `ms` (torch.cuda._sleep spins for a number of clock cycles)."""
        if self._cycles_per_ms is None:
            self.synchronize()
            start, end = self.event(), self.event()
            start.record()
            torch.cuda._sleep(10_000_000)
            end.record()
            self.synchronize()
            self._cycles_per_ms = 10_000_000 / max(start.elapsed_time(end), 1e-3)
        torch.cuda._sleep(int(ms * self._cycles_per_ms))


def device_median(fn, *, samples: int = 15, calls: int = 10, sleep_ms: float = 20.0, max_sleep_ms: float = 640.0,
                  clock=None) -> float:  # fmt: skip
    """Median ms per call of fn's device time alone. Each sample queues `calls` calls behind a GPU sleep and times
    them with CUDA events recorded after the sleep and after the last call, so the kernels run back to back and the
    host's issue time between calls is not in the figure. That holds only if the host finished issuing before the
    sleep ended: the sleep's real length is measured by an event before it, and a sample whose issue took longer
    is discarded, after which the sleep doubles (up to `max_sleep_ms`) and then `calls` halves (a full launch queue
    blocks the host until the GPU drains it, which no sleep cures). Raises if one call alone cannot be hidden."""
    clock = clock or CudaClock()
    fn()
    clock.synchronize()
    times: list[float] = []
    while len(times) < samples:
        before, start, end = clock.event(), clock.event(), clock.event()
        clock.synchronize()
        t0 = clock.perf_ms()
        before.record()
        clock.sleep_ms(sleep_ms)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        issued_ms = clock.perf_ms() - t0
        clock.synchronize()
        slept_ms = before.elapsed_time(start)
        if issued_ms < 0.9 * slept_ms:
            times.append(start.elapsed_time(end) / calls)
        elif sleep_ms < max_sleep_ms:
            sleep_ms *= 2
        elif calls > 1:
            calls //= 2
        else:
            raise RuntimeError(
                f"device_median: one call's host issue ({issued_ms:.1f} ms) outlasts a {slept_ms:.1f} ms GPU sleep; "
                "its device time cannot be separated from the host's"
            )
    return statistics.median(times)


def check_and_time(row: dict, settings, fn, ref, timer, tolerance: float) -> dict:
    """One configuration of a sweep: under `settings` (a context manager applying it), fn's output (a tensor or a
    tuple of them) is compared with `ref` (`max_rel_diff`) and timed only if it agrees within `tolerance`; a
    configuration that raises (out of shared memory, registers) keeps its reason. Fills max_rel_diff, ok, ms (None
    unless timed) and error into `row`."""
    try:
        with settings:
            diff = max_rel_diff(fn(), ref)
            row.update(max_rel_diff=diff, ok=diff <= tolerance)
            row["ms"] = timer(fn) if row["ok"] else None
    except Exception as err:
        row.update(ok=False, ms=None, error=failure_reason(err))
    return row


def sweep_points(points, run_point, describe, *, json_path, meta: dict, device: torch.device) -> list[dict]:
    """The loop of a launch-configuration sweep: `run_point(point, record)` returns one row per configuration, each
    with `current_ms` (the op as configured now) and `ms` (None where the configuration failed), and calls
    `record(rows so far)` after each, so the JSON keeps every configuration timed before an interruption. A line per
    point; the JSON marked complete at the end."""
    rows: list[dict] = []
    for point in points:
        # `rows` holds the finished points while run_point runs
        got = run_point(point, lambda r: record_rows(json_path, meta, rows + r))
        rows.extend(got)
        ran = [r for r in got if r.get("ms")]
        line = f"{describe(point)}: {len(ran)}/{len(got)} configurations ran"
        if ran:
            line += f"; current {got[0]['current_ms']:.4f} ms, best {min(r['ms'] for r in ran):.4f}"
        print(line, flush=True)
        record_rows(json_path, meta, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record_rows(json_path, meta, rows, complete=True)
    if meta["smoke"]:
        print("SMOKE RUN on CPU: perf_counter medians; the interpreter ignores launch configurations")
    return rows


def bench_median(fn, *, warmup_ms: float, rep_ms: float, do_bench=None) -> float:
    """Median ms by triton.testing.do_bench, whichever of `return_mode` / `quantiles` this Triton takes."""
    if do_bench is None:
        from triton.testing import do_bench
    params = inspect.signature(do_bench).parameters
    if "return_mode" in params:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    if "quantiles" in params:
        res = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
        return float(res[0] if isinstance(res, (list, tuple)) else res)
    raise RuntimeError(f"triton.testing.do_bench{inspect.signature(do_bench)} takes neither return_mode nor quantiles")


def cpu_median(fn, *, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device: torch.device) -> float | None:
    """Peak allocation of one run above what was allocated before it (inputs, kept outputs)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # tensors held by reference cycles (e.g. a caught exception's frames) go before empty_cache
        # a broken context raises here too; _cuda_alive reports it after the point
        with contextlib.suppress(RuntimeError):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def _cuda_alive(device: torch.device) -> bool:
    """After an illegal access the CUDA context is unusable for the rest of the process."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


@contextlib.contextmanager
def sdpa_backend(name: str):
    """Pin SDPA to one backend ("auto": the default dispatch). Refusals raise; their warnings are noise here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "auto":
            yield
        else:
            with sdpa_kernel(pinned[name]):
                yield


# ---------------------------------------------------------------------------------------------------------------
# implementations


def make_inputs(p: Point, device: torch.device) -> dict:
    """Fresh randn inputs; for fwd+bwd they require grad and a fixed random upstream gradient `do` is drawn."""
    dtype = DTYPES[p.dtype]
    grad = p.mode == "fwdbwd"

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    q = randn(p.b, p.h, p.n, p.d)
    k, v = randn(p.b, p.hk, p.n, p.d), randn(p.b, p.hk, p.n, p.d)
    mask = None
    if p.case == "mask":
        # trailing key padding: every query keeps at least the first 75% of keys
        mask = torch.ones(p.b, p.n, dtype=torch.bool, device=device)
        mask[:, p.n - int(p.n * MASKED_FRACTION) :] = False
    do = torch.randn(p.b, p.h, p.n, p.d, device=device, dtype=dtype) if grad else None
    return {"q": q, "k": k, "v": v, "mask": mask, "do": do}


def ours_forward(x: dict, p: Point):
    q, k, v, mask = x["q"], x["k"], x["v"], x["mask"]
    return lambda: cosine_sim_attention(q, k, v, mask=mask, causal=p.causal, scale=SCALE)


def peer_forward(x: dict, p: Point):
    q, k, v = x["q"], x["k"], x["v"]
    # a bool (b, 1, 1, n) mask rules out the flash (and, depending on version, cudnn) backend
    attn_mask = x["mask"][:, None, None, :] if x["mask"] is not None else None
    gqa = {"enable_gqa": True} if p.hk != p.h else {}

    def forward():
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return F.scaled_dot_product_attention(qn, kn, v, attn_mask=attn_mask, is_causal=p.causal, scale=SCALE, **gqa)

    return forward


def reference_forward(x: dict, p: Point):
    q, k, v, mask = x["q"], x["k"], x["v"], x["mask"]
    return lambda: attention_reference(q, k, v, mask=mask, causal=p.causal, scale=SCALE)


def make_run(forward, x: dict, p: Point):
    """The timed closure: forward only, or forward + backward through autograd.grad (nothing accumulates)."""
    if p.mode == "fwd":
        return lambda: (forward(),)
    inputs = (x["q"], x["k"], x["v"])

    def run():
        o = forward()
        return (o, *torch.autograd.grad(o, inputs, x["do"]))

    return run


def compare(ours: tuple, peer: tuple) -> tuple[float, float]:
    """(max |o_ours − o_peer|, worst over o and grads of ‖diff‖ / ‖peer‖). A norm ratio, not max/max: two
    correct 16-bit results differ by an ulp somewhere, which is percents of a small output's largest entry."""
    abs_o, rel = 0.0, 0.0
    for idx, (a, b) in enumerate(zip(ours, peer)):
        if a.shape != b.shape:
            raise ValueError(f"output {idx} shapes differ: ours {tuple(a.shape)}, peer {tuple(b.shape)}")
        delta = a.float() - b.float()
        diff = delta.norm().item()
        scale = b.float().norm().item()
        if idx == 0:
            abs_o = delta.abs().max().item()
        r = diff / scale if scale > 0 else diff
        rel = max(rel, r if math.isfinite(r) else math.inf)  # NaN must not compare as "close"
    return abs_o, rel


def failure_reason(e: BaseException) -> str:
    """A failed variant's one-line reason for its row: "out of memory", or the exception's type and first line."""
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {first[:160]}"


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    if any(m in first for m in ("No available kernel", "No viable backend")):
        return UNSUPPORTED
    return failure_reason(e)


def _error_note(errors: dict) -> str:
    refused = [k for k, v in errors.items() if v == UNSUPPORTED]
    failed = {k: v for k, v in errors.items() if v != UNSUPPORTED}
    return (f" | {UNSUPPORTED}: {','.join(refused)}" if refused else "") + (f" | errors: {failed}" if failed else "")


# points with a time under this (ms) get a second timing round (see the module docstring)
REPEAT_BELOW_MS = 2.0


class Runner:
    """Times one point's implementations; any failure of one impl is recorded and the others go on."""

    def __init__(
        self,
        device: torch.device,
        *,
        warmup_ms: float,
        rep_ms: float,
        smoke_reps: int = 3,
        repeat_below_ms: float = 0.0,
    ):
        self.device = device
        self.warmup_ms, self.rep_ms, self.smoke_reps = warmup_ms, rep_ms, smoke_reps
        self.repeat_below_ms = repeat_below_ms

    def time(self, fn) -> float:
        if self.device.type == "cuda":
            return bench_median(fn, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)
        return cpu_median(fn, reps=self.smoke_reps)

    def _second_round(self, m: dict, ours_run, peer_runs: dict) -> None:
        """Host-sensitive points: time every implementation again, in the same order, keep each one's lower."""
        times = [t for t in (m["ours_ms"], *m["peer_all"].values()) if t is not None]
        if not times or min(times) >= self.repeat_below_ms:
            return
        if m["ours_ms"] is not None:
            again = self.attempt(m["errors"], "ours", self.time, ours_run)
            m["ours_ms"] = min(m["ours_ms"], again) if again is not None else m["ours_ms"]
        for backend, run in peer_runs.items():
            with sdpa_backend(backend):
                again = self.attempt(m["errors"], backend, self.time, run)
            if again is not None:
                m["peer_all"][backend] = min(m["peer_all"][backend], again)

    def attempt(self, errors: dict, name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # one failing impl must not end the run
            errors[name] = _error_text(e)
            _free(self.device)
            return None

    def bench_point(self, p: Point, backends, ref_max_n: int) -> dict:
        x = make_inputs(p, self.device)
        errors: dict[str, str] = {}
        # the check run also compiles/autotunes, so it stays outside the timing
        ours_run = make_run(ours_forward(x, p), x, p)
        ours_out = self.attempt(errors, "ours", ours_run)
        m = {"errors": errors, "ours_ms": None, "peer_all": {}, "peer_mib_all": {}}
        peer_runs = {}
        if ours_out is not None:
            m["ours_ms"] = self.attempt(errors, "ours", self.time, ours_run)
            m["ours_mib"] = self.attempt(errors, "ours_mib", peak_mib, ours_run, self.device)

        for backend in backends:
            m["peer_all"][backend] = m["peer_mib_all"][backend] = None
            with sdpa_backend(backend):
                run = make_run(peer_forward(x, p), x, p)
                out = self.attempt(errors, backend, run)
                if out is None:
                    continue
                diffs = self.attempt(errors, f"{backend}_check", compare, ours_out, out) if ours_out else None
                # judged against the closest backend: they differ among themselves by their own rounding
                if diffs is not None and ("max_rel_diff" not in m or diffs[1] < m["max_rel_diff"]):
                    m["max_abs_diff"], m["max_rel_diff"] = diffs
                del out
                m["peer_all"][backend] = self.attempt(errors, backend, self.time, run)
                m["peer_mib_all"][backend] = self.attempt(errors, f"{backend}_mib", peak_mib, run, self.device)
                if m["peer_all"][backend] is not None:
                    peer_runs[backend] = run
        del ours_out
        self._second_round(m, ours_run, peer_runs)

        if p.n <= ref_max_n:
            ref_run = make_run(reference_forward(x, p), x, p)
            m["ref_ms"] = self.attempt(errors, "reference", self.time, ref_run)
            if m["ref_ms"] is not None:
                m["ref_mib"] = self.attempt(errors, "reference_mib", peak_mib, ref_run, self.device)
        del x
        _free(self.device)
        return make_row(p, **m)


# ---------------------------------------------------------------------------------------------------------------
# command line


def _split(values) -> list[str]:
    """Accept both `--n 1024 2048` and `--n 1024,2048`."""
    return [s for v in values for s in str(v).split(",") if s]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """ "BxHxD" or "BxHxHKxD" → (b, h, hk, d)."""
    parts = text.lower().split("x")
    try:
        nums = [int(s) for s in parts]
    except ValueError:
        nums = []
    if len(nums) == 3:
        b, h, d = nums
        hk = h
    elif len(nums) == 4:
        b, h, hk, d = nums
    else:
        raise argparse.ArgumentTypeError(f"--shape must look like 4x8x64 (b x h x d) or 4x16x4x128; got {text!r}")
    if min(nums) < 1 or h % hk:
        raise argparse.ArgumentTypeError(f"--shape needs positive sizes with h % hk == 0; got {text!r}")
    return b, h, hk, d


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", nargs="+", help=f"of {list(DTYPES)} (default: {' '.join(DEFAULT_DTYPES)})")
    ap.add_argument("--n", nargs="+", help=f"sequence lengths (default: {' '.join(map(str, DEFAULT_NS))})")
    ap.add_argument("--shape", nargs="+", help="b x h x d (or b x h x hk x d) (default: 4x8x64 4x16x128)")
    ap.add_argument("--causal", choices=["0", "1", "both"], default="both")
    ap.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default="both")
    ap.add_argument("--backends", nargs="+", help=f"peer SDPA backends of {list(BACKENDS)} (default: auto cudnn flash)")
    ap.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True, help="key-padding and GQA cases")
    ap.add_argument("--quick", action="store_true", help="bf16, n in {1024, 4096} (unless --dtype / --n are given)")
    ap.add_argument("--out-dir", type=Path, default=DOCS / "benchmarks", help="JSON and PNG go to <out-dir>/<gpu>.*")
    ap.add_argument("--out-json", type=Path, default=None, help="write the JSON here instead (PNG beside it)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--summary", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="stop adding points after")
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run, never written to docs/"
    )
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--ref-max-n", type=int, default=4096, help="time the O(n²) reference up to this n (0: never)")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only redraw JSON's plot (PNG beside it)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.replot is not None:
        given = [k for k, v in vars(args).items() if k != "replot" and v != ap.get_default(k)]
        if given:
            ap.error(
                f"--replot redraws from the JSON alone; got also {', '.join('--' + k.replace('_', '-') for k in given)}"
            )
        if not args.replot.is_file():
            ap.error(f"--replot {args.replot}: no such file")
        return args
    quick = args.quick
    try:
        args.dtype = _split(args.dtype) if args.dtype else list(QUICK_DTYPES if quick else DEFAULT_DTYPES)
        args.n = [int(s) for s in _split(args.n)] if args.n else list(QUICK_NS if quick else DEFAULT_NS)
        args.shape = [parse_shape(s) for s in _split(args.shape)] if args.shape else list(DEFAULT_SHAPES)
    except (ValueError, argparse.ArgumentTypeError) as e:
        ap.error(str(e))
    args.backends = _split(args.backends) if args.backends else list(DEFAULT_BACKENDS)
    for dt in args.dtype:
        if dt not in DTYPES:
            ap.error(f"--dtype must be among {list(DTYPES)}; got {dt!r}")
    for bk in args.backends:
        if bk not in BACKENDS:
            ap.error(f"--backends must be among {list(BACKENDS)}; got {bk!r}")
    if any(n < 1 for n in args.n):
        ap.error(f"--n must be positive; got {args.n}")
    args.causals = [False, True] if args.causal == "both" else [args.causal == "1"]
    args.modes = list(MODES) if args.mode == "both" else [args.mode]
    return args


def json_output(out_json: Path | None, meta: dict, default: Callable[[str], Path]) -> Path | None:
    """Where a benchmark writes its JSON (every benchmark tool's rule): --out-json if given, else `default(slug of
    the GPU's name)`. A smoke run (CPU: timings meaningless) writes only where --out-json says, never under docs/."""
    if meta["smoke"]:
        if out_json is not None and out_json.resolve().is_relative_to(DOCS.resolve()):
            raise SystemExit(f"--out-json {out_json}: a --device cpu smoke run is never written under docs/")
        return out_json
    return out_json if out_json is not None else default(slugify(meta["gpu"]))


def output_paths(args, meta: dict) -> tuple[Path | None, Path | None]:
    """(json, png), by `json_output`; the plot beside the JSON unless --no-plot."""
    json_path = json_output(args.out_json, meta, lambda gpu: args.out_dir / f"{gpu}.json")
    if json_path is None:
        return None, None
    return json_path, None if args.no_plot else json_path.with_suffix(".png")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """The command line (scripts/benchmark.py): parse, run, print (or with --replot, redraw); exit status 0."""
    args = parse_args(argv)
    if args.replot is not None:
        print(f"wrote {replot(args.replot)}")
        return 0
    run(args, argv)
    return 0


def run(args: argparse.Namespace, argv=None) -> list[dict]:
    """The benchmark of `parse_args`' options: rows as written to the JSON."""
    device = benchmark_device(args.device)
    meta = environment(device)
    meta.update(
        scale=SCALE,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        timer="perf_counter median (smoke)"
        if meta["smoke"]
        else f"triton.testing.do_bench median; under {REPEAT_BELOW_MS:g} ms the lower of two rounds",
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    json_path, png_path = output_paths(args, meta)
    points = build_grid(args.dtype, args.shape, args.n, args.causals, args.modes, extras=args.extras)
    est = estimate_seconds(
        points, n_peers=len(args.backends), ref_max_n=args.ref_max_n, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms
    )
    label = "SMOKE RUN on CPU (timings meaningless)" if meta["smoke"] else meta["gpu"]
    print(
        f"{label} | torch {meta['torch']} triton {meta['triton']} cuda {meta['cuda']} | {len(points)} points, "
        f"backends {','.join(args.backends)} | estimate ~{est:.0f} s at {ASSUMED_TFLOPS:.0f} TFLOP/s "
        "(plus compilation)",
        flush=True,
    )

    runner = Runner(
        device,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        repeat_below_ms=REPEAT_BELOW_MS if device.type == "cuda" else 0.0,
    )
    rows: list[dict] = []
    stopped = None
    t0 = time.perf_counter()
    # `timeout` sends SIGTERM: treat it like Ctrl-C so the table of what was measured still prints
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for idx, p in enumerate(points):
            elapsed = time.perf_counter() - t0
            if args.time_budget is not None and elapsed > args.time_budget:
                stopped = (
                    f"time budget {args.time_budget:.0f} s exceeded after {elapsed:.0f} s: "
                    f"{len(points) - idx} of {len(points)} points skipped"
                )
                break
            row = runner.bench_point(p, args.backends, args.ref_max_n)
            rows.append(row)
            print(
                f"[{idx + 1}/{len(points)} {time.perf_counter() - t0:6.1f}s] {p.label}: "
                f"ours {_fmt(row['ours_ms'], '.3f')} ms, peer {_fmt(row['peer_ms'], '.3f')} ms "
                f"({row['peer_backend']}), ratio {_fmt(row['ratio'], '.2f')}, "
                f"{_ok_cell(row)}{_error_note(row['errors'])}",
                flush=True,
            )
            if json_path is not None:
                write_json(json_path, {**meta, "complete": False}, rows)
            if not _cuda_alive(device):
                stopped = f"the CUDA context broke at point {idx + 1} ({row['errors']}); later points not run"
                break
    except KeyboardInterrupt:
        stopped = f"interrupted after {len(rows)} of {len(points)} points"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    if json_path is not None:
        write_json(json_path, {**meta, "complete": stopped is None, "stopped": stopped}, rows)
        print(f"wrote {json_path}", flush=True)
    if png_path is not None and rows:
        try:
            plot(rows, png_path, plot_title(meta))
            print(f"wrote {png_path}", flush=True)
        except Exception as e:  # a plotting problem must not cost the table
            print(f"plot not written: {_error_text(e)}", flush=True)
    if stopped:
        print(f"STOPPED: {stopped}", flush=True)
    if meta["smoke"]:
        print("SMOKE RUN on CPU: timings are perf_counter medians, not GPU numbers")
    print(format_table(rows))
    if args.summary:
        print(summary_line(rows))
    sys.stdout.flush()
    return rows
