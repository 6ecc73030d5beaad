"""Multi-head attention with one backend switch, `attn="cosine" | "regular"`.

cosine:  logits = scale · cos(q, k) (q, k l2-normalised per group of the head dim), computed by the fused op
         `cosattn.cosine_sim_attention`. With unit-norm q and k every logit lies in [−scale·groups, scale·groups],
         which is what lets the kernel skip the running row maximum.
regular: `F.scaled_dot_product_attention` with the usual 1/sqrt(dim_head): the baseline.

Everything else is shared, so the two differ only in the similarity: projections, grouped-query attention
(`kv_heads`), key-padding masks, causal masking aligned bottom-right (query r sees key c iff c <= r + (j − i),
so a KV cache can feed only the new queries), rotary (applied after the l2norm for cosine, see positional.py),
ALiBi (in-kernel slopes for cosine, an additive float bias for regular), relative position biases (`attn_bias`,
through the op's bias argument, which returns its gradient), and dropout on the attention output (the fused op has
no dropout on attention probabilities, so neither backend uses one). A query row with no visible key returns zeros
in both backends.

x-transformers' extras, with its semantics:
- memory key/values (`num_mem_kv`): learned (k, v) per kv head, prepended to the keys of every call. They are
  concatenated to k and v before the op, so under cosine attention they are l2-normalised with the other keys;
  never rotated, never cached, visible to every query (also under the causal mask: bottom-right alignment puts
  them before every query), with no position bias (zeros, also for ALiBi: then the bias is explicit, not in-kernel).
- value residual (Zhou et al., 2024, "Value Residual Learning", arXiv:2410.17897): a layer mixes the values of
  the stack's first attention into its own, v ← lerp(v_first, v, λ), λ = 0.5 or learned per token and kv head
  (sigmoid of a linear map of the attention's input).
- gated values: `gate_values` multiplies the merged heads by sigmoid(W x) (W: dim → heads · dim_head, no bias,
  zero-initialised, so every gate starts at 0.5); `gate_value_heads` multiplies each head by sigmoid(w_h · x + b_h)
  (initialised w = 0, b = 10: gates start open), from "Attend to nothing" (arXiv:2306.12929).
- packed documents (`segment_ids` (b, n), self-attention only): query r sees key c only where their ids are equal,
  on top of the other masks; the op takes the ids itself (and skips tiles no document shares), regular attention
  gets the equivalent boolean mask. Not with memory key/values (they belong to no document) nor a KV cache.
- attention maps (`return_attn=True`): the forward runs a non-fused path that materialises the (b, h, i, j)
  logits and weights. Slow, with O(n²) memory: for inspection, not training.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from cosattn import check_attention_config, cosine_sim_attention, l2norm_tensors

from .positional import alibi_bias, alibi_slopes, apply_rotary

ATTN_KINDS = ("cosine", "regular")
DEFAULT_SCALE = 10.0  # of cosine attention; regular attention takes no scale (1/sqrt(dim_head))
VALUE_HEAD_GATE_BIAS = 10.0  # x-transformers' init: sigmoid(10) ≈ 1, the per-head gates start open


@dataclass
class AttentionIntermediates:
    """What one attention call exposes besides its output (x-transformers' names).

    values: (b, kv_heads, j_new, dim_head), this call's own values before any value-residual mix.
    pre_softmax_attn / post_softmax_attn: (b, h, i, j) logits (−inf where masked) and weights over every key the
    call read (memory key/values first); only with `return_attn=True`.
    """

    values: torch.Tensor
    pre_softmax_attn: torch.Tensor | None = None
    post_softmax_attn: torch.Tensor | None = None


class KVBuffer:
    """One attention layer's cached keys and values, written in place: storage k, v (b, hk, capacity, d), of which
    positions [0, length) hold data. `append` writes the new positions after them and returns views of the
    filled prefix (the fused op takes strided inputs), so a decoding step copies only its own keys and values.
    A write beyond the capacity reallocates, at least doubling it, so token-by-token decoding past the reserve
    still copies each key O(1) times on average; `reserve` sets the capacity of the first allocation.
    Also holds token ids (b, n, 1) for `TransformerWrapper`: any tensors whose dim -2 is the sequence."""

    def __init__(self, reserve: int = 0):
        self.reserve = reserve
        self.length = 0
        self.storage: tuple[torch.Tensor, ...] | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.storage is None else self.storage[0].shape[-2]

    def filled(self) -> tuple[torch.Tensor, ...]:
        return tuple(t[..., : self.length, :] for t in self.storage)

    def append(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write tensors (..., n, d) at positions [length, length + n); returns views of [0, length + n)."""
        start, end = self.length, self.length + tensors[0].shape[-2]
        if end > self.capacity:
            capacity = max(end, 2 * self.capacity, self.reserve)
            # zeros, not empty: a fixed-shape step reads the unwritten positions too (masked, but 0 · NaN = NaN)
            grown = tuple(t.new_zeros(*t.shape[:-2], capacity, t.shape[-1]) for t in tensors)
            if self.storage is not None:
                for new, old in zip(grown, self.storage):
                    new[..., :start, :] = old[..., :start, :]
            self.storage = grown
        for buffer, t in zip(self.storage, tensors):
            buffer[..., start:end, :] = t
        self.length = end
        return self.filled()

    def write_at(self, position: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fixed-shape decoding step (`KVCache.step_position`): write tensors (..., 1, d) at `position`, a (1,)
        integer tensor on their device, and return the whole storage, every position up to the capacity (the caller
        masks those beyond `position`). No host value is read and no shape depends on the step, so the step can be
        compiled once and replayed as a CUDA graph; `length` is advanced by the caller (`KVCache.advance`)."""
        if self.storage is None:
            raise ValueError("write_at needs allocated storage: fill the cache (a prefill) first")
        for buffer, t in zip(self.storage, tensors):
            buffer[..., position, :] = t  # index_put_: compiled, it writes in place (no copy of the buffer)
        return self.storage


class Attention(nn.Module):
    """Self- or cross-attention on (b, n, dim).

    Self-attention: keys and values come from x. Cross-attention (`cross=True`): from `context`
    (b, m, dim_context); never causal. `forward` returns the output, the (k, v) the attention read (post-projection,
    and for rotary post-norm/post-rotation; no memory key/values) and the call's `AttentionIntermediates`. A KV cache
    (`KVBuffer`) keeps exactly those keys and values.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        dim_head: int = 64,
        kv_heads: int | None = None,
        causal: bool = False,
        attn: str = "cosine",
        scale: float | None = None,
        groups: int = 1,
        cross: bool = False,
        dim_context: int | None = None,
        alibi: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        out_bias: bool = False,
        num_mem_kv: int = 0,
        gate_values: bool = False,
        gate_value_heads: bool = False,
        learned_value_residual_mix: bool = False,
    ):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        check_attention_args(
            attn=attn, heads=heads, kv_heads=kv_heads, dim_head=dim_head, groups=groups, scale=scale, dropout=dropout
        )
        if alibi and cross:
            raise ValueError("alibi=True is for self-attention; cross-attention has no relative positions")
        if dim_context is not None and not cross:
            raise ValueError(f"dim_context={dim_context} is only meaningful for cross-attention")
        if isinstance(num_mem_kv, bool) or not isinstance(num_mem_kv, int) or num_mem_kv < 0:
            raise ValueError(f"num_mem_kv (attn_num_mem_kv) must be an integer >= 0; got num_mem_kv={num_mem_kv!r}")
        self.kind = attn
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.causal = causal and not cross
        self.cross = cross
        self.scale = None if attn == "regular" else float(DEFAULT_SCALE if scale is None else scale)
        self.groups = groups

        dim_kv_in = dim_context if dim_context is not None else dim
        self.to_q = nn.Linear(dim, heads * dim_head, bias=qkv_bias)
        self.to_k = nn.Linear(dim_kv_in, kv_heads * dim_head, bias=qkv_bias)
        self.to_v = nn.Linear(dim_kv_in, kv_heads * dim_head, bias=qkv_bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=out_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("alibi_slopes", alibi_slopes(heads) if alibi else None, persistent=False)

        self.num_mem_kv = num_mem_kv
        self.mem_k = nn.Parameter(torch.randn(kv_heads, num_mem_kv, dim_head)) if num_mem_kv else None
        self.mem_v = nn.Parameter(torch.randn(kv_heads, num_mem_kv, dim_head)) if num_mem_kv else None
        self.to_v_gate = nn.Linear(dim, heads * dim_head, bias=False) if gate_values else None
        if self.to_v_gate is not None:
            nn.init.zeros_(self.to_v_gate.weight)
        self.to_v_head_gate = nn.Linear(dim, heads) if gate_value_heads else None
        if self.to_v_head_gate is not None:
            nn.init.zeros_(self.to_v_head_gate.weight)
            nn.init.constant_(self.to_v_head_gate.bias, VALUE_HEAD_GATE_BIAS)
        # values live per kv head, so the learned mix has one logit per kv head (x-transformers: per query head)
        self.to_value_residual_mix = nn.Linear(dim, kv_heads) if learned_value_residual_mix else None

    @staticmethod
    def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=heads)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVBuffer | None = None,
        attn_bias: torch.Tensor | None = None,
        value_residual: torch.Tensor | None = None,
        return_attn: bool = False,
        segment_ids: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], AttentionIntermediates]:
        """x (b, i, dim); context (b, m, dim_context) for cross-attention; mask (b, j) bool over all keys
        (True = may attend; memory key/values are added to it); rotary (cos, sin) of the new positions
        (self-attention only). kv_cache: this layer's `KVBuffer`; self-attention appends the new keys and values to
        it and attends to everything it holds; cross-attention fills it with the context's once and reuses them
        afterwards (the context is then ignored). attn_bias (h, i, j) float added to the logits over the cached and
        new keys (relative position biases); value_residual (b, kv_heads, j_new, dim_head): the values of the
        stack's first attention, mixed into this call's; return_attn: compute the attention maps (slow, see the
        module docstring); segment_ids (b, n) integer document ids of packed self-attention (no cache, no memory
        key/values): a query sees the keys of its own document only. cache_position (1,) integer tensor: the fixed-
        shape decoding step (see `KVCache`): one new token at that position, written into the cache's storage, and
        the attention reads the whole storage; mask (b, capacity) must then hide the positions beyond it.
        Returns (out (b, i, dim), (k, v) each (b, kv_heads, j, dim_head), AttentionIntermediates)."""
        if segment_ids is not None:
            if self.cross:
                raise ValueError("segment_ids apply to self-attention; this Attention is cross-attention")
            if kv_cache is not None or self.num_mem_kv:
                raise ValueError(
                    "segment_ids do not combine with a KV cache or memory key/values (num_mem_kv): cached and memory "
                    "keys belong to no document of the packed row"
                )
        q = self._split_heads(self.to_q(x), self.heads)  # (b, h, i, d)
        reuse = self.cross and kv_cache is not None and kv_cache.length > 0
        if reuse:
            k, v = kv_cache.filled()  # the context does not change between decoding steps
            values = v
        else:
            src = context if self.cross else x
            k = self._split_heads(self.to_k(src), self.kv_heads)  # (b, hk, j_new, d)
            v = values = self._split_heads(self.to_v(src), self.kv_heads)
            if value_residual is not None:
                mix = 0.5
                if self.to_value_residual_mix is not None:
                    mix = rearrange(self.to_value_residual_mix(x).sigmoid(), "b n h -> b h n 1")
                v = value_residual.to(v.dtype).lerp(v, mix)

        # Under autocast the projections give the autocast dtype, while the norm and the rotation may give fp32:
        # the op takes one dtype, that of v (of the cache's v once there is a cache).
        prenormed = False
        if rotary is not None:
            if self.kind == "cosine":
                q, k = l2norm_tensors(q, k, groups=self.groups)
                prenormed = True
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if k.dtype != v.dtype:
            k = k.to(v.dtype)
        if kv_cache is not None and not reuse:
            if cache_position is not None:
                k, v = kv_cache.write_at(cache_position, k, v)  # the whole storage: shapes fixed across steps
            else:
                k, v = kv_cache.append(k, v)  # views of the filled prefix: no copy of what was cached
        if q.dtype != v.dtype:
            q = q.to(v.dtype)
        kv = (k, v)

        bias, slopes = attn_bias, self.alibi_slopes
        if slopes is not None and cache_position is not None:
            # the op would place the query at the storage's last position: give the distances explicitly
            bias, slopes = alibi_bias(slopes, q.shape[-2], k.shape[-2], pos_q=cache_position)[0], None
        elif slopes is not None and (self.kind == "regular" or self.num_mem_kv or return_attn):
            bias, slopes = alibi_bias(slopes, q.shape[-2], k.shape[-2])[0], None  # (h, i, j), explicit
        if self.num_mem_kv:
            k, v, mask, bias = self._add_memory_kv(k, v, mask, bias, prenormed)

        inter = AttentionIntermediates(values=values)
        if return_attn:
            out, inter.pre_softmax_attn, inter.post_softmax_attn = self._explicit(
                q, k, v, mask, bias, prenormed, segment_ids
            )
        elif self.kind == "cosine":
            out = cosine_sim_attention(
                q,
                k,
                v,
                mask=mask,
                attn_bias=bias,
                causal=self.causal,
                scale=self.scale,
                l2norm_qk=not prenormed,
                groups=self.groups,
                alibi_slopes=slopes,
                segment_ids=segment_ids,
            )
        else:
            out = self._regular(q, k, v, mask, bias, segment_ids)
        if self.to_v_head_gate is not None:
            out = out * rearrange(self.to_v_head_gate(x).sigmoid(), "b n h -> b h n 1").to(out.dtype)
        out = rearrange(out, "b h i d -> b i (h d)")
        if self.to_v_gate is not None:
            out = out * self.to_v_gate(x).sigmoid().to(out.dtype)
        return self.dropout(self.to_out(out)), kv, inter

    def _add_memory_kv(self, k, v, mask, bias, prenormed):
        b, n_mem = k.shape[0], self.num_mem_kv
        mem_k = repeat(self.mem_k, "h n d -> b h n d", b=b).to(k.dtype)
        mem_v = repeat(self.mem_v, "h n d -> b h n d", b=b).to(v.dtype)
        if prenormed:  # the other keys were normalised before the rotation; the op will not normalise again
            mem_k = l2norm_tensors(mem_k, groups=self.groups)
        k, v = torch.cat((mem_k, k), dim=-2), torch.cat((mem_v, v), dim=-2)
        if mask is not None:
            mask = F.pad(mask, (n_mem, 0), value=True)
        if bias is not None:
            bias = F.pad(bias, (n_mem, 0), value=0.0)
        return k, v, mask, bias

    def _visibility(self, q, k, mask, segment_ids=None):
        """Bool broadcastable to (b, h, i, j), True = may attend; None when every key is visible. segment_ids (b, n)
        with i == j == n (self-attention without cache or memory keys, as `forward` ensures)."""
        i, j = q.shape[-2], k.shape[-2]
        vis = None
        if self.causal:
            rows = torch.arange(i, device=q.device)[:, None] + (j - i)  # bottom-right aligned, as the op
            vis = (torch.arange(j, device=q.device)[None, :] <= rows)[None, None]
        if mask is not None:
            key_mask = mask[:, None, None, :]
            vis = key_mask if vis is None else vis & key_mask
        if segment_ids is not None:
            same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (b, 1, i, j)
            vis = same if vis is None else vis & same
        return vis

    def _explicit(self, q, k, v, mask, bias, prenormed, segment_ids=None):
        """The attention written out, returning (out, logits, weights): what `return_attn` exposes."""
        if self.kind == "cosine" and not prenormed:
            q, k = l2norm_tensors(q, k, groups=self.groups)
        groups_per_kv = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups_per_kv, dim=1), v.repeat_interleave(groups_per_kv, dim=1)
        scale = self.scale if self.kind == "cosine" else self.dim_head**-0.5
        logits = scale * (q.float() @ k.float().transpose(-1, -2))  # (b, h, i, j)
        if bias is not None:
            logits = logits + bias.float()
        vis = self._visibility(q, k, mask, segment_ids)
        if vis is not None:
            logits = logits.masked_fill(~vis, float("-inf"))
        # a row with no visible key gives zero weights (and a zero output), as the op does
        has_key = (logits != float("-inf")).any(dim=-1, keepdim=True)
        weights = torch.where(has_key, logits, torch.zeros_like(logits)).softmax(dim=-1) * has_key
        out = (weights.to(v.dtype) @ v).to(q.dtype)
        return out, logits, weights

    def _regular(self, q, k, v, mask, bias, segment_ids=None):
        # SDPA's is_causal aligns top-left: with i != j, a mask or a bias, build the bottom-right mask the op uses.
        # One query (a decoding step) sees every key under that mask: no mask then, which keeps SDPA on its fastest
        # kernels (a mask rules out flash attention)
        i, j = q.shape[-2], k.shape[-2]
        causal = self.causal and i > 1
        needs_vis = (causal and i != j) or mask is not None or bias is not None or segment_ids is not None
        vis = self._visibility(q, k, mask, segment_ids) if needs_vis else None
        has_key = None
        if vis is not None:
            # SDPA returns NaN on a row with no visible key; open such rows, then zero them like the op does
            has_key = vis.any(dim=-1, keepdim=True)
            vis = vis | ~has_key
        attn_mask = vis
        if bias is not None:
            bias = bias.to(q.dtype)
            attn_mask = bias if vis is None else bias.masked_fill(~vis, float("-inf"))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=causal and attn_mask is None,
            enable_gqa=self.kv_heads != self.heads,
        )
        return out if has_key is None else out * has_key


