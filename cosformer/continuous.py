"""`ContinuousTransformerWrapper`: a `Transformer` stack on continuous vectors rather than token ids, as in
x-transformers: a linear map in (dim_in → dim), optional learned absolute positions, the stack, a linear map out
(dim → dim_out)."""

from __future__ import annotations

import torch
from torch import nn

from .positional import AbsolutePositionalEmbedding
from .transformer import KVCache, Transformer
from .wrappers import StackWrapper


class ContinuousTransformerWrapper(StackWrapper):
    """x (b, n, dim_in) → attn_layers → (b, n, dim_out).

    dim_in / dim_out: widths of the input and output vectors; None means the layers' dim, with no projection.
    max_seq_len: the longest sequence, needed only for learned absolute positions (None: no length limit).
    use_abs_pos_emb: None (default) means learned absolute positions when max_seq_len is given and the layers encode
    no positions themselves (rotary, alibi, ...); True / False force them on / off. post_emb_norm: a LayerNorm on
    the projected input (after the positions). emb_dropout: dropout there. num_memory_tokens: see `StackWrapper`.
    As everywhere in cosformer, the layers are post-LN with cosine attention by default (see `Transformer`).
    """

    def __init__(
        self,
        dim_in: int | None = None,
        dim_out: int | None = None,
        max_seq_len: int | None = None,
        attn_layers: Transformer | None = None,
        *,
        post_emb_norm: bool = False,
        emb_dropout: float = 0.0,
        use_abs_pos_emb: bool | None = None,
        num_memory_tokens: int | None = 0,
    ):
        super().__init__()
        if not isinstance(attn_layers, Transformer):
            raise ValueError(f"attn_layers must be a cosformer Transformer; got {type(attn_layers).__name__}")
        for name, value in (("dim_in", dim_in), ("dim_out", dim_out), ("max_seq_len", max_seq_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None; got {name}={value!r}")
        if not 0.0 <= emb_dropout < 1.0:
            raise ValueError(f"emb_dropout must be in [0, 1); got emb_dropout={emb_dropout!r}")
        if use_abs_pos_emb is None:
            use_abs_pos_emb = max_seq_len is not None and not attn_layers.uses_relative_positions
        if use_abs_pos_emb and max_seq_len is None:
            raise ValueError("use_abs_pos_emb=True needs max_seq_len (the number of learned positions)")
        dim = attn_layers.dim
        self.dim_in, self.dim_out, self.max_seq_len = dim_in, dim_out, max_seq_len
        self.attn_layers = attn_layers
        self.project_in = nn.Linear(dim_in, dim, bias=False) if dim_in is not None else nn.Identity()
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len) if use_abs_pos_emb else None
        self.post_emb_norm = nn.LayerNorm(dim) if post_emb_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_out = nn.Linear(dim, dim_out, bias=False) if dim_out is not None else nn.Identity()
        self._init_memory_tokens(num_memory_tokens, dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        return_embeddings: bool = False,
        cache: KVCache | None = None,
        return_cache: bool = False,
        return_intermediates: bool = False,
        return_attn: bool = False,
    ):
        """x (b, n, dim_in) -> (b, n, dim_out), or the final-normed embeddings (b, n, dim) with return_embeddings.
        The other arguments and the extra outputs as in `TransformerWrapper.forward`."""
        width = self.dim_in if self.dim_in is not None else self.attn_layers.dim
        if x.dim() != 3 or x.shape[-1] != width or not x.is_floating_point():
            raise ValueError(f"x must be (b, n, dim_in={width}) floats; got shape {tuple(x.shape)}, dtype {x.dtype}")
        self._check_returns(cache, return_cache, return_intermediates, return_attn)
        n, offset = x.shape[1], (cache.length if cache is not None else 0)
        if self.max_seq_len is not None and offset + n > self.max_seq_len:
            raise ValueError(
                f"sequence length {offset + n} (cached {offset} + new {n}) > max_seq_len={self.max_seq_len}"
            )
        h = self.project_in(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(n, offset)
        h = self.emb_dropout(self.post_emb_norm(h))
        h, extra = self._run_layers(
            h,
            mask=mask,
            context=context,
            context_mask=context_mask,
            cache=cache,
            return_cache=return_cache,
            intermediates=return_intermediates or return_attn,
        )
        out = h if return_embeddings else self.project_out(h)
        return self._outputs(out, extra, return_cache, return_intermediates, return_attn)
