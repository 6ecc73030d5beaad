"""Split-KV forward for decoding: a few new queries against a long key/value cache.

The main forward gives each (batch, query head) its own program, which streams every key of its kv head: with i
small that is one or two programs per head, far too few to fill a GPU at batch 1, and under GQA every query head
of a kv head reads the same keys again. Here a program owns (key split, batch · kv head, row chunk): its rows are
the h // hk query heads that share the kv head times the i queries (so K and V are read once per kv head, not once
per query head), and it streams only its slice of the keys, so splits × kv heads programs fill the GPU. Keys are
normalised in the loop (an inverse norm per key applied to the logits, or the tile normalised per group): a
pre-pass would read and write the whole cache once more, which is what a memory-bound decode step cannot afford.

Combining the splits needs no maximum on the fixed-offset path. With bounded logits every split uses the same
offset c (it depends only on scale, groups and the dtype, never on the data), so its partial sums
acc_s = Σ exp2(t − c) v and l_s = Σ exp2(t − c) are already in one common unit and O = Σ_s acc_s / Σ_s l_s, a plain
sum. Where the main forward needs a running maximum (an additive bias, ALiBi, or scale · groups past the dtype's
bound: `ops._use_max`) each split also stores its maximum m_s and the combine rescales by exp(m_s − max_s m_s),
the log-sum-exp merge of FlashDecoding. One split writes the output directly, with no combine launch.

Dispatch (`use_decode`, called by `ops.triton_attention`): only calls that need no gradient (inference, sampling)
with at most DECODE_MAX_Q queries and at least DECODE_MIN_N keys; everything else takes the main forward.

References: Dao et al., "Flash-Decoding for long-context inference" (2023); Ainslie et al., "GQA" (2023).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import ops
from .kernels import LOG2E, _inv_norm, _l2norm_rows
from .launch import cdiv, next_power_of_2

# Dispatch rule: queries per call at most DECODE_MAX_Q (one step, or a short speculative / multi-token step), keys
# at least DECODE_MIN_N. Below that many keys a call is host-bound and the main forward is one launch; above that
# many queries the main forward's query tiles fill the GPU on their own. Chosen, not yet measured:
# `python scripts/bench_decode.py` measures both paths side by side.
DECODE_MAX_Q = 16
DECODE_MIN_N = 512
# set to False to send every call to the main forward (the decode benchmark times the op both ways)
ENABLED = True
# split sizing on a GPU: enough splits for SPLIT_WAVES programs per SM, each of at least MIN_SPLIT_KEYS keys (a
# split's fixed costs, its q prologue and partial stores, stay small against its loop), at most MAX_SPLITS. The
# loop is bandwidth-bound: many programs per SM with few pipeline stages each keep the most bytes in flight
# (a sweep of 64 launch configurations at 6 batch/context points: docs/benchmarks/NOTES.md, "Decoding")
SPLIT_WAVES = 8
# the loop's launch configuration on a GPU for 16-bit inputs up to head dim 128 (fp32 and larger heads take 32-key
# tiles); module constants so that `scripts/bench_decode.py --tune` can sweep them
TILE_KEYS = 64
NUM_WARPS = 4
NUM_STAGES = 2
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 64
# under the interpreter (tests): a few splits, so the combine always has work at small lengths
INTERPRET_SPLITS = 4

# Argument lists below are packed by hand, as in kernels.py.
# fmt: off


@triton.jit
def _decode_inner(acc, l_i, m_i, q, m, row_ok, cols,
                  K_base, V_base, bias_rows, mask_base, slope, offset2,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_mn,
                  M, N, lo, hi,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUPS: tl.constexpr, L2NORM: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  USE_MAX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            # `hi` is the split's end: a tile must not reach into the next split's keys
            kv_mask = (offs_n[:, None] < hi) & (cols[None, :] < HEAD_DIM)
        else:
            kv_mask = cols[None, :] < HEAD_DIM
        k = tl.load(K_base + offs_n[:, None] * stride_kn + cols[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if L2NORM and GROUPS > 1:
            k32, _ = _l2norm_rows(k.to(tl.float32), cols, GROUPS, HEAD_DIM)
            k = k32.to(k.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_R, BLOCK_N]
        if L2NORM and GROUPS == 1:
            qk = qk * _inv_norm(k.to(tl.float32), 1)[None, :]  # k̂ = k / ‖k‖, applied to the logits
        kpos = offs_n[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_rows[:, None] + kpos * stride_bn, mask=row_ok[:, None] & (kpos < hi), other=0.0)
            qk = qk + bias.to(tl.float32)
        if HAS_ALIBI:
            qk = qk - slope[:, None] * tl.abs(m[:, None] + (N - M) - kpos).to(tl.float32)
        if MASKED:
            vis = kpos < hi
            if CAUSAL:
                vis = vis & (kpos <= m[:, None] + (N - M))
            qk = tl.where(vis, qk, float("-inf"))
        if HAS_MASK:
            km = tl.load(mask_base + offs_n * stride_mn, mask=offs_n < hi, other=0)
            qk = tl.where(km[None, :] != 0, qk, float("-inf"))
        v = tl.load(V_base + offs_n[:, None] * stride_vn + cols[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if USE_MAX:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * LOG2E)
            p = tl.exp2((qk - m_safe[:, None]) * LOG2E).to(v.dtype)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        else:
            p = tl.exp2(qk - offset2).to(v.dtype)  # the same fixed offset in every split: no max, nothing to rescale
        # the row sums add the weights exactly as rounded for the P·V product, so the output stays their convex
        # combination: a row that sees one key returns its value exactly, as the peer's softmax does
        l_i = l_i + tl.sum(p.to(tl.float32), 1)
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _decode_split_kernel(
    Q,  # (b, h, i, d) raw queries, any strides
    K,  # (b, hk, j, d) raw keys, any strides (e.g. a view of a KV cache's filled prefix)
    V,  # (b, hk, j, d) any strides
    ACC,  # (b·h·i, splits, d) fp32 out: Σ p·v over the split's keys (unused when DIRECT)
    L,  # (b·h·i, splits) fp32 out: Σ p over the split's keys (unused when DIRECT)
    MX,  # (b·h·i, splits) fp32 out: the split's max logit, natural units (only with USE_MAX)
    O,  # (b, h, i, d) out, unit stride along d (only when DIRECT: a single split)
    MASK, BIAS, SLOPES,  # as in kernels._fwd_kernel
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om,
    H, HK, M, N, CHUNKS, SPLIT_LEN, SPLITS, qk_scale, offset2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUPS: tl.constexpr, L2NORM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, USE_MAX: tl.constexpr,
    DIRECT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)
    chunk = pid % CHUNKS
    bhk = pid // CHUNKS
    b = bhk // HK
    hk = bhk % HK
    group = H // HK
    # this program's rows: query head g of the kv head's group, query m; row = g·M + m
    rows = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < group * M
    g = rows // M
    m = rows % M
    h = hk * group + g
    cols = tl.arange(0, D_PAD)
    q_mask = row_ok[:, None] & (cols[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + m[:, None] * stride_qm + cols[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    q32 = q.to(tl.float32)
    if L2NORM:
        q32, _ = _l2norm_rows(q32, cols, GROUPS, HEAD_DIM)
    q = (q32 * qk_scale).to(q.dtype)

    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    bias_rows = BIAS + b * stride_bb + h * stride_bh + m * stride_bm
    mask_base = MASK + b * stride_mb
    slope = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h, mask=row_ok, other=0.0).to(tl.float32)

    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N)
    # keys before `seen_by_all` are visible to every row (causal: the first query sees keys up to N − M); whole
    # tiles of them need no masks, the rest of the split (the causal diagonal, the ragged end) does
    if CAUSAL:
        seen_by_all = N - M + 1
    else:
        seen_by_all = N
    full_end = lo + (tl.maximum(tl.minimum(hi, seen_by_all) - lo, 0) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, m, row_ok, cols,
                                  K_base, V_base, bias_rows, mask_base, slope, offset2,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_mn,
                                  M, N, lo, full_end,
                                  HEAD_DIM, D_PAD, GROUPS, L2NORM, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                                  USE_MAX, PRECISION, BLOCK_N, MASKED=False)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, m, row_ok, cols,
                                  K_base, V_base, bias_rows, mask_base, slope, offset2,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_mn,
                                  M, N, full_end, hi,
                                  HEAD_DIM, D_PAD, GROUPS, L2NORM, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                                  USE_MAX, PRECISION, BLOCK_N, MASKED=True)

    out_rows = (b * H + h) * M + m  # row of (b, h, i)
    if DIRECT:
        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        o_ptrs = O + b * stride_ob + h[:, None] * stride_oh + m[:, None] * stride_om + cols[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=q_mask)
    else:
        part = out_rows * SPLITS + split
        tl.store(ACC + part[:, None] * HEAD_DIM + cols[None, :], acc, mask=q_mask)
        tl.store(L + part, l_i, mask=row_ok)
        if USE_MAX:
            tl.store(MX + part, m_i, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    ACC, L, MX,  # the split kernel's partials
    O,  # (b, h, i, d) out, unit stride along d
    SPLITS, H, M, stride_ob, stride_oh, stride_om,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    offs_s = tl.arange(0, SPLITS_PAD)
    l_s = tl.load(L + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=0.0)
    m_safe = 0.0
    if USE_MAX:
        # log-sum-exp merge: each split's sums are relative to its own max; rescale them to the largest
        m_s = tl.load(MX + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
        m_all = tl.max(m_s, 0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        l_s = l_s * tl.exp2((m_s - m_safe) * LOG2E)
    l_tot = tl.sum(l_s, 0)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for s in range(0, SPLITS):
        part = tl.load(ACC + (row * SPLITS + s) * HEAD_DIM + cols, mask=cols < HEAD_DIM, other=0.0)
        if USE_MAX:
            part = part * tl.exp2((tl.load(MX + row * SPLITS + s) - m_safe) * LOG2E)
        acc = acc + part
    o = acc / tl.where(l_tot == 0.0, 1.0, l_tot)  # a row with no visible key: all sums 0, output 0
    o_ptrs = O + row // (H * M) * stride_ob + row // M % H * stride_oh + row % M * stride_om + cols
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=cols < HEAD_DIM)


# fmt: on


def use_decode(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The dispatch rule, for a call that needs no gradient: few queries against many keys."""
    return ENABLED and q.shape[2] <= DECODE_MAX_Q and k.shape[2] >= DECODE_MIN_N


