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

LN is a LayerNorm, or an RMSNorm with `use_rmsnorm=True`. The output of the stack is always final-normed: in
post-LN the last operation already is a norm.

Options beyond the named arguments are routed by prefix, x-transformers style (see options.py): `attn_*` to every
`Attention`, `cross_attn_*` to cross-attention only, `ff_*` to every `FeedForward`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, AttentionIntermediates, KVBuffer
from .options import resolve_stack_options
from .position_bias import DynamicPositionBias, RelativePositionBias
from .positional import RotaryEmbedding, check_segment_ids, check_seq_start_pos, segment_positions


class KVCache:
    """Keys and values of earlier steps, kept by a `Transformer` (and the token ids by a `TransformerWrapper`).

    Every forward given the cache updates it in place: each self-attention layer writes its new keys and values
    into preallocated buffers at position `length`, and cross-attention layers keep the context's keys and values
    from the first call. `layers[l] = (self_kv, cross_kv)`: the block's `KVBuffer`s (None where the block has no
    such attention), each holding k, v (b, kv_heads, j, dim_head). `length`: tokens seen. `capacity`: positions
    the self-attention buffers reserve at their first write (at least what that write needs); a longer sequence
    reallocates them, doubling. `generate` reserves what it will need, so it never reallocates.

    Fixed-shape decoding (what CUDA graphs and a compiled step need): after a first call has filled the cache (the
    prompt, a "prefill"), a forward with `cache_position` (1,) = `cache.step_position()` feeds one new token, writes
    its keys and values into the storage at that position and attends to the whole storage, the positions beyond it
    masked. No host value of the cache is read and no shape changes from step to step, so the step compiles once
    and replays; the caller then calls `advance(1)`. The cost is that of attending to `capacity` keys every step.
    """

    def __init__(self, capacity: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative integer; got capacity={capacity!r}")
        self.capacity = capacity
        self.length = 0
        self.batch: int | None = None
        self.layers: list[tuple[KVBuffer | None, KVBuffer | None]] = []
        self.tokens: KVBuffer | None = None  # (b, length, 1) ids, when a TransformerWrapper fed the cache
        self.context_mask: torch.Tensor | None = None  # (b, m) of the context whose keys cross_kv holds
        self.seq_start_pos: torch.Tensor | None = None  # (b,) left padding of the rows, fixed by the first call

    def resolve_seq_start_pos(self, seq_start_pos: torch.Tensor | None) -> torch.Tensor | None:
        """The left padding (b,) the cache was started with: a later call may omit it, never change it."""
        if self.length == 0 or seq_start_pos is self.seq_start_pos:
            return seq_start_pos
        if seq_start_pos is None:
            return self.seq_start_pos
        if self.seq_start_pos is None or not torch.equal(seq_start_pos, self.seq_start_pos.to(seq_start_pos.device)):
            raise ValueError(
                f"seq_start_pos {seq_start_pos.tolist()} differs from the left padding the cache was started with "
                f"({None if self.seq_start_pos is None else self.seq_start_pos.tolist()})"
            )
        return seq_start_pos

    def step_position(self, device: torch.device | str) -> torch.Tensor:
        """(1,) long tensor on `device`: the position the next fixed-shape step writes (see the class docstring)."""
        if self.length == 0 or not self.layers:
            raise ValueError("a fixed-shape step needs a filled cache: run a first forward (the prompt) with it")
        if self.length >= self.reserved:
            raise ValueError(
                f"the cache holds {self.length} of its {self.reserved} positions: a fixed-shape step cannot grow it "
                f"(reserve more with KVCache(capacity=...))"
            )
        return torch.tensor([self.length], device=device)

    @property
    def reserved(self) -> int:
        """Positions the self-attention storage holds now (0 before the first write)."""
        buffers = [kv for kv, _ in self.layers if kv is not None]
        return buffers[0].capacity if buffers else 0

    def advance(self, n: int = 1) -> None:
        """Count n tokens written by fixed-shape steps (which leave the host-side lengths alone). The token ids are
        no longer recorded from then on (they served only to reject a whole sequence fed again)."""
        self.length += n
        for kv, _ in self.layers:
            if kv is not None:
                kv.length += n
        self.tokens = None

    def _start(self, blocks, batch: int) -> None:
        self.batch = batch
        self.layers = [
            (
                KVBuffer(self.capacity) if block.self_attn is not None else None,
                KVBuffer() if block.cross_attn is not None else None,
            )
            for block in blocks
        ]


@dataclass
class LayerIntermediates:
    """What `Transformer.forward(return_intermediates=True)` returns besides its output (x-transformers' names).

    hiddens: the input of every block, (b, n, dim) each, in order. attn_intermediates: one `AttentionIntermediates`
    per attention sublayer that ran, self before cross within a block, with the attention maps. last_hidden: the
    stack's (final-normed) output. memory_tokens: the wrappers' memory tokens after the stack, (b, m, dim).
    """

    hiddens: list[torch.Tensor]
    attn_intermediates: list[AttentionIntermediates]
    last_hidden: torch.Tensor
    memory_tokens: torch.Tensor | None = None


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

    def forward(
        self,
        x,
        *,
        mask,
        context,
        context_mask,
        rotary,
        cache,
        attn_bias,
        value_residuals,
        return_attn,
        segment_ids=None,
        cache_position=None,
    ):
        """Returns x, the (self, cross) key/values a cache keeps and the (self, cross) AttentionIntermediates."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        self_kv = cross_kv = self_inter = cross_inter = None
        if self.self_attn is not None:
            h, self_kv, self_inter = self.self_attn(
                self._in(x, self.self_norm),
                mask=mask,
                rotary=rotary,
                kv_cache=self_cache,
                attn_bias=attn_bias,
                value_residual=value_residuals[0],
                return_attn=return_attn,
                segment_ids=segment_ids,
                cache_position=cache_position,
            )
            x = self._out(x, h, self.self_norm)
        if self.cross_attn is not None:
            h, cross_kv, cross_inter = self.cross_attn(
                self._in(x, self.cross_norm),
                context=context,
                mask=context_mask,
                kv_cache=cross_cache,
                value_residual=value_residuals[1],
                return_attn=return_attn,
            )
            x = self._out(x, h, self.cross_norm)
        x = self._out(x, self.ff(self._in(x, self.ff_norm)), self.ff_norm)
        return x, (self_kv, cross_kv), (self_inter, cross_inter)


class Transformer(nn.Module):
    """The stack of blocks on (b, n, dim), in x-transformers' vocabulary (`AttentionLayers` there).

    Unlike x-transformers, blocks are **post-LN** by default (`pre_norm=False`, with DeepNet's residual scaling;
    see the module docstring) and attention is **cosine similarity at scale 10** (x-transformers'
    `attn_qk_norm=True, attn_qk_norm_scale=10`). `pre_norm=True` and `attn="regular"` (or `attn_qk_norm=False`)
    give x-transformers' defaults: pre-LN with softmax attention at 1/sqrt(dim_head).

    heads: attention heads (default 8). attn: "cosine" (default) or "regular". use_rmsnorm: RMSNorm instead of
    LayerNorm everywhere in the stack. cross_attend: add cross-attention to `context` (b, m, dim_context or dim) in
    every block; only_cross: blocks without self-attention (see `CrossAttender`). dropout: default of
    `attn_dropout` and `ff_dropout`.

    Relative positions of self-attention, at most one scheme: rotary_pos_emb (rotary_emb_dim: the channels of a head
    that rotate, default dim_head // 2 as in x-transformers; rotary_theta; see positional.py), alibi_pos_bias,
    rel_pos_bias (T5's bucketed bias: rel_pos_num_buckets, rel_pos_max_distance), dynamic_pos_bias (an MLP of the
    distance: dynamic_pos_bias_mlp_depth, dynamic_pos_bias_log_distance, dynamic_pos_bias_norm). The biases reach
    the fused op as its `attn_bias`; see position_bias.py.

    layer_dropout: stochastic depth; in training each block is skipped with this probability (x-transformers skips
    each sublayer on its own). add_value_residual: every attention after the first of its kind (self, cross) mixes
    in that first attention's values, with a learned per-token mix (learned_value_residual_mix, self-attention
    only, as in x-transformers) or 0.5.

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
        rotary_emb_dim: int | None = None,
        rotary_theta: float = 10000.0,
        alibi_pos_bias: bool | None = None,
        rel_pos_bias: bool = False,
        rel_pos_num_buckets: int = 32,
        rel_pos_max_distance: int = 128,
        dynamic_pos_bias: bool = False,
        dynamic_pos_bias_mlp_depth: int = 2,
        dynamic_pos_bias_log_distance: bool = False,
        dynamic_pos_bias_norm: bool = False,
        layer_dropout: float = 0.0,
        add_value_residual: bool = False,
        learned_value_residual_mix: bool = True,
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
        schemes = dict(rotary=rotary, alibi=alibi, rel_pos_bias=rel_pos_bias, dynamic_pos_bias=dynamic_pos_bias)
        chosen = [name for name, on in schemes.items() if on]
        if len(chosen) > 1:
            raise ValueError(
                f"{' and '.join(f'{name}=True' for name in chosen)} all encode positions; choose one "
                "(rotary = rotary_pos_emb, alibi = alibi_pos_bias)"
            )
        if chosen and only_cross:
            raise ValueError(f"{chosen[0]} acts on self-attention; cross-attention-only blocks have none")
        if not (isinstance(layer_dropout, (int, float)) and 0.0 <= layer_dropout < 1.0):
            raise ValueError(f"layer_dropout must be in [0, 1); got layer_dropout={layer_dropout!r}")
        if rotary and (dim_head // groups) % 2 != 0:
            raise ValueError(
                f"rotary=True needs an even l2norm group size, attn_dim_head / attn_qk_norm_groups; got "
                f"dim_head={dim_head}, groups={groups}"
            )
        if dim_context is not None and not cross_attend:
            raise ValueError(f"dim_context={dim_context} needs cross_attend=True")
        if rotary_emb_dim is not None and not rotary:
            raise ValueError(f"rotary_emb_dim={rotary_emb_dim!r} needs rotary_pos_emb=True")
        rotary_emb_dim = dim_head // 2 if rotary_emb_dim is None else rotary_emb_dim
        even = isinstance(rotary_emb_dim, int) and rotary_emb_dim % 2 == 0
        if rotary and not (even and 2 <= rotary_emb_dim <= dim_head):
            raise ValueError(
                f"rotary_emb_dim must be an even number of channels in [2, dim_head={dim_head}] (default "
                f"dim_head // 2); got rotary_emb_dim={rotary_emb_dim!r}"
            )

        self.dim, self.depth, self.heads = dim, depth, heads
        self.causal = causal
        self.cross_attend, self.only_cross = cross_attend, only_cross
        self.dim_context = dim_context if dim_context is not None else dim
        self.attn = (opts.cross_attn if only_cross else opts.attn).get("attn", "cosine")
        self.pre_norm = pre_norm
        self.uses_relative_positions = bool(chosen)
        self.layer_dropout = float(layer_dropout)
        self.add_value_residual = add_value_residual
        self.alpha = 1.0 if pre_norm else (2 * depth) ** 0.25
        self.beta = 1.0 if pre_norm else (8 * depth) ** -0.25

        norm = nn.RMSNorm if use_rmsnorm else nn.LayerNorm
        self.rotary = RotaryEmbedding(rotary_emb_dim, theta=rotary_theta, head_dim=dim_head) if rotary else None
        self.rel_pos = None
        if rel_pos_bias:
            self.rel_pos = RelativePositionBias(
                heads,
                causal=causal,
                scale=dim_head**0.5,
                num_buckets=rel_pos_num_buckets,
                max_distance=rel_pos_max_distance,
            )
        elif dynamic_pos_bias:
            self.rel_pos = DynamicPositionBias(
                max(dim // 4, 1),
                heads=heads,
                depth=dynamic_pos_bias_mlp_depth,
                log_distance=dynamic_pos_bias_log_distance,
                norm=dynamic_pos_bias_norm,
            )

        def attention(first: bool, **kwargs):
            # the first attention of its kind is the source of the value residual; the others mix it in
            learned_mix = add_value_residual and learned_value_residual_mix and not first and not kwargs.get("cross")
            return Attention(dim, heads, learned_value_residual_mix=learned_mix, **kwargs)

        self.layers = nn.ModuleList(
            Block(
                dim,
                self_attn=None if only_cross else attention(index == 0, causal=causal, alibi=alibi, **opts.attn),
                cross_attn=attention(index == 0, cross=True, dim_context=dim_context, **opts.cross_attn)
                if cross_attend
                else None,
                ff=FeedForward(dim, **opts.ff),
                pre_norm=pre_norm,
                alpha=self.alpha,
                norm=norm,
            )
            for index in range(depth)
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

    def _check_inputs(self, x, mask, context, context_mask, cache, seq_start_pos, segment_ids=None, return_cache=False):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (b, n, dim={self.dim}); got {tuple(x.shape)}")
        b, n, _ = x.shape
        check_seq_start_pos(seq_start_pos, b)
        check_segment_ids(segment_ids, b, n)
        if segment_ids is not None:
            if self.only_cross:
                raise ValueError("segment_ids apply to self-attention; cross-attention-only blocks have none")
            if cache is not None or return_cache:
                raise ValueError(
                    "segment_ids (packed documents) do not combine with a KV cache (cache / return_cache): decode one "
                    "document per row instead"
                )
            if seq_start_pos is not None:
                raise ValueError(
                    "segment_ids and seq_start_pos do not combine: give left padding its own segment id (and mask it)"
                )
        if seq_start_pos is not None and self.only_cross:
            raise ValueError("seq_start_pos applies to self-attention; cross-attention-only blocks have none")
        offset = cache.length if cache is not None else 0
        if cache is not None:
            if not self.causal and not self.only_cross:
                raise ValueError("cache needs causal self-attention; this stack is bidirectional (causal=False)")
            if cache.layers and len(cache.layers) != self.depth:
                raise ValueError(f"cache holds {len(cache.layers)} layers; this stack has depth={self.depth}")
            if cache.batch is not None and cache.batch != b:
                raise ValueError(f"cache holds a batch of {cache.batch}; x has batch {b}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend); got {mask.dtype}")
            if tuple(mask.shape) != (b, offset + n):
                raise ValueError(f"mask must be (b, cached + new keys) = ({b}, {offset + n}); got {tuple(mask.shape)}")
        if self.cross_attend:
            need_context = cache is None or offset == 0
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
                m = context.shape[1] if context is not None else cache.layers[0][1].length
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
        seq_start_pos: torch.Tensor | None = None,
        return_intermediates: bool = False,
        segment_ids: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ):
        """x (b, n, dim) -> (b, n, dim), final-normed.

        mask (b, n) bool key-padding mask (True = real token); with a cache it covers all keys, (b, cached + n).
        seq_start_pos (b,): left-padded rows (x-transformers' name): row r's first seq_start_pos[r] positions are
        padding, masked as keys, and its rotary positions count from its first real token; with a cache it is
        fixed by the first call (later calls may omit it). context (b, m, dim_context) and context_mask (b, m) for
        cross-attention. cache: a `KVCache`, empty or from earlier calls, updated in place; x holds only the tokens
        the cache has not seen (never the whole sequence again), and cross-attention reuses the context's keys and
        values and its mask cached by the first call (context and context_mask may then be omitted).
        return_cache: also return the cache (a new one when none was given).
        return_intermediates: also return a `LayerIntermediates` with every attention map, computed by a non-fused
        path (slow, O(n²) memory: for inspection, not training); not together with a cache.
        segment_ids (b, n) integers: packed documents, one id per token. Self-attention sees only the keys of the
        query's own document (causally within it for a causal stack) and rotary positions restart at every document
        (see positional.py), so each document gets what it gets alone. Cross-attention is unaffected (every
        document of a row sees the row's context). Not with a cache, nor with seq_start_pos.
        cache_position (1,) integer tensor, `cache.step_position(...)`: a fixed-shape decoding step (see `KVCache`):
        x (b, 1, dim) is the token at that position; the cache, already filled, is read whole (positions beyond
        cache_position masked, left padding as the cache was started); mask and seq_start_pos are not given.
        """
        if cache_position is not None:
            return self._fixed_step(x, cache, cache_position, mask, seq_start_pos, context, return_cache)
        self._check_inputs(x, mask, context, context_mask, cache, seq_start_pos, segment_ids, return_cache)
        if return_intermediates and (cache is not None or return_cache):
            raise ValueError("return_intermediates=True does not combine with a KV cache (cache / return_cache)")
        if cache is None and return_cache:
            cache = KVCache()
        offset = cache.length if cache is not None else 0
        if cache is not None:
            seq_start_pos = cache.resolve_seq_start_pos(seq_start_pos)
            if not cache.layers:
                cache._start(self.layers, x.shape[0])
            if offset == 0:
                cache.seq_start_pos = seq_start_pos
        if cache is not None and self.cross_attend:
            # the context's mask belongs with its cached keys: a later call may omit both
            if offset == 0:
                cache.context_mask = context_mask
            elif context_mask is None:
                context_mask = cache.context_mask
        n = x.shape[1]
        if seq_start_pos is not None:
            left_pad = torch.arange(offset + n, device=x.device) >= seq_start_pos.to(x.device)[:, None]  # (b, j)
            mask = left_pad if mask is None else mask & left_pad
        rotary = None
        if self.rotary is not None:
            pos = segment_positions(segment_ids) if segment_ids is not None else None
            rotary = self.rotary(n, offset, seq_start_pos, pos=pos)
        attn_bias = self.rel_pos(n, offset + n) if self.rel_pos is not None else None
        # stochastic depth only where no cache is built: a skipped block would leave a hole in it
        drop = self.training and self.layer_dropout > 0 and cache is None
        x, hiddens, attn_intermediates = self._run_blocks(
            x, mask=mask, context=context, context_mask=context_mask, rotary=rotary, cache=cache, attn_bias=attn_bias,
            return_attn=return_intermediates, segment_ids=segment_ids, drop=drop,
        )  # fmt: skip
        if cache is not None:
            cache.length = offset + n
        if return_cache:
            return x, cache
        if return_intermediates:
            return x, LayerIntermediates(hiddens=hiddens, attn_intermediates=attn_intermediates, last_hidden=x)
        return x

    def _fixed_step(self, x, cache, cache_position, mask, seq_start_pos, context, return_cache):
        """`forward` with cache_position: no value of the cache is read on the host, no shape depends on it."""
        if cache is None or not cache.layers:
            raise ValueError("cache_position needs a cache filled by an earlier call (the prompt)")
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[0] != cache.batch or x.shape[-1] != self.dim:
            raise ValueError(
                f"a fixed-shape step takes one token: x must be (b={cache.batch}, 1, dim={self.dim}); got "
                f"{tuple(x.shape)}"
            )
        if mask is not None or seq_start_pos is not None or context is not None:
            raise ValueError(
                "a fixed-shape step builds its mask from cache_position and the cache's own left padding, and reads "
                "the context's keys from the cache: pass no mask, seq_start_pos or context"
            )
        capacity = cache.reserved
        keys = torch.arange(capacity, device=x.device)
        mask = (keys <= cache_position.to(x.device))[None].expand(x.shape[0], capacity)  # (b, capacity)
        seq_start_pos = cache.seq_start_pos
        if seq_start_pos is not None:
            mask = mask & (keys >= seq_start_pos.to(x.device)[:, None])
        rotary = self.rotary(1, cache_position, seq_start_pos) if self.rotary is not None else None
        attn_bias = self.rel_pos(1, capacity, pos_q=cache_position) if self.rel_pos is not None else None
        x, _, _ = self._run_blocks(
            x, mask=mask, context=None, context_mask=cache.context_mask, rotary=rotary, cache=cache,
            attn_bias=attn_bias, cache_position=cache_position,
        )  # fmt: skip
        return (x, cache) if return_cache else x

    def _run_blocks(self, x, *, mask, context, context_mask, rotary, cache, attn_bias, return_attn=False,
                    segment_ids=None, drop=False, cache_position=None):  # fmt: skip
        """Every block in turn, then the final norm: (x, the blocks' inputs, their AttentionIntermediates), the two
        lists filled only with return_attn: held otherwise, they would keep every block's input and values alive to
        the end of a forward without grad (a long prefill's memory). drop: skip each block with probability
        layer_dropout (stochastic depth)."""
        layer_caches = cache.layers if cache is not None else [None] * self.depth
        hiddens, attn_intermediates = [], []
        first_values = [None, None]  # (self, cross): the value residual's source, once its first attention ran
        for block, layer_cache in zip(self.layers, layer_caches):
            if drop and torch.rand(()).item() < self.layer_dropout:
                continue
            if return_attn:
                hiddens.append(x)
            x, _, inters = block(
                x, mask=mask, context=context, context_mask=context_mask, rotary=rotary, cache=layer_cache,
                attn_bias=attn_bias, value_residuals=first_values if self.add_value_residual else (None, None),
                return_attn=return_attn, segment_ids=segment_ids, cache_position=cache_position,
            )  # fmt: skip
            for kind, inter in enumerate(inters):
                if inter is not None:
                    if return_attn:
                        attn_intermediates.append(inter)
                    if self.add_value_residual and first_values[kind] is None:
                        first_values[kind] = inter.values
        return self.final_norm(x), hiddens, attn_intermediates


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
