"""End-to-end generation throughput of the model zoo: `AutoregressiveWrapper.generate` with its KV cache, decoded
eagerly and as compiled fixed-shape steps, cosine vs regular attention.

Model: `AutoregressiveWrapper(TransformerWrapper(num_tokens=256, max_seq_len=M, attn_layers=Decoder(dim=512,
depth=12, heads=8, attn_dim_head=64, attn=ATTN, rotary_pos_emb=True)))`, M = the largest context + new tokens (so
no point reaches generate's sliding window), random weights (seed 0), bf16 on a GPU and fp32 on CPU (`--dtype`);
`--tiny`: dim 64, depth 2, heads 2. Per point (batch b, prompt context n, `--new-tokens` k; random prompt tokens)
and attention kind, two variants:

    eager      model.generate(prompt, k, temperature=0.0)
    compiled   model.generate(prompt, k, temperature=0.0, compile=MODE): every step after the prompt is a fixed-shape
               step compiled once (MODE: --compile-mode, default reduce-overhead, i.e. CUDA graphs); it attends to
               generate's whole reserve, a power of two of positions >= n + k - 1 (at most M), the rest masked

generate is a host loop, so do_bench does not apply: each call is timed with time.perf_counter between
torch.cuda.synchronize() calls. Per attention kind and point, each variant first makes one untimed call (the compiled
one compiles, dynamo reset before it so that every compiled variant pays its own compilation: the row's
first_call_s, shorter when Inductor's on-disk caches hold the graph already), and so does the prefill alone,
`model.net(prompt, cache=KVCache(capacity=n + k - 1))` (the forward that generate's first step makes, eagerly in
both variants). Then `--repeats` rounds time the prefill, the eager
and the compiled call in turn (a slow spell of the host, which moves a host-bound loop's rate by tens of percent,
then falls on all three alike), and each keeps its median. The first token comes from the prefill, so the decoding
phase is the k - 1 steps after it:

    ms/token       (generate − prefill) / (k − 1): one decoding step, b tokens
    decode tok/s   b · (k − 1) / (generate − prefill)
    e2e tok/s      b · k / generate

Before timing, the compiled variant's greedy tokens (from its first call) are compared with the eager ones: `agree`
is the fraction equal. It is reported, not asserted: a rounding difference can flip one greedy choice, and every
token after it differs too. `timed_compiles` counts graphs dynamo compiled during the timed calls (0 expected: the
step is compiled once per batch size and reserve). A variant that fails (out of memory, a compiler error) keeps its
row with the reason, and the table goes on. On a GPU each row also has `peak_gib`, the most its calls held at once
(everything allocated included), and `held_gib`, what was allocated when its point began (the models, plus whatever
earlier points left behind): what an out-of-memory row needs to be explained.

`--device cpu` is a smoke run of the pipeline: labelled so, and never written under docs/. Its compiled variants are
skipped ("compiled decoding is measured on a GPU": Inductor on CPU needs a C++ compiler) unless --compile-mode is
given.

    python scripts/bench_generate.py                                   # b 1/8 x n 1k/4k, 128 new tokens
    python scripts/bench_generate.py --batches 1 --contexts 4096 --compile-mode default --out-json $OUT/gen.json
    python scripts/bench_generate.py --attn cosine cosine-nosplit regular --contexts 8192 32768   # + no split path
    python scripts/bench_generate.py --device cpu --tiny --batches 1 --contexts 8 --new-tokens 4 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from cosattn import decode
from cosformer import AutoregressiveWrapper, Decoder, KVCache, TransformerWrapper
from cosformer.wrappers import COMPILE_MODES

from .benchmark import DOCS, DTYPES, benchmark_device, environment, failure_reason, json_output, record_rows

VOCAB = 256
FULL = dict(dim=512, depth=12, heads=8, dim_head=64)
TINY = dict(dim=64, depth=2, heads=2, dim_head=32)
ATTNS = ("cosine", "regular")
# also on request: the cosine model with the op's split-KV decode path switched off (cosattn.decode.ENABLED), the
# main forward then serving every step: what the split path is worth end to end
NOSPLIT = "cosine-nosplit"
MODES = ("eager", "compiled")
DEFAULT_COMPILE_MODE = "reduce-overhead"
CPU_COMPILED = "compiled decoding is measured on a GPU"
DEFAULT_CONTEXTS = (1024, 4096)
DEFAULT_BATCHES = (1, 8)
COLUMNS = ("attn", "mode", "b", "context", "new", "ms_per_token", "decode_tok_s", "e2e_tok_s", "first_call_s", "agree",
           "peak_gib")  # fmt: skip
HEADERS = ("attn", "mode", "b", "context", "new", "ms/token", "decode tok/s", "e2e tok/s", "first call s", "agree",
           "peak GiB")  # fmt: skip


def build_model(attn: str, max_seq_len: int, cfg: dict, dtype: torch.dtype, device: torch.device):
    attn = attn.removesuffix("-nosplit")
    torch.manual_seed(0)
    layers = Decoder(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"], attn_dim_head=cfg["dim_head"], attn=attn,
                     rotary_pos_emb=True)  # fmt: skip
    net = TransformerWrapper(num_tokens=VOCAB, max_seq_len=max_seq_len, attn_layers=layers)
    return AutoregressiveWrapper(net).to(device=device, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def without_split(fn):
    """fn with the op's split-KV decode path off while it runs (restored after, also on an error)."""

    def call():
        enabled, decode.ENABLED = decode.ENABLED, False
        try:
            return fn()
        finally:
            decode.ENABLED = enabled

    return call


