"""Kernel launches with less host time per call.

`kernel[grid](...)` runs Triton's JIT dispatcher on every call: it binds and specialises each argument, builds a
cache key from them and the options, checks the kernel's globals, and only then calls the compiled launcher: host
time comparable to a whole forward at 1024 keys (measured: docs/benchmarks/NOTES.md). `Launcher` keeps the
compiled kernel of each specialisation it has seen and calls it directly (`CompiledKernel[grid](*args)`), keyed by
what Triton specialises on, refined: each tensor's dtype and address mod 16, each integer's value (or its class:
the value 1, its residue mod 16, its width), each descriptor's dtype, address, shape, strides and block shape,
every constexpr, the launch options and the current device. A new specialisation goes through the JIT (which
compiles it) once.

The direct call goes through the compiled kernel's own launcher, so Triton's launch hooks (profilers) still see
every launch. Under the interpreter, with `FAST_LAUNCH = False`, or with a Triton whose compiled kernels cannot be
launched this way, every launch goes through the JIT: only host time differs.
"""

from __future__ import annotations

import logging

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


def _say_unsupported(why: str) -> None:
    global _unsupported_said
    if not _unsupported_said:
        _unsupported_said = True
        log.warning(
            "cosattn: direct kernel launches unavailable (%s); using Triton's JIT dispatcher (slower host path, same results)",
            why,
        )


def _int_class(a: int):
    """A refinement of how Triton specialises an integer argument (the value 1, divisibility by 16, 32- or 64-bit):
    equal classes always select the same compiled kernel."""
    return (a == 1, a & 15, -(2**31) <= a < 2**31)


def _ptr_key(a, exact: bool):
    """Key of a tensor (dtype, address mod 16) or tensor descriptor; None for anything else (not cached)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15)
    if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
        dims = (*a.shape, *a.strides)
        base = a.base
        return (
            base.dtype,
            base.data_ptr() & 15,
            tuple(a.block_shape),
            tuple(dims) if exact else tuple(map(_int_class, dims)),
            getattr(a, "padding", None),
        )
    return None


def _scalar_class(a):
    t = type(a)
    return _int_class(a) if t is int else (a if t is bool else t)


class Launcher:
    """`Launcher(jit_fn)(grid, args, constexprs, num_warps=, num_stages=)` launches like
    `jit_fn[grid](*args, **constexprs, num_warps=, num_stages=)`. `args` are the runtime arguments in signature
    order, tensors and descriptors first, then scalars; `constexprs` names every constexpr parameter (they follow
    the runtime ones in our kernels).

    Two caches: by the exact arguments (a tuple slice and a few tensor attributes: the cheap key, hit on every call
    when shapes repeat, as in training), and by their specialisation classes (hit when only lengths change in ways
    Triton does not specialise on, as in decoding with a growing cache)."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        self.by_class: dict = {}
        # the interpreter's functions have no `params` (and no compiled kernels): always the JIT path there
        params = list(fn.params) if hasattr(fn, "params") else []
        self.n_runtime = sum(not p.is_constexpr for p in params)
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        # the compiled launcher takes every parameter in signature order: runtime ones first, then the constexprs
        self.enabled = bool(params) and all(p.is_constexpr for p in params[self.n_runtime :])
        self.n_ptr = None  # how many leading runtime arguments are tensors or descriptors (set by the first call)

    def __call__(self, grid, args: tuple, constexprs: dict, *, num_warps: int, num_stages: int | None = None):
        key = cls = None
        if FAST_LAUNCH and self.enabled:
            key = self._key(grid, args, constexprs, num_warps, num_stages)
            if key is not None:
                hit = self.cache.get(key)
                if hit is None:
                    cls = self._class_key(key, args)
                    hit = self.by_class.get(cls) if cls is not None else None
                    if hit is not None:
                        self._remember(self.cache, key, hit)
                if hit is not None:
                    compiled, tail = hit
                    compiled[(grid[0], grid[1], 1)](*args, *tail)
                    return
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        compiled = self.fn[grid](*args, **constexprs, **options)
        if key is not None and self._launchable(compiled):
            entry = (compiled, tuple(constexprs[n] for n in self.constexpr_names))
            self._remember(self.cache, key, entry)
            if cls is not None:
                self._remember(self.by_class, cls, entry)

    @staticmethod
    def _remember(cache: dict, key, entry) -> None:
        if len(cache) >= MAX_ENTRIES:  # keys that keep changing: start over rather than grow without bound
            cache.clear()
        cache[key] = entry

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
            (a.dtype, a.data_ptr() & 15) if type(a) is torch.Tensor else _ptr_key(a, True) for a in args[:n_ptr]
        )
        if None in ptrs:
            return None
        # scalars by value (floats are never specialised, but the op passes the same ones for the same scale)
        return (torch.cuda.current_device(), ptrs, args[n_ptr:], tuple(constexprs.items()), num_warps, num_stages)

    def _class_key(self, key, args):
        device, ptrs, scalars, constexprs, num_warps, num_stages = key
        ptrs = tuple(p if type(a) is torch.Tensor else _ptr_key(a, False) for p, a in zip(ptrs, args))
        return (device, ptrs, tuple(map(_scalar_class, scalars)), constexprs, num_warps, num_stages)

    def _launchable(self, compiled) -> bool:
        if not all(hasattr(compiled, a) for a in ("__getitem__", "function", "packed_metadata")):
            _say_unsupported(f"Triton {triton.__version__}'s compiled kernels have no direct launch")
            self.enabled = False
            return False
        return True
