"""Public entry point: `cosine_sim_attention`. Checks inputs once, brings them to canonical 4-D form and
dispatches: Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else a chunked PyTorch path."""

from __future__ import annotations

import math
import numbers
import operator
import os

import torch

from .reference import attention_chunked

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the integer dtypes segment ids may have (the kernels compare them as loaded)
_SEGMENT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_SCALE = 100.0


def _shape(t):
    return tuple(t.shape) if t is not None else None


def _integer(name: str, value) -> int:
    """`value` as an int: anything `operator.index` takes (Python or NumPy integers) except a bool, which would
    otherwise pass as 0 or 1."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be an integer; got {name}={value!r}")


def _check_scale(name: str, value) -> None:
    """The rule for a float scale, and for the bound `scale_max` of a per-head scale tensor."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and 0 < value <= MAX_SCALE):
        raise ValueError(f"{name} must be a finite number in (0, {MAX_SCALE:g}]; got {name}={value!r}")


def check_attention_config(dim_head, heads, kv_heads, scale, groups) -> None:
    """Raise ValueError, naming the argument, unless the op supports this configuration:

    - dim_head: an integer in [MIN_HEAD_DIM, MAX_HEAD_DIM];
    - heads, kv_heads: positive integers with heads % kv_heads == 0;
    - scale: a finite real number in (0, MAX_SCALE] (for a per-head scale tensor, pass its bound scale_max);
    - groups: a positive integer dividing dim_head.

    Integers are what `operator.index` accepts (NumPy integers too), never bools. Needs no tensors, so a model can
    check its options when it is built; `cosine_sim_attention` applies this same function on every call.
    """
    d = _integer("dim_head", dim_head)
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"dim_head (the head dim) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]; got dim_head={dim_head!r}"
        )
    h, hk = _integer("heads", heads), _integer("kv_heads", kv_heads)
    if h < 1:
        raise ValueError(f"heads must be a positive integer; got heads={heads!r}")
    if hk < 1 or h % hk != 0:
        raise ValueError(
            f"kv_heads must be a positive integer dividing heads (h % hk == 0); "
            f"got heads={heads!r}, kv_heads={kv_heads!r}"
        )
    _check_scale("scale", scale)
    g = _integer("groups", groups)
    if g < 1 or d % g != 0:
        raise ValueError(f"groups must be a positive integer dividing dim_head={d}; got groups={groups!r}")