def allocated_gib(device: torch.device, peak: bool = False) -> float | None:
    """Memory held by tensors on a CUDA device now (or at its peak since the last `reset_peak`), GiB; None on CPU."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed_call(fn, device: torch.device) -> tuple[float, object]:
    """(wall-clock seconds, result) of one call between device synchronisations: generate is a host loop of
    launches, so the host's clock around the whole call is its time."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def make_row(point: dict, *, generate_ms_all, prefill_ms, first_call_s, agree=None, timed_compiles=None) -> dict:
    """A timed row: medians and the rates derived from them (see the module docstring); the decode rates are null
    when the generate median does not exceed the prefill's (noise on a smoke run)."""
    b, new = point["b"], point["new"]
    generate_ms = statistics.median(generate_ms_all)
    decode_ms = generate_ms - prefill_ms
    timed = decode_ms > 0
    return dict(
        point,
        generate_ms=generate_ms,
        generate_ms_all=list(generate_ms_all),
        prefill_ms=prefill_ms,
        ms_per_token=decode_ms / (new - 1) if timed else None,
        decode_tok_s=b * (new - 1) / (decode_ms * 1e-3) if timed else None,
        e2e_tok_s=b * new / (generate_ms * 1e-3),
        first_call_s=first_call_s,
        agree=agree,
        timed_compiles=timed_compiles,
    )


