"""Hopper (sm_90) backward in Gluon: the dk/dv and dq passes with warpgroup MMAs, TMA loads and mbarriers.

EXPERIMENTAL, off by default (`HOPPER_BWD`, or COSATTN_HOPPER_BWD=1): chosen in `ops.attention_backward` only when
switched on and `eligible` (below); the Triton-language kernels stay the path everywhere else (the CPU interpreter,
other GPUs, every option this file does not cover). Each pass computes what its Triton kernel computes, from the
same prep-kernel outputs, so the two are interchangeable launch by launch; tests/test_hopper_gpu.py checks them
against each other and against an fp32 reference.

Covered: the fixed offset (no bias, no ALiBi, scale·groups within the dtype's bound, one float scale), l2norm with
one group, no mask, no segments, no bias or scale gradient; GQA; causal (bottom-right) or not; bf16/fp16; head dim
64 or 128; lengths that are multiples of the tiles.

dk/dv program: one tile of BLOCK_N keys (k normalised in fp32 registers, k̂ and v stored to shared memory once),
then every query tile of every head of the kv group: q̂·qk_scale and dO tiles by TMA, NUM_BUF-deep; four
warpgroup MMAs per tile pair: sᵀ = k̂·q̂sᵀ and dPᵀ = v·dOᵀ issued together, Pᵀ = exp2(sᵀ − lse) while dPᵀ runs,
dv += Pᵀ·dO and dk += dSᵀ·q̂s with Pᵀ, dSᵀ as register operands; the epilogue takes dk̂ through k's normalisation.
dq program: one query tile (q normalised in registers; q̂s and dO stored to shared memory as MMA operands), k̂ and v
tiles by TMA;
three MMAs per tile pair. Causal masks only on the diagonal tiles.

dO (dk/dv) and v (dq) are read through 2-D descriptors, so a non-contiguous one is copied first (the model's
(b, n, h, d) views): one copy per backward call.
"""

from __future__ import annotations

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# opt in: module flag (tests and benchmarks set it), default from the environment
HOPPER_BWD = os.environ.get("COSATTN_HOPPER_BWD", "0") == "1"
# launch configurations per head dim, (BLOCK_M, BLOCK_N, warps, buffers) for each pass, from the side-by-side run on
# the H200 (NOTES row 22): the fastest correct pair per head dim. No spills under Triton 3.6; under 3.9 the d=128
# dk/dv tiles take a 48-byte stack frame (tests/test_hopper.py bounds it)
DKDV_CONFIG = {64: (64, 128, 8, 2), 128: (64, 128, 8, 2)}
DQ_CONFIG = {64: (64, 64, 4, 2), 128: (128, 64, 8, 2)}

# fmt: off
NORM_EPS = gl.constexpr(1e-12)
# the CTA-wide barrier: `thread_barrier` in Triton 3.6, `barrier` in later releases
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# the TMA tile load: `async_copy_global_to_shared` in Triton 3.6, `async_load` in later releases (same arguments)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _normalize_rows(x32):
    """(x̂, 1/‖x‖) per row of an fp32 tile, as F.normalize: correctly rounded sqrt and division, ‖x‖ ≥ NORM_EPS."""
    norm = gl.maximum(gl.sqrt_rn(gl.sum(x32 * x32, 1)), NORM_EPS)
    return gl.div_rn(x32, gl.expand_dims(norm, 1)), 1.0 / norm


@gluon.jit
def _through_l2norm(x_ptrs, dxh):
    """The gradient through x̂ = x/‖x‖ of the rows at x_ptrs (reloaded: fewer registers live in the main loop):
    (dx̂ − x̂⟨x̂, dx̂⟩)/‖x‖, or dx̂/eps where the norm was clamped (F.normalize's derivative)."""
    xh, inv = _normalize_rows(gl.load(x_ptrs).to(gl.float32))
    dot = gl.where(inv < 1.0 / NORM_EPS, gl.sum(xh * dxh, 1), 0.0)
    return (dxh - xh * gl.expand_dims(dot, 1)) * gl.expand_dims(inv, 1)


@gluon.jit
def _tile_ptrs(base, b, h, stride_b, stride_h, stride_n, start, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
               layout: gl.constexpr):
    """Pointers to rows [start, start + ROWS) of head h of batch element b in a (b, heads, n, d) tensor with unit
    stride along d, in `layout`."""
    rows = start + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    return base + b.to(gl.int64) * stride_b + h.to(gl.int64) * stride_h + rows[:, None] * stride_n + cols[None, :]


