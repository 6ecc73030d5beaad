"""Positional information: learned absolute embeddings, rotary embeddings and ALiBi slopes.

Rotary embeddings use x-transformers' layout (2.x: `RotaryEmbedding`, `rotate_half`, `apply_rotary_pos_emb`), so
weights converted from it give the same logits: channel pairs are INTERLEAVED, (2i, 2i+1) rotate together by angle
pos · θ^(−2i/r), and only the first r = `rotary_emb_dim` channels of a head rotate (partial rotary, as in GPT-J);
the rest pass unchanged. r defaults to dim_head // 2, x-transformers' default; θ (`rotary_theta`) to 10000.

With cosine attention the rotation is applied AFTER the l2norm of q and k, and the fused op is told
`l2norm_qk=False`: every l2norm group must then still be unit-norm. A rotation preserves the norm of its pair, so it
preserves a group's norm as long as no pair straddles two groups. An interleaved pair starts at an even channel, so
with an even group size (dim_head / groups, which the stack requires with rotary) it never straddles, whatever r
is. (The half-split layout of some other libraries, pairing c with c + r/2, would straddle groups whenever
groups > 1.) Because no pair straddles, normalising before or after the rotation gives the same q and k;
x-transformers normalises first too.

ALiBi (Press et al., 2022, "Train Short, Test Long") adds −slope_h · |pos_q − pos_k| to the logits, with queries
aligned bottom-right (pos_q = r + j − i) like the causal mask, so a KV cache sees the same biases.

Packed documents (`segment_ids`): learned absolute and rotary positions restart at every document
(`segment_positions`), so a document packed after others gets the embeddings and angles it gets alone. ALiBi and
the learned relative biases need nothing more than the segment mask: they depend only on pos_q − pos_k, which
packing leaves unchanged between two tokens of one document.

References: Su et al., 2021, "RoFormer" (arXiv:2104.09864); Press et al., 2022 (arXiv:2108.12409).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_seq_start_pos(seq_start_pos: torch.Tensor | None, b: int) -> None:
    """seq_start_pos: None, or (b,) integers, each row's count of left-padding tokens."""
    if seq_start_pos is None:
        return
    if not isinstance(seq_start_pos, torch.Tensor) or tuple(seq_start_pos.shape) != (b,):
        shape = tuple(seq_start_pos.shape) if isinstance(seq_start_pos, torch.Tensor) else type(seq_start_pos).__name__
        raise ValueError(f"seq_start_pos must be (b,) = ({b},) left-padding lengths; got {shape}")
    if seq_start_pos.dtype.is_floating_point or seq_start_pos.dtype.is_complex or seq_start_pos.dtype == torch.bool:
        raise TypeError(f"seq_start_pos must hold integers; got {seq_start_pos.dtype}")


