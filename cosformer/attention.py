"""Multi-head attention with one backend switch, `attn="cosine" | "regular"`.

cosine:  logits = scale · cos(q, k) (q, k l2-normalised per group of the head dim), computed by the fused op
         `cosattn.cosine_sim_attention`. With unit-norm q and k every logit lies in [−scale·groups, scale·groups],
         which is what lets the kernel skip the running row maximum.
regular: `F.scaled_dot_product_attention` with the usual 1/sqrt(dim_head): the baseline.

Everything else is shared, so the two differ only in the similarity: projections, grouped-query attention
(`kv_heads`), key-padding masks, causal masking aligned bottom-right (query r sees key c iff c <= r + (j − i),
so a KV cache can feed only the new queries), rotary (applied after the l2norm for cosine, see positional.py),
ALiBi (in-kernel slopes for cosine, an additive float bias for regular), and dropout on the attention output
(the fused op has no dropout on attention probabilities, so neither backend uses one). A query row with no
visible key returns zeros in both backends.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cosattn import check_attention_config, cosine_sim_attention, l2norm_tensors

from .positional import alibi_bias, alibi_slopes, apply_rotary

ATTN_KINDS = ("cosine", "regular")
DEFAULT_SCALE = 10.0  # of cosine attention; regular attention takes no scale (1/sqrt(dim_head))


class Attention(nn.Module):
    """Self- or cross-attention on (b, n, dim).

    Self-attention: keys and values come from x. Cross-attention (`cross=True`): from `context`
    (b, m, dim_context); never causal. `forward` returns the output and the (k, v) pair a KV cache must keep:
    post-projection, and for rotary post-norm/post-rotation, exactly what the attention read.
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
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (b, i, dim); context (b, m, dim_context) for cross-attention; mask (b, j) bool over all keys
        (True = may attend); rotary (cos, sin) of the new positions (self-attention only); kv_cache the (k, v)
        returned by an earlier call. Returns (out (b, i, dim), (k, v) each (b, kv_heads, j, dim_head))."""
        q = self._split_heads(self.to_q(x), self.heads)  # (b, h, i, d)
        if self.cross and kv_cache is not None:
            k, v = kv_cache  # the context does not change between decoding steps
        else:
            src = context if self.cross else x
            k = self._split_heads(self.to_k(src), self.kv_heads)  # (b, hk, j_new, d)
            v = self._split_heads(self.to_v(src), self.kv_heads)

        # Under autocast the projections give the autocast dtype, while the norm and the rotation may give fp32:
        # the op takes one dtype, that of v.
        dtype = v.dtype
        prenormed = False
        if rotary is not None:
            if self.kind == "cosine":
                q, k = l2norm_tensors(q, k, groups=self.groups)
                prenormed = True
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q, k = q.to(dtype), k.to(dtype)
        if kv_cache is not None and not self.cross:
            k = torch.cat((kv_cache[0], k), dim=-2)
            v = torch.cat((kv_cache[1], v), dim=-2)

        if self.kind == "cosine":
            out = cosine_sim_attention(
                q,
                k,
                v,
                mask=mask,
                causal=self.causal,
                scale=self.scale,
                l2norm_qk=not prenormed,
                groups=self.groups,
                alibi_slopes=self.alibi_slopes,
            )
        else:
            out = self._regular(q, k, v, mask)
        out = rearrange(out, "b h i d -> b i (h d)")
        return self.dropout(self.to_out(out)), (k, v)

    def _regular(self, q, k, v, mask):
        i, j = q.shape[-2], k.shape[-2]
        vis = None  # bool, broadcastable to (b, h, i, j): True = may attend
        if self.causal and (i != j or mask is not None or self.alibi_slopes is not None):
            # SDPA's is_causal aligns top-left; build the bottom-right mask the op uses
            rows = torch.arange(i, device=q.device)[:, None] + (j - i)
            vis = (torch.arange(j, device=q.device)[None, :] <= rows)[None, None]
        if mask is not None:
            key_mask = mask[:, None, None, :]
            vis = key_mask if vis is None else vis & key_mask
        has_key = None
        if vis is not None:
            # SDPA returns NaN on a row with no visible key; open such rows, then zero them like the op does
            has_key = vis.any(dim=-1, keepdim=True)
            vis = vis | ~has_key
        attn_mask = vis
        if self.alibi_slopes is not None:
            bias = alibi_bias(self.alibi_slopes, i, j).to(q.dtype)
            attn_mask = bias if vis is None else bias.masked_fill(~vis, float("-inf"))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=self.causal and attn_mask is None,
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