@gluon.jit
def _rings(desc_a, desc_b, NUM_BUF: gl.constexpr):
    """NUM_BUF-deep shared-memory rings for the tiles of two descriptors, and one initialised mbarrier per slot."""
    a = gl.allocate_shared_memory(desc_a.dtype, [NUM_BUF] + desc_a.block_type.shape, desc_a.layout)
    b = gl.allocate_shared_memory(desc_b.dtype, [NUM_BUF] + desc_b.block_type.shape, desc_b.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(bars.index(i), count=1)
    return a, b, bars


@gluon.jit
def _issue_pair(desc_a, desc_b, ring_a, ring_b, bars, j, row, NUM_BUF: gl.constexpr):
    """TMA loads of the two tiles at `row` into slot j % NUM_BUF, completing on that slot's mbarrier."""
    buf = j % NUM_BUF
    bar = bars.index(buf)
    mbarrier.expect(bar, desc_a.block_type.nbytes + desc_b.block_type.nbytes)
    _tma_load(desc_a, [row, 0], bar, ring_a.index(buf))
    _tma_load(desc_b, [row, 0], bar, ring_b.index(buf))


@gluon.jit
def dkdv_kernel(qs_desc, do_desc, K, V, LSE, DELTA, DK, DV,
                stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                H, HK, M, N, dk_scale,
                HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                NUM_BUF: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = qs_desc.dtype
    pid_n = gl.program_id(0)
    bhk = gl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    group = H // HK

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [num_warps, 1], [1, 0])
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    # the key tile: k normalised in fp32 (as F.normalize), k̂ and v to shared memory for the MMAs
    start_n = pid_n * BLOCK_N
    k_ptrs = _tile_ptrs(K, b, hk, stride_kb, stride_kh, stride_kn, start_n, BLOCK_N, HEAD_DIM, ld_layout)
    kh32, _ = _normalize_rows(gl.load(k_ptrs).to(gl.float32))
    v = gl.load(_tile_ptrs(V, b, hk, stride_vb, stride_vh, stride_vn, start_n, BLOCK_N, HEAD_DIM, ld_layout))
    kh_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_smem_layout)
    kh_smem.store(kh32.to(dtype))
    v_smem.store(v)
    fence_async_shared()
    _cta_barrier()

    qs_smem, do_smem, bars = _rings(qs_desc, do_desc, NUM_BUF)

    if CAUSAL:
        # query tiles from lo; tiles from full_start on see every key of this block (no mask)
        lo = gl.maximum(pid_n * BLOCK_N - (N - M), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_start = gl.maximum(lo, (pid_n + 1) * BLOCK_N - 1 - (N - M))
        full_start = gl.minimum(((full_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, M)
    else:
        lo = pid_n * 0
        full_start = lo
    n_tiles = (M - lo) // BLOCK_M
    total = group * n_tiles
    row0 = (b * H + hk * group) * M  # first row of this group's first head in the (b·h·m, d) views

    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    kpos = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))

    if total > 0:
        _issue_pair(qs_desc, do_desc, qs_smem, do_smem, bars, 0, row0 + lo, NUM_BUF)
    for j in range(total):
        buf = j % NUM_BUF
        if j + 1 < total:
            # the slot's previous tiles may still feed another warpgroup's MMAs: Triton's shared-memory hazard
            # analysis puts a CTA barrier before this TMA (an explicit one left the PTX's bar.sync count unchanged)
            nxt = j + 1  # its head within the group, then its query tile
            _issue_pair(qs_desc, do_desc, qs_smem, do_smem, bars, nxt,
                        row0 + (nxt // n_tiles) * M + lo + (nxt % n_tiles) * BLOCK_M, NUM_BUF)
        mbarrier.wait(bars.index(buf), (j // NUM_BUF) & 1)
        qs_t = qs_smem.index(buf)
        do_t = do_smem.index(buf)
        start_m = lo + (j % n_tiles) * BLOCK_M
        stat_row = row0 + (j // n_tiles) * M + start_m
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))

        sT = warpgroup_mma(kh_smem, qs_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpT = warpgroup_mma(v_smem, do_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        lse = gl.load(LSE + stat_row + offs_m)
        delta = gl.load(DELTA + stat_row + offs_m)
        sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT,))
        pT = gl.exp2(sT - gl.expand_dims(lse, 0))
        if CAUSAL:
            if start_m < full_start:  # a tile on the diagonal
                qpos = start_m + offs_m
                pT = gl.where(gl.expand_dims(kpos, 1) <= gl.expand_dims(qpos, 0) + (N - M), pT, 0.0)
        dv = warpgroup_mma(gl.convert_layout(pT.to(dtype), op_layout), do_t, dv, is_async=True)
        dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT,))
        dsT = pT * (dpT - gl.expand_dims(delta, 0))
        dk = warpgroup_mma(gl.convert_layout(dsT.to(dtype), op_layout), qs_t, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))

    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(bars.index(i))

    # epilogue: dk̂ = dk_scale·Σ dSᵀq̂s, then through k's normalisation
    dk = _through_l2norm(k_ptrs, gl.convert_layout(dk, ld_layout) * dk_scale)
    dv = gl.convert_layout(dv, ld_layout)
    gl.store(_tile_ptrs(DK, b, hk, stride_dkb, stride_dkh, stride_dkn, start_n, BLOCK_N, HEAD_DIM, ld_layout),
             dk.to(dtype))
    gl.store(_tile_ptrs(DV, b, hk, stride_dvb, stride_dvh, stride_dvn, start_n, BLOCK_N, HEAD_DIM, ld_layout),
             dv.to(dtype))


@gluon.jit
def dq_kernel(kh_desc, v_desc, Q, DO, LSE, DELTA, DQ,
              stride_qb, stride_qh, stride_qm, stride_db, stride_dh, stride_dm, stride_dqb, stride_dqh, stride_dqm,
              H, HK, M, N, qk_scale, scale,
              HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_BUF: gl.constexpr, num_warps: gl.constexpr):
    """dq of one query tile: q normalised in registers, q̂s and dO in shared memory as MMA operands, k̂ and v tiles by TMA,
    double-buffered; s = q̂s·k̂ᵀ and dP = dO·vᵀ issued together, dq += dS·k̂; epilogue through q's normalisation."""
    dtype: gl.constexpr = kh_desc.dtype
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    a_acc_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [num_warps, 1], [1, 0])

    start_m = pid_m * BLOCK_M
    q_ptrs = _tile_ptrs(Q, b, h, stride_qb, stride_qh, stride_qm, start_m, BLOCK_M, HEAD_DIM, ld_layout)
    qh, _ = _normalize_rows(gl.load(q_ptrs).to(gl.float32))
    qs = (qh * qk_scale).to(dtype)
    do = gl.load(_tile_ptrs(DO, b, h, stride_db, stride_dh, stride_dm, start_m, BLOCK_M, HEAD_DIM, ld_layout))
    # q̂s and dO read by the MMAs from shared memory. As register operands (fewer shared-memory stores) the causal dq
    # came out wrong on the H200 while the non-causal one was right (NOTES row 22): not used
    ops_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_op = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], ops_layout)
    do_op = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], ops_layout)
    q_op.store(qs)
    do_op.store(do)
    fence_async_shared()
    _cta_barrier()
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse = gl.load(LSE + bh.to(gl.int64) * M + offs_m)
    delta = gl.load(DELTA + bh.to(gl.int64) * M + offs_m)

    kh_smem, v_smem, bars = _rings(kh_desc, v_desc, NUM_BUF)

    if CAUSAL:
        # key tiles before full_end are visible to every row of this tile (no mask); none from hi on
        hi = gl.minimum(N, gl.maximum(0, (pid_m + 1) * BLOCK_M + (N - M)))
        full_end = (gl.minimum(hi, gl.maximum(0, pid_m * BLOCK_M + (N - M) + 1)) // BLOCK_N) * BLOCK_N
    else:
        hi = N + pid_m * 0
        full_end = hi
    total = (hi + BLOCK_N - 1) // BLOCK_N
    row0 = (b * HK + hk) * N

    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, acc_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    qpos = gl.expand_dims(offs_m, 1) + (N - M)
    if total > 0:
        _issue_pair(kh_desc, v_desc, kh_smem, v_smem, bars, 0, row0, NUM_BUF)
    for t in range(total):
        buf = t % NUM_BUF
        if t + 1 < total:
            _issue_pair(kh_desc, v_desc, kh_smem, v_smem, bars, t + 1, row0 + (t + 1) * BLOCK_N, NUM_BUF)
        mbarrier.wait(bars.index(buf), (t // NUM_BUF) & 1)
        kh_t = kh_smem.index(buf)
        v_t = v_smem.index(buf)
        s = warpgroup_mma(q_op, kh_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_op, v_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        p = gl.exp2(s - gl.expand_dims(lse, 1))
        if CAUSAL:
            if t * BLOCK_N >= full_end:  # a tile on the diagonal
                kpos = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                p = gl.where(gl.expand_dims(kpos, 0) <= qpos, p, 0.0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
        ds = p * (dp - gl.expand_dims(delta, 1))
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_acc_layout), kh_t, dq, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))

    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(bars.index(i))

    # epilogue: dq̂ = scale·Σ dS·k̂, then through q's normalisation
    dq = _through_l2norm(q_ptrs, gl.convert_layout(dq, ld_layout) * scale)
    gl.store(_tile_ptrs(DQ, b, h, stride_dqb, stride_dqh, stride_dqm, start_m, BLOCK_M, HEAD_DIM, ld_layout),
             dq.to(dtype))


def _row_tiles(*tensors, block_rows: int):
    """TMA descriptors of (block_rows, d) tiles over (b, heads, n, d) tensors seen as (b·heads·n, d) rows, one
    NVMMA shared layout for all; a tensor that is not contiguous is copied first (a 2-D view needs it)."""
    d = tensors[0].shape[-1]
    gdt = gl.bfloat16 if tensors[0].dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, d], gdt)
    descs = []
    for t in tensors:
        t2 = t.contiguous().reshape(-1, d)
        descs.append(TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [block_rows, d], layout))
    return descs


