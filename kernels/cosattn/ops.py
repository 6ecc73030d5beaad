"""Host side of the Triton path: launch configurations, launchers, and the `cosattn::attention` custom op
(with a fake implementation, so `torch.compile(fullgraph=True)` traces through it, and its autograd formula).

Inputs arrive in canonical form from `cosattn.interface`: q (b, h, i, d), k/v (b, hk, j, d), mask (b, j) bool,
bias (bb, bh, i, j) broadcast to (b, h, i, j) through zero strides, slopes (h,). The scale is a float, or per head:
`scales` (h,) float64 clamped to [0, scale_max], with the float `scale` then standing for their bound scale_max, which
is all the host needs to know of them (which path, which offsets are exact): it never reads their values.
Segment ids come as two (b, i), (b, j) integer tensors of one dtype (`q_seg`, `k_seg`; both None without segments).
"""

from __future__ import annotations

import os

import torch

from . import decode
from . import kernels as K
from .launch import Launcher, cdiv, next_power_of_2
from .reference import clamp_scale

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

try:  # the experimental Hopper backward (Gluon); opt-in, see cosattn.hopper
    from . import hopper
except ImportError:  # pragma: no cover - a Triton without Gluon's Hopper API
    hopper = None

LOG2E: float = K.LOG2E.value  # the kernels' constants, as host floats
HEADROOM: float = K.HEADROOM.value
# log2 of the smallest normal number of the dtype P is cast to before the P·V product
_MIN_NORMAL_LOG2 = {torch.float16: -14.0, torch.bfloat16: -126.0, torch.float32: -126.0}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty_in_layout(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like x, laid out like x (torch.empty_like: a dense tensor with x's dimension
    order) when that keeps unit stride along the last dim, else contiguous. The op's output and its input gradients
    are allocated this way, so a (b, n, h, d) projection viewed as (b, h, n, d) gets its output and gradients back in
    (b, n, h, d) and the model's reshape to (b, n, h·d) is a view, not a copy (SDPA's outputs behave the same). The
    kernels store through the strides; the fake impls allocate by this same function."""
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    return y if y.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def fixed_offset_ok(dtype: torch.dtype, scale: float, groups: int) -> bool:
    """True when every row's largest term exp2(t_max − offset) stays a normal number of `dtype` even if all of
    its logits sit at the lower bound −scale·groups: then a fixed offset is exact and no running max is needed.
    For per-head scales `scale` is their bound scale_max: each head's offset follows its own scale ≤ scale_max."""
    c2 = scale * groups * LOG2E
    return 2.0 * c2 <= HEADROOM - _MIN_NORMAL_LOG2[dtype] - 0.05


def _use_max(dtype, bias, slopes, scale: float, groups: int) -> bool:
    """The kernels' USE_MAX. False for bounded logits: a fixed offset, with scale·log2(e) folded into q̂ so the inner
    loop is a bare exp2. True with a bias or ALiBi (range unknown) or scale·groups past the dtype's bound: a running
    max, with logits kept in natural units: large values cancel in `s − max` before the log2(e) multiply rounds them,
    and fp32 logits of ±100 keep a bit more precision than ±144."""
    return bias is not None or slopes is not None or not fixed_offset_ok(dtype, scale, groups)


def _qk_scale(scale: float, use_max: bool) -> float:
    """What q̂ is multiplied by: scale, in log2 units (· log2 e) unless the running max keeps natural units."""
    return scale if use_max else scale * LOG2E


def _k_inline(rows: int, n: int, d_pad: int, groups: int, l2norm: bool) -> bool:
    """Normalise k inside the forward's loop (one launch less, more GPU work) rather than by a pre-pass: only for
    calls small enough that the host, not the GPU, sets their time. `rows` = b · h · i query rows."""
    return (
        l2norm
        and groups == 1
        and n <= K_INLINE_MAX_N
        and d_pad <= K_INLINE_MAX_D
        and rows * n * d_pad <= K_INLINE_MAX_WORK
    )


def _precision(dtype: torch.dtype) -> str:
    # full-precision fp32 products for fp32 inputs (the contract excludes tf32); irrelevant for 16-bit inputs
    return "ieee" if dtype == torch.float32 else "tf32"


def _d_pad(d: int) -> int:
    return max(16, next_power_of_2(d))