def decode_config(rows: int, d_pad: int, dtype: torch.dtype):
    """(BLOCK_R, BLOCK_N, num_warps, num_stages) for `rows` = (h // hk) · i query rows per kv head. BLOCK_R is at
    least 16 (tl.dot's minimum; padded rows are zeros, free in a memory-bound loop) and at most 64 (32 at head dim
    256, fp32 accumulators in registers); more rows take several row chunks. BLOCK_N, warps and stages: TILE_KEYS,
    NUM_WARPS, NUM_STAGES."""
    max_r = 64 if d_pad <= 128 else 32
    block_r = min(max(16, next_power_of_2(rows)), max_r)
    if ops._interpreting():
        return block_r, 16, 1, 1
    block_n = 32 if dtype == torch.float32 or d_pad > 128 else TILE_KEYS
    return block_r, block_n, NUM_WARPS, NUM_STAGES


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(n: int, programs: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) for n keys and `programs` programs per split: on a GPU enough splits for
    SPLIT_WAVES programs per SM, each split a whole number of key tiles; no split is empty."""
    if ops._interpreting() or device.type != "cuda":
        target = INTERPRET_SPLITS
    else:
        target = cdiv(SPLIT_WAVES * _sm_count(device.index or 0), programs)
        target = min(target, MAX_SPLITS, cdiv(n, MIN_SPLIT_KEYS))
    split_len = cdiv(cdiv(n, max(target, 1)), block_n) * block_n
    return cdiv(n, split_len), split_len


def decode_forward(q, k, v, mask, bias, slopes, causal: bool, scale: float, l2norm: bool, groups: int):
    """Canonical inputs (see `ops`) -> output (b, h, i, d) in q's dtype: the same function as
    `ops.attention_forward`'s output, by splits over the keys. Forward only: no statistics are saved."""
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    d_pad = ops._d_pad(d)
    use_max = ops._use_max(q.dtype, bias, slopes, scale, groups)
    qk_scale = ops._qk_scale(scale, use_max)
    offset2 = scale * groups * ops.LOG2E - ops.HEADROOM
    rows = (h // hk) * m
    block_r, block_n, warps, stages = decode_config(rows, d_pad, q.dtype)
    chunks = cdiv(rows, block_r)
    splits, split_len = num_splits(n, b * hk * chunks, block_n, q.device)
    direct = splits == 1
    o = ops.empty_in_layout(q)
    if direct:
        acc = l_s = m_s = o  # unused
    else:
        acc = torch.empty((b * h * m, splits, d), dtype=torch.float32, device=q.device)
        l_s = torch.empty((b * h * m, splits), dtype=torch.float32, device=q.device)
        m_s = torch.empty_like(l_s) if use_max else l_s
    aux, aux_strides = ops._aux(q, mask, bias, slopes)
    tensors = (q, k, v, acc, l_s, m_s, o, *aux)
    strides = (*q.stride(), *k.stride(), *v.stride(), *aux_strides, *o.stride()[:3])
    ops._launch(
        _decode_split_kernel,
        (splits, b * hk * chunks),
        (*tensors, *strides, h, hk, m, n, chunks, split_len, splits, qk_scale, offset2),
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
            DIRECT=direct,
            PRECISION=ops._precision(q.dtype),
            BLOCK_R=block_r,
            BLOCK_N=block_n,
        ),
        num_warps=warps,
        num_stages=stages,
    )
    if not direct:
        ops._launch(
            _decode_combine_kernel,
            (b * h * m, 1),
            (acc, l_s, m_s, o, splits, h, m, *o.stride()[:3]),
            dict(HEAD_DIM=d, D_PAD=d_pad, SPLITS_PAD=next_power_of_2(splits), USE_MAX=use_max),
            num_warps=1 if ops._interpreting() else 4,
        )
    return o


@torch.library.custom_op("cosattn::attention_decode", mutates_args=())
def _decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    slopes: torch.Tensor | None,
    causal: bool,
    scale: float,
    l2norm: bool,
    groups: int,
) -> torch.Tensor:
    return decode_forward(q, k, v, mask, bias, slopes, causal, scale, l2norm, groups)


@_decode_op.register_fake
def _(q, k, v, mask, bias, slopes, causal, scale, l2norm, groups):
    return ops.empty_in_layout(q)


def decode_attention(q, k, v, mask, bias, slopes, causal: bool, scale: float, l2norm: bool, groups: int):
    """`decode_forward`, through the registered custom op under torch.compile (which traces it as one node) and
    directly otherwise (the custom-op dispatch costs as much host time as a decode step's kernels)."""
    args = (q, k, v, mask, bias, slopes, causal, scale, l2norm, groups)
    if torch.compiler.is_compiling():
        return _decode_op(*args)
    return decode_forward(*args)
