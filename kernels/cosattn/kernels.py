"""Triton kernels for cosine-similarity attention: l2norm pre-pass, forward, backward (dk/dv pass, dq pass).

Invariant the forward relies on: q and k are l2-normalised (per group), so every logit
scale · q̂·k̂ lies in [-scale·groups, +scale·groups]. With C = scale·groups·log2(e) (logits kept in log2 units,
the constant folded into q̂ so the inner loop is one exp2 per logit), exp2(t − C + HEADROOM) is at most
2^HEADROOM and at least 2^(HEADROOM − 2C): the kernel accumulates those terms and their row sum with a FIXED
offset, no running row maximum and no rescaling of the accumulator. HEADROOM = 15 keeps the largest term
representable in fp16 (P is cast to the input dtype for the P·V product) and, for scale·groups ≤ 10.02, the
smallest possible row maximum above fp16's smallest normal: scale 10 fits exactly. The host checks the bound for
the dtype and otherwise (or with an additive bias or ALiBi, whose range is unknown) selects USE_MAX: a
FlashAttention-2 style running maximum, with the logits, bias and ALiBi in natural units. Either way the forward
saves one fp32 number per query row, the log-sum-exp in the logits' units (offset + log2(rowsum), or
max + ln(rowsum); +inf for a row with no visible key), and the backward recomputes P from it tile by tile.

Per-head scales (SCALE_PER_HEAD): each head's scale is loaded from an (h,) float64 tensor, clamped by the host to
[0, scale_max]; the host picks USE_MAX from scale_max as from a float scale, and each head's offset follows its own
scale. The dq pass then also writes the scale gradient's part of each query row (SCALE_GRAD).

Segment ids (HAS_SEGMENTS): a logit is −inf where the query's and the key's ids differ, in every visited tile; and
each program loops only over the other side's tiles whose [first, last] ids meet its own tile's [min, max]
(`_segment_phases`), a range exact for non-decreasing ids, which the host flags per batch element and side; rows
flagged unsorted visit every tile and rely on the mask alone.

Backward (per group): dq = (dq̂ − q̂⟨q̂, dq̂⟩)/‖q‖, the same for k, applied in each pass's epilogue with the
norms from its prologue. No float atomics: dk/dv programs own a key block and loop over the query heads of their
kv head (GQA), dq programs own a query block, so gradients are bitwise deterministic.

Tile loads: with USE_TMA the loops read their streamed tiles through 4-D tensor descriptors (Hopper's bulk tensor
copies; the copy engine zero-fills past the sequence length and the head dim), otherwise through masked pointer
loads; the math is the same either way.

References: Dao, "FlashAttention-2" (2023); the Triton fused-attention tutorial (06); Henry et al.,
"Query-Key Normalization for Transformers" (2020).
"""

import triton
import triton.language as tl

# Argument lists below are packed by hand, grouped (tensors, strides, sizes, constexprs) as in Triton's tutorials;
# the formatter would put one argument per line.
# fmt: off

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural units -> log2 units (exp(x) = exp2(x · LOG2E))
LN2 = tl.constexpr(0.6931471805599453)  # ln(2) = 1 / LOG2E
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps: a vector shorter than this is divided by it instead
# exp2 headroom of the fixed offset: the largest term is 2^15, below fp16's max (65504)
HEADROOM = tl.constexpr(15.0)
# tiles of the other side whose first and last segment ids one step of `_segment_range` reads: one step up to
# 256 tiles (16k keys at BLOCK_N 64)
SEGMENT_SCAN = tl.constexpr(256)


@triton.jit
def _l2norm_rows(x, cols, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """x: [R, D_PAD] fp32 with zero padding. Returns (x̂, inverse norm per column's group, [R, D_PAD]).
    Correctly rounded sqrt and division, as F.normalize: an ulp lost in x̂ is multiplied by scale·groups in
    the logits."""
    if GROUPS == 1:
        norm_cols = tl.zeros_like(x) + tl.maximum(tl.sqrt_rn(tl.sum(x * x, 1)), NORM_EPS)[:, None]
    else:
        gid = cols // (HEAD_DIM // GROUPS)
        norm_cols = tl.zeros_like(x) + 1.0
        for g in tl.static_range(GROUPS):
            sel = (gid == g)[None, :]
            norm = tl.maximum(tl.sqrt_rn(tl.sum(tl.where(sel, x * x, 0.0), 1)), NORM_EPS)
            norm_cols = tl.where(sel, norm[:, None], norm_cols)
    return tl.div_rn(x, norm_cols), 1.0 / norm_cols


@triton.jit
def _l2norm_bwd(xh, inv_cols, dxh, cols, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Gradient through x̂ = x / max(‖x‖, eps) per group: (dx̂ − x̂⟨x̂, dx̂⟩)/‖x‖, or dx̂/eps below eps."""
    prod = xh * dxh
    if GROUPS == 1:
        dot_cols = tl.zeros_like(xh) + tl.sum(prod, 1)[:, None]
    else:
        gid = cols // (HEAD_DIM // GROUPS)
        dot_cols = tl.zeros_like(xh)
        for g in tl.static_range(GROUPS):
            sel = (gid == g)[None, :]
            dot_cols = tl.where(sel, tl.sum(tl.where(sel, prod, 0.0), 1)[:, None], dot_cols)
    # below eps the norm is clamped, so the projection term vanishes (F.normalize's derivative)
    dot_cols = tl.where(inv_cols < 1.0 / NORM_EPS, dot_cols, 0.0)
    return (dxh - xh * dot_cols) * inv_cols


@triton.jit
def _inv_norm(x, AXIS: tl.constexpr):
    """1 / max(‖x‖, eps) along AXIS of an fp32 tile of raw keys: the scale of each key's logits when k is normalised
    inside the forward's loop (K_INLINE). Every pass that recomputes those logits uses this same formula."""
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, AXIS)), NORM_EPS)


