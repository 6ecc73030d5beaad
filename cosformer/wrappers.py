"""Token-level wrappers around a `Transformer` stack, in x-transformers' vocabulary.

- `TransformerWrapper`: token (+ absolute position) embeddings → attn_layers → logits (or the final-normed
  embeddings with `return_embeddings=True`).
- `AutoregressiveWrapper`: next-token cross-entropy in `forward`; `generate` with temperature, top-k / top-p / min-p,
  an end-of-sequence token and a KV cache.
- `XTransformer`: encoder-decoder; the decoder cross-attends to the encoder's embeddings.

KV cache (`KVCache`): each block keeps its self-attention (k, v) as the attention read them (post-projection;
post-norm and post-rotary when rotary is on) in buffers preallocated for the whole generation and written in place,
and its cross-attention (k, v) of the context (computed once). Each decoding step feeds only the new token; the
op's causal mask is aligned bottom-right, so one query against j keys sees all of them. When a sequence outgrows
`max_seq_len`, `generate` falls back to a sliding window over the last `max_seq_len` tokens, recomputed each step
without the cache (positions restart at 0 in the window). `generate(..., compile=...)` runs the steps after the
prompt as fixed-shape steps (`KVCache`'s `cache_position`): the whole reserve read, positions beyond masked, so one
compiled graph serves every step and replays as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .attention import KVBuffer
from .compiling import compile_kwargs
from .positional import (
    AbsolutePositionalEmbedding,
    check_segment_ids,
    check_seq_start_pos,
    positions,
    segment_positions,
)
from .sampling import check_sampling_args, sample_next, top_k
from .transformer import Decoder, Encoder, KVCache, Transformer


class StackWrapper(nn.Module):
    """What `TransformerWrapper` and `ContinuousTransformerWrapper` share around their `attn_layers`: memory tokens
    and the extra outputs of a forward (a KV cache, intermediates, attention maps).

    Memory tokens (Burtsev et al., 2020, "Memory Transformer", arXiv:2006.11527): `num_memory_tokens` learned
    vectors prepended to every sequence after the embeddings (they take no absolute position; with rotary they
    take the first positions), unmasked, and cut off again after the stack. As in x-transformers, a wrapper with
    memory tokens decodes without a KV cache (`generate(..., cache_kv=False)`).
    """

    def _init_memory_tokens(self, num_memory_tokens: int | None, dim: int) -> None:
        num_memory_tokens = 0 if num_memory_tokens is None else num_memory_tokens
        if isinstance(num_memory_tokens, bool) or not isinstance(num_memory_tokens, int) or num_memory_tokens < 0:
            raise ValueError(f"num_memory_tokens must be an integer >= 0; got num_memory_tokens={num_memory_tokens!r}")
        self.num_memory_tokens = num_memory_tokens
        self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim)) if num_memory_tokens else None

    @property
    def can_cache_kv(self) -> bool:
        """Whether this wrapper can decode with a KV cache (x-transformers' name)."""
        return self.num_memory_tokens == 0 and self.attn_layers.causal

    def _check_returns(self, cache, return_cache: bool, return_intermediates: bool, return_attn: bool) -> None:
        caching = cache is not None or return_cache
        if caching and (return_intermediates or return_attn):
            raise ValueError("return_intermediates / return_attn do not combine with a KV cache (cache, return_cache)")
        if caching and self.num_memory_tokens:
            raise ValueError(
                f"num_memory_tokens={self.num_memory_tokens}: memory tokens are not cached, so this wrapper decodes "
                "without a KV cache (generate(..., cache_kv=False))"
            )

    def _run_layers(self, h, *, mask, cache, return_cache: bool, intermediates: bool, **layer_kwargs):
        """Memory tokens in, attn_layers, memory tokens out: (h (b, n, dim), the cache or intermediates or None)."""
        n_mem = self.num_memory_tokens
        if n_mem and layer_kwargs.get("seq_start_pos") is not None:
            # left padding is counted from position 0, which memory tokens would occupy
            raise ValueError("seq_start_pos (left-padded rows) is not supported with num_memory_tokens > 0")
        if n_mem and layer_kwargs.get("segment_ids") is not None:
            # one set of memory tokens per row would be read and written by every document packed in it
            raise ValueError("segment_ids (packed documents) are not supported with num_memory_tokens > 0")
        if n_mem:
            h = torch.cat((repeat(self.memory_tokens, "m d -> b m d", b=h.shape[0]).to(h.dtype), h), dim=1)
            mask = F.pad(mask, (n_mem, 0), value=True) if mask is not None else None
        out = self.attn_layers(
            h, mask=mask, cache=cache, return_cache=return_cache, return_intermediates=intermediates, **layer_kwargs
        )
        extra = None
        if return_cache or intermediates:
            out, extra = out
        if n_mem:
            if intermediates:
                extra.memory_tokens = out[:, :n_mem]
            out = out[:, n_mem:]
        return out, extra

    @staticmethod
    def _outputs(out, extra, return_cache: bool, return_intermediates: bool, return_attn: bool):
        if return_cache or return_intermediates:
            return out, extra
        if return_attn:
            return out, [inter.post_softmax_attn for inter in extra.attn_intermediates]
        return out


class TransformerWrapper(StackWrapper):
    """Embeddings and logits around `attn_layers` (a `Transformer`), as x-transformers' `TransformerWrapper`.

    emb_dim: width of the token and absolute-position embeddings (default: the layers' dim); when it differs, a
    linear map takes them to dim. post_emb_norm: a LayerNorm on the summed embeddings. emb_dropout: dropout on them.
    use_abs_pos_emb: None (default) means learned absolute positions unless the layers already encode positions
    (rotary or alibi); True / False force them on / off, so both kinds together remain possible.
    tie_embedding: the logits reuse the token-embedding matrix, h @ Eᵀ (without the dim^-0.5 factor recent
    x-transformers applies). logits_dim: width of the logits (default num_tokens). return_only_embed: no logits
    layer at all; forward returns the final-normed embeddings (an encoder whose logits are never used keeps no
    parameter without a gradient, which DDP would reject). num_memory_tokens: see `StackWrapper`.

    The layers are post-LN with cosine attention by default (see `Transformer`): x-transformers' defaults are
    `Decoder(..., pre_norm=True, attn="regular")`.
    """

    def __init__(
        self,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: Transformer,
        *,
        emb_dim: int | None = None,
        emb_dropout: float = 0.0,
        post_emb_norm: bool = False,
        tie_embedding: bool = False,
        logits_dim: int | None = None,
        return_only_embed: bool = False,
        use_abs_pos_emb: bool | None = None,
        num_memory_tokens: int | None = 0,
    ):
        super().__init__()
        if not isinstance(attn_layers, Transformer):
            raise ValueError(f"attn_layers must be a cosformer Transformer; got {type(attn_layers).__name__}")
        for name, value in (("num_tokens", num_tokens), ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {name}={value!r}")
        for name, value in (("emb_dim", emb_dim), ("logits_dim", logits_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None; got {name}={value!r}")
        if not 0.0 <= emb_dropout < 1.0:
            raise ValueError(f"emb_dropout must be in [0, 1); got emb_dropout={emb_dropout!r}")
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        if tie_embedding and emb_dim != dim:
            raise ValueError(f"tie_embedding=True needs emb_dim == dim; got emb_dim={emb_dim}, dim={dim}")
        if tie_embedding and logits_dim not in (None, num_tokens):
            raise ValueError(f"tie_embedding=True gives num_tokens={num_tokens} logits; got logits_dim={logits_dim}")
        if return_only_embed and logits_dim is not None:
            raise ValueError(f"return_only_embed=True has no logits; got logits_dim={logits_dim}")
        self.num_tokens, self.max_seq_len = num_tokens, max_seq_len
        self.attn_layers = attn_layers
        if use_abs_pos_emb is None:
            use_abs_pos_emb = not attn_layers.uses_relative_positions
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_abs_pos_emb else None
        self.post_emb_norm = nn.LayerNorm(emb_dim) if post_emb_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.tie_embedding, self.return_only_embed = tie_embedding, return_only_embed
        self.to_logits = None
        if not (tie_embedding or return_only_embed):
            self.to_logits = nn.Linear(dim, num_tokens if logits_dim is None else logits_dim, bias=False)
            nn.init.normal_(self.to_logits.weight, std=dim**-0.5)
        self._init_memory_tokens(num_memory_tokens, dim)

    @property
    def causal(self) -> bool:
        return self.attn_layers.causal

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        return_embeddings: bool = False,
        cache: KVCache | None = None,
        return_cache: bool = False,
        seq_start_pos: torch.Tensor | None = None,
        return_intermediates: bool = False,
        return_attn: bool = False,
        segment_ids: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ):
        """x (b, n) token ids -> logits (b, n, num_tokens), or embeddings (b, n, dim) with return_embeddings.
        With return_cache, returns (output, cache). See `Transformer.forward` for mask, context and cache: with a
        cache, x holds only the n tokens the cache has not seen, at positions [cache.length, cache.length + n);
        x-transformers' habit of feeding the whole sequence again is rejected (see `_check_only_new_tokens`).
        seq_start_pos (b,): rows left-padded by that many tokens (x-transformers' name): the padding is masked and
        every position scheme counts from each row's first real token, so a padded row gives the logits it gives
        alone. (A mask alone hides the padding but leaves absolute positions shifted.)
        return_intermediates: returns (output, `LayerIntermediates`); return_attn: returns (output, [post-softmax
        attention maps (b, h, i, j), one per attention sublayer]). Both run the attention through a non-fused path
        that materialises the maps: slow, O(n²) memory, for inspection.
        segment_ids (b, n) integers: documents packed in a row, one id per token (see `Transformer.forward`); the
        absolute positions restart at every document too, so each document gets the logits it gets alone. Not with
        a cache, seq_start_pos or memory tokens.
        cache_position (1,) integer tensor, `cache.step_position(...)`: a fixed-shape decoding step, x (b, 1) the
        token at that position (see `KVCache`; what `generate(..., compile=...)` compiles); the caller checks the
        position against max_seq_len and calls `cache.advance(1)` afterwards."""
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"x must be (b, n) integer token ids; got shape {tuple(x.shape)}, dtype {x.dtype}")
        self._check_returns(cache, return_cache, return_intermediates, return_attn)
        if cache_position is not None:
            return self._fixed_step(x, cache, cache_position, mask, context, context_mask, seq_start_pos,
                                    return_embeddings, return_cache)  # fmt: skip
        n = x.shape[1]
        if cache is None and return_cache:
            cache = KVCache()
        offset = cache.length if cache is not None else 0
        if offset + n > self.max_seq_len:
            raise ValueError(
                f"sequence length {offset + n} (cached {offset} + new {n}) > max_seq_len={self.max_seq_len}"
            )
        check_seq_start_pos(seq_start_pos, x.shape[0])
        check_segment_ids(segment_ids, *x.shape)
        if cache is not None:
            _check_only_new_tokens(x, cache)
            seq_start_pos = cache.resolve_seq_start_pos(seq_start_pos)
        h = self.token_emb(x)
        if self.pos_emb is not None:
            pos = segment_positions(segment_ids) if segment_ids is not None else None
            h = h + self.pos_emb(n, offset, seq_start_pos, pos=pos)
        h = self.emb_dropout(self.post_emb_norm(h))
        h = self.project_emb(h)
        h, extra = self._run_layers(
            h,
            mask=mask,
            context=context,
            context_mask=context_mask,
            cache=cache,
            return_cache=return_cache,
            intermediates=return_intermediates or return_attn,
            seq_start_pos=seq_start_pos,
            segment_ids=segment_ids,
        )
        if cache is not None:
            if cache.tokens is None and offset == 0:
                cache.tokens = KVBuffer(cache.capacity)
            if cache.tokens is not None and cache.tokens.length == offset:
                cache.tokens.append(x.long()[..., None])  # (b, n, 1): the buffer appends along dim -2
        out = h if return_embeddings or self.return_only_embed else self._logits(h)
        return self._outputs(out, extra, return_cache, return_intermediates, return_attn)

    def _fixed_step(self, x, cache, cache_position, mask, context, context_mask, seq_start_pos, embeddings, ret_cache):
        """`forward` with cache_position: reads no host value of the cache, so every step has the same graph."""
        if cache is None or context_mask is not None or seq_start_pos is not None:
            raise ValueError(
                "cache_position is a decoding step against a filled cache: give the cache, and no context_mask or "
                "seq_start_pos (the cache keeps those of its first call)"
            )
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(1, pos=positions(1, cache_position, cache.seq_start_pos, x.device))
        h = self.project_emb(self.emb_dropout(self.post_emb_norm(h)))
        h = self.attn_layers(h, mask=mask, context=context, cache=cache, cache_position=cache_position)
        out = h if embeddings or self.return_only_embed else self._logits(h)
        return (out, cache) if ret_cache else out

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.tie_embedding:
            return h @ self.token_emb.weight.t()
        return self.to_logits(h)


def _check_only_new_tokens(x: torch.Tensor, cache: KVCache) -> None:
    """With a cache, x must hold only new tokens. The whole sequence fed again would be read as that many more
    tokens at shifted positions, silently; it shows as x beginning with every token the cache has seen, and is
    rejected then. New tokens look the same only when a chunk longer than everything cached repeats all of it,
    which is rejected too (feed such a chunk in two parts). Only chunks longer than the cache are compared, so
    decoding token by token never pays for the check."""
    seen = cache.tokens
    if seen is None or seen.length != cache.length or not 0 < cache.length < x.shape[1]:
        return
    if torch.equal(x[:, : cache.length].long(), seen.filled()[0][..., 0]):
        raise ValueError(
            f"x ({x.shape[1]} tokens) begins with all {cache.length} tokens the cache has seen: with a cache, pass "
            f"only the new tokens, x[:, {cache.length}:] (x-transformers feeds the whole sequence; cosformer does not)"
        )


class AutoregressiveWrapper(nn.Module):
    """Next-token loss and sampling around a `TransformerWrapper` with causal layers."""

    def __init__(self, net: TransformerWrapper, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        if not isinstance(net, TransformerWrapper):
            raise ValueError(f"net must be a TransformerWrapper; got {type(net).__name__}")
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.ignore_index, self.pad_value = ignore_index, pad_value

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        reduction: str = "mean",
        lens: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """x (b, n) -> mean cross-entropy of predicting x[:, 1:] from x[:, :-1], as x-transformers computes it.

        Targets equal to ignore_index are left out of the loss; as inputs they are fed as pad_value. lens (b,):
        positions >= lens become ignore_index (right padding). mask (b, n) is only the key-padding mask the net
        attends with (cut to the inputs, mask[:, :-1]): it removes no target from the loss, so a padded position
        still counts unless x holds ignore_index there (or lens says so). reduction="none" gives (b,) per-sequence
        means over the counted targets instead (exact evaluation over sequences of any length). kwargs (context,
        context_mask) go to the net.

        segment_ids (b, n) integers: documents packed in each row (see `TransformerWrapper.forward`). No target is
        predicted across a boundary: where the id changes between x[:, t] and x[:, t + 1], target t is left out (as
        ignore_index), so the first token of a document is never a target, as it is not when the document runs
        alone. The mean is then over every document's own targets, the loss of the documents run one by one
        (token-weighted)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'; got reduction={reduction!r}")
        if x.dim() != 2 or x.shape[1] < 2:
            raise ValueError(f"x must be (b, n) token ids with n >= 2; got shape {tuple(x.shape)}")
        if lens is not None:
            if lens.shape != (x.shape[0],):
                raise ValueError(f"lens must be (b,) = ({x.shape[0]},); got {tuple(lens.shape)}")
            beyond = torch.arange(x.shape[1], device=x.device) >= lens[:, None]
            x = x.masked_fill(beyond, self.ignore_index)
        inp, target = x[:, :-1], x[:, 1:].long()
        inp = inp.masked_fill(inp == self.ignore_index, self.pad_value)
        if segment_ids is not None:
            check_segment_ids(segment_ids, *x.shape)
            segment_ids = segment_ids.to(x.device)
            target = target.masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], self.ignore_index)
            kwargs["segment_ids"] = segment_ids[:, :-1]
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape):
                raise ValueError(f"mask must be (b, n) = {tuple(x.shape)}; got {tuple(mask.shape)}")
            kwargs["mask"] = mask[:, :-1]
        logits = self.net(inp, **kwargs)  # (b, n - 1, num_tokens)
        if reduction == "mean":
            return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)
        losses = F.cross_entropy(
            logits.transpose(1, 2).float(), target, ignore_index=self.ignore_index, reduction="none"
        )
        counted = (target != self.ignore_index).sum(dim=1)
        return losses.sum(dim=1) / counted.clamp(min=1)  # (b,)

    def _last_logits(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The net's logits (b, num_tokens) at the last position of x only: a prompt's prefill would otherwise
        allocate (b, n, num_tokens) of them, b · n · num_tokens values, to sample from the last row."""
        h = self.net(x, return_embeddings=True, **kwargs)[:, -1]
        return h if self.net.return_only_embed else self.net._logits(h)

    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor | list[torch.Tensor],
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        prompt_lens: torch.Tensor | None = None,
        filter_logits_fn: str | Callable | None = top_k,
        filter_kwargs: dict | None = None,
        cache_kv: bool = True,
        *,
        mask: torch.Tensor | None = None,
        compile: bool | str = False,
        **kwargs,
    ) -> torch.Tensor:
        """Sample up to `seq_len` tokens after `prompts` (b, n) (or (n,)); returns only the new tokens (b, k).

        x-transformers' signature, order and semantics:
        - eos_token: a row ends at its first eos (kept); what it samples after is replaced by pad_value, and
          generation stops once every row has ended, so k < seq_len then; k = seq_len otherwise. Only generated
          tokens count: an eos inside the prompt ends nothing.
        - temperature: 0 is greedy. filter_logits_fn: "top_k" (filter_kwargs k or frac_num_tokens), "top_p"
          (thres), "min_p" (min_p), any callable (logits, **filter_kwargs) -> logits, or None; it filters the raw
          logits, then the temperature divides them (see sampling.py).
        - prompts of different lengths: prompt_lens (b,) with each row's prompt at its start, prompts[r, :len_r]
          (or prompts as a list of 1-D tensors). Rows are right-aligned, left-padded; the padding is masked and
          positions count from each row's first real token (seq_start_pos), so every row gets the tokens it would
          get alone, under absolute, rotary and ALiBi positions alike. mask (b, n), keyword only, instead says the
          prompts are left-padded already: each row False then True.
        - cache_kv: decode with a KV cache while the sequence fits in max_seq_len (each step feeds the net only
          the new token; never the whole sequence with the cache); beyond it, a sliding window recomputed without
          the cache (see the module docstring). A net that is not causal has no valid cache: it recomputes.
        - compile (keyword only; not in x-transformers): False decodes eagerly, each step attending to the keys
          cached so far. True or a torch.compile mode ("reduce-overhead": CUDA graphs, what True means; "default",
          "max-autotune", "max-autotune-no-cudagraphs") runs every step after the prompt as a fixed-shape step
          (see `KVCache`): the cache is reserved for a power of two of positions (at most max_seq_len), each step
          attends to all of them with those beyond its position masked, and the step is compiled once per mode,
          batch size and reserve, with fullgraph=True, and replayed. The tokens are those of the eager decoding
          (up to the rounding of a compiled graph). Needs a KV cache (a causal net, no memory tokens, cache_kv);
          the sliding window beyond max_seq_len stays eager.
        kwargs (context, context_mask) go to the net.
        """
        if "segment_ids" in kwargs:
            raise ValueError(
                "generate() continues one document per row: segment_ids (packed documents) are for the loss; pass "
                "each document as its own prompt (prompts as a list for different lengths)"
            )
        if "filter" in kwargs:
            raise TypeError(
                "generate() takes filter_logits_fn= (x-transformers' name), not filter=; e.g. "
                "filter_logits_fn='top_p', filter_kwargs={'thres': 0.9}"
            )
        if eos_token is not None and (isinstance(eos_token, bool) or not isinstance(eos_token, int)):
            raise ValueError(
                f"eos_token must be an integer token id or None; got eos_token={eos_token!r} (the third positional "
                "argument is eos_token, as in x-transformers: pass temperature= by keyword)"
            )
        filter_fn = check_sampling_args(temperature, filter_logits_fn, filter_kwargs)
        compile_mode = _check_compile(compile)
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer; got seq_len={seq_len!r}")
        if isinstance(prompts, (list, tuple)):
            if prompt_lens is not None or mask is not None:
                raise ValueError("prompts given as a list carry their own lengths: pass neither prompt_lens nor mask")
            if not prompts or any(not isinstance(p, torch.Tensor) or p.dim() != 1 or len(p) < 1 for p in prompts):
                raise ValueError("prompts given as a list must be a non-empty list of non-empty 1-D tensors")
            prompt_lens = torch.tensor([len(p) for p in prompts], device=prompts[0].device)
            prompts = pad_sequence(list(prompts), batch_first=True)
        squeeze = prompts.dim() == 1
        if squeeze:
            prompts = prompts[None]
            mask = mask[None] if mask is not None else None
        if prompts.dim() != 2 or prompts.shape[1] < 1:
            raise ValueError(f"prompts must be (b, n) or (n,) with n >= 1; got shape {tuple(prompts.shape)}")
        out, seq_start_pos = _left_pad(prompts, prompt_lens, mask)
        # a bidirectional net's earlier keys change with every new token: x-transformers then quietly recomputes
        cache_kv = cache_kv and self.net.causal and self.net.can_cache_kv  # (memory tokens are not cached either)
        if compile_mode is not None and not cache_kv:
            raise ValueError(
                f"compile={compile!r} compiles the fixed-shape decoding step of a KV cache, and this call has none "
                "(cache_kv=False, a net that is not causal, or memory tokens): use compile=False"
            )
        if compile_mode is not None and set(kwargs) - {"context", "context_mask"}:
            raise ValueError(f"compile= steps take no net kwargs beyond context and context_mask; got {sorted(kwargs)}")

        was_training = self.net.training
        self.net.eval()
        window = self.max_seq_len
        ended = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        generated = []
        # reserve every position the cache will hold: the prompt and the tokens fed back, up to max_seq_len (for
        # compiled steps a power of two of them, so that other lengths reuse the compiled step)
        capacity = min(out.shape[1] + seq_len - 1, window)
        if compile_mode is not None:
            capacity = min(1 << (capacity - 1).bit_length(), window)
        cache = KVCache(capacity=capacity) if cache_kv else None
        step = compiled_decode_step(compile_mode) if compile_mode is not None else None
        for t in range(seq_len):
            if step is not None and cache is not None and t > 0 and out.shape[1] <= window:
                if t == 1:  # the first step after the prompt (t = 0 fed the prompt and filled the cache)
                    _mark_static(cache)
                if compile_mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                # (b, 1) with strides (1, 1) at every step: a view of out, or .contiguous() of it (a no-op for b = 1),
                # would carry out's growing row stride, and dynamo would recompile for each new one
                last = out[:, -1:].clone(memory_format=torch.contiguous_format)
                logits = step(self.net, last, cache, cache.step_position(out.device))
                cache.advance(1)
            elif cache is not None and out.shape[1] <= window:
                # the cache is fed only the tokens it has not seen: the whole prompt first, then one per step
                logits = self._last_logits(out[:, cache.length :], cache=cache, seq_start_pos=seq_start_pos, **kwargs)
            else:
                cache = None
                start = seq_start_pos
                if start is not None and out.shape[1] > window:
                    start = (start - (out.shape[1] - window)).clamp(min=0)  # the padding left in the window
                logits = self._last_logits(out[:, -window:], seq_start_pos=start, **kwargs)
            token = sample_next(
                logits, temperature=temperature, filter_logits_fn=filter_fn, filter_kwargs=filter_kwargs
            )
            # rows that ended still feed their sampled tokens (pad_value need not be a valid token id); the
            # tokens after each row's first eos are masked once, at the end
            out = torch.cat((out, token[:, None]), dim=1)
            generated.append(token)
            if eos_token is not None:
                ended |= token == eos_token
                if bool(ended.all()):
                    break
        self.net.train(was_training)
        tokens = torch.stack(generated, dim=1)  # (b, k), k <= seq_len: shorter when every row ended early
        if eos_token is not None:
            after_eos = F.pad(tokens == eos_token, (1, -1)).cumsum(dim=1) > 0
            tokens = tokens.masked_fill(after_eos, self.pad_value)
        return tokens[0] if squeeze else tokens


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile(compile) -> str | None:
    """generate's compile argument -> a torch.compile mode, or None for eager decoding."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "reduce-overhead"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}; got compile={compile!r}")
    return compile


def _decode_step(net: TransformerWrapper, token: torch.Tensor, cache: KVCache, position: torch.Tensor):
    """One fixed-shape decoding step: the logits (b, num_tokens) after token (b, 1) at position (1,)."""
    return net(token, cache=cache, cache_position=position)[:, -1]


_COMPILED_STEPS: dict[str, Callable] = {}
# graphs of the compiled step a process may hold: one per net, batch size and reserve. Dynamo's default of 8 per
# function is soon reached by a process that generates at several batch sizes or lengths, and with fullgraph=True
# reaching it is an error (FailOnRecompileLimitHit), not a fallback
STEP_RECOMPILE_LIMIT = 64


def compiled_decode_step(mode: str) -> Callable:
    """`_decode_step` compiled for one torch.compile mode (fullgraph, static shapes; the Inductor options of
    `compile_kwargs`), made once per process: a new net, batch size or reserve is a recompile of the same
    function (up to STEP_RECOMPILE_LIMIT of them), not a new one."""
    if mode not in _COMPILED_STEPS:
        compiled = torch.compile(_decode_step, **compile_kwargs(dynamic=False, mode=mode))

        def step(*args):
            # set and restored by hand: config.patch costs ~25 µs per call on a CPU, this ~4
            config = torch._dynamo.config
            limit = config.recompile_limit
            config.recompile_limit = max(limit, STEP_RECOMPILE_LIMIT)
            try:
                return compiled(*args)
            finally:
                config.recompile_limit = limit

        _COMPILED_STEPS[mode] = step
    return _COMPILED_STEPS[mode]


def _mark_static(cache: KVCache) -> None:
    """Tell torch.compile that the cache's storage keeps its address from step to step: CUDA graphs then read and
    write it in place instead of copying it into the graph's own inputs at every replay."""
    for layer in cache.layers:
        for buffer in layer:
            if buffer is not None and buffer.storage is not None:
                for t in buffer.storage:
                    torch._dynamo.mark_static_address(t)


def _left_pad(
    prompts: torch.Tensor, prompt_lens: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts (b, n) -> right-aligned prompts and seq_start_pos (b,), each row's count of padding tokens (None
    when no row is padded). prompt_lens: row r's prompt is prompts[r, :prompt_lens[r]] (x-transformers'
    align_right moves it to the end); mask: the prompts are left-padded already (False then True per row). The
    padding fed is token 0 (a valid id; nothing attends to it), and padding all rows share is cut off."""
    b, n = prompts.shape
    if prompt_lens is not None and mask is not None:
        raise ValueError("give prompt_lens (prompts at the start of each row) or mask (left-padded), not both")
    if prompt_lens is not None:
        if not isinstance(prompt_lens, torch.Tensor) or tuple(prompt_lens.shape) != (b,):
            shape = tuple(prompt_lens.shape) if isinstance(prompt_lens, torch.Tensor) else type(prompt_lens).__name__
            raise ValueError(f"prompt_lens must be a (b,) = ({b},) tensor of lengths; got {shape}")
        lens = prompt_lens.to(prompts.device)
        if lens.dtype.is_floating_point or lens.dtype == torch.bool or bool(((lens < 1) | (lens > n)).any()):
            raise ValueError(f"prompt_lens must be integers in [1, n={n}]; got {prompt_lens.tolist()}")
        start = (n - lens).long()
        source = torch.arange(n, device=prompts.device) - start[:, None]  # where each position's token comes from
        prompts = prompts.gather(1, source.clamp(min=0)).masked_fill(source < 0, 0)
    elif mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must be a bool tensor shaped like the prompts {(b, n)}; got {mask.dtype} "
                             f"{tuple(mask.shape)}")  # fmt: skip
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(
                "mask must mark left padding (each row False, then True up to its last token); for prompts at "
                "the start of each row pass prompt_lens"
            )
        start = (~mask).sum(dim=1)
        prompts = prompts.masked_fill(~mask, 0)
    else:
        return prompts, None
    shared = int(start.min())
    prompts, start = prompts[:, shared:], start - shared
    return prompts, (start if bool(start.any()) else None)


def _split_by_prefix(kwargs: dict, prefixes: tuple[str, ...]) -> tuple[dict, ...]:
    """Route `enc_*` / `dec_*` kwargs; an unprefixed kwarg applies to both stacks (a prefixed one wins)."""
    shared = {k: v for k, v in kwargs.items() if not k.startswith(prefixes)}
    routed = []
    for prefix in prefixes:
        own = {k[len(prefix) :]: v for k, v in kwargs.items() if k.startswith(prefix)}
        routed.append(shared | own)
    return tuple(routed)


# TransformerWrapper options that wrap a stack rather than configure it (routed apart by XTransformer, TextToImage)
WRAPPER_KEYS = ("emb_dropout", "tie_embedding", "use_abs_pos_emb", "emb_dim", "post_emb_norm", "num_memory_tokens")


def _split_wrapper(kwargs: dict) -> tuple[dict, dict]:
    wrapper = {k: kwargs.pop(k) for k in WRAPPER_KEYS if k in kwargs}
    return wrapper, kwargs


class XTransformer(nn.Module):
    """Encoder-decoder. kwargs are routed by prefix: `enc_*` to the encoder, `dec_*` to the decoder (wrapper
    options such as emb_dropout / tie_embedding / use_abs_pos_emb, or any `Transformer` option); unprefixed kwargs go
    to both. The decoder cross-attends to the encoder embeddings, with the source mask as its context mask. The
    encoder has no logits layer (`return_only_embed`): every parameter gets a gradient, as DDP requires."""

    def __init__(
        self,
        dim: int,
        *,
        enc_num_tokens: int,
        enc_depth: int,
        enc_max_seq_len: int,
        dec_num_tokens: int,
        dec_depth: int,
        dec_max_seq_len: int,
        enc_heads: int = 8,
        dec_heads: int = 8,
        tie_token_emb: bool = False,
        ignore_index: int = -100,
        pad_value: int = 0,
        **kwargs,
    ):
        super().__init__()
        enc_kwargs, dec_kwargs = _split_by_prefix(kwargs, ("enc_", "dec_"))
        enc_wrapper, enc_layers = _split_wrapper(enc_kwargs)
        dec_wrapper, dec_layers = _split_wrapper(dec_kwargs)
        if "dim_context" in dec_layers:
            raise ValueError("XTransformer sets the decoder's dim_context to the encoder's dim")
        enc_wrapper.pop("tie_embedding", None)  # the encoder has no logits to tie
        self.encoder = TransformerWrapper(
            num_tokens=enc_num_tokens,
            max_seq_len=enc_max_seq_len,
            attn_layers=Encoder(dim, enc_depth, enc_heads, **enc_layers),
            return_only_embed=True,
            **enc_wrapper,
        )
        self.decoder = AutoregressiveWrapper(
            TransformerWrapper(
                num_tokens=dec_num_tokens,
                max_seq_len=dec_max_seq_len,
                attn_layers=Decoder(dim, dec_depth, dec_heads, cross_attend=True, **dec_layers),
                **dec_wrapper,
            ),
            ignore_index=ignore_index,
            pad_value=pad_value,
        )
        if tie_token_emb:
            if enc_num_tokens != dec_num_tokens:
                raise ValueError(
                    f"tie_token_emb=True needs enc_num_tokens == dec_num_tokens; got {enc_num_tokens}, {dec_num_tokens}"
                )
            self.decoder.net.token_emb = self.encoder.token_emb

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
        """src (b, n_src), tgt (b, n_tgt), mask (b, n_src) source padding mask -> the decoder's loss."""
        enc = self.encoder(src, mask=mask, return_embeddings=True)
        return self.decoder(tgt, context=enc, context_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        seq_in: torch.Tensor,
        seq_out_start: torch.Tensor,
        seq_len: int,
        mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Encode seq_in (b, n_src) with its mask, then sample up to seq_len tokens after seq_out_start (b, n),
        cross-attending to the encoding (x-transformers' signature); kwargs as in `AutoregressiveWrapper.generate`.
        Returns the new tokens (b, k), k = seq_len unless every row produced eos_token earlier."""
        was_training = self.encoder.training
        self.encoder.eval()
        enc = self.encoder(seq_in, mask=mask, return_embeddings=True)
        self.encoder.train(was_training)
        return self.decoder.generate(seq_out_start, seq_len, context=enc, context_mask=mask, **kwargs)