def check_attention_args(*, attn, heads, kv_heads, dim_head, groups, scale, dropout) -> None:
    """Reject invalid or conflicting attention options, naming the argument. The cosine backend's limits are the
    op's own (`cosattn.check_attention_config`); regular attention takes neither a scale nor l2norm groups."""
    if attn not in ATTN_KINDS:
        raise ValueError(f"attn must be one of {ATTN_KINDS}; got attn={attn!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1); got dropout={dropout!r}")
    if attn == "cosine":
        check_attention_config(dim_head, heads, kv_heads, DEFAULT_SCALE if scale is None else scale, groups)
        return
    if scale is not None:
        raise ValueError(
            f"scale applies to attn='cosine' only (attn_qk_norm_scale; regular uses 1/sqrt(dim_head)); "
            f"got scale={scale!r}"
        )
    if groups != 1:
        raise ValueError(
            f"groups applies to attn='cosine' only (attn_qk_norm_groups, the l2norm groups); got groups={groups!r}"
        )
    for name, value in (("heads", heads), ("kv_heads", kv_heads), ("dim_head", dim_head)):
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a positive integer; got {name}={value!r}")
    if heads % kv_heads != 0:
        raise ValueError(f"kv_heads must divide heads; got heads={heads}, kv_heads={kv_heads}")