@torch.no_grad()
def bench_point(model, attn: str, b: int, n: int, args, device: torch.device) -> list[dict]:
    """The eager and compiled rows of one attention kind at one point (b, n), in MODES order: first calls (the
    compiled one compiles), then `--repeats` rounds timing the prefill, eager and compiled calls in turn, so that
    a slow spell of the host falls on all three alike."""
    new = args.new_tokens
    torch.manual_seed(b * 1_000_003 + n)
    prompt = torch.randint(0, VOCAB, (b, n), device=device)
    points = {mode: dict(attn=attn, mode=mode, compile_mode=args.compile_mode if mode == "compiled" else None, b=b,
                         context=n, new=new, dtype=args.dtype) for mode in MODES}  # fmt: skip
    calls = {"prefill": lambda: model.net(prompt, cache=KVCache(capacity=n + new - 1))}
    for mode, point in points.items():
        if mode == "eager" or point["compile_mode"] is not None:
            calls[mode] = partial(model.generate, prompt, new, temperature=0.0, compile=point["compile_mode"] or False)
    if attn == NOSPLIT:
        calls = {name: without_split(fn) for name, fn in calls.items()}
    errors, first_s, tokens, peak = {}, {}, {}, {}
    held = allocated_gib(device)  # what the point starts with: the models, and anything earlier points left behind
    for name, fn in calls.items():
        if name == "compiled":
            torch._dynamo.reset()  # its own compilation in its first call, and no cache-limit count carried over
        reset_peak(device)
        try:
            first_s[name], out = timed_call(fn, device)
            if name != "prefill":  # the prefill's logits are not compared, and need not stay allocated
                tokens[name] = out
        except Exception as e:
            errors[name] = failure_reason(e)
        peak[name] = allocated_gib(device, peak=True)
    times = {name: [] for name in first_s}
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(args.repeats):
        for name in list(times):
            reset_peak(device)
            try:
                times[name].append(timed_call(calls[name], device)[0] * 1e3)
            except Exception as e:
                errors[name] = failure_reason(e)
                del times[name]
            if peak[name] is not None:
                peak[name] = max(peak[name], allocated_gib(device, peak=True))
    timed_compiles = counters["stats"]["unique_graphs"] - graphs  # the compiled calls' (eager ones compile nothing)

    rows = []
    for mode, point in points.items():
        # peak: the most this variant's calls held at once, what was held before them included; held_gib: at the start
        point = dict(point, held_gib=held, peak_gib=peak.get(mode))
        if mode not in calls:
            rows.append(dict(point, skipped=CPU_COMPILED))
        elif "prefill" in errors or mode in errors:
            rows.append(dict(point, error=errors.get(mode) or f"prefill: {errors['prefill']}"))
        else:
            agree = None
            if mode == "compiled" and "eager" in tokens and tokens["eager"].shape == tokens[mode].shape:
                agree = (tokens[mode] == tokens["eager"]).float().mean().item()
            rows.append(make_row(point, generate_ms_all=times[mode], prefill_ms=statistics.median(times["prefill"]),
                                 first_call_s=first_s[mode], agree=agree,
                                 timed_compiles=timed_compiles if mode == "compiled" else None))  # fmt: skip
    return rows


