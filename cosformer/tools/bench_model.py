"""Training-step throughput of the model zoo, eager and compiled side by side: cosine vs regular attention, same
model otherwise.

A 12-layer, 512-dim, 8-head decoder (dim_head 64, vocab 256, post-LN defaults) is trained on random tokens with a
fixed token budget per step (16k), so seq 1024 runs batch 16 and seq 8192 runs batch 2. One step is forward +
backward under bf16 autocast + an AdamW step (fused on CUDA; `--no-optimizer` leaves it out). After warm-up steps
(which also absorb compilation and Triton autotuning), each step is timed with CUDA events (wall clock on CPU) and
the median is reported, with the peak allocated memory of the case.

Attention variants (`--attn`): cosine (the op), regular (SDPA with the usual 1/sqrt(d) scale, no normalisation) and
normalize-sdpa: the cosine model with the op replaced by `F.scaled_dot_product_attention(F.normalize(q),
F.normalize(k), v, scale=10)`, the same function through the regular kernels (for this benchmark only: the op's
name in `cosformer.attention` is patched for that case and restored after it). Modes (`--modes`): eager, and
`cosformer.compile_model` with torch.compile's default mode, reduce-overhead (CUDA graphs; CUDA only, skipped with
a note on CPU) or max-autotune. Each mode and length resets dynamo, builds a fresh model per variant (compiled for
its own shapes, `--dynamic`), warms each up, then times them in interleaved rounds (`--rounds`: the variants take
turns, their order rotated each round), so that the host's slow and fast spells, which move absolute rates by tens of
percent on shared machines, fall on every variant alike. The table, printed last, gives each row's tokens/s relative
to regular attention in the same mode.

`--profile REPORT` asks whether a row's tokens/s measures kernels or the host: after a group's timing, each case runs
`--profile-steps` (5) more steps under `torch.profiler` (CPU and CUDA activity; CPU only on `--device cpu`), outside
the timed steps, whose numbers it leaves alone. Each row gains `device_ms`, the summed device time (kernels, memcpy,
memset) per step, and `host_bound`, its step_ms over device_ms: near 1 the GPU was busy the whole step, well above 1
it waited on the host. On CPU there is no device activity, so both are null. REPORT lists, per case, the top
`--profile-top` (25) device kernels and the top 12 CPU ops by self time, per step; the table gains a `device ms`
column.

    python scripts/bench_model.py --modes eager default --seqs 1024 --profile prof.txt --out m.json

    python scripts/bench_model.py --out runs/bench_model.json                 # GPU: eager and compiled rows
    python scripts/bench_model.py --out m.json --modes eager default reduce-overhead
    python scripts/bench_model.py --device cpu --tiny --out /tmp/bm.json      # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import cosformer.attention
from cosformer import AutoregressiveWrapper, Decoder, TransformerWrapper, compile_model

FULL = dict(depth=12, dim=512, heads=8, dim_head=64, seqs=(1024, 8192), tokens_per_step=16384, steps=20, warmup=5)
TINY = dict(depth=2, dim=64, heads=2, dim_head=32, seqs=(64, 128), tokens_per_step=256, steps=3, warmup=1)
VOCAB = 256
ATTNS = ("cosine", "regular", "normalize-sdpa")
MODES = ("eager", "default", "reduce-overhead", "max-autotune")
CUDA_ONLY_MODES = {"reduce-overhead": "CUDA graphs need a CUDA device"}
MIN_WARMUP = {"reduce-overhead": 3}  # CUDA graph trees: a warm-up run, a recording, then replays
PROFILE_STEPS, PROFILE_TOP, PROFILE_CPU_TOP, PROFILE_NAME = 5, 25, 12, 110


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny model and short sequences (CPU smoke test)")
    p.add_argument("--attn", nargs="+", default=list(ATTNS), choices=ATTNS, help="attention variants (all three)")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "default"],
        choices=MODES,
        help="eager and/or torch.compile modes, each a row per variant and length (default: eager default)",
    )
    p.add_argument("--seqs", nargs="+", type=int, help="sequence lengths (default 1024 8192; tiny: 64 128)")
    p.add_argument("--tokens-per-step", type=int, help="batch = tokens_per_step // seq (default 16384)")
    p.add_argument("--steps", type=int, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds per mode and length (default 4)")
    p.add_argument("--no-optimizer", action="store_true", help="time forward + backward only")
    p.add_argument("--no-autocast", action="store_true", help="run in float32 instead of bf16 autocast")
    p.add_argument(
        "--dynamic",
        choices=["auto", "true", "false"],
        default="auto",
        help="compiled rows: dynamic shapes (auto: static for the case's one shape)",
    )
    p.add_argument("--profile", type=Path, help="profile each case after its timing; write the report to this file")
    p.add_argument("--profile-steps", type=int, help=f"--profile: steps profiled per case (default {PROFILE_STEPS})")
    p.add_argument("--profile-top", type=int, help=f"--profile: device kernels listed per case (default {PROFILE_TOP})")
    args = p.parse_args(argv)
    if args.profile is None and (args.profile_steps is not None or args.profile_top is not None):
        p.error("--profile-steps and --profile-top need --profile")
    args.profile_steps = PROFILE_STEPS if args.profile_steps is None else args.profile_steps
    args.profile_top = PROFILE_TOP if args.profile_top is None else args.profile_top
    if args.profile_steps < 1 or args.profile_top < 1:
        p.error(f"--profile-steps and --profile-top must be >= 1, got {args.profile_steps} and {args.profile_top}")
    return args


def normalize_sdpa(q, k, v, *, mask=None, attn_bias=None, causal=False, scale=10.0, l2norm_qk=True, groups=1,
                   alibi_slopes=None, attn_bias_batch_dim=False, segment_ids=None):  # fmt: skip
    """The op's function through the regular kernels: SDPA on F.normalize'd q and k with a fixed scale. Only what
    this benchmark's model uses (no mask, bias, ALiBi, segment ids or l2norm groups; causal with as many queries as
    keys)."""
    if mask is not None or attn_bias is not None or alibi_slopes is not None or segment_ids is not None or groups != 1:
        raise ValueError(
            "normalize_sdpa: mask, attn_bias, alibi_slopes, segment_ids and groups > 1 are not part of the benchmark"
        )
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"normalize_sdpa: causal needs q_len == k_len (SDPA aligns top-left), got {q.shape}, {k.shape}"
        )
    if l2norm_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def build_model(attn: str, seq: int, cfg: dict) -> AutoregressiveWrapper:
    """normalize-sdpa builds the cosine model; its steps run under `_swap`, which replaces its attention function."""
    kind = "cosine" if attn == "normalize-sdpa" else attn
    layers = Decoder(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"], dim_head=cfg["dim_head"], attn=kind)
    return AutoregressiveWrapper(TransformerWrapper(num_tokens=VOCAB, max_seq_len=seq, attn_layers=layers))


def _swap(attn: str):
    """The context a variant's steps run in: normalize-sdpa patches the op's name in `cosformer.attention` (its
    compiled graph guards on that global, so every one of its steps runs patched, not only the first)."""
    if attn == "normalize-sdpa":
        return mock.patch.object(cosformer.attention, "cosine_sim_attention", normalize_sdpa)
    return contextlib.nullcontext()


@dataclass
class Case:
    """One variant at one mode and length: built, compiled and warmed up, ready to time."""

    attn: str
    batch: int
    params: int
    step: Callable[[], torch.Tensor]  # one training step; returns its loss
    peak_mib: float | None
    times_ms: list[float] = field(default_factory=list)
    loss: float | None = None


def build_case(attn: str, mode: str, seq: int, cfg: dict, args: argparse.Namespace) -> Case:
    """A fresh model (seed 0) and optimiser, compiled for `mode`, and its warm-up steps (compilation, autotuning,
    CUDA-graph recording). Peak memory: the most allocated during build and warm-up above what was allocated before
    (other variants of the group stay alive while this one is measured)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    batch = max(1, cfg["tokens_per_step"] // seq)
    model = build_model(attn, seq, cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = None if args.no_optimizer else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    forward = model
    if mode != "eager":
        dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
        forward = compile_model(model, dynamic=dynamic, mode=mode)
    graphs = mode == "reduce-overhead"
    x = torch.randint(0, VOCAB, (batch, seq + 1), device=device)  # the wrapper predicts x[:, 1:] from x[:, :-1]

    def step() -> torch.Tensor:
        if graphs:
            # a new iteration: the previous step's graph outputs (its loss) may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast):
            loss = forward(x)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss.detach().clone() if graphs else loss

    with _swap(attn):
        for _ in range(max(cfg["warmup"], MIN_WARMUP.get(mode, 0))):
            step()
    peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return Case(attn, batch, params, step, peak_mib)


def time_steps(case: Case, n: int, device: torch.device) -> None:
    """Times n steps of `case` (CUDA events on a GPU, wall clock on CPU), appending to its times."""
    with _swap(case.attn):
        for _ in range(n):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = case.step()
                end.record()
                torch.cuda.synchronize(device)
                case.times_ms.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                loss = case.step()
                case.times_ms.append((time.perf_counter() - t0) * 1e3)
    case.loss = loss.item()


@dataclass
class StepProfile:
    """What the profiler saw in one case's steps, per step. `kernels` and `cpu_ops` are (ms per step, launches per
    step, name), longest first, as in `cosformer.tools.profiling.kernel_times`; `device_ms` sums the kernels (None on
    CPU, where there is no device activity)."""

    device_ms: float | None
    kernels: list[tuple[float, float, str]]
    cpu_ops: list[tuple[float, float, str]]


def profile_steps(case: Case, n: int, device: torch.device) -> StepProfile:
    """n more steps of `case` under `torch.profiler`, CPU and (on a GPU) CUDA activity in one window, so that both
    lists describe the same steps. (`profiling.kernel_times` records one activity per window and warms up first:
    here the case is warm, and both views are wanted.) Every device event counts towards device_ms, including those
    of kernels that ran in only some of the steps."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _swap(case.attn):
        if cuda:
            torch.cuda.synchronize(device)  # earlier steps' kernels stay out of the window
        with profile(activities=activities) as prof:
            for _ in range(n):
                case.step()  # marks a CUDA-graph step begin itself, as in the timed steps
            if cuda:
                torch.cuda.synchronize(device)
    kernels, cpu_ops = [], []
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0:
            kernels.append((e.self_device_time_total / n / 1e3, e.count / n, e.key))
        elif e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0:
            cpu_ops.append((e.self_cpu_time_total / n / 1e3, e.count / n, e.key))
    device_ms = sum(ms for ms, _, _ in kernels) if cuda else None
    return StepProfile(device_ms, sorted(kernels, reverse=True), sorted(cpu_ops, reverse=True))


def format_profile(mode: str, seq: int, attn: str, step_ms: float, prof: StepProfile, top: int) -> list[str]:
    """One case's section of the report: a header with the timed step and the device time per step, then the top
    device kernels (GPU only) and the top CPU ops by self time, per step."""
    device = "n/a on CPU" if prof.device_ms is None else f"{prof.device_ms:.2f} ms per step"
    lines = [f"== {mode} seq={seq} {attn}: step {step_ms:.2f} ms, device kernels {device}"]

    def entries(rows):
        return [f"   {ms:9.3f} ms x{count:<6g} {name[:PROFILE_NAME]}" for ms, count, name in rows]

    if prof.device_ms is not None:
        lines += [f"  top {top} device kernels (ms per step, launches per step)"] + entries(prof.kernels[:top])
    lines += [f"  top {PROFILE_CPU_TOP} CPU ops by self time (ms per step, calls per step)"]
    return lines + entries(prof.cpu_ops[:PROFILE_CPU_TOP])


def schedule(n_cases: int, steps: int, rounds: int) -> list[tuple[int, int]]:
    """(case index, steps) blocks: `steps` per case split into `rounds` near-equal blocks, the cases taking turns,
    their order rotated each round, so that a slow or fast spell of the host falls on every variant alike."""
    rounds = max(1, min(rounds, steps))
    counts = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    return [((r + c) % n_cases, n) for r, n in enumerate(counts) for c in range(n_cases)]


def run_group(attns: list[str], mode: str, seq: int, cfg: dict, args: argparse.Namespace) -> tuple[list, list]:
    """Every variant at one mode and length, built first, then timed in interleaved rounds; one row each. With
    `--profile`, each variant is then profiled; returns the rows and the report's lines (none without it)."""
    device = torch.device(args.device)
    torch._dynamo.reset()  # no graphs, guards or cache-limit counts carried over from the previous group
    cases, rows = {}, {}
    for attn in attns:
        try:
            cases[attn] = build_case(attn, mode, seq, cfg, args)
        except torch.OutOfMemoryError:
            rows[attn] = dict(attn=attn, mode=mode, seq=seq, error="out of memory")
    built = list(cases.values())
    for index, n in schedule(len(built), cfg["steps"], args.rounds) if built else []:
        time_steps(built[index], n, device)
    # only after every variant's timing: no timed step runs under the profiler, or between profiled ones
    profiles = {a: profile_steps(c, args.profile_steps, device) for a, c in cases.items()} if args.profile else {}
    lines = []
    for attn, case in cases.items():
        median_ms = statistics.median(case.times_ms)
        rows[attn] = dict(
            attn=attn,
            mode=mode,
            seq=seq,
            batch=case.batch,
            params=case.params,
            step_ms=median_ms,
            step_ms_all=case.times_ms,
            tokens_per_s=case.batch * seq / (median_ms / 1e3),
            peak_mib=case.peak_mib,
            final_loss=case.loss,
        )
        if attn in profiles:
            device_ms = profiles[attn].device_ms
            rows[attn].update(device_ms=device_ms, host_bound=median_ms / device_ms if device_ms else None)
            lines += format_profile(mode, seq, attn, median_ms, profiles[attn], args.profile_top)
    del cases, built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [rows[attn] for attn in attns], lines


def print_table(meta: dict, results: list[dict], step_desc: str) -> None:
    """One row per (mode, length, variant); `vs regular`: tokens/s over regular attention's in the same mode; `device
    ms` (profiled runs only): the summed device time per step."""
    profiled = "profile" in meta
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['precision']} | {step_desc}")
    header = f"{'mode':<16} {'attn':<15} {'seq':>6} {'batch':>5} {'step ms':>9} {'tokens/s':>12} {'vs regular':>10}"
    print(header + f" {'peak MiB':>9}" + (f" {'device ms':>9}" if profiled else ""))
    regular = {(r["mode"], r["seq"]): r for r in results if r["attn"] == "regular" and "tokens_per_s" in r}
    for r in results:
        lead = f"{r['mode']:<16} {r['attn']:<15} {r['seq']:>6}"
        if "tokens_per_s" not in r:
            print(f"{lead} {r.get('error') or 'skipped: ' + r['skipped']}")
            continue
        ref = regular.get((r["mode"], r["seq"]))
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "n/a"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        line = f"{lead} {r['batch']:>5} {r['step_ms']:>9.2f} {r['tokens_per_s']:>12,.0f} {ratio:>10} {peak:>9}"
        if profiled:
            line += f" {r['device_ms']:>9.2f}" if r["device_ms"] is not None else f" {'n/a':>9}"
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    for key in ("seqs", "tokens_per_step", "steps", "warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is visible; use --device cpu --tiny")

    results, report = [], []
    for mode in args.modes:
        for seq in cfg["seqs"]:
            if args.device != "cuda" and mode in CUDA_ONLY_MODES:
                results += [dict(attn=a, mode=mode, seq=seq, skipped=CUDA_ONLY_MODES[mode]) for a in args.attn]
                continue
            rows, lines = run_group(args.attn, mode, seq, cfg, args)
            results += rows
            report += lines

    meta = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        optimizer_step="none" if args.no_optimizer else "AdamW",
        precision="fp32" if args.no_autocast else "bf16 autocast",
        modes=args.modes,
        dynamic=args.dynamic,
        timing=("median of per-step CUDA event times" if args.device == "cuda" else "median of wall-clock step times")
        + f"; the variants of one mode and length timed in {args.rounds} interleaved rounds",
        rounds=args.rounds,
        model=dict(depth=cfg["depth"], dim=cfg["dim"], heads=cfg["heads"], dim_head=cfg["dim_head"], vocab=VOCAB),
        tokens_per_step=cfg["tokens_per_step"],
        steps=cfg["steps"],
        warmup=cfg["warmup"],
    )
    step_desc = "fwd+bwd" + ("" if args.no_optimizer else "+AdamW")
    if args.profile is not None:
        meta["profile"] = dict(report=str(args.profile), steps=args.profile_steps)
        head = f"# {meta['device']} | torch {meta['torch']} | {meta['precision']} | {step_desc}"
        head += f" | {args.profile_steps} profiled steps per case, after its timing"
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text("\n".join([head, *report]) + "\n")
        print(f"wrote {args.profile}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"wrote {args.out}")
    print_table(meta, results, step_desc)
    return 0
