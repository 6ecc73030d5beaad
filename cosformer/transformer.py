"""The block stack: `Transformer` and its x-transformers-style variants `Encoder`, `Decoder`, `CrossAttender`.

A block is self-attention (unless cross-only), cross-attention (when `cross_attend`), then a feed-forward, each
a residual sublayer f. Two normalisation layouts:

- post-LN (default, `pre_norm=False`), with DeepNet's residual scaling and init (Wang et al., 2022, "DeepNet:
  Scaling Transformers to 1,000 Layers", arXiv:2203.00555):
      x_{l+1} = LN(alpha · x_l + f(x_l)),   alpha = (2 · depth) ** 0.25,
  and xavier-normal init with gain beta = (8 · depth) ** -0.25 for the feed-forward weights and the value and
  output projections of attention (q and k projections: gain 1). `depth` is the number of blocks in this stack.
  Post-LN with cosine attention is the combination flash-cosine-sim-attention reports working (the l2norm of q
  and k takes over the stabilising role of the pre-norm); the DeepNet scaling guards its long-run stability.
- pre-LN (`pre_norm=True`): x_{l+1} = x_l + f(LN(x_l)), a final LN after the last block, no DeepNet scaling
  (all gains 1).

The output of the stack is always final-normed: in post-LN the last operation already is a LayerNorm.

Options beyond the named arguments are routed by prefix, x-transformers style: `attn_dropout`, `attn_qkv_bias`,
`attn_out_bias` go to every `Attention`; `ff_dropout`, `ff_bias` to every `FeedForward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention
from .positional import RotaryEmbedding

ATTN_PREFIXED = ("dropout", "qkv_bias", "out_bias")
FF_PREFIXED = ("dropout", "bias")


@dataclass
class KVCache:
    """Per-block keys and values of earlier steps: `layers[l] = (self_kv, cross_kv)`, each (k, v) with
    k, v (b, kv_heads, j, dim_head), or None where the block has no such attention. `length`: tokens seen."""

    layers: list
    length: int


class FeedForward(nn.Module):
    """Linear → GELU (or GEGLU when `glu`) → dropout → Linear, inner width dim · mult."""

    def __init__(self, dim: int, *, mult: float = 4, glu: bool = False, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if mult <= 0:
            raise ValueError(f"ff_mult must be positive; got {mult!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ff dropout must be in [0, 1); got {dropout!r}")
        inner = int(dim * mult)
        self.glu = glu
        self.proj_in = nn.Linear(dim, inner * 2 if glu else inner, bias=bias)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            h = h * self.act(gate)
        else:
            h = self.act(h)
        return self.proj_out(self.dropout(h))


class Block(nn.Module):
    """One block: [self-attention], [cross-attention], feed-forward; each sublayer with its own LayerNorm."""

    def __init__(self, dim, *, self_attn, cross_attn, ff, pre_norm: bool, alpha: float):
        super().__init__()
        self.self_attn, self.cross_attn, self.ff = self_attn, cross_attn, ff
        self.self_norm = nn.LayerNorm(dim) if self_attn is not None else None
        self.cross_norm = nn.LayerNorm(dim) if cross_attn is not None else None
        self.ff_norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        self.alpha = alpha

    def _in(self, x, norm):
        return norm(x) if self.pre_norm else x

    def _out(self, x, h, norm):
        return x + h if self.pre_norm else norm(self.alpha * x + h)

    def forward(self, x, *, mask, context, context_mask, rotary, cache):
        self_cache, cross_cache = cache if cache is not None else (None, None)
        self_kv = cross_kv = None
        if self.self_attn is not None:
            h, self_kv = self.self_attn(self._in(x, self.self_norm), mask=mask, rotary=rotary, kv_cache=self_cache)
            x = self._out(x, h, self.self_norm)
        if self.cross_attn is not None:
            h, cross_kv = self.cross_attn(
                self._in(x, self.cross_norm), context=context, mask=context_mask, kv_cache=cross_cache
            )
            x = self._out(x, h, self.cross_norm)
        x = self._out(x, self.ff(self._in(x, self.ff_norm)), self.ff_norm)
        return x, (self_kv, cross_kv)


def _route_prefixed(kwargs: dict) -> tuple[dict, dict]:
    attn_kwargs, ff_kwargs = {}, {}
    for key, value in kwargs.items():
        if key.startswith("attn_") and key[5:] in ATTN_PREFIXED:
            attn_kwargs[key[5:]] = value
        elif key.startswith("ff_") and key[3:] in FF_PREFIXED:
            ff_kwargs[key[3:]] = value
        else:
            allowed = [f"attn_{k}" for k in ATTN_PREFIXED] + [f"ff_{k}" for k in FF_PREFIXED]
            raise TypeError(f"Transformer got an unexpected keyword argument {key!r} (prefixed options: {allowed})")
    return attn_kwargs, ff_kwargs


class Transformer(nn.Module):
    """The stack of blocks on (b, n, dim).

    attn: "cosine" (fused cosine-similarity attention, `scale`, l2norm `groups`) or "regular" (SDPA, 1/sqrt(d)).
    kv_heads: grouped-query attention (heads % kv_heads == 0). rotary / alibi: relative positions (not both).
    cross_attend: add cross-attention to `context` (b, m, dim_context or dim) in every block; only_cross: blocks
    without self-attention (see `CrossAttender`).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        *,
        causal: bool = False,
        cross_attend: bool = False,
        only_cross: bool = False,
        attn: str = "cosine",
        scale: float | None = None,
        groups: int = 1,
        kv_heads: int | None = None,
        dim_head: int = 64,
        dim_context: int | None = None,
        pre_norm: bool = False,
        ff_mult: float = 4,
        ff_glu: bool = False,
        dropout: float = 0.0,
        rotary: bool = False,
        rotary_theta: float = 10000.0,
        alibi: bool = False,
        **kwargs,
    ):
        super().__init__()
        attn_kwargs, ff_kwargs = _route_prefixed(kwargs)
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer; got dim={dim!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer; got depth={depth!r}")
        if only_cross and not cross_attend:
            raise ValueError("only_cross=True needs cross_attend=True")
        if only_cross and causal:
            raise ValueError("causal=True has no meaning for cross-attention-only blocks (only_cross=True)")
        if rotary and alibi:
            raise ValueError("rotary=True and alibi=True both encode positions; choose one")
        if (rotary or alibi) and only_cross:
            raise ValueError("rotary/alibi act on self-attention; cross-attention-only blocks have none")
        if rotary and (dim_head // groups) % 2 != 0:
            raise ValueError(
                f"rotary=True needs an even l2norm group size (dim_head / groups); got dim_head={dim_head}, "
                f"groups={groups}"
            )
        if dim_context is not None and not cross_attend:
            raise ValueError(f"dim_context={dim_context} needs cross_attend=True")

        self.dim, self.depth, self.heads = dim, depth, heads
        self.causal = causal
        self.cross_attend, self.only_cross = cross_attend, only_cross
        self.dim_context = dim_context if dim_context is not None else dim
        self.attn, self.pre_norm = attn, pre_norm
        self.uses_relative_positions = rotary or alibi
        self.alpha = 1.0 if pre_norm else (2 * depth) ** 0.25
        self.beta = 1.0 if pre_norm else (8 * depth) ** -0.25

        common = (
            dict(dim_head=dim_head, kv_heads=kv_heads, attn=attn, scale=scale, groups=groups, dropout=dropout)
            | attn_kwargs
        )
        ff_kwargs = dict(mult=ff_mult, glu=ff_glu, dropout=dropout) | ff_kwargs
        self.rotary = RotaryEmbedding(dim_head, theta=rotary_theta) if rotary else None
        self.layers = nn.ModuleList(
            Block(
                dim,
                self_attn=None if only_cross else Attention(dim, heads, causal=causal, alibi=alibi, **common),
                cross_attn=Attention(dim, heads, cross=True, dim_context=dim_context, **common)
                if cross_attend
                else None,
                ff=FeedForward(dim, **ff_kwargs),
                pre_norm=pre_norm,
                alpha=self.alpha,
            )
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        def xavier(linear: nn.Linear, gain: float):
            nn.init.xavier_normal_(linear.weight, gain=gain)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

        for block in self.layers:
            for attn in (block.self_attn, block.cross_attn):
                if attn is None:
                    continue
                xavier(attn.to_q, 1.0)
                xavier(attn.to_k, 1.0)
                xavier(attn.to_v, self.beta)
                xavier(attn.to_out, self.beta)
            xavier(block.ff.proj_in, self.beta)
            xavier(block.ff.proj_out, self.beta)

    def _check_inputs(self, x, mask, context, context_mask, cache):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (b, n, dim={self.dim}); got {tuple(x.shape)}")
        b, n, _ = x.shape
        offset = cache.length if cache is not None else 0
        if cache is not None:
            if not self.causal and not self.only_cross:
                raise ValueError("cache needs causal self-attention; this stack is bidirectional (causal=False)")
            if len(cache.layers) != self.depth:
                raise ValueError(f"cache holds {len(cache.layers)} layers; this stack has depth={self.depth}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend); got {mask.dtype}")
            if tuple(mask.shape) != (b, offset + n):
                raise ValueError(f"mask must be (b, cached + new keys) = ({b}, {offset + n}); got {tuple(mask.shape)}")
        if self.cross_attend:
            need_context = cache is None or any(c[1] is None for c in cache.layers)
            if context is None and need_context:
                raise ValueError("context is required: this stack was built with cross_attend=True")
            if context is not None and (
                context.dim() != 3 or context.shape[0] != b or context.shape[-1] != self.dim_context
            ):
                raise ValueError(
                    f"context must be (b={b}, m, dim_context={self.dim_context}); got {tuple(context.shape)}"
                )
            if context_mask is not None:
                if context_mask.dtype != torch.bool:
                    raise TypeError(f"context_mask must be a bool tensor; got {context_mask.dtype}")
                m = context.shape[1] if context is not None else cache.layers[0][1][0].shape[-2]
                if tuple(context_mask.shape) != (b, m):
                    raise ValueError(f"context_mask must be (b, m) = ({b}, {m}); got {tuple(context_mask.shape)}")
        elif context is not None or context_mask is not None:
            raise ValueError("context/context_mask given, but this stack was built without cross_attend=True")

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_cache: bool = False,
    ):
        """x (b, n, dim) -> (b, n, dim), final-normed.

        mask (b, n) bool key-padding mask (True = real token); with a cache it covers all keys, (b, cached + n).
        context (b, m, dim_context) and context_mask (b, m) for cross-attention. cache: a `KVCache` from an
        earlier call with return_cache=True; only the new tokens are fed, and cross-attention reuses the context's
        keys and values cached by the first call (context may then be omitted). return_cache: also return the cache.
        """
        self._check_inputs(x, mask, context, context_mask, cache)
        offset = cache.length if cache is not None else 0
        rotary = self.rotary(x.shape[1], offset) if self.rotary is not None else None
        layer_caches = cache.layers if cache is not None else [None] * self.depth
        new_caches = []
        for block, layer_cache in zip(self.layers, layer_caches):
            x, kv = block(x, mask=mask, context=context, context_mask=context_mask, rotary=rotary, cache=layer_cache)
            new_caches.append(kv)
        x = self.final_norm(x)
        if return_cache:
            return x, KVCache(layers=new_caches, length=offset + x.shape[1])
        return x


def _reject(kwargs: dict, names: tuple[str, ...], cls: str) -> None:
    for name in names:
        if name in kwargs:
            raise ValueError(f"{cls} fixes {name}; got {name}={kwargs[name]!r} (use Transformer to choose it)")


class Encoder(Transformer):
    """Bidirectional stack (causal=False)."""

    def __init__(self, dim: int, depth: int, heads: int, **kwargs):
        _reject(kwargs, ("causal",), "Encoder")
        super().__init__(dim, depth, heads, causal=False, **kwargs)


class Decoder(Transformer):
    """Causal stack (causal=True); `cross_attend=True` adds cross-attention to an encoder's output."""

    def __init__(self, dim: int, depth: int, heads: int, **kwargs):
        _reject(kwargs, ("causal",), "Decoder")
        super().__init__(dim, depth, heads, causal=True, **kwargs)


class CrossAttender(Transformer):
    """Blocks of cross-attention and feed-forward only (no self-attention), as in x-transformers."""

    def __init__(self, dim: int, depth: int, heads: int, **kwargs):
        _reject(kwargs, ("causal", "cross_attend", "only_cross"), "CrossAttender")
        super().__init__(dim, depth, heads, causal=False, cross_attend=True, only_cross=True, **kwargs)
