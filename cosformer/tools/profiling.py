"""Where the attention op's time goes, next to the peer's (scripts/profile_attention.py).

Two views, both for ours (`cosine_sim_attention`) and the peer (`F.scaled_dot_product_attention` on
`F.normalize(q)`, `F.normalize(k)`, scale 10), forward + backward through autograd:
- kernels: the time of each device kernel per call, from `torch.profiler` (CUDA activity on a GPU);
- host vs device: wall time per call when calls are issued without synchronising (what the host costs), the summed
  kernel time per call (what the GPU costs), and the `triton.testing.do_bench` median the benchmark reports. When
  the first exceeds the second the call is host-bound and the benchmark's ratio measures Python and launch
  overhead, not kernels.

On a CPU (`--device cpu`) the same code runs as a smoke test: CPU activity, fp32, tiny shapes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cosattn import cosine_sim_attention

LONG_POINTS = [(4, 16, 16384, 128, False), (4, 16, 16384, 128, True), (4, 8, 16384, 64, False)]
SHORT_POINTS = [(4, 8, 1024, 64, True), (4, 16, 1024, 128, False)]
TINY_POINTS = [(1, 2, 64, 16, True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_times(fn: Callable[[], object], device: torch.device, *, reps: int = 3) -> list[tuple[float, int, str]]:
    """(ms per call, launches per call, name) of every kernel (CUDA) or op (CPU) that runs at least once per call,
    longest first."""
    for _ in range(2):
        fn()
    _sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0 and e.count >= reps:
            rows.append((us / reps / 1000, e.count // reps, e.key))
    return sorted(rows, reverse=True)


def host_device_us(fn: Callable[[], object], device: torch.device, *, calls: int = 200) -> dict[str, float]:
    """Per call: host wall time without synchronisation, summed kernel time, and the do_bench median (GPU only)."""
    for _ in range(20):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    _sync(device)
    out = {"host": host, "device": sum(r[0] for r in kernel_times(fn, device, reps=5)) * 1000}
    if device.type == "cuda":
        import triton

        out["do_bench"] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1000
    return out


def _calls(b: int, h: int, n: int, d: int, causal: bool, device: torch.device, dtype: torch.dtype) -> dict:
    q = torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    do = torch.randn_like(q)

    def ours():
        return cosine_sim_attention(q, k, v, causal=causal)

    def peer():
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return F.scaled_dot_product_attention(qn, kn, v, scale=10.0, is_causal=causal)

    return {
        "ours fwd": ours,
        "peer fwd": peer,
        "ours fwd+bwd": lambda: torch.autograd.grad(ours(), (q, k, v), do),
        "peer fwd+bwd": lambda: torch.autograd.grad(peer(), (q, k, v), do),
    }


def report(device: torch.device, *, long_points, short_points, top: int = 8) -> list[str]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = []
    for b, h, n, d, causal in long_points:
        calls = _calls(b, h, n, d, causal, device, dtype)
        for name in ("ours fwd+bwd", "peer fwd+bwd"):
            rows = kernel_times(calls[name], device)
            lines.append(f"== {b}x{h}x{n}x{d} causal={causal} {name}: kernels (ms per call)")
            lines += [f"   {ms:8.3f} ms x{count}  {key[:90]}" for ms, count, key in rows[:top]]
    for b, h, n, d, causal in short_points:
        calls = _calls(b, h, n, d, causal, device, dtype)
        lines.append(f"== {b}x{h}x{n}x{d} causal={causal}: us per call (host without sync | device | do_bench)")
        for name, fn in calls.items():
            t = host_device_us(fn, device)
            bench = f" | do_bench {t['do_bench']:7.1f}" if "do_bench" in t else ""
            lines.append(f"   {name:13s} host {t['host']:7.1f} | device {t['device']:7.1f}{bench}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the report to this text file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu for a smoke run)")
    if device.type == "cuda":
        long_points, short_points = LONG_POINTS, SHORT_POINTS
        env = f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        long_points, short_points = TINY_POINTS, TINY_POINTS
        env = f"# CPU smoke run, torch {torch.__version__}"
    lines = [env] + report(device, long_points=long_points, short_points=short_points)
    print("\n".join(lines), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0