def _check_segments(segment_ids, q, k, b: int, i: int, j: int):
    """segment_ids: one (b, n) tensor (needs i == j) or a pair ((b, i), (b, j)) -> (q_segment_ids, k_segment_ids) of
    one integer dtype (a pair of two dtypes is promoted: exact), or None. b, i, j: the canonical q4's batch and
    length and k4's length (b is the merged batch B for a 3-D q). Before any launch, like `_canonicalize`."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, torch.Tensor):
        if i != j:
            raise ValueError(
                f"segment_ids as one tensor is for self-attention (q_len == k_len); got q {_shape(q)}, k {_shape(k)}: "
                f"pass a pair (q_segment_ids (b, i), k_segment_ids (b, j))"
            )
        pair = (("segment_ids", segment_ids, "n", i), ("segment_ids", segment_ids, "n", j))
    elif isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2:
        pair = (("q_segment_ids", segment_ids[0], "i", i), ("k_segment_ids", segment_ids[1], "j", j))
    else:
        raise TypeError(
            f"segment_ids must be an integer tensor (b, n) or a pair (q_segment_ids, k_segment_ids); "
            f"got {type(segment_ids).__name__}"
        )
    for name, t, dim, n in pair:
        if not isinstance(t, torch.Tensor) or t.dtype not in _SEGMENT_DTYPES:
            raise TypeError(
                f"{name} must be an integer tensor (int8, int16, int32, int64 or uint8); "
                f"got {getattr(t, 'dtype', type(t).__name__)}"
            )
        if tuple(t.shape) != (b, n):
            raise ValueError(
                f"{name} must be (b, {dim}) = ({b}, {n}); got {_shape(t)} for q {_shape(q)}, k {_shape(k)}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}; got {t.device}")
    q_seg, k_seg = pair[0][1], pair[1][1]
    if q_seg.dtype != k_seg.dtype:
        dtype = torch.promote_types(q_seg.dtype, k_seg.dtype)
        q_seg, k_seg = q_seg.to(dtype), k_seg.to(dtype)
    return q_seg, k_seg


def _canonicalize(
    q, k, v, mask, attn_bias, alibi_slopes, causal, scale, l2norm_qk, groups, attn_bias_batch_dim, scale_max
):
    """Validate and return canonical (q4, k4, v4, mask, bias4, slopes, scale, scale_max, groups, merged) before any
    launch.

    q4 (b, h, i, d); k4, v4 (b, hk, j, d); mask (b, j) bool or None; bias4 (bb, bh, bi, bj), each dim 1 or the full
    size, a view of attn_bias (its size-1 dims are read with zero strides, and autograd maps its gradient back to
    attn_bias's own shape); scale a float (scale_max None) or the caller's (h,) tensor (scale_max a float: the
    bound it is clamped to), groups an int; merged says q was 3-D.
    """
    for name, flag in (("causal", causal), ("l2norm_qk", l2norm_qk), ("attn_bias_batch_dim", attn_bias_batch_dim)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool; got {name}={flag!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (b, h, i, d) or (B, i, d); got shape {_shape(q)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32; got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype; got q {q.dtype}, {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device; got q on {q.device}, {name} on {t.device}")
    merged = q.dim() == 3
    if merged:
        if k.dim() != 3 or v.dim() != 3:
            raise ValueError(
                f"with a 3-D q (B, i, d), k and v must be 3-D (B, j, d); got q {_shape(q)}, k {_shape(k)}, "
                f"v {_shape(v)}"
            )
        q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    else:
        if k.dim() not in (3, 4) or v.dim() != k.dim():
            raise ValueError(f"k and v must both be (b, hk, j, d) or both (b, j, d); got k {_shape(k)}, v {_shape(v)}")
        q4 = q
        k4, v4 = (k.unsqueeze(1), v.unsqueeze(1)) if k.dim() == 3 else (k, v)
    b, h, i, d = q4.shape
    bk, hk, j, dk = k4.shape
    if bk != b or v4.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if v4.shape[1] != hk or v4.shape[2] != j:
        raise ValueError(f"k and v must have the same heads and length; got k {_shape(k)}, v {_shape(v)}")
    if dk != d or v4.shape[3] != d:
        raise ValueError(f"q, k and v must share the head dim; got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if i == 0 or j == 0 or b == 0 or h == 0 or hk == 0:
        raise ValueError(f"empty inputs are not supported; got q {_shape(q)}, k {_shape(k)}")
    per_head = isinstance(scale, torch.Tensor)
    if per_head:
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a float or a floating-point tensor; got a tensor of {scale.dtype}")
        if tuple(scale.shape) != (h,):
            if merged:
                raise ValueError(
                    f"with a 3-D q (batch and heads merged) a scale tensor must be (1,), one scale for every row; got "
                    f"scale {_shape(scale)} for q {_shape(q)}; pass q as (b, h, i, d) for one scale per head"
                )
            raise ValueError(f"scale must be a float or an (h,) = ({h},) tensor; got scale {_shape(scale)}")
        if scale.device != q.device:
            raise ValueError(f"scale must be on {q.device}; got {scale.device}")
        scale_max = MAX_SCALE if scale_max is None else scale_max
        _check_scale("scale_max", scale_max)
    elif scale_max is not None:
        raise ValueError(
            f"scale_max bounds a per-head scale tensor; with a float scale leave it None; got scale={scale!r}, "
            f"scale_max={scale_max!r}"
        )
    try:
        # a per-head scale: its bound is what the rules (and the kernels' choice of path) need
        check_attention_config(d, h, hk, scale_max if per_head else scale, groups)
    except ValueError as e:
        raise ValueError(f"{e} (q {_shape(q)}, k {_shape(k)})") from None
    groups = operator.index(groups)
    if per_head:
        scale_max = float(scale_max)
    else:
        scale = float(scale)

    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend); got {getattr(mask, 'dtype', type(mask))}")
        if tuple(mask.shape) != (b, j):
            raise ValueError(f"mask must be (b, j) = ({b}, {j}); got {_shape(mask)}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on {q.device}; got {mask.device}")

    bias4 = None
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
            raise TypeError(f"attn_bias must be a float tensor; got {getattr(attn_bias, 'dtype', type(attn_bias))}")
        if attn_bias.device != q.device:
            raise ValueError(f"attn_bias must be on {q.device}; got {attn_bias.device}")
        nd, max_nd = attn_bias.dim(), 3 if merged else 4
        if not 1 <= nd <= max_nd:
            raise ValueError(
                f"attn_bias must have 1 to {max_nd} dims (broadcastable to the logits); got {_shape(attn_bias)} "
                f"for q {_shape(q)}"
            )
        # PyTorch broadcasting (dims aligned on the right), except that a 3-D bias is (b, i, j), not (h, i, j),
        # with attn_bias_batch_dim=True or a 3-D q (b then stands for the merged batch·heads)
        by_batch = nd == 3 and (attn_bias_batch_dim or merged)
        bias4 = attn_bias[:, None] if by_batch else attn_bias[(None,) * (4 - nd)]
        if any(n not in (1, full) for n, full in zip(bias4.shape, (b, h, i, j))):
            read_as = ""
            if nd == 3:
                read_as = " read as (b, i, j)," if by_batch else " read as (h, i, j) (attn_bias_batch_dim=False),"
            raise ValueError(
                f"attn_bias {_shape(attn_bias)}{read_as} does not broadcast to (b, h, i, j) = ({b}, {h}, {i}, {j})"
            )

    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
            raise TypeError("alibi_slopes must be a float tensor of shape (h,)")
        if tuple(alibi_slopes.shape) != (h,):
            raise ValueError(f"alibi_slopes must be (h,) = ({h},); got {_shape(alibi_slopes)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on {q.device}; got {alibi_slopes.device}")
        if alibi_slopes.requires_grad:
            # the kernels have no slope gradient: refused everywhere rather than dropped on one backend
            raise ValueError(
                "alibi_slopes must not require grad (the op returns no gradient for them); register them as a "
                "buffer or pass alibi_slopes.detach()"
            )
    return q4, k4, v4, mask, bias4, alibi_slopes, scale, scale_max, groups, merged


def _use_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def cosine_sim_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | torch.Tensor = 10.0,
    l2norm_qk: bool = True,
    groups: int = 1,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias_batch_dim: bool = False,
    scale_max: float | None = None,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cosine-similarity attention: softmax(scale · q̂ k̂ᵀ + attn_bias) v, with q̂, k̂ l2-normalised along d.

    Arguments:
        q: (b, h, i, d), or (B, i, d) with batch and heads merged.
        k, v: (b, hk, j, d) with h % hk == 0 (GQA: query head n reads kv head n // (h // hk)); (b, j, d) for one
            kv head shared by all query heads (MQA); (B, j, d) when q is 3-D.
        mask: (b, j) bool key-padding mask, True = may attend. Combines with `causal`.
        attn_bias: float, 1 to 4 dims, added to the logits under PyTorch broadcasting to (b, h, i, j): e.g. (i, j),
            (h, i, j), (b, 1, i, j), (b, h, i, j), or key-only (j,), (b, 1, 1, j), query-only (i, 1), per-head
            (h, 1, 1); except that a 3-D bias is (b, i, j) when `attn_bias_batch_dim=True` or q is 3-D (then at
            most 3 dims, broadcastable to (B, i, j)). −inf entries mask. Its gradient is returned when it requires
            grad, summed over the broadcast dims to its own shape.
        causal: query r may see key c iff c <= r + (j − i), i.e. aligned bottom-right, so a KV cache works:

                i=2, j=5   keys 0 1 2 3 4
                query 0         x x x x .
                query 1         x x x x x

        scale: multiplier of the cosine similarity: a real number in (0, 100] (default 10), or a float tensor of
            shape (h,), one scale per query head (e.g. learned; (1,) for a 3-D q), on q's device. A tensor is
            clamped to [0, scale_max] (torch.clamp semantics: a head outside the range gets a zero gradient) and its
            gradient is returned when it requires grad.
        l2norm_qk: normalise q and k here (default). Pass False only if they are already unit-norm per group
            (e.g. rotary embeddings applied after the normalisation): the kernel relies on |q̂·k̂| <= groups.
        groups: normalise in this many equal chunks of d (logits then lie in ±scale·groups); an integer, not a bool.
        alibi_slopes: (h,) float: adds −slope·|pos_q − pos_k| (pos_q = r + j − i) in the kernel, O(n) memory.
            Fixed slopes: a tensor that requires grad is refused (no gradient is computed for them).
        scale_max: the bound of a scale tensor, in (0, 100]; default 100 (MAX_SCALE). Only with a scale tensor. The
            op never reads the tensor's values on the host (no device sync: CUDA graphs and torch.compile work), so
            this bound picks the kernel's path as a float scale does: keep it tight when learning scales, e.g. 16
            or 32: the fixed exponent offset (faster) needs scale_max·groups ≤ 48.8 in bf16/fp32 and ≤ 10.02 in
            fp16; beyond, the kernel runs the (exact) running-max path.
        segment_ids: packed documents. One integer tensor (b, n) for self-attention (needs i == j), or a pair
            (q_segment_ids (b, i), k_segment_ids (b, j)); with a 3-D q, b is its merged batch B. Integer dtypes
            int8/16/32/64 or uint8 (a pair of two dtypes is promoted), on q's device. Query r sees key c only where
            their ids are equal, on top of `mask`, `causal` (still aligned on the whole sequences: positions, ALiBi's
            included, are those of the packed sequence, not per document) and −inf entries of `attn_bias`. Ids in any
            order are exact. Where a batch element's ids are non-decreasing (as packing gives: checked on the device,
            per batch element and side, no host sync), the kernels skip whole tiles: a tile of keys whose
            [first id, last id] misses the query tile's [min id, max id] is never loaded (and likewise query tiles in
            the backward), so a packed batch costs about the tiles its documents share, not b·i·j. A query whose
            segment has no visible key is a row with no visible key (below).

    Returns: like q (shape and dtype). Rows with no visible key are zeros, with zero gradients. On the Triton path
    the output, and the gradients of q, k and v, are laid out like q, k and v (a (b, n, h, d) projection seen as
    (b, h, n, d) gets them back in (b, n, h, d), so reshaping to (b, n, h·d) is free), or contiguous where that
    layout would not have unit stride along d.

    Dtypes fp32 (full-precision products, not tf32), fp16, bf16, forward and backward; head dims 16–256; any
    lengths. Gradients flow to the raw q, k, v (through the normalisation), to attn_bias and to a scale tensor. The
    backward is deterministic: no atomics, bitwise-identical gradients for identical inputs.

    Numerics: with bounded logits the kernel uses a fixed exponent offset instead of a running maximum; with a
    bias, ALiBi, or scale·groups past what the dtype can hold it switches to a running maximum, so it stays
    exact. For a scale tensor that bound is scale_max·groups, and each head's offset follows its own scale. Memory
    is O(n): one fp32 statistic per query row is saved; nothing of size i·j is allocated.

    Errors: tensors of the wrong rank, shape, dtype or device raise ValueError / TypeError naming the argument and
    the shapes seen; scalar arguments outside the rules of `check_attention_config` (and flags that are not bools)
    raise ValueError naming the argument. All checks run before any kernel launch, the same on every backend.

    Backends: CUDA tensors run the Triton kernels; CPU tensors run them under the Triton interpreter when
    TRITON_INTERPRET=1, otherwise a chunked PyTorch implementation of the same function (with autograd). On the
    Triton backend, calls that need no gradient with few queries against many keys (decoding with a KV cache; the
    rule is `cosattn.decode.use_decode`) take a split-KV decode path: the same function, keys read once per kv head.
    """
    q4, k4, v4, mask, bias4, slopes, scale, scale_max, groups, merged = _canonicalize(
        q, k, v, mask, attn_bias, alibi_slopes, causal, scale, l2norm_qk, groups, attn_bias_batch_dim, scale_max
    )
    segments = _check_segments(segment_ids, q, k, q4.shape[0], q4.shape[2], k4.shape[2])
    if _use_triton(q.device):
        from .ops import triton_attention

        o = triton_attention(
            q4,
            k4,
            v4,
            mask=mask,
            attn_bias=bias4,
            causal=causal,
            scale=scale,
            l2norm_qk=l2norm_qk,
            groups=groups,
            alibi_slopes=slopes,
            scale_max=scale_max,
            segment_ids=segments,
        )
    else:
        o = attention_chunked(
            q4,
            k4,
            v4,
            mask=mask,
            attn_bias=bias4,
            causal=causal,
            scale=scale,
            l2norm_qk=l2norm_qk,
            groups=groups,
            alibi_slopes=slopes,
            scale_max=scale_max,
            segment_ids=segments,
        )
    return o.squeeze(1) if merged else o


def cosine_sim_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    causal: bool = False,
    scale: float | torch.Tensor = 10.0,
    l2norm_qk: bool = True,
    groups: int = 1,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlashAttention's variable-length form (`flash_attn_varlen_func`): sequences of different lengths concatenated
    along the first dim, no padding. Sequence s is q[cu_q[s] : cu_q[s + 1]] attending to k, v[cu_k[s] : cu_k[s + 1]];
    it is `cosine_sim_attention` on one packed row with segment ids, so the kernels skip the tiles that no two tokens
    of one sequence share.

    Arguments:
        q: (total_q, h, d); k, v: (total_k, hk, d), h % hk == 0.
        cu_seqlens_q: (n + 1,) integers, the cumulative sequence lengths from 0 (total_q last), on q's device.
        cu_seqlens_k: the same for k and v (n + 1 entries too); None (default) when k and v are laid out as q
            (self-attention).
        max_seqlen_q, max_seqlen_k: accepted for FlashAttention's signature and not used (nothing here needs the
            bound, and reading the lengths would synchronise the device).
        causal: within each sequence, query r sees key c ≤ r. The op aligns causality on the packed row, which is the
            per-sequence rule when q and k share one layout, so causal needs cu_seqlens_k None or equal to
            cu_seqlens_q (FlashAttention's bottom-right alignment of sequences whose q and k lengths differ is not
            supported: it raises). Passing None or the same tensor avoids comparing them on the device.
        scale, l2norm_qk, groups, alibi_slopes: as in `cosine_sim_attention`; ALiBi's distances are those within a
            sequence, so it too needs one layout for q and k.

    Returns (total_q, h, d) in q's dtype, with gradients for q, k, v (and a scale tensor). The lengths are not read
    on the host: cu_seqlens must be non-decreasing from 0 and end at total_q (total_k); tokens past the last offset
    would form one more sequence.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be (total, heads, d) in the varlen form; got {_shape(t)}")
    same_layout = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D tensor of n + 1 >= 2 cumulative lengths; got {_shape(cu)}")
        if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers; got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {cu.device}")
    if cu_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must count the same sequences; got {cu_seqlens_q.numel() - 1} and "
            f"{cu_k.numel() - 1}"
        )
    if (causal or alibi_slopes is not None) and not same_layout:
        if q.shape[0] != k.shape[0] or torch.compiler.is_compiling() or not torch.equal(cu_seqlens_q, cu_k):
            what = "causal=True" if causal else "alibi_slopes"
            raise ValueError(
                f"{what} in the varlen form needs q and k laid out alike (cu_seqlens_k None or equal to "
                "cu_seqlens_q; under torch.compile, None or the same tensor): the op aligns positions on the packed "
                "row, not per sequence"
            )
    positions_q = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    q_seg = torch.searchsorted(cu_seqlens_q[1:].to(torch.int32), positions_q, right=True, out_int32=True)
    if same_layout and k.shape[0] == q.shape[0]:
        k_seg = q_seg
    else:
        positions_k = torch.arange(k.shape[0], device=q.device, dtype=torch.int32)
        k_seg = torch.searchsorted(cu_k[1:].to(torch.int32), positions_k, right=True, out_int32=True)
    o = cosine_sim_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        causal=causal, scale=scale, l2norm_qk=l2norm_qk, groups=groups, alibi_slopes=alibi_slopes,
        segment_ids=(q_seg[None], k_seg[None]),
    )  # fmt: skip
    return o[0].transpose(0, 1)