# The forward normalises k inside its loop (no separate pass, one launch less) up to this many keys, for head
# dims up to 64 (larger heads pay more in the loop than the launch costs), and only while b·h·i·j·d stays under
# K_INLINE_MAX_WORK: the in-loop normalisation is more GPU work than the pre-pass, which the saved launch repays
# only while the call is host-bound; beyond these sizes the pre-pass is faster (measured: docs/benchmarks/NOTES.md)
K_INLINE_MAX_N = 2048
K_INLINE_MAX_D = 64
K_INLINE_MAX_WORK = 1 << 32


# Tensor descriptors (Hopper's bulk tensor copies) for the K/V tiles of the inner loops: used where the GPU has
# them (compute capability 9+) and the tensors meet their alignment rules, and under the interpreter (so CI runs
# this path); otherwise pointer loads. Set to False to force pointer loads (tests compare the two paths).
USE_TMA = True
# where descriptor loads are faster: from this many keys (below, a launch's little GPU work does not repay the
# descriptors' host-side setup), and, in the backward and the running-max forward, from this padded head dim
# (below it those kernels are slower with them); measured: docs/benchmarks/NOTES.md
TMA_MIN_N = 2048
TMA_MIN_D = 128


def _tma_ok(*tensors: torch.Tensor) -> bool:
    if not USE_TMA or TensorDescriptor is None:
        return False
    t0 = tensors[0]
    if not _interpreting() and (not t0.is_cuda or torch.cuda.get_device_capability(t0.device)[0] < 9):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _desc(t: torch.Tensor, block_rows: int, d_pad: int):
    """(b, heads, n, d) tensor -> descriptor of (1, 1, block_rows, d_pad) tiles (zero fill past n and d)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_rows, d_pad])


def _rowsum_tile(block_m: int, block_n: int, warps: int, d_pad: int) -> bool:
    # the forward's row sums accumulate in a [BLOCK_M, BLOCK_N] tile (one cross-thread reduction at the end
    # instead of one per key block) when that costs at most 32 registers per thread, from head dim 128: faster
    # there, slower at 64, where the extra registers cost more than the reductions saved
    # (measured: docs/benchmarks/NOTES.md)
    return d_pad >= 128 and block_m * block_n <= 32 * 32 * warps


def launch_config(kernel: str, d_pad: int, dtype: torch.dtype, causal: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel`: "fwd" / "fwd_tma" (pointer or descriptor loads),
    "dkdv", "dq" / "dq_tma"."""
    if _interpreting():
        return 16, 16, 1, 1
    fp32 = dtype == torch.float32
    # 16-bit values: the best of sweeps over (BLOCK_M, BLOCK_N, warps, stages) (measured: docs/benchmarks/NOTES.md);
    # fp32 takes smaller tiles for its full-precision products
    if kernel == "fwd_tma" and not fp32:
        if d_pad <= 64:
            return (64, 64, 4, 3) if causal else (128, 64, 8, 3)
        if d_pad <= 128:
            return 128, 64, 8, 3
        return 64, 32, 4, 2
    if kernel in ("fwd", "fwd_tma"):
        if fp32:
            return (64, 32, 4, 2) if d_pad <= 128 else (32, 32, 4, 1)
        if d_pad <= 64:
            return 128, 64, 4, 4
        if d_pad <= 128:
            return 64, 64, 4, 3
        return 64, 32, 4, 2
    if kernel == "dkdv":
        if fp32:
            return (16, 64, 4, 1) if d_pad <= 128 else (16, 32, 4, 1)
        if d_pad <= 64:
            return 32, 128, 4, 3
        if d_pad <= 128:
            return 64, 128, 8, 3
        return 16, 64, 8, 1
    if kernel == "dq_tma" and not fp32 and d_pad == 128 and not causal:
        # with descriptor loads and no causal masking this tile is faster than the "dq" one below; with causal
        # masking it is slower (measured: docs/benchmarks/NOTES.md)
        return 64, 64, 4, 3
    if kernel in ("dq", "dq_tma"):
        if fp32:
            return (64, 16, 4, 1) if d_pad <= 128 else (32, 16, 4, 1)
        if d_pad <= 64:
            return 64, 64, 4, 3
        if d_pad <= 128:
            return 128, 64, 8, 3
        return 64, 16, 8, 1
    raise KeyError(kernel)


_launchers: dict = {}


def _launch(fn, grid, args: tuple, constexprs: dict, *, num_warps: int, num_stages: int | None = None) -> None:
    """`fn[grid](*args, **constexprs, ...)` through a `Launcher` (direct calls of the compiled kernel)."""
    launcher = _launchers.get(fn)
    if launcher is None:
        launcher = _launchers[fn] = Launcher(fn)
    launcher(grid, args, constexprs, num_warps=num_warps, num_stages=num_stages)


