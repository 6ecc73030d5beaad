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

Options beyond the named arguments are routed by prefix, x-transformers style (see options.py): `attn_*` to every
`Attention`, `cross_attn_*` to cross-attention only, `ff_*` to every `FeedForward`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention
from .options import resolve_stack_options
from .positional import RotaryEmbedding


@dataclass
class KVCache:
    """Per-block keys and values of earlier steps: `layers[l] = (self_kv, cross_kv)`, each (k, v) with
    k, v (b, kv_heads, j, dim_head), or None where the block has no such attention. `length`: tokens seen."""

    layers: list
    length: int


class FeedForward(nn.Module):
    """Linear → activation → dropout → Linear, inner width dim · mult. The activation is GELU, or SiLU with `swish`;
    `glu` gates it (GEGLU, or SwiGLU with `swish`): the first half of the projection times act(second half)."""

    def __init__(
        self,
        dim: int,
        *,
        mult: float = 4,
        glu: bool = False,
        swish: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        if mult <= 0:
            raise ValueError(f"ff_mult must be positive; got {mult!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ff dropout must be in [0, 1); got {dropout!r}")
        inner = int(dim * mult)
        self.glu = glu
        self.proj_in = nn.Linear(dim, inner * 2 if glu else inner, bias=bias)
        self.act = nn.SiLU() if swish else nn.GELU()
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

    def __init__(self, dim, *, self_attn, cross_attn, ff, pre_norm: bool, alpha: float, norm=nn.LayerNorm):
        super().__init__()
        self.self_attn, self.cross_attn, self.ff = self_attn, cross_attn, ff
        self.self_norm = norm(dim) if self_attn is not None else None
        self.cross_norm = norm(dim) if cross_attn is not None else None
        self.ff_norm = norm(dim)
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


class Transformer(nn.Module):
    """The stack of blocks on (b, n, dim), in x-transformers' vocabulary (`AttentionLayers` there).

    Unlike x-transformers, blocks are **post-LN** by default (`pre_norm=False`, with DeepNet's residual scaling;
    see the module docstring) and attention is **cosine similarity at scale 10** (x-transformers'
    `attn_qk_norm=True, attn_qk_norm_scale=10`). `pre_norm=True` and `attn="regular"` (or `attn_qk_norm=False`)
    give x-transformers' defaults: pre-LN with softmax attention at 1/sqrt(dim_head).

    heads: attention heads (default 8). attn: "cosine" (default) or "regular". use_rmsnorm: RMSNorm instead of
    LayerNorm everywhere in the stack. rotary_pos_emb / alibi_pos_bias: relative positions (at most one).
    cross_attend: add cross-attention to `context` (b, m, dim_context or dim) in every block; only_cross: blocks
    without self-attention (see `CrossAttender`). dropout: default of `attn_dropout` and `ff_dropout`.

    Routed by prefix (options.py lists every spelling): `attn_dim_head` (64), `attn_kv_heads` / `attn_one_kv_head`
    (grouped-query attention), `attn_qk_norm` (True = cosine, False = regular), `attn_qk_norm_scale` (10),
    `attn_qk_norm_groups` (l2norm groups), `attn_dropout` (on the attention output: the fused op has none on the
    weights), `attn_qkv_bias`, `attn_out_bias`; `ff_mult` (4), `ff_glu`, `ff_swish`, `ff_no_bias`, `ff_dropout`;
    `cross_attn_*` overrides `attn_*` for cross-attention. The first spellings of this project stay accepted:
    `rotary`, `alibi`, `dim_head`, `kv_heads`, `scale`, `groups`, `ff_bias`.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        *,
        causal: bool = False,
        cross_attend: bool = False,
        only_cross: bool = False,
        attn: str | None = None,
        pre_norm: bool = False,
        use_rmsnorm: bool = False,
        rotary_pos_emb: bool | None = None,
        rotary_theta: float = 10000.0,
        alibi_pos_bias: bool | None = None,
        dropout: float = 0.0,
        dim_context: int | None = None,
        **kwargs,
    ):
        super().__init__()
        opts = resolve_stack_options(
            kwargs | {"attn": attn},
            rotary_pos_emb=rotary_pos_emb,
            alibi_pos_bias=alibi_pos_bias,
            dropout=dropout,
            named=_NAMED,
        )
        rotary, alibi = opts.rotary, opts.alibi
        dim_head, groups = opts.attn.get("dim_head", 64), opts.attn.get("groups", 1)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer; got dim={dim!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer; got depth={depth!r}")
        if only_cross and not cross_attend:
            raise ValueError("only_cross=True needs cross_attend=True")
        if only_cross and causal:
            raise ValueError("causal=True has no meaning for cross-attention-only blocks (only_cross=True)")
        if rotary and alibi:
            raise ValueError("rotary_pos_emb (rotary) and alibi_pos_bias (alibi) both encode positions; choose one")
        if (rotary or alibi) and only_cross:
            raise ValueError("rotary/alibi act on self-attention; cross-attention-only blocks have none")
        if rotary and (dim_head // groups) % 2 != 0:
            raise ValueError(
                f"rotary=True needs an even l2norm group size (dim_head / groups, rotary_pos_emb); got "
                f"dim_head={dim_head}, groups={groups}"
            )
        if dim_context is not None and not cross_attend:
            raise ValueError(f"dim_context={dim_context} needs cross_attend=True")

        self.dim, self.depth, self.heads = dim, depth, heads
        self.causal = causal
        self.cross_attend, self.only_cross = cross_attend, only_cross
        self.dim_context = dim_context if dim_context is not None else dim
        self.attn = (opts.cross_attn if only_cross else opts.attn).get("attn", "cosine")
        self.pre_norm = pre_norm
        self.uses_relative_positions = rotary or alibi
        self.alpha = 1.0 if pre_norm else (2 * depth) ** 0.25
        self.beta = 1.0 if pre_norm else (8 * depth) ** -0.25

        norm = nn.RMSNorm if use_rmsnorm else nn.LayerNorm
        self.rotary = RotaryEmbedding(dim_head, theta=rotary_theta) if rotary else None
        self.layers = nn.ModuleList(
            Block(
                dim,
                self_attn=None if only_cross else Attention(dim, heads, causal=causal, alibi=alibi, **opts.attn),
                cross_attn=Attention(dim, heads, cross=True, dim_context=dim_context, **opts.cross_attn)
                if cross_attend
                else None,
                ff=FeedForward(dim, **opts.ff),
                pre_norm=pre_norm,
                alpha=self.alpha,
                norm=norm,
            )
            for _ in range(depth)
        )
        self.final_norm = norm(dim) if pre_norm else nn.Identity()
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


# the constructor's own parameters, for the did-you-mean hint on an unknown option
_NAMED = tuple(p for p in inspect.signature(Transformer.__init__).parameters if p not in ("self", "kwargs"))


def _reject(kwargs: dict, names: tuple[str, ...], cls: str) -> None:
    for name in names:
        if name in kwargs:
            raise ValueError(f"{cls} fixes {name}; got {name}={kwargs[name]!r} (use Transformer to choose it)")


class Encoder(Transformer):
    """Bidirectional stack (causal=False)."""

    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        _reject(kwargs, ("causal",), "Encoder")
        super().__init__(dim, depth, heads, causal=False, **kwargs)


class Decoder(Transformer):
    """Causal stack (causal=True); `cross_attend=True` adds cross-attention to an encoder's output."""

    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        _reject(kwargs, ("causal",), "Decoder")
        super().__init__(dim, depth, heads, causal=True, **kwargs)


class CrossAttender(Transformer):
    """Blocks of cross-attention and feed-forward only (no self-attention), as in x-transformers."""

    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        _reject(kwargs, ("causal", "cross_attend", "only_cross"), "CrossAttender")
        super().__init__(dim, depth, heads, causal=False, cross_attend=True, only_cross=True, **kwargs)