def _cell(row: dict, col: str) -> str:
    value = row.get(col)
    if value is None:
        return "-"
    if col in ("decode_tok_s", "e2e_tok_s"):
        return f"{value:,.0f}"
    if col == "ms_per_token":
        return f"{value:.3f}"
    if col == "first_call_s":
        return f"{value:.2f}"
    if col == "agree":
        return f"{value:.1%}"
    if col == "peak_gib":
        return f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Fixed-width table, columns HEADERS; a row that was skipped or failed says why after its first five cells."""
    lead = 5  # attn, mode, b, context, new: what every row has
    cells = [list(HEADERS)] + [[_cell(r, c) for c in COLUMNS] for r in rows]
    notes = [None] + [r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error") for r in rows]
    widths = [
        max(len(line[i]) for line, note in zip(cells, notes) if i < lead or not note) for i in range(len(COLUMNS))
    ]
    left = {"attn", "mode"}

    def line(values, note):
        parts = [v.ljust(w) if c in left else v.rjust(w) for c, v, w in zip(COLUMNS, values, widths)]
        return "  ".join(parts[:lead] + [note] if note else parts)

    return "\n".join(line(values, note) for values, note in zip(cells, notes))


def summary_line(rows: list[dict]) -> str | None:
    """Geomean over points of compiled / eager decode tok/s, per attention kind (None when nothing pairs)."""
    eager = {(r["attn"], r["b"], r["context"]): r.get("decode_tok_s") for r in rows if r["mode"] == "eager"}
    parts = []
    for attn in (*ATTNS, NOSPLIT):
        ratios = []
        for r in rows:
            ref = eager.get((r["attn"], r["b"], r["context"]))
            if r["attn"] == attn and r["mode"] == "compiled" and r.get("decode_tok_s") and ref:
                ratios.append(r["decode_tok_s"] / ref)
        if ratios:
            geo = statistics.geometric_mean(ratios)
            parts.append(f"{attn} {geo:.2f}x over {len(ratios)} points")
    return "decode tok/s, compiled over eager (geomean): " + ", ".join(parts) if parts else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), help="prompt tokens n")
    ap.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per call (k >= 2)")
    ap.add_argument("--attn", nargs="+", choices=[*ATTNS, NOSPLIT], default=list(ATTNS),
                    help=f"model variants (default {' '.join(ATTNS)}; {NOSPLIT}: no split-KV path)")  # fmt: skip
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                    help=f"compiled rows' torch.compile mode (default {DEFAULT_COMPILE_MODE}; cpu: none)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per variant (median kept)")
    ap.add_argument("--tiny", action="store_true", help="dim 64, depth 2, heads 2 (CPU smoke test)")
    ap.add_argument("--out-json", type=Path, default=None, help="default (GPU): docs/benchmarks/generate-<gpu>.json")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("contexts", "batches"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} must be positive integers; got {getattr(args, name)}")
    if args.new_tokens < 2:
        ap.error(f"--new-tokens must be at least 2 (the first token comes from the prefill); got {args.new_tokens}")
    if args.repeats < 1:
        ap.error(f"--repeats must be positive; got {args.repeats}")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.compile_mode is None and args.device == "cuda":
        args.compile_mode = DEFAULT_COMPILE_MODE
    return args


def main(argv=None) -> int:
    """The command line (scripts/bench_generate.py): parse, run every point, write the JSON, print the table last."""
    args = parse_args(argv)
    device = benchmark_device(args.device)
    cfg = dict(TINY if args.tiny else FULL)
    max_seq_len = max(args.contexts) + args.new_tokens
    meta = environment(device)
    meta.update(
        model=dict(cfg, vocab=VOCAB, max_seq_len=max_seq_len, rotary_pos_emb=True),
        dtype=args.dtype,
        new_tokens=args.new_tokens,
        compile_mode=args.compile_mode,
        repeats=args.repeats,
        timer="perf_counter median of generate calls, torch.cuda.synchronize() around each"
        + (" (smoke)" if meta["smoke"] else ""),
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    json_path = json_output(args.out_json, meta, lambda gpu: DOCS / "benchmarks" / f"generate-{gpu}.json")
    label = "SMOKE RUN on CPU (timings meaningless)" if meta["smoke"] else meta["gpu"]
    print(f"{label} | torch {meta['torch']} triton {meta['triton']} | {args.dtype} dim={cfg['dim']} "
          f"depth={cfg['depth']} heads={cfg['heads']} | {args.new_tokens} new tokens | compiled: "
          f"{args.compile_mode or 'skipped'}", flush=True)  # fmt: skip
    models = {attn: build_model(attn, max_seq_len, cfg, DTYPES[args.dtype], device) for attn in args.attn}
    rows = []
    for b in args.batches:
        for n in args.contexts:
            for attn, model in models.items():
                point_rows = bench_point(model, attn, b, n, args, device)
                rows += point_rows
                for r in point_rows:
                    done = r.get("skipped") or r.get("error")
                    print(f"{attn} {r['mode']} b={b} n={n}: " + (done or f"{_cell(r, 'ms_per_token')} ms/token, "
                          f"{_cell(r, 'e2e_tok_s')} tok/s end to end, first call {r['first_call_s']:.2f} s"),
                          flush=True)  # fmt: skip
                record_rows(json_path, meta, rows)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    record_rows(json_path, meta, rows, complete=True)
    if meta["smoke"]:
        print("SMOKE RUN on CPU: timings are perf_counter medians of a CPU run, not GPU numbers")
    summary = summary_line(rows)
    if summary:
        print(summary)
    print(format_table(rows))
    return 0