def l2norm_launch(x: torch.Tensor, *, groups: int, multiplier: float, l2norm: bool) -> torch.Tensor:
    """x (b, hx, n, d) any strides -> contiguous x̂ · multiplier in x's dtype."""
    b, hx, n, d = x.shape
    y = torch.empty((b, hx, n, d), dtype=x.dtype, device=x.device)
    block = 16 if _interpreting() else 64
    _launch(
        K._l2norm_kernel,
        (cdiv(n, block), b * hx),
        (x, y, *x.stride(), hx, n, multiplier),
        dict(HEAD_DIM=d, D_PAD=_d_pad(d), GROUPS=groups, L2NORM=l2norm, BLOCK=block),
        num_warps=1 if _interpreting() else 4,
    )
    return y


def _aux(q, mask, bias, slopes):
    """Kernel arguments for the optional inputs, as every attention kernel takes them: the tensors (MASK, BIAS,
    SLOPES) and their strides (mask's, then bias's); a dummy pointer with zero strides for each one absent."""
    mask_i8 = mask.to(torch.int8) if mask is not None else q
    mask_strides = tuple(mask_i8.stride()) if mask is not None else (0, 0)
    bias_t = bias if bias is not None else q
    # broadcast dims must read the same element for every (b, h): a size-1 dim's own stride would not
    bias_strides = (
        tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4)) if bias is not None else (0,) * 4
    )
    slopes_t = slopes.contiguous() if slopes is not None else q
    return (mask_i8, bias_t, slopes_t), (*mask_strides, *bias_strides)


def _non_decreasing(ids: torch.Tensor) -> torch.Tensor:
    return (ids[:, 1:] >= ids[:, :-1]).all(dim=1)


def _segment_args(q, q_seg, k_seg):
    """Kernel arguments for segment ids: the tensors (QSEG, KSEG, SEG_SORTED) and their strides. SEG_SORTED (b, 2)
    int8 says per batch element whether its query / key ids are non-decreasing: where they are, the kernels skip
    whole tiles by range (`kernels._segment_range`); computed on the device, so no host sync. Dummies without."""
    if q_seg is None:
        return (q, q, q), (0, 0, 0, 0)
    q_sorted = _non_decreasing(q_seg)
    k_sorted = q_sorted if k_seg is q_seg else _non_decreasing(k_seg)
    flags = torch.stack((q_sorted, k_sorted), dim=1).to(torch.int8)
    return (q_seg, k_seg, flags), (*q_seg.stride(), *k_seg.stride())


