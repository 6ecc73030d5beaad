"""Plain PyTorch references for cosine-similarity attention.

`attention_reference` materialises the (b, h, i, j) logits: it is the ground truth the kernels are tested
against (run it in float64) and nothing else. `attention_chunked` computes the same function in query chunks
with autograd, so memory stays O(chunk · j): it is what the op runs on a CPU when the Triton interpreter
is off. Both take canonical 4-D inputs (see `cosattn.interface`), and a float scale or a per-head (h,) tensor, clamped
by `clamp_scale` as the kernels' path clamps it. `segment_ids` is one (b, n) integer tensor (self-attention) or a
pair (q_segment_ids (b, i), k_segment_ids (b, j)): a query sees a key only where their ids are equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def l2norm_tensors(*tensors: torch.Tensor, groups: int = 1, eps: float = EPS):
    """l2-normalise each tensor along its last dim in `groups` equal chunks (F.normalize semantics)."""
    out = []
    for t in tensors:
        d = t.shape[-1]
        if groups < 1 or d % groups != 0:
            raise ValueError(f"groups must be a positive divisor of the last dim, got groups={groups}, dim={d}")
        if groups == 1:  # the same, without the two views (host time per call, in eager decoding)
            out.append(F.normalize(t, dim=-1, eps=eps))
            continue
        g = t.unflatten(-1, (groups, d // groups))
        out.append(F.normalize(g, dim=-1, eps=eps).flatten(-2))
    return out[0] if len(out) == 1 else tuple(out)


def clamp_scale(scale: torch.Tensor, scale_max: float | None, dtype: torch.dtype) -> torch.Tensor:
    """A per-head scale tensor as every backend uses it: in `dtype`, clamped to [0, scale_max] by torch.clamp, so its
    gradient is zero outside that range and a NaN stays NaN. scale_max None: no upper clamp (reference only)."""
    return scale.to(dtype).clamp(0.0, scale_max)


def _head_scale(scale, scale_max, dtype):
    """A float scale as it is; a per-head (h,) tensor clamped and shaped (h, 1, 1) to broadcast over (b, h, i, j),
    kept at least as precise as `dtype` (as a float scale is: a half-precision reference rounds the logits, not the
    scale)."""
    if not isinstance(scale, torch.Tensor):
        return scale
    return clamp_scale(scale, scale_max, torch.promote_types(scale.dtype, dtype))[:, None, None]


def segment_pair(segment_ids):
    """(q_segment_ids, k_segment_ids) from one tensor (self-attention: both the same) or a pair; None stays None."""
    if segment_ids is None or isinstance(segment_ids, torch.Tensor):
        return segment_ids, segment_ids
    return tuple(segment_ids)


def visibility(
    i: int, j: int, *, causal: bool, mask: torch.Tensor | None, device, segment_ids=None, rows: slice = slice(None)
) -> torch.Tensor | None:
    """Bool (b or 1, 1, i, j): True where query r may see key c. Causal is aligned bottom-right; with `segment_ids`
    only keys of the query's own segment. `rows` restricts the queries (a chunk of them: (.., len(rows), j))."""
    vis = None
    if causal:
        r = torch.arange(i, device=device)[rows, None]
        c = torch.arange(j, device=device)[None, :]
        vis = (c <= r + (j - i))[None, None]
    if mask is not None:
        m = mask[:, None, None, :]
        vis = m if vis is None else vis & m
    q_seg, k_seg = segment_pair(segment_ids)
    if q_seg is not None:
        s = (q_seg[:, rows, None] == k_seg[:, None, :])[:, None]
        vis = s if vis is None else vis & s
    return vis


def alibi_bias(slopes: torch.Tensor, i: int, j: int, dtype) -> torch.Tensor:
    """(1, h, i, j): −slope · |pos_q − pos_k| with pos_q = r + j − i."""
    pq = torch.arange(i, device=slopes.device, dtype=dtype)[:, None] + (j - i)
    pk = torch.arange(j, device=slopes.device, dtype=dtype)[None, :]
    return -slopes.to(dtype)[None, :, None, None] * (pq - pk).abs()[None, None]