@triton.jit
def _key_range(pid_m, M, N, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys of query tile pid_m, split at `full_end`: tiles in [0, full_end) are visible to every row of the tile
    (no masks); [full_end, hi) holds the causal diagonal and the ragged last tile (masks); keys from hi on are never
    visible. Bottom-right causal alignment: row r sees key c iff c ≤ r + (N − M)."""
    if CAUSAL:
        # keys beyond the last row's diagonal are never visible; tiles left of the first row's diagonal always are
        hi = tl.minimum(N, tl.maximum(0, (pid_m + 1) * BLOCK_M + (N - M)))
        full_end = tl.minimum(hi, tl.maximum(0, pid_m * BLOCK_M + (N - M) + 1))
    else:
        hi = N
        full_end = N
    full_end = (full_end // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _query_range(pid_n, M, N, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows of key block pid_n, split at `full_start`: tiles in [lo, full_start) hold the causal diagonal
    (masks); rows in [full_start, M) see every key of the block; rows before lo see none of them."""
    if CAUSAL:
        # first query row that sees this block's first key; rows past the block's last key see it all
        lo = tl.maximum(0, pid_n * BLOCK_N - (N - M))
        lo = (lo // BLOCK_M) * BLOCK_M
        full_start = tl.maximum(lo, (pid_n + 1) * BLOCK_N - 1 - (N - M))
        full_start = tl.minimum(((full_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, tl.maximum(lo, M))
    else:
        lo = 0
        full_start = 0
    return lo, full_start


@triton.jit
def _segment_range(smin, smax, SEG_base, stride_sn, n, other_sorted, BLOCK: tl.constexpr):
    """[lo, hi): the positions of the other side, in whole tiles of BLOCK, that may hold a segment id in
    [smin, smax] (this tile's range). For non-decreasing ids (other_sorted ≠ 0) tile t may be skipped iff its last
    id < smin or its first id > smax, and those tiles form a prefix and a suffix: counting them bounds the loop
    exactly. Unsorted ids (other_sorted = 0) skip nothing, [0, n): the per-element segment mask alone decides."""
    n_tiles = tl.cdiv(n, BLOCK)
    below = 0  # tiles whose ids all lie below smin
    upto = 0  # tiles whose first id is at most smax
    for t0 in range(0, n_tiles, SEGMENT_SCAN):
        t = t0 + tl.arange(0, SEGMENT_SCAN)
        ok = t < n_tiles
        first = tl.load(SEG_base + (t * BLOCK) * stride_sn, mask=ok)
        last = tl.load(SEG_base + (tl.minimum((t + 1) * BLOCK, n) - 1) * stride_sn, mask=ok)
        below += tl.sum((ok & (last < smin)).to(tl.int32), 0)
        upto += tl.sum((ok & (first <= smax)).to(tl.int32), 0)
    lo = tl.where(other_sorted != 0, below * BLOCK, 0)
    hi = tl.where(other_sorted != 0, tl.minimum(upto * BLOCK, n), n)
    return lo, hi


@triton.jit
def _segment_phases(OWN_base, stride_own, offs, n_own, OTHER_base, stride_other, n_other, other_sorted_ptr,
                    start, split, end, BLOCK_OTHER: tl.constexpr):
    """The segment ids of this program's own tile (the query tile; the key block in the dk/dv pass) as a column
    [rows, 1], and its two loop phases [start, split) (unmasked or causal, as the caller splits them) and
    [split, end), both narrowed to the other side's tiles `_segment_range` keeps. Min and max are reduced over the
    loaded ids, so this side's ids may come in any order; rows past n_own take the tile's first id, always in range."""
    ok = offs < n_own
    seg = tl.load(OWN_base + offs * stride_own, mask=ok, other=0)
    seg_in = tl.where(ok, seg, tl.load(OWN_base + tl.min(offs, 0) * stride_own))
    seg_lo, seg_hi = _segment_range(tl.min(seg_in, 0), tl.max(seg_in, 0), OTHER_base, stride_other, n_other,
                                    tl.load(other_sorted_ptr), BLOCK_OTHER)
    return (seg[:, None], tl.maximum(start, seg_lo), tl.minimum(split, seg_hi), tl.maximum(split, seg_lo),
            tl.minimum(end, seg_hi))


@triton.jit
def _alibi_slope(SLOPES, h, HAS_ALIBI: tl.constexpr):
    """Head h's ALiBi slope, in natural units like the logits of the running-max path that ALiBi selects; 0 without
    ALiBi."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h).to(tl.float32)
    return slope


@triton.jit
def _head_scale(SCALES, h, GROUPS: tl.constexpr, USE_MAX: tl.constexpr):
    """Head h's scale from SCALES (a per-head scale: (h,) float64, clamped to [0, scale_max] by the host) and the two
    numbers derived from it: (scale, qk_scale, offset2), as the host derives them from a float scale, by the same
    float64 operations rounded to fp32 as a float argument is, so a tensor of equal values gives the float path's
    bits. The fixed offset follows the head's own scale: its largest term is 2^HEADROOM and every row's largest term
    at least 2^(HEADROOM − 2·scale_h·groups·log2 e), which scale_max, by the host's rule, keeps a normal number."""
    s = tl.load(SCALES + h)
    if USE_MAX:
        qk_scale = s
    else:
        qk_scale = s * LOG2E
    offset2 = s * GROUPS * LOG2E - HEADROOM
    return s.to(tl.float32), qk_scale.to(tl.float32), offset2.to(tl.float32)


@triton.jit
def _logits_mods(qk, qpos, kpos, M, N, bias_ptrs, slope, key_mask_ptrs, seg_q, seg_k,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """Adds bias / ALiBi to a logits tile and sets invisible entries to −inf. qpos and kpos are the query and key
    positions as broadcastable 2-D tensors, so one helper serves both tile orientations; seg_q and seg_k, their
    segment ids (HAS_SEGMENTS), likewise. A bias or ALiBi always comes with USE_MAX (the host's rule), so the logits
    are in natural units here."""
    if HAS_BIAS:
        bias = tl.load(bias_ptrs, mask=(qpos < M) & (kpos < N), other=0.0)
        qk = qk + bias.to(tl.float32)
    if HAS_ALIBI:
        qk = qk - slope * tl.abs(qpos + (N - M) - kpos).to(tl.float32)
    if MASKED:
        vis = kpos < N
        if CAUSAL:
            vis = vis & (kpos <= qpos + (N - M))
        qk = tl.where(vis, qk, float("-inf"))
    if HAS_MASK:
        km = tl.load(key_mask_ptrs, mask=kpos < N, other=0)
        qk = tl.where(km != 0, qk, float("-inf"))
    if HAS_SEGMENTS:
        qk = tl.where(seg_q == seg_k, qk, float("-inf"))
    return qk


@triton.jit
def _probs(qk, lse, USE_MAX: tl.constexpr):
    """P = exp(S − lse), recomputed exactly as the forward normalised it: natural units on the running-max path,
    log2 units (scale·log2 e folded into q̂) otherwise."""
    if USE_MAX:
        p = tl.exp2((qk - lse) * LOG2E)
    else:
        p = tl.exp2(qk - lse)
    return p


@triton.jit
def _l2norm_kernel(
    X,  # (b, hx, n, d) any strides
    Y,  # (b, hx, n, d) contiguous: x̂ · multiplier, in Y's dtype
    stride_xb, stride_xh, stride_xn, stride_xd,
    HX, N, multiplier,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUPS: tl.constexpr, L2NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HX
    h = bh % HX
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    m = (rows[:, None] < N) & (cols[None, :] < HEAD_DIM)
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                mask=m, other=0.0)
    x = x.to(tl.float32)
    if L2NORM:
        x, _ = _l2norm_rows(x, cols, GROUPS, HEAD_DIM)
    y = x * multiplier
    tl.store(Y + bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, offs_m, cols,
               K_base, V_base, K_desc, V_desc, b32, hk32, bias_base, mask_base, slope, offset2, KSEG_base, seg_q,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn, stride_skn,
               M, N, lo, hi,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
               USE_MAX: tl.constexpr, PRECISION: tl.constexpr, K_INLINE: tl.constexpr, USE_TMA: tl.constexpr,
               ROWSUM_TILE: tl.constexpr, HAS_SEGMENTS: tl.constexpr, MASKED: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n[:, None] < N) & (cols[None, :] < HEAD_DIM)
        else:
            kv_mask = cols[None, :] < HEAD_DIM
        if USE_TMA:
            # bulk tensor copies: the copy engine zero-fills rows past N and columns past HEAD_DIM. v is requested
            # together with k, so both arrive on one barrier (a separate v barrier measured slower:
            # docs/benchmarks/NOTES.md)
            kT = tl.trans(tl.reshape(K_desc.load([b32, hk32, start_n, 0]), [BLOCK_N, D_PAD]))
            v = tl.reshape(V_desc.load([b32, hk32, start_n, 0]), [BLOCK_N, D_PAD])
        else:
            kT = tl.load(K_base + offs_n[None, :] * stride_kn + cols[:, None] * stride_kd, mask=tl.trans(kv_mask),
                         other=0.0)
        qk = tl.dot(q, kT, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], log2 units (natural with USE_MAX)
        if K_INLINE:
            # k normalised here, one inverse norm per key, instead of in a separate pass: at short lengths the
            # extra launch costs more than this arithmetic
            qk = qk * _inv_norm(kT.to(tl.float32), 0)[None, :]
        qpos = offs_m[:, None]
        kpos = offs_n[None, :]
        seg_k = 0
        if HAS_SEGMENTS:
            seg_k = tl.load(KSEG_base + kpos * stride_skn, mask=kpos < N, other=0)
        qk = _logits_mods(qk, qpos, kpos, M, N, bias_base + qpos * stride_bm + kpos * stride_bn, slope,
                          mask_base + kpos * stride_mn, seg_q, seg_k,
                          MASKED, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI, HAS_SEGMENTS)
        if USE_MAX:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            # subtract in natural units first: large bias values cancel before the log2(e) multiply rounds them
            alpha = tl.exp2((m_i - m_safe) * LOG2E)
            p = tl.exp2((qk - m_safe[:, None]) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        else:
            # bounded logits: a fixed offset, no max, no rescale
            p = tl.exp2(qk - offset2)
            if ROWSUM_TILE:
                l_i = l_i + p  # a tile of partial sums, reduced across threads once after the loop
            else:
                l_i = l_i + tl.sum(p, 1)
        if not USE_TMA:
            v = tl.load(V_base + offs_n[:, None] * stride_vn + cols[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,  # (b, h, i, d) raw queries, any strides
    K,  # (b, hk, j, d) normalised keys k̂ (raw keys with K_INLINE)
    V,  # (b, hk, j, d)
    K_desc, V_desc,  # tensor descriptors of K and V, block (1, 1, BLOCK_N, D_PAD), when USE_TMA (else unused)
    O,  # (b, h, i, d) output, unit stride along d (the host allocates it in q's layout)
    LSE,  # (b, h, i) fp32: offset + log2(rowsum), or max + ln(rowsum) with USE_MAX; +inf for empty rows
    MASK,  # (b, j) int8 key-padding mask (1 = visible)
    BIAS,  # (bb, bh, i, j) additive bias, broadcast through zero strides
    SLOPES,  # (h,) ALiBi slopes
    SCALES,  # (h,) float64 per-head scales, clamped (only when SCALE_PER_HEAD: then qk_scale, offset2 come from it)
    QSEG, KSEG,  # (b, i), (b, j) integer segment ids, any strides (only when HAS_SEGMENTS)
    SEG_SORTED,  # (b, 2) int8: 1 where a row of QSEG (column 0) / KSEG (column 1) is non-decreasing (HAS_SEGMENTS)
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_sqb, stride_sqm, stride_skb, stride_skn, stride_ob, stride_oh, stride_om,
    H, HK, M, N, qk_scale, offset2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUPS: tl.constexpr, L2NORM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, USE_MAX: tl.constexpr,
    K_INLINE: tl.constexpr, USE_TMA: tl.constexpr, ROWSUM_TILE: tl.constexpr, EVEN_N: tl.constexpr,
    PRECISION: tl.constexpr, SCALE_PER_HEAD: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)
    # 32-bit coordinates for the tensor descriptors
    b32 = tl.program_id(1) // H
    hk32 = (tl.program_id(1) % H) // (H // HK)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    q_mask = (offs_m[:, None] < M) & (cols[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + cols[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    q32 = q.to(tl.float32)
    if L2NORM:
        q32, _ = _l2norm_rows(q32, cols, GROUPS, HEAD_DIM)
    if SCALE_PER_HEAD:
        _, qk_scale, offset2 = _head_scale(SCALES, h, GROUPS, USE_MAX)
    # fold scale·log2(e) into q̂ once: the inner loop then needs one exp2 per logit and no multiply
    q = (q32 * qk_scale).to(q.dtype)

    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    mask_base = MASK + b * stride_mb
    slope = _alibi_slope(SLOPES, h, HAS_ALIBI)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    if ROWSUM_TILE:
        l_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    full_end, hi = _key_range(pid_m, M, N, CAUSAL, BLOCK_M, BLOCK_N)
    KSEG_base = KSEG + b * stride_skb
    seg_q, lo1, hi1, lo2, hi2 = 0, 0, full_end, full_end, hi
    if HAS_SEGMENTS:
        seg_q, lo1, hi1, lo2, hi2 = _segment_phases(QSEG + b * stride_sqb, stride_sqm, offs_m, M, KSEG_base,
                                                    stride_skn, N, SEG_SORTED + 2 * b + 1, 0, full_end, hi, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, offs_m, cols,
                               K_base, V_base, K_desc, V_desc, b32, hk32, bias_base, mask_base, slope, offset2,
                               KSEG_base, seg_q,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn, stride_skn,
                               M, N, lo1, hi1,
                               HEAD_DIM, D_PAD, BLOCK_N, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                               USE_MAX, PRECISION, K_INLINE, USE_TMA, ROWSUM_TILE, HAS_SEGMENTS, MASKED=False)
    if CAUSAL or not EVEN_N:  # the ragged last key block or the causal diagonal: masked tiles
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, offs_m, cols,
                                   K_base, V_base, K_desc, V_desc, b32, hk32, bias_base, mask_base, slope, offset2,
                                   KSEG_base, seg_q,
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                                   stride_skn, M, N, lo2, hi2,
                                   HEAD_DIM, D_PAD, BLOCK_N, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                                   USE_MAX, PRECISION, K_INLINE, USE_TMA, ROWSUM_TILE, HAS_SEGMENTS, MASKED=True)
    if ROWSUM_TILE:
        l_i = tl.sum(l_i, 1)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    log_l = tl.log2(tl.where(empty, 1.0, l_i))
    if USE_MAX:
        lse = m_i + log_l * LN2  # natural units, like the logits on this path
    else:
        lse = offset2 + log_l
    lse = tl.where(empty, float("inf"), lse)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + cols[None, :], o.to(O.dtype.element_ty),
             mask=q_mask)
    tl.store(LSE + bh * M + offs_m, lse, mask=offs_m < M)


@triton.jit
def _bwd_prep_kernel(
    Q,  # (b, h, i, d) raw queries, any strides
    K,  # (b, hk, j, d) raw keys, any strides
    O,  # (b, h, i, d), unit stride along d
    DO,  # (b, h, i, d) any strides
    QS,  # (b, h, i, d) contiguous out: q̂ · qk_scale
    KH,  # (b, hk, j, d) contiguous out: k̂ (when NORM_K)
    RK,  # (b, hk, j) fp32 out: 1/‖k‖ (otherwise)
    DELTA,  # (b, h, i) fp32 out: rowsum(dO ⊙ O)
    SCALES,  # (h,) float64 per-head scales (only when SCALE_PER_HEAD), as in the forward
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_db, stride_dh, stride_dm, stride_dd, stride_ob, stride_oh, stride_om,
    H, HK, M, N, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUPS: tl.constexpr, L2NORM: tl.constexpr, BLOCK: tl.constexpr,
    NORM_K: tl.constexpr, USE_MAX: tl.constexpr, SCALE_PER_HEAD: tl.constexpr,
):
    """Everything the two backward passes need precomputed, in one launch: per (b, h) row block, delta and the
    scaled q̂; the programs with h < hk also normalise a block of k for kv head h."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    if pid * BLOCK < M:
        m = (rows[:, None] < M) & (cols[None, :] < HEAD_DIM)
        o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + cols[None, :], mask=m, other=0.0)
        do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + cols[None, :] * stride_dd,
                     mask=m, other=0.0)
        tl.store(DELTA + bh * M + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < M)
        x = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + cols[None, :] * stride_qd,
                    mask=m, other=0.0)
        x = x.to(tl.float32)
        if L2NORM:
            x, _ = _l2norm_rows(x, cols, GROUPS, HEAD_DIM)
        if SCALE_PER_HEAD:
            _, qk_scale, _ = _head_scale(SCALES, h, GROUPS, USE_MAX)
        tl.store(QS + bh * M * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :],
                 (x * qk_scale).to(QS.dtype.element_ty), mask=m)
    if (h < HK) and (pid * BLOCK < N):
        m = (rows[:, None] < N) & (cols[None, :] < HEAD_DIM)
        x = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + cols[None, :] * stride_kd,
                    mask=m, other=0.0)
        x = x.to(tl.float32)
        if NORM_K:
            if L2NORM:
                x, _ = _l2norm_rows(x, cols, GROUPS, HEAD_DIM)
            tl.store(KH + (b * HK + h) * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :],
                     x.to(KH.dtype.element_ty), mask=m)
        else:
            # inverse key norms for the dq pass (the forward normalised k inside its loop)
            rk = _inv_norm(x, 1)
            tl.store(RK + (b * HK + h) * N + rows, rk, mask=rows < N)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, rk, v, offs_n, cols,
                    Q_base, DO_base, Q_desc, DO_desc, b32, h32, LSE_base, DELTA_base, DB_base, bias_base, mask_base,
                    slope, QSEG_base, seg_k, stride_dm, stride_dd, stride_bm, stride_bn, stride_mn, stride_sqm,
                    M, N, lo, hi,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    USE_MAX: tl.constexpr, BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                    K_INLINE: tl.constexpr, USE_TMA: tl.constexpr, HAS_SEGMENTS: tl.constexpr, MASKED: tl.constexpr):
    # tiles are kept transposed ([keys, queries]) so Pᵀ and dSᵀ feed the dk/dv products without a transpose
    kpos = offs_n[:, None]
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        qT_mask = row_ok[None, :] & (cols[:, None] < HEAD_DIM)
        if USE_TMA:
            qT = tl.trans(tl.reshape(Q_desc.load([b32, h32, start_m, 0]), [BLOCK_M, D_PAD]))
            do = tl.reshape(DO_desc.load([b32, h32, start_m, 0]), [BLOCK_M, D_PAD])
        else:
            qT = tl.load(Q_base + offs_m[None, :] * HEAD_DIM + cols[:, None], mask=qT_mask, other=0.0)  # q̂·scale·log2e
            do = tl.load(DO_base + offs_m[:, None] * stride_dm + cols[None, :] * stride_dd, mask=tl.trans(qT_mask),
                         other=0.0)
        lse = tl.load(LSE_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_base + offs_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, qT, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M], log2 units (natural with USE_MAX)
        if K_INLINE:
            qkT = qkT * rk[:, None]  # raw k in the product, as the forward computed it
        qpos = offs_m[None, :]
        seg_q = 0
        if HAS_SEGMENTS:
            seg_q = tl.load(QSEG_base + qpos * stride_sqm, mask=qpos < M, other=0)
        qkT = _logits_mods(qkT, qpos, kpos, M, N, bias_base + qpos * stride_bm + kpos * stride_bn, slope,
                           mask_base + kpos * stride_mn, seg_q, seg_k,
                           MASKED, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI, HAS_SEGMENTS)
        pT = _probs(qkT, lse[None, :], USE_MAX)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if BIAS_GRAD:
            tl.store(DB_base + qpos * N + kpos, dsT, mask=row_ok[None, :] & (kpos < N))
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    QS,  # (b, h, i, d) contiguous: q̂ · qk_scale
    K,  # (b, hk, j, d) raw keys
    V,  # (b, hk, j, d)
    DO,  # (b, h, i, d)
    LSE, DELTA,  # (b, h, i) fp32
    DK, DV,  # (b, hk, j, d), unit stride along d (the host allocates them in k's and v's layouts)
    DB,  # (b, h, i, j) fp32 bias gradient (only when BIAS_GRAD)
    QS_desc, DO_desc,  # descriptors of QS and DO, block (1, 1, BLOCK_M, D_PAD) (only when USE_TMA)
    MASK, BIAS, SLOPES,  # as in the forward
    QSEG, KSEG, SEG_SORTED,  # as in the forward (only when HAS_SEGMENTS)
    stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd, stride_mb, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_sqb, stride_sqm, stride_skb, stride_skn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    H, HK, M, N, qk_scale, dk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUPS: tl.constexpr, L2NORM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, USE_MAX: tl.constexpr,
    BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr, K_INLINE: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HK
    hk = bhk % HK
    b32 = tl.program_id(1) // HK
    hk32 = tl.program_id(1) % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    kv_mask = (offs_n[:, None] < N) & (cols[None, :] < HEAD_DIM)
    k_raw = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + cols[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + cols[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    k32 = k_raw.to(tl.float32)
    inv_k = tl.zeros_like(k32)
    if L2NORM:
        k32, inv_k = _l2norm_rows(k32, cols, GROUPS, HEAD_DIM)
    if K_INLINE:
        rk = _inv_norm(k_raw.to(tl.float32), 1)
        k = k_raw
    else:
        rk = tl.zeros([BLOCK_N], dtype=tl.float32)
        k = k32.to(k_raw.dtype)

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    lo, full_start = _query_range(pid_n, M, N, CAUSAL, BLOCK_M, BLOCK_N)
    mask_base = MASK + b * stride_mb
    QSEG_base = QSEG + b * stride_sqb
    # the same query tiles for every head of the group: segments are per batch element
    seg_k, lo1, hi1, lo2, hi2 = 0, lo, full_start, full_start, M
    if HAS_SEGMENTS:
        seg_k, lo1, hi1, lo2, hi2 = _segment_phases(KSEG + b * stride_skb, stride_skn, offs_n, N, QSEG_base,
                                                    stride_sqm, M, SEG_SORTED + 2 * b, lo, full_start, M, BLOCK_M)
    group = H // HK
    for hq in range(0, group):
        h = hk * group + hq
        h32 = hk32 * group + hq
        bh = b * H + h
        Q_base = QS + bh * M * HEAD_DIM
        DO_base = DO + b * stride_db + h * stride_dh
        bias_base = BIAS + b * stride_bb + h * stride_bh
        DB_base = DB + bh * M * N
        slope = _alibi_slope(SLOPES, h, HAS_ALIBI)
        # only tiles on the causal diagonal need the visibility mask: keys past N are never stored
        if CAUSAL:  # (otherwise the range is empty)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, rk, v, offs_n, cols,
                                     Q_base, DO_base, QS_desc, DO_desc, b32, h32, LSE + bh * M, DELTA + bh * M,
                                     DB_base, bias_base, mask_base, slope, QSEG_base, seg_k,
                                     stride_dm, stride_dd, stride_bm, stride_bn, stride_mn, stride_sqm,
                                     M, N, lo1, hi1,
                                     HEAD_DIM, D_PAD, BLOCK_M, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                                     USE_MAX, BIAS_GRAD, PRECISION, K_INLINE, USE_TMA, HAS_SEGMENTS, MASKED=True)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, rk, v, offs_n, cols,
                                 Q_base, DO_base, QS_desc, DO_desc, b32, h32, LSE + bh * M, DELTA + bh * M,
                                 DB_base, bias_base, mask_base, slope, QSEG_base, seg_k,
                                 stride_dm, stride_dd, stride_bm, stride_bn, stride_mn, stride_sqm,
                                 M, N, lo2, hi2,
                                 HEAD_DIM, D_PAD, BLOCK_M, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                                 USE_MAX, BIAS_GRAD, PRECISION, K_INLINE, USE_TMA, HAS_SEGMENTS, MASKED=False)
    dk = dk * dk_scale  # dk̂ = scale · dSᵀq̂ = (scale / qk_scale) · dSᵀ(q̂ · qk_scale)
    if L2NORM:
        dk = _l2norm_bwd(k32, inv_k, dk, cols, GROUPS, HEAD_DIM)
        dk = tl.where(kv_mask, dk, 0.0)  # padded key rows are zero vectors: keep their 1/eps out of the cast
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + cols[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + cols[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, ds_sum, pc_sum, dc_sum, q, do, lse, delta, offs_m, cols,
                  K_base, RK_base, V_base, K_desc, V_desc, b32, hk32, bias_base, mask_base, slope, KSEG_base, seg_q,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn, stride_skn,
                  M, N, lo, hi,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  USE_MAX: tl.constexpr, PRECISION: tl.constexpr, K_INLINE: tl.constexpr, USE_TMA: tl.constexpr,
                  SCALE_GRAD: tl.constexpr, HAS_SEGMENTS: tl.constexpr, MASKED: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n[:, None] < N) & (cols[None, :] < HEAD_DIM)
        else:
            kv_mask = cols[None, :] < HEAD_DIM
        if USE_TMA:
            k = tl.reshape(K_desc.load([b32, hk32, start_n, 0]), [BLOCK_N, D_PAD])
            v = tl.reshape(V_desc.load([b32, hk32, start_n, 0]), [BLOCK_N, D_PAD])
        else:
            k = tl.load(K_base + offs_n[:, None] * stride_kn + cols[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(V_base + offs_n[:, None] * stride_vn + cols[None, :] * stride_vd, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if K_INLINE:
            # raw k, scaled by its inverse norm after the product: the logits the forward computed. The norms
            # come precomputed: reducing this tile in registers as well as feeding it to the dots raced in the
            # compiled, pipelined loop (docs/benchmarks/NOTES.md)
            rk = tl.load(RK_base + offs_n, mask=offs_n < N, other=0.0)
            qk = qk * rk[None, :]
        if SCALE_GRAD:
            cos_scaled = qk  # qk_scale · q̂·k̂, before bias and masks
        qpos = offs_m[:, None]
        kpos = offs_n[None, :]
        seg_k = 0
        if HAS_SEGMENTS:
            seg_k = tl.load(KSEG_base + kpos * stride_skn, mask=kpos < N, other=0)
        qk = _logits_mods(qk, qpos, kpos, M, N, bias_base + qpos * stride_bm + kpos * stride_bn, slope,
                          mask_base + kpos * stride_mn, seg_q, seg_k,
                          MASKED, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI, HAS_SEGMENTS)
        p = _probs(qk, lse[:, None], USE_MAX)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SCALE_GRAD:
            # the row sums of the scale gradient (see the dq kernel's epilogue), from dS in fp32
            ds_sum += tl.sum(ds, 1)
            pc_sum += tl.sum(p * cos_scaled, 1)
            dc_sum += tl.sum(ds * cos_scaled, 1)
        if K_INLINE:
            ds = ds * rk[None, :]  # dq̂ = Σ dS·k̂ = Σ (dS·rk)·k
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq, ds_sum, pc_sum, dc_sum


@triton.jit
def _bwd_dq_kernel(
    Q,  # (b, h, i, d) raw queries
    K,  # (b, hk, j, d) k̂ contiguous, or raw k (K_INLINE)
    RK,  # (b, hk, j) fp32 1/‖k‖ (K_INLINE)
    V,  # (b, hk, j, d) any strides
    K_desc, V_desc,  # descriptors of K and V, block (1, 1, BLOCK_N, D_PAD) (only when USE_TMA)
    DO, LSE, DELTA,  # as in the dk/dv pass
    DQ,  # (b, h, i, d), unit stride along d (the host allocates it in q's layout)
    MASK, BIAS, SLOPES, SCALES,  # as in the forward
    DSCALE,  # (b, h, i) fp32 out: ⟨dS k̂, q̂⟩ per query row, the row's part of dL/dscale_h (only when SCALE_GRAD)
    QSEG, KSEG, SEG_SORTED,  # as in the forward (only when HAS_SEGMENTS)
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_db, stride_dh, stride_dm, stride_dd,
    stride_mb, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn, stride_sqb, stride_sqm, stride_skb, stride_skn,
    stride_dqb, stride_dqh, stride_dqm,
    H, HK, M, N, qk_scale, scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUPS: tl.constexpr, L2NORM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, USE_MAX: tl.constexpr,
    PRECISION: tl.constexpr, K_INLINE: tl.constexpr, USE_TMA: tl.constexpr, EVEN_N: tl.constexpr,
    SCALE_PER_HEAD: tl.constexpr, SCALE_GRAD: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)
    b32 = tl.program_id(1) // H
    hk32 = (tl.program_id(1) % H) // (H // HK)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    q_mask = (offs_m[:, None] < M) & (cols[None, :] < HEAD_DIM)
    q_raw = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + cols[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
    q32 = q_raw.to(tl.float32)
    inv_q = tl.zeros_like(q32)
    if L2NORM:
        q32, inv_q = _l2norm_rows(q32, cols, GROUPS, HEAD_DIM)
    if SCALE_PER_HEAD:
        scale, qk_scale, _ = _head_scale(SCALES, h, GROUPS, USE_MAX)
    q = (q32 * qk_scale).to(q_raw.dtype)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + cols[None, :] * stride_dd,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * M + offs_m, mask=offs_m < M, other=float("inf"))
    delta = tl.load(DELTA + bh * M + offs_m, mask=offs_m < M, other=0.0)
    K_base = K + b * stride_kb + hk * stride_kh
    RK_base = RK + (b * HK + hk) * N
    V_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    mask_base = MASK + b * stride_mb
    slope = _alibi_slope(SLOPES, h, HAS_ALIBI)

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    ds_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_j dS_ij (SCALE_GRAD)
    pc_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_j P_ij · qk_scale · q̂_i·k̂_j (SCALE_GRAD)
    dc_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_j dS_ij · qk_scale · q̂_i·k̂_j (SCALE_GRAD)
    full_end, hi = _key_range(pid_m, M, N, CAUSAL, BLOCK_M, BLOCK_N)
    KSEG_base = KSEG + b * stride_skb
    seg_q, lo1, hi1, lo2, hi2 = 0, 0, full_end, full_end, hi
    if HAS_SEGMENTS:
        seg_q, lo1, hi1, lo2, hi2 = _segment_phases(QSEG + b * stride_sqb, stride_sqm, offs_m, M, KSEG_base,
                                                    stride_skn, N, SEG_SORTED + 2 * b + 1, 0, full_end, hi, BLOCK_N)
    dq, ds_sum, pc_sum, dc_sum = _bwd_dq_inner(dq, ds_sum, pc_sum, dc_sum, q, do, lse, delta, offs_m, cols,
                                       K_base, RK_base, V_base, K_desc, V_desc, b32, hk32, bias_base, mask_base, slope,
                                       KSEG_base, seg_q,
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                                       stride_skn, M, N, lo1, hi1,
                                       HEAD_DIM, D_PAD, BLOCK_N, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                                       USE_MAX, PRECISION, K_INLINE, USE_TMA, SCALE_GRAD, HAS_SEGMENTS, MASKED=False)
    if CAUSAL or not EVEN_N:  # the ragged last key block or the causal diagonal: masked tiles
        dq, ds_sum, pc_sum, dc_sum = _bwd_dq_inner(dq, ds_sum, pc_sum, dc_sum, q, do, lse, delta, offs_m, cols,
                                           K_base, RK_base, V_base, K_desc, V_desc, b32, hk32, bias_base, mask_base,
                                           slope, KSEG_base, seg_q, stride_kn, stride_kd, stride_vn, stride_vd,
                                           stride_bm, stride_bn, stride_mn, stride_skn, M, N, lo2, hi2,
                                           HEAD_DIM, D_PAD, BLOCK_N, CAUSAL, HAS_MASK, HAS_BIAS, HAS_ALIBI,
                                           USE_MAX, PRECISION, K_INLINE, USE_TMA, SCALE_GRAD, HAS_SEGMENTS,
                                           MASKED=True)
    if SCALE_GRAD:
        # dL/dscale_h = Σ_ij dS_ij c_ij with c = q̂·k̂. This row's part is Σ_j dS_ij c_ij, summed in fp32 from dS
        # before it is rounded for the dq product (a sum through that product, ⟨dS k̂, q̂⟩, carries the rounding of
        # every dS_ij, more than PyTorch's own error at head dim 128), less (Σ_j dS_ij)(Σ_j P_ij c_ij), which is
        # zero in exact arithmetic (Σ_j dS_ij = 0) and cancels the rounding of delta, computed from the output as
        # stored in q's dtype: the row's part is a covariance under P, small, while delta's error enters it times
        # the mean cosine, not small. The sums hold qk_scale · c, hence the division. A head clamped to scale 0 has
        # no qk_scale to divide by: its part comes from ⟨dS k̂, q̂⟩. The host sums the rows (no atomics).
        nonzero = qk_scale != 0.0
        row = (dc_sum - ds_sum * pc_sum) / tl.where(nonzero, qk_scale, 1.0)
        tl.store(DSCALE + bh * M + offs_m, tl.where(nonzero, row, tl.sum(dq * q32, 1)), mask=offs_m < M)
    dq = dq * scale
    if L2NORM:
        dq = _l2norm_bwd(q32, inv_q, dq, cols, GROUPS, HEAD_DIM)
        dq = tl.where(q_mask, dq, 0.0)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + cols[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)
