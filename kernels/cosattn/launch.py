"""Kernel launches with less host time per call.

`kernel[grid](...)` runs Triton's JIT dispatcher on every call: it binds and specialises each argument, builds a
cache key from them and the options, checks the kernel's globals, and only then calls the compiled launcher. On the
GPU machines' CPUs that is 15–30 µs per launch, as much as a whole forward at 1024 keys. `Launcher` keeps the
compiled kernel of each specialisation it has seen and calls it directly (`CompiledKernel[grid](*args)`), keyed by
what Triton specialises on: each tensor's dtype and 16-byte alignment, each integer's value, each descriptor's
dtype, alignment, shape, strides and block shape, every constexpr, the launch options and the current device.
A new specialisation goes through the JIT (which compiles it) once.

Under the interpreter, with launch hooks installed (profilers), with `FAST_LAUNCH = False`, or with a Triton whose
compiled kernels cannot be launched this way, every launch goes through the JIT: only host time differs.
"""

from __future__ import annotations

import logging
import os

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: no descriptors
    TensorDescriptor = None

log = logging.getLogger(__name__)

# set to False to send every launch through Triton's JIT dispatcher (tests compare the two paths)
FAST_LAUNCH = True
# compiled kernels remembered per kernel (one entry per distinct argument signature, shapes included)
MAX_ENTRIES = 1024
_unsupported_said = False


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (plain Python: `triton.cdiv` costs microseconds per call in newer Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _say_unsupported(why: str) -> None:
    global _unsupported_said
    if not _unsupported_said:
        _unsupported_said = True
        log.warning(
            "cosattn: direct kernel launches unavailable (%s); using Triton's JIT dispatcher (slower host path, same results)",
            why,
        )


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or isinstance(a, int):
        return (type(a), a)
    if isinstance(a, float):
        return float
    if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
        base = a.base
        return (base.dtype, base.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides), tuple(a.block_shape))
    return None  # unknown kind: not cached


class Launcher:
    """`Launcher(jit_fn)(grid, args, constexprs, num_warps=, num_stages=)` launches like
    `jit_fn[grid](*args, **constexprs, num_warps=, num_stages=)`. `args` are the runtime arguments in signature
    order, tensors and descriptors first, then scalars; `constexprs` names every constexpr parameter (they follow
    the runtime ones in our kernels)."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        params = list(fn.params) if hasattr(fn, "params") else []
        self.n_runtime = sum(not p.is_constexpr for p in params)
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        # the compiled launcher takes every parameter in signature order: runtime ones first, then the constexprs
        self.enabled = bool(params) and all(p.is_constexpr for p in params[self.n_runtime :])
        self.n_ptr = None  # how many leading runtime arguments are tensors or descriptors (set by the first call)

    def __call__(self, grid, args: tuple, constexprs: dict, *, num_warps: int, num_stages: int | None = None):
        key = None
        if FAST_LAUNCH and self.enabled and not _interpreting():
            key = self._key(grid, args, constexprs, num_warps, num_stages)
            hit = self.cache.get(key) if key is not None else None
            if hit is not None:
                compiled, tail = hit
                compiled[(grid[0], grid[1], 1)](*args, *tail)
                return
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        compiled = self.fn[grid](*args, **constexprs, **options)
        if key is not None and self._launchable(compiled):
            if len(self.cache) >= MAX_ENTRIES:  # shapes that keep changing (decoding): start over
                self.cache.clear()
            self.cache[key] = (compiled, tuple(constexprs[n] for n in self.constexpr_names))

    def _key(self, grid, args, constexprs, num_warps, num_stages):
        if len(grid) != 2 or len(args) != self.n_runtime or len(constexprs) != len(self.constexpr_names):
            return None
        n_ptr = self.n_ptr
        if n_ptr is None:
            n_ptr = next((i for i, a in enumerate(args) if type(a) in (int, float, bool)), len(args))
            if not all(type(a) in (int, float, bool) for a in args[n_ptr:]):
                self.enabled = False
                return None
            self.n_ptr = n_ptr
        ptrs = tuple(
            (a.dtype, a.data_ptr() % 16 == 0) if type(a) is torch.Tensor else _arg_key(a) for a in args[:n_ptr]
        )
        if None in ptrs:
            return None
        # scalars by value: exact for integers (Triton specialises on ==1, %16 and width); floats are not
        # specialised, but the op passes the same ones for the same scale, so keying on them costs no hits
        return (torch.cuda.current_device(), ptrs, args[n_ptr:], tuple(constexprs.items()), num_warps, num_stages)

    def _launchable(self, compiled) -> bool:
        if not all(hasattr(compiled, a) for a in ("__getitem__", "function", "packed_metadata")):
            _say_unsupported(f"Triton {triton.__version__}'s compiled kernels have no direct launch")
            self.enabled = False
            return False
        return True
