"""Logit filters for sampling (top-k, nucleus/top-p) and the next-token sampler used by `generate`.

Filters return logits of the same shape with the removed entries set to −inf, so they compose with a
temperature and a softmax. Order in `sample_next`: divide by the temperature, then filter, then sample —
the order Hugging Face's logits warpers use, which matters for top-p (the nucleus depends on the temperature).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def top_k(logits: torch.Tensor, k: int | None = None, frac_num_tokens: float = 0.1) -> torch.Tensor:
    """Keep the k largest logits along the last dim (k defaults to ceil(frac_num_tokens · vocab)).
    Entries tied with the k-th largest are kept too."""
    num_tokens = logits.shape[-1]
    if k is None:
        if not 0.0 < frac_num_tokens <= 1.0:
            raise ValueError(f"frac_num_tokens must be in (0, 1]; got {frac_num_tokens!r}")
        k = math.ceil(frac_num_tokens * num_tokens)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got k={k!r}")
    k = min(k, num_tokens)
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float = 0.9) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches p."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1]; got p={p!r}")
    if p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # a token goes when the tokens before it already hold mass p; the most likely token always stays
    remove_sorted = (probs.cumsum(dim=-1) - probs) >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


FILTERS = {"top_k": top_k, "top_p": top_p}


def check_sampling_args(temperature: float, filter: str | None, filter_kwargs: dict | None) -> None:
    """Reject bad sampling options before any forward pass is spent."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got temperature={temperature!r}")
    if filter is not None and filter not in FILTERS:
        raise ValueError(f"filter must be one of {sorted(FILTERS)} or None; got filter={filter!r}")
    if filter_kwargs is not None and not isinstance(filter_kwargs, dict):
        raise ValueError(f"filter_kwargs must be a dict; got {type(filter_kwargs).__name__}")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    filter: str | None = "top_k",
    filter_kwargs: dict | None = None,
) -> torch.Tensor:
    """logits (b, num_tokens) -> token ids (b,). temperature 0 is greedy (the filter is then irrelevant).

    Every temperature > 0, however small, samples softmax(logits / temperature), with no floor and no overflow: as
    it approaches 0 the samples become the argmax (uniform over exactly tied maxima)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shift each row so its maximum is 0 before dividing (softmax is shift-invariant). The shifted logits are <= 0,
    # so a tiny temperature can only push them towards -inf, where exp underflows to 0 anyway; unshifted, they
    # overflowed to +inf and the softmax gave nan. The maxima are kept at 0 explicitly: 0 / t is nan once t rounds
    # to 0 in fp32 (below ~1e-45), and so is 0 * (1 / t), the form a division by a scalar takes on a GPU, once
    # 1 / t overflows (below ~3e-39).
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    if filter is not None:
        logits = FILTERS[filter](logits, **(filter_kwargs or {}))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)
