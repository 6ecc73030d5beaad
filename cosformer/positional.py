"""Positional information: learned absolute embeddings, rotary embeddings and ALiBi slopes.

Rotary pairs are INTERLEAVED: channels (2i, 2i+1) rotate together by angle pos · theta^(-2i/d). With cosine
attention the rotation is applied after the l2norm of q and k; an interleaved pair never straddles two l2norm
groups (group size even), and a rotation preserves each pair's norm, so every group stays unit-norm and the fused
op can be told `l2norm_qk=False`.

ALiBi (Press et al., 2022, "Train Short, Test Long") adds −slope_h · |pos_q − pos_k| to the logits, with queries
aligned bottom-right (pos_q = r + j − i) like the causal mask, so a KV cache sees the same biases.

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
    n: int, offset: int, seq_start_pos: torch.Tensor | None, device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """Positions of the tokens [offset, offset + n): (n,), or (b, n) counted from each row's first real token when
    seq_start_pos (b,) gives the row's left padding (x-transformers' name). Padding sits at position 0: nothing
    attends to it (the stack masks it), it only has to be a valid position."""
    pos = torch.arange(offset, offset + n, device=device)
    if seq_start_pos is not None:
        pos = (pos[None, :] - seq_start_pos.to(device)[:, None]).clamp(min=0)
    return pos.to(dtype)


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute position embeddings for positions [offset, offset + n), per row with seq_start_pos."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, n: int, offset: int = 0, seq_start_pos: torch.Tensor | None = None) -> torch.Tensor:
        """-> (n, dim), or (b, n, dim) with seq_start_pos (b,)."""
        if offset + n > self.max_seq_len:
            raise ValueError(f"positions [{offset}, {offset + n}) exceed max_seq_len={self.max_seq_len}")
        return self.emb(positions(n, offset, seq_start_pos, self.emb.weight.device))


class RotaryEmbedding(nn.Module):
    """Angles for interleaved rotary embeddings over a head dim `dim` (even)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head dim; got dim={dim}")
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (dim / 2,)

    def forward(
        self, n: int, offset: int = 0, seq_start_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin (n, dim / 2), or (b, 1, n, dim / 2) with seq_start_pos (b,): per row, broadcast over heads.
        Rotary scores depend only on position differences, but per-row positions give a left-padded row the very
        angles (and so the very rounding) it would get alone."""
        pos = positions(n, offset, seq_start_pos, self.inv_freq.device, torch.float32)
        angles = pos[..., None] * self.inv_freq  # (n, dim / 2) or (b, n, dim / 2)
        if seq_start_pos is not None:
            angles = angles[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of t (..., n, d) by the angles behind cos, sin (n, d / 2), or any shape
    that broadcasts against (..., n, d / 2), such as per-row (b, 1, n, d / 2).

    Computed in float32 (the angles are float32) and returned in t's dtype."""
    pairs = t.float().unflatten(-1, (-1, 2))  # (..., n, d / 2, 2)
    x1, x2 = pairs.unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(t.dtype)


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


def alibi_bias(slopes: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """(1, h, i, j) float32 bias −slope · |pos_q − pos_k| with pos_q = r + j − i (bottom-right aligned)."""
    pos_q = torch.arange(i, device=slopes.device, dtype=torch.float32)[:, None] + (j - i)
    pos_k = torch.arange(j, device=slopes.device, dtype=torch.float32)[None, :]
    return -slopes.float()[None, :, None, None] * (pos_q - pos_k).abs()[None, None]