def _attend(q, k, v, *, bias, vis, scale):
    # q (b, h, i, d); k, v (b, h, j, d) with kv heads already expanded
    s = (scale * (q @ k.transpose(-1, -2))).to(q.dtype)  # (b, h, i, j)
    if bias is not None:
        s = s + bias
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    # rows with no visible key give zeros; a NaN logit is "visible" and propagates, never hidden
    has_key = (s != float("-inf")).any(dim=-1, keepdim=True)
    s = torch.where(has_key, s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = s.softmax(dim=-1) * has_key
    return p.to(v.dtype) @ v


def _expand_kv(t: torch.Tensor, h: int) -> torch.Tensor:
    hk = t.shape[1]
    return t if hk == h else t.repeat_interleave(h // hk, dim=1)


def attention_reference(q, k, v, *, mask=None, attn_bias=None, causal=False, scale=10.0, l2norm_qk=True, groups=1,
                        alibi_slopes=None, scale_max=None, segment_ids=None):  # fmt: skip
    """Canonical inputs: q (b, h, i, d), k/v (b, hk, j, d), mask (b, j) bool, attn_bias broadcastable to
    (b, h, i, j), alibi_slopes (h,), scale a float or (h,) tensor (clamped to [0, scale_max]), segment_ids (b, n) or a
    pair ((b, i), (b, j)). Computes in the dtype of q (pass float64 for ground truth); autograd gives every gradient,
    the scale's included."""
    b, h, i, _ = q.shape
    j = k.shape[2]
    scale = _head_scale(scale, scale_max, q.dtype)
    if l2norm_qk:
        q, k = l2norm_tensors(q, k, groups=groups)
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    bias = attn_bias.to(q.dtype) if attn_bias is not None else None
    if alibi_slopes is not None:
        ab = alibi_bias(alibi_slopes, i, j, q.dtype)
        bias = ab if bias is None else bias + ab
    vis = visibility(i, j, causal=causal, mask=mask, device=q.device, segment_ids=segment_ids)
    return _attend(q, k, v, bias=bias, vis=vis, scale=scale)


def attention_chunked(q, k, v, *, mask=None, attn_bias=None, causal=False, scale=10.0, l2norm_qk=True, groups=1,
                      alibi_slopes=None, scale_max=None, segment_ids=None, chunk_size=1024):  # fmt: skip
    """The same function as `attention_reference`, computed over query chunks: memory O(chunk · j).
    Computes in float32 for half inputs (like the kernels' accumulators), returns q's dtype."""
    b, h, i, _ = q.shape
    j = k.shape[2]
    out_dtype = q.dtype
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = _head_scale(scale, scale_max, cdt)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    if l2norm_qk:
        q, k = l2norm_tensors(q, k, groups=groups)
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    outs = []
    for start in range(0, i, chunk_size):
        stop = min(i, start + chunk_size)
        r = torch.arange(start, stop, device=q.device)
        bias = None
        if attn_bias is not None:
            bias = attn_bias[..., start:stop, :].to(cdt) if attn_bias.shape[-2] != 1 else attn_bias.to(cdt)
        if alibi_slopes is not None:
            pq = (r + (j - i)).to(cdt)[:, None]
            pk = torch.arange(j, device=q.device, dtype=cdt)[None, :]
            ab = -alibi_slopes.to(cdt)[None, :, None, None] * (pq - pk).abs()[None, None]
            bias = ab if bias is None else bias + ab
        vis = visibility(
            i, j, causal=causal, mask=mask, device=q.device, segment_ids=segment_ids, rows=slice(start, stop)
        )
        outs.append(_attend(q[:, :, start:stop], k, v, bias=bias, vis=vis, scale=scale))
    return torch.cat(outs, dim=2).to(out_dtype)
