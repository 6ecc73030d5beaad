"""Learned relative position biases, added to the attention logits through the op's `attn_bias` (which returns
their gradient): T5's bucketed bias and the dynamic position bias (an MLP of the distance).

Both return (h, i, j) for i queries against j keys with queries aligned bottom-right (query r sits at position
r + j − i), like the causal mask and ALiBi, so a KV cache sees the same biases. One module serves every
self-attention layer of a stack, as in x-transformers. The bias is a dense (h, i, j) tensor, computed once per
forward: O(h·n²) memory, where ALiBi's in-kernel slopes need none.

References: Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5, arXiv:1910.10683), section 2.1; Wang et al., 2021, "CrossFormer" (arXiv:2108.00154), the
dynamic position bias.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def _positions(i: int, j: int, device, pos_q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    pos_q = torch.arange(j - i, j, device=device) if pos_q is None else pos_q.to(device)
    return pos_q, torch.arange(j, device=device)


class RelativePositionBias(nn.Module):
    """T5's bias: one learned scalar per head and distance bucket. Distances below num_buckets / 2 (per direction
    when bidirectional) get a bucket each; longer ones share log-spaced buckets up to max_distance, beyond which all
    distances share the last. `scale` multiplies the bias (x-transformers uses sqrt(dim_head))."""

    def __init__(self, heads: int, *, causal: bool, scale: float, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        if not 2 <= num_buckets <= max_distance:
            raise ValueError(
                f"rel_pos_num_buckets must be in [2, rel_pos_max_distance]; got rel_pos_num_buckets={num_buckets}, "
                f"rel_pos_max_distance={max_distance}"
            )
        self.causal, self.scale = causal, scale
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def bucket(self, distance: torch.Tensor) -> torch.Tensor:
        """distance = pos_q − pos_k (positive: the key lies in the past) -> bucket index, same shape."""
        buckets, offset = self.num_buckets, torch.zeros_like(distance)
        if self.causal:
            distance = distance.clamp(min=0)  # future keys are masked anyway: they share bucket 0
        else:
            buckets //= 2
            offset = (distance < 0).long() * buckets  # the future gets the upper half of the buckets
            distance = distance.abs()
        exact = buckets // 2
        # log-spaced beyond `exact`; clamping at `exact` keeps log() finite where the exact branch is taken anyway
        far = (
            exact
            + (
                torch.log(distance.clamp(min=exact).float() / exact)
                / math.log(self.max_distance / exact)
                * (buckets - exact)
            ).long()
        )
        far = far.clamp(max=buckets - 1)
        return offset + torch.where(distance < exact, distance, far)

    def forward(self, i: int, j: int, pos_q: torch.Tensor | None = None) -> torch.Tensor:
        """-> (h, i, j); pos_q (i,) places the queries elsewhere (a decoding step against a cache's storage)."""
        pos_q, pos_k = _positions(i, j, self.relative_attention_bias.weight.device, pos_q)
        values = self.relative_attention_bias(self.bucket(pos_q[:, None] - pos_k[None, :]))  # (i, j, h)
        return rearrange(values, "i j h -> h i j") * self.scale


class DynamicPositionBias(nn.Module):
    """An MLP from the signed distance pos_q − pos_k (or sign · log(1 + |distance|) with `log_distance`) to one bias
    per head: Linear(1, dim) → SiLU, (depth − 1) × [Linear(dim, dim) → SiLU], Linear(dim, heads), with a LayerNorm
    before each SiLU when `norm`. Evaluated once per distinct distance (2j − 1 of them), then gathered."""

    def __init__(self, dim: int, *, heads: int, depth: int = 2, log_distance: bool = False, norm: bool = False):
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"dynamic_pos_bias_mlp_depth must be an integer >= 1; got {depth!r}")
        self.log_distance = log_distance
        layers, width_in = [], 1
        for _ in range(depth):
            layers += [nn.Linear(width_in, dim), nn.LayerNorm(dim) if norm else nn.Identity(), nn.SiLU()]
            width_in = dim
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, heads))

    def forward(self, i: int, j: int, pos_q: torch.Tensor | None = None) -> torch.Tensor:
        """-> (h, i, j); pos_q (i,) as in `RelativePositionBias.forward` (within [0, j))."""
        device = self.mlp[0].weight.device
        distances = torch.arange(-(j - 1), j, device=device, dtype=torch.float32)[:, None]  # (2j − 1, 1)
        if self.log_distance:
            distances = distances.sign() * distances.abs().log1p()
        table = self.mlp(distances)  # (2j − 1, h)
        pos_q, pos_k = _positions(i, j, device, pos_q)
        values = table[pos_q[:, None] - pos_k[None, :] + (j - 1)]  # (i, j, h)
        return rearrange(values, "i j h -> h i j")