def dq_launch(q, k_hat, v, do, lse, delta, dq_out, *, causal: bool, qk_scale: float, scale: float, block_m=64, block_n=64,
              warps=4, num_buf=2, launch=None):
    """q, do (b, h, m, d) unit stride along d; k_hat (b, hk, n, d) contiguous; v any layout (copied to contiguous for
    its descriptor); writes dq_out."""
    b, h, m, d = q.shape
    hk, n = k_hat.shape[1], k_hat.shape[2]
    kh_desc, v_desc = _row_tiles(k_hat, v, block_rows=block_n)
    args = (kh_desc, v_desc, q, do, lse, delta, dq_out,
            q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq_out.stride(0), dq_out.stride(1), dq_out.stride(2), h, hk, m, n, qk_scale, scale)
    kw = dict(HEAD_DIM=d, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, NUM_BUF=num_buf, num_warps=warps)
    if launch is not None:
        return launch(dq_kernel, *args, **kw)
    dq_kernel[(m // block_m, b * h)](*args, **kw)


def dkdv_launch(q_s, k, v, do, lse, delta, dk, dv, *, causal: bool, dk_scale: float, block_m=64, block_n=128, warps=8,
         num_buf=2, launch=None):
    """q_s (b, h, m, d) contiguous, k/v (b, hk, n, d) unit stride along d, do (b, h, m, d) any layout (copied to
    contiguous for its descriptor), lse/delta (b, h, m) fp32; writes dk, dv."""
    b, h, m, d = q_s.shape
    hk, n = k.shape[1], k.shape[2]
    qs_desc, do_desc = _row_tiles(q_s, do, block_rows=block_m)
    args = (qs_desc, do_desc, k, v, lse, delta, dk, dv,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            h, hk, m, n, dk_scale)
    kw = dict(HEAD_DIM=d, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, NUM_BUF=num_buf, num_warps=warps)
    if launch is not None:
        return launch(dkdv_kernel, *args, **kw)
    dkdv_kernel[(n // block_n, b * hk)](*args, **kw)
# fmt: on


def _capability_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def eligible(
    q, k, v, do, *, mask, bias, slopes, scales, q_seg, use_max, l2norm, groups, k_inline, bias_grad, scale_grad
) -> bool:
    """Whether this backward call can take the Hopper path (when switched on): the covered options (module doc),
    an sm_90 device, not under the interpreter, and lengths that are multiples of both passes' tiles."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not _capability_ok(q.device):
        return False
    if mask is not None or bias is not None or slopes is not None or scales is not None or q_seg is not None:
        return False
    if use_max or not l2norm or groups != 1 or k_inline or bias_grad or scale_grad:
        return False
    d = q.shape[-1]
    if d not in DKDV_CONFIG or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    m, n = q.shape[2], k.shape[2]
    for bm, bn, *_ in (DKDV_CONFIG[d], DQ_CONFIG[d]):
        if m % bm or n % bn:
            return False
    return all(t.stride(-1) == 1 for t in (q, k, v, do))


def backward(q_s, q, k, k_hat, v, do, lse, delta, dq, dk, dv, *, causal: bool, qk_scale: float, scale: float):
    """Both passes: dk, dv from (q̂·qk_scale, raw k, v, dO), dq from (raw q, k̂, v, dO); lse and delta from the prep
    kernel, as the Triton passes take them."""
    d = q.shape[-1]
    bm, bn, warps, nbuf = DKDV_CONFIG[d]
    dkdv_launch(q_s, k, v, do, lse, delta, dk, dv, causal=causal, dk_scale=scale / qk_scale, block_m=bm, block_n=bn,
                warps=warps, num_buf=nbuf)  # fmt: skip
    bm, bn, warps, nbuf = DQ_CONFIG[d]
    dq_launch(q, k_hat, v, do, lse, delta, dq, causal=causal, qk_scale=qk_scale, scale=scale, block_m=bm, block_n=bn,
              warps=warps, num_buf=nbuf)  # fmt: skip
