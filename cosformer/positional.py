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


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute position embeddings for positions [offset, offset + n)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, n: int, offset: int = 0) -> torch.Tensor:
        if offset + n > self.max_seq_len:
            raise ValueError(f"positions [{offset}, {offset + n}) exceed max_seq_len={self.max_seq_len}")
        pos = torch.arange(offset, offset + n, device=self.emb.weight.device)
        return self.emb(pos)  # (n, dim)


class RotaryEmbedding(nn.Module):
    """Angles for interleaved rotary embeddings over a head dim `dim` (even)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head dim; got dim={dim}")
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (dim / 2,)

    def forward(self, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(offset, offset + n, device=self.inv_freq.device, dtype=torch.float32)
        angles = pos[:, None] * self.inv_freq[None, :]  # (n, dim / 2)
        return angles.cos(), angles.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of t (..., n, d) by the angles behind cos, sin (n, d / 2).

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