def attention_forward(
    q, k, v, mask, bias, slopes, scales, q_seg, k_seg, causal: bool, scale: float, l2norm: bool, groups: int
):
    """`scale` is the float scale, or with `scales` (per-head, (h,) float64, clamped) their bound scale_max: the path
    and the host's numbers below follow it, and the kernels derive each head's own from `scales`."""
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    d_pad = _d_pad(d)
    use_max = _use_max(q.dtype, bias, slopes, scale, groups)
    qk_scale = _qk_scale(scale, use_max)
    offset2 = scale * groups * LOG2E - HEADROOM
    # k normalised once by a pre-pass, or (small, host-bound calls) inside the loop: see _k_inline
    k_inline = _k_inline(b * h * m, n, d_pad, groups, l2norm)
    k_hat = k if k_inline else l2norm_launch(k, groups=groups, multiplier=1.0, l2norm=l2norm)
    o = empty_in_layout(q)
    lse = torch.empty((b, h, m), dtype=torch.float32, device=q.device)
    aux, aux_strides = _aux(q, mask, bias, slopes)
    # the in-loop k normalisation reduces the loaded tile in registers: it keeps pointer loads
    use_tma = not k_inline and n >= TMA_MIN_N and (not use_max or d_pad >= TMA_MIN_D) and _tma_ok(k_hat, v)
    block_m, block_n, warps, stages = launch_config("fwd_tma" if use_tma else "fwd", d_pad, q.dtype, causal)
    k_desc = _desc(k_hat, block_n, d_pad) if use_tma else k_hat
    v_desc = _desc(v, block_n, d_pad) if use_tma else v
    seg, seg_strides = _segment_args(q, q_seg, k_seg)
    tensors = (q, k_hat, v, k_desc, v_desc, o, lse, *aux, scales if scales is not None else q, *seg)
    strides = (*q.stride(), *k_hat.stride(), *v.stride(), *aux_strides, *seg_strides, *o.stride()[:3])
    _launch(
        K._fwd_kernel,
        (cdiv(m, block_m), b * h),
        (*tensors, *strides, h, hk, m, n, qk_scale, offset2),
        dict(
            HEAD_DIM=d,
            D_PAD=d_pad,
            GROUPS=groups,
            L2NORM=l2norm,
            CAUSAL=causal,
            HAS_MASK=mask is not None,
            HAS_BIAS=bias is not None,
            HAS_ALIBI=slopes is not None,
            USE_MAX=use_max,
            K_INLINE=k_inline,
            USE_TMA=use_tma,
            ROWSUM_TILE=not use_max and _rowsum_tile(block_m, block_n, warps, d_pad),
            EVEN_N=n % block_n == 0,
            PRECISION=_precision(q.dtype),
            SCALE_PER_HEAD=scales is not None,
            HAS_SEGMENTS=q_seg is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        ),
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


def attention_backward(
    do, q, k, v, o, lse, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups, bias_grad, scale_grad
):
    """(dq, dk, dv, dbias or None, dscale or None): dbias (b, h, i, j) fp32 before its reduction to the bias's shape;
    dscale (h,) fp32, the gradient of the clamped per-head scales. The flags and `scale` as in attention_forward."""
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    d_pad = _d_pad(d)
    prec = _precision(q.dtype)
    use_max = _use_max(q.dtype, bias, slopes, scale, groups)
    qk_scale = _qk_scale(scale, use_max)
    bm1, bn1, warps1, stages1 = launch_config("dkdv", d_pad, q.dtype, causal)

    delta = torch.empty((b, h, m), dtype=torch.float32, device=q.device)
    q_s = torch.empty((b, h, m, d), dtype=q.dtype, device=q.device)
    # the forward's choice, so both passes compute bitwise the same logits
    k_inline = _k_inline(b * h * m, n, d_pad, groups, l2norm)
    k_hat = q_s if k_inline else torch.empty((b, hk, n, d), dtype=k.dtype, device=q.device)
    rk = torch.empty((b, hk, n), dtype=torch.float32, device=q.device) if k_inline else delta
    block = 16 if _interpreting() else 64
    scales_t = scales if scales is not None else q
    _launch(
        K._bwd_prep_kernel,
        (cdiv(max(m, n), block), b * h),
        (
            q,
            k,
            o,
            do,
            q_s,
            k_hat,
            rk,
            delta,
            scales_t,
            *q.stride(),
            *k.stride(),
            *do.stride(),
            *o.stride()[:3],
            h,
            hk,
            m,
            n,
            qk_scale,
        ),
        dict(
            HEAD_DIM=d,
            D_PAD=d_pad,
            GROUPS=groups,
            L2NORM=l2norm,
            BLOCK=block,
            NORM_K=not k_inline,
            USE_MAX=use_max,
            SCALE_PER_HEAD=scales is not None,
        ),
        num_warps=1 if _interpreting() else 4,
    )
    dq, dk, dv = empty_in_layout(q), empty_in_layout(k), empty_in_layout(v)
    if (
        hopper is not None
        and hopper.HOPPER_BWD
        and hopper.eligible(
            q, k, v, do, mask=mask, bias=bias, slopes=slopes, scales=scales, q_seg=q_seg, use_max=use_max,
            l2norm=l2norm, groups=groups, k_inline=k_inline, bias_grad=bias_grad, scale_grad=scale_grad,
        )
    ):  # fmt: skip
        hopper.backward(q_s, q, k, k_hat, v, do, lse, delta, dq, dk, dv, causal=causal, qk_scale=qk_scale, scale=scale)
        return dq, dk, dv, None, None
    aux, aux_strides = _aux(q, mask, bias, slopes)
    seg, seg_strides = _segment_args(q, q_seg, k_seg)
    # the bias gradient is dS itself, written per (b, h) and reduced to the bias's shape afterwards; zeroed
    # because causally invisible tiles are skipped, never written
    db = torch.zeros((b, h, m, n), dtype=torch.float32, device=q.device) if bias_grad else q
    # the scale gradient per query row, summed below: every row is written (rows with no visible key give 0)
    ds_rows = torch.empty((b, h, m), dtype=torch.float32, device=q.device) if scale_grad else q
    k_dq = k if k_inline else k_hat
    use_tma = n >= TMA_MIN_N and d_pad >= TMA_MIN_D and _tma_ok(q_s, do, k_dq, v)
    bm2, bn2, warps2, stages2 = launch_config("dq_tma" if use_tma else "dq", d_pad, q.dtype, causal)
    flags = dict(
        USE_TMA=use_tma,
        HEAD_DIM=d,
        D_PAD=d_pad,
        GROUPS=groups,
        L2NORM=l2norm,
        CAUSAL=causal,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        HAS_ALIBI=slopes is not None,
        USE_MAX=use_max,
        PRECISION=prec,
        K_INLINE=k_inline,
        HAS_SEGMENTS=q_seg is not None,
    )
    descs = (_desc(q_s, bm1, d_pad), _desc(do, bm1, d_pad)) if use_tma else (q_s, do)
    tensors = (q_s, k, v, do, lse, delta, dk, dv, db, *descs, *aux, *seg)
    strides = (*k.stride(), *v.stride(), *do.stride(), *aux_strides, *seg_strides, *dk.stride()[:3], *dv.stride()[:3])
    # dk̂ = scale·dSᵀq̂ = (scale / qk_scale)·dSᵀ(q̂·qk_scale): the ratio is the units factor (1/log2 e, or 1 with
    # USE_MAX) for every head, per-head scales included (there `scale` is their bound)
    _launch(
        K._bwd_dkdv_kernel,
        (cdiv(n, bn1), b * hk),
        (*tensors, *strides, h, hk, m, n, qk_scale, scale / qk_scale),
        dict(BIAS_GRAD=bias_grad, BLOCK_M=bm1, BLOCK_N=bn1, **flags),
        num_warps=warps1,
        num_stages=stages1,
    )
    descs = (_desc(k_dq, bn2, d_pad), _desc(v, bn2, d_pad)) if use_tma else (k_dq, v)
    tensors = (q, k_dq, rk, v, *descs, do, lse, delta, dq, *aux, scales_t, ds_rows, *seg)
    strides = (*q.stride(), *k_dq.stride(), *v.stride(), *do.stride(), *aux_strides, *seg_strides, *dq.stride()[:3])
    _launch(
        K._bwd_dq_kernel,
        (cdiv(m, bm2), b * h),
        (*tensors, *strides, h, hk, m, n, qk_scale, scale),
        dict(
            EVEN_N=n % bn2 == 0,
            SCALE_PER_HEAD=scales is not None,
            SCALE_GRAD=scale_grad,
            BLOCK_M=bm2,
            BLOCK_N=bn2,
            **flags,
        ),
        num_warps=warps2,
        num_stages=stages2,
    )
    if not bias_grad:
        db = None
    # a fixed-order reduction by torch (deterministic, no atomics); per query head, GQA or not
    dscale = ds_rows.sum(dim=(0, 2)) if scale_grad else None
    return dq, dk, dv, db, dscale


# ----------------------------------------------------------------------------------------------------------
# custom op + autograd


@torch.library.custom_op("cosattn::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    slopes: torch.Tensor | None,
    scales: torch.Tensor | None,
    q_seg: torch.Tensor | None,
    k_seg: torch.Tensor | None,
    causal: bool,
    scale: float,
    l2norm: bool,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups)


@_attention_fwd_op.register_fake
def _(q, k, v, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups):
    b, h, m, d = q.shape
    return empty_in_layout(q), q.new_empty((b, h, m), dtype=torch.float32)


def _attention_bwd_impl(
    do, q, k, v, o, lse, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups, bias_grad, scale_grad
):
    flags = (causal, scale, l2norm, groups, bias_grad, scale_grad)
    dq, dk, dv, db, dscale = attention_backward(do, q, k, v, o, lse, mask, bias, slopes, scales, q_seg, k_seg, *flags)
    if db is None:
        db = q.new_empty((0,), dtype=torch.float32)
    if dscale is None:
        dscale = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, db, dscale


# The backward op is registered through `torch.library.Library` rather than `custom_op`: it has no autograd of its
# own, and custom_op's per-call layers (its autograd wrapper, the dynamo-disable wrapper, alias checks) cost ~25 µs
# more host time per call (NOTES.md, "Compiled step, profiled"); a compiled training step calls it once per layer.
_lib = torch.library.Library("cosattn", "FRAGMENT")
_lib.define(
    "attention_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? mask, Tensor? bias, "
    "Tensor? slopes, Tensor? scales, Tensor? q_seg, Tensor? k_seg, bool causal, float scale, bool l2norm, "
    "SymInt groups, bool bias_grad, bool scale_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.impl("attention_bwd", _attention_bwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("cosattn::attention_bwd", lib=_lib)
def _(
    do, q, k, v, o, lse, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups, bias_grad, scale_grad
):
    b, h, m, d = q.shape
    n = k.shape[2]
    db_shape = (b, h, m, n) if bias_grad else (0,)
    # in the inputs' layouts, as the kernels write them
    return (
        empty_in_layout(q),
        empty_in_layout(k),
        empty_in_layout(v),
        q.new_empty(db_shape, dtype=torch.float32),
        q.new_empty((h,) if scale_grad else (0,), dtype=torch.float32),
    )


_attention_bwd_op = torch.ops.cosattn.attention_bwd.default


def _save(ctx, inputs, o, lse):
    q, k, v, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups = inputs
    ctx.save_for_backward(q, k, v, o, lse, mask, bias, slopes, scales, q_seg, k_seg)
    ctx.causal, ctx.scale, ctx.l2norm, ctx.groups = causal, scale, l2norm, groups
    ctx.bias_shape = tuple(bias.shape) if bias is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _setup_context(ctx, inputs, output):
    o, lse = output
    _save(ctx, inputs, o, lse)
    ctx.mark_non_differentiable(lse)


def _backward_impl(ctx, do, bwd):
    q, k, v, o, lse, mask, bias, slopes, scales, q_seg, k_seg = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    scale_grad = scales is not None and ctx.needs_input_grad[6]
    flags = (ctx.causal, ctx.scale, ctx.l2norm, ctx.groups, bias_grad, scale_grad)
    dq, dk, dv, db, dscale = bwd(do, q, k, v, o, lse, mask, bias, slopes, scales, q_seg, k_seg, *flags)
    dbias = None
    if bias_grad:
        # reduce over the dims the bias broadcast along, back to its own shape
        dims = [i for i, s in enumerate(ctx.bias_shape) if s == 1 and db.shape[i] != 1]
        dbias = (db.sum(dim=dims, keepdim=True) if dims else db).to(ctx.bias_dtype)
    dscale = dscale.to(scales.dtype) if scale_grad else None
    return dq, dk, dv, None, dbias, None, dscale, None, None, None, None, None, None


def _backward(ctx, do, dlse):
    return _backward_impl(ctx, do, _attention_bwd_op)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, without the custom-op dispatch: that costs tens of
    microseconds per call in eager mode, as much as the whole kernel at short sequence lengths."""

    @staticmethod
    def forward(ctx, q, k, v, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups):
        args = (q, k, v, mask, bias, slopes, scales, q_seg, k_seg, causal, scale, l2norm, groups)
        o, lse = attention_forward(*args)
        _save(ctx, args, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return _backward_impl(ctx, do, attention_backward)


def triton_attention(
    q, k, v, *, mask, attn_bias, causal, scale, l2norm_qk, groups, alibi_slopes, scale_max=None, segment_ids=None
):
    """Canonical inputs (see module docstring; `segment_ids` the (q, k) pair or None) -> output (b, h, i, d) in q's
    dtype. `scale` a float, or an (h,) tensor clamped here to [0, scale_max] (torch.clamp: its gradient is zero
    outside). Eager calls go through an autograd.Function (or straight to the launcher when no gradient can flow:
    inference and sampling skip the autograd bookkeeping); under torch.compile the registered custom op is traced
    instead. Calls with no gradient, few queries and many keys (decoding with a KV cache: `decode.use_decode`) take
    the split-KV decode path, which has no segment ids or per-head scales: those calls take the main forward."""
    scales = None
    if isinstance(scale, torch.Tensor):
        # float64, so the kernels derive each head's numbers as the host does from a float scale
        scales, scale = clamp_scale(scale, scale_max, torch.float64).contiguous(), float(scale_max)
    q_seg, k_seg = segment_ids if segment_ids is not None else (None, None)
    args = (q, k, v, mask, attn_bias, alibi_slopes, scales, q_seg, k_seg, causal, scale, l2norm_qk, groups)
    no_grad = not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (q, k, v, attn_bias, alibi_slopes, scales)
    )
    if no_grad and scales is None and segment_ids is None and decode.use_decode(q, k):
        return decode.decode_attention(q, k, v, mask, attn_bias, alibi_slopes, causal, scale, l2norm_qk, groups)
    if torch.compiler.is_compiling():
        return _attention_fwd_op(*args)[0]
    if no_grad:
        return attention_forward(*args)[0]
    return _AttentionFunction.apply(*args)