def positions(
    n: int,
    offset: int | torch.Tensor,
    seq_start_pos: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Positions of the tokens [offset, offset + n): (n,), or (b, n) counted from each row's first real token when
    seq_start_pos (b,) gives the row's left padding (x-transformers' name). Padding sits at position 0: nothing
    attends to it (the stack masks it), it only has to be a valid position. offset may be a (1,) integer tensor
    (a fixed-shape decoding step's `cache_position`), read on the device only."""
    if isinstance(offset, torch.Tensor):
        pos = offset.to(device) + torch.arange(n, device=device)
    else:
        pos = torch.arange(offset, offset + n, device=device)
    if seq_start_pos is not None:
        pos = (pos[None, :] - seq_start_pos.to(device)[:, None]).clamp(min=0)
    return pos.to(dtype)


def check_segment_ids(segment_ids: torch.Tensor | None, b: int, n: int) -> None:
    """segment_ids: None, or (b, n) integers, one document id per token."""
    if segment_ids is None:
        return
    if not isinstance(segment_ids, torch.Tensor) or tuple(segment_ids.shape) != (b, n):
        shape = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise ValueError(f"segment_ids must be (b, n) = ({b}, {n}) document ids, one per token; got {shape}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must hold integers; got {segment_ids.dtype}")


def segment_positions(segment_ids: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """(b, n) document ids -> (b, n) positions: how many earlier tokens of the row share the token's id. For packed
    documents (contiguous runs of one id) that is the index within the document. The attention matches ids, not
    runs, so a repeated id continues its count, consistently with what its tokens see."""
    b, n = segment_ids.shape
    order = segment_ids.argsort(dim=1, stable=True)  # each id's tokens together, in sequence order
    ranked = segment_ids.gather(1, order)
    index = torch.arange(n, device=segment_ids.device).expand(b, n)
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    start = torch.where(first, index, torch.zeros_like(index)).cummax(dim=1).values
    pos = torch.empty_like(index)
    pos.scatter_(1, order, index - start)
    return pos.to(dtype)


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute position embeddings for positions [offset, offset + n), per row with seq_start_pos."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(
        self, n: int, offset: int = 0, seq_start_pos: torch.Tensor | None = None, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-> (n, dim), or (b, n, dim) with seq_start_pos (b,) or explicit positions pos (b, n) (packed documents:
        `segment_positions`)."""
        if offset + n > self.max_seq_len:
            raise ValueError(f"positions [{offset}, {offset + n}) exceed max_seq_len={self.max_seq_len}")
        if pos is None:
            pos = positions(n, offset, seq_start_pos, self.emb.weight.device)
        return self.emb(pos.to(self.emb.weight.device))


class RotaryEmbedding(nn.Module):
    """Angles for interleaved rotary embeddings over the first `dim` (even) channels of a head: dim is
    x-transformers' `rotary_emb_dim`, not the head dim (`head_dim`, default dim: the channels beyond dim pass
    unchanged). The frequencies are computed as x-transformers computes them, 1 / θ^(2i/dim) in float32, so a
    converted model rotates by bitwise the same angles."""

    def __init__(self, dim: int, theta: float = 10000.0, head_dim: int | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2 != 0:
            raise ValueError(f"rotary embeddings rotate an even number of channels >= 2; got rotary_emb_dim={dim!r}")
        head_dim = dim if head_dim is None else head_dim
        if not isinstance(head_dim, int) or head_dim < dim:
            raise ValueError(f"head_dim must be an integer >= rotary_emb_dim={dim}; got head_dim={head_dim!r}")
        self.dim, self.head_dim = dim, head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (dim / 2,)

    def forward(
        self, n: int, offset: int = 0, seq_start_pos: torch.Tensor | None = None, pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the tables `apply_rotary` takes, cos and sin (n, head_dim), or (b, 1, n, head_dim) with seq_start_pos
        (b,) or explicit positions pos (b, n): per row, broadcast over heads. Built once per forward for every layer,
        so each application is a handful of operations. Rotary scores depend only on position differences, but
        per-row positions give a left-padded row, or a packed document, the very angles (and so the very rounding)
        it would get alone."""
        if pos is None:
            pos = positions(n, offset, seq_start_pos, self.inv_freq.device, torch.float32)
        pos = pos.to(self.inv_freq.device, torch.float32)
        angles = pos[..., None] * self.inv_freq  # (n, dim / 2) or (b, n, dim / 2)
        if angles.dim() == 3:
            angles = angles[:, None]
        cos, sin = angles.cos(), angles.sin()
        # interleaved: channel 2i is cos, −sin and channel 2i + 1 cos, +sin of angle i; channels beyond dim keep
        # their value (cos 1, sin 0)
        cos, sin = torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2)
        if self.head_dim > self.dim:
            rest = (*cos.shape[:-1], self.head_dim - self.dim)
            cos, sin = torch.cat((cos, cos.new_ones(rest)), dim=-1), torch.cat((sin, sin.new_zeros(rest)), dim=-1)
        return cos, sin


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of t (..., n, d) by the tables of `RotaryEmbedding` (head_dim = d), which
    broadcast against t: (x1, x2) -> (x1 cos − x2 sin, x1 sin + x2 cos), and channels beyond its rotary dim unchanged.

    As t · cos + swap(t) · sin with swap exchanging each pair and the sign folded into sin: the same products and
    sums as the pairwise form, so bitwise the same values (a pass-through channel gets x · 1 + y · 0 = x), in six
    operations where the pairwise form takes fourteen. Computed in float32 (the tables are float32) and returned in
    t's dtype."""
    if cos.shape[-1] != t.shape[-1]:
        raise ValueError(f"rotary tables of width {cos.shape[-1]} for a head of {t.shape[-1]} channels: build them "
                         f"with RotaryEmbedding(..., head_dim={t.shape[-1]})")  # fmt: skip
    tf = t.float()
    swapped = tf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x2) -> (x2, x1), per pair
    return (tf * cos + swapped * sin).to(t.dtype)


def alibi_slopes(heads: int) -> torch.Tensor:
    """The geometric ALiBi slopes (h,). For a head count that is not a power of two, the slopes of the nearest
    lower power of two are followed by every other slope of the next one (the paper's recipe)."""
    if heads < 1:
        raise ValueError(f"heads must be positive; got heads={heads}")

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(heads))
    slopes = geometric(closest)
    if closest != heads:
        slopes += geometric(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, i: int, j: int, pos_q: torch.Tensor | None = None) -> torch.Tensor:
    """(1, h, i, j) float32 bias −slope · |pos_q − pos_k| with pos_q = r + j − i (bottom-right aligned), or the
    queries' positions pos_q (i,) given (a decoding step against a cache's whole storage)."""
    if pos_q is None:
        pos_q = torch.arange(i, device=slopes.device) + (j - i)
    pos_q = pos_q.to(slopes.device, torch.float32)[:, None]
    pos_k = torch.arange(j, device=slopes.device, dtype=torch.float32)[None, :]
    return -slopes.float()[None, :, None, None] * (pos_q - pos_k).abs()[None, None]
