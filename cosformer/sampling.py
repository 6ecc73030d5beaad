"""Logit filters for sampling (top-k, nucleus/top-p, min-p) and the next-token sampler used by `generate`.

Names and parameters are x-transformers': `top_k(logits, frac_num_tokens=0.1, k=None)`, `top_p(logits, thres=0.9)`,
`min_p(logits, min_p=0.1)`, looked up by name in `FILTER_LOGITS_FN`. A filter returns logits of the same shape with
the removed entries set to −inf. Order in `sample_next`, as in x-transformers: filter the raw logits first, then
divide by the temperature, then sample. So the set a filter keeps does not depend on the temperature (for top-p and
min-p it would: the probabilities they threshold change with it); the temperature only reshapes the kept mass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

NEG_INF = float("-inf")


def top_k(logits: torch.Tensor, frac_num_tokens: float = 0.1, k: int | None = None) -> torch.Tensor:
    """Keep the k largest logits along the last dim (k defaults to ceil(frac_num_tokens · vocab)).
    Entries tied with the k-th largest are kept too (x-transformers keeps exactly k, breaking ties by index)."""
    num_tokens = logits.shape[-1]
    if k is None:
        if not 0.0 < frac_num_tokens <= 1.0:
            raise ValueError(f"frac_num_tokens must be in (0, 1]; got frac_num_tokens={frac_num_tokens!r}")
        k = math.ceil(frac_num_tokens * num_tokens)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got k={k!r}")
    k = min(k, num_tokens)
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches thres.
    (x-transformers also keeps the next token when the mass before it equals thres exactly.)"""
    if not 0.0 < thres <= 1.0:
        raise ValueError(f"thres must be in (0, 1]; got thres={thres!r}")
    if thres == 1.0:
        return logits  # a cumulative sum that rounds above 1 must not drop the tail
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # a token goes when the tokens before it already hold mass thres; the most likely token always stays
    remove_sorted = (probs.cumsum(dim=-1) - probs) >= thres
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p(logits: torch.Tensor, min_p: float = 0.1) -> torch.Tensor:
    """Keep the tokens whose probability is at least min_p times the largest one (Nguyen et al., 2024,
    arXiv:2407.01082). The most likely token always stays."""
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1]; got min_p={min_p!r}")
    probs = logits.softmax(dim=-1)
    limit = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < limit, NEG_INF)


FILTER_LOGITS_FN: dict[str, Callable[..., torch.Tensor]] = {"top_k": top_k, "top_p": top_p, "min_p": min_p}

# keyword names this package took before it adopted x-transformers' names: named in the error, never translated
_OLD_FILTER_KWARGS = {top_p: {"p": "thres"}}


def resolve_filter(filter_logits_fn: str | Callable | None) -> Callable | None:
    """A filter given by name ("top_k", "top_p", "min_p"), as a callable (logits, **filter_kwargs) -> logits, or
    None (no filter) -> the callable or None."""
    if filter_logits_fn is None or callable(filter_logits_fn):
        return filter_logits_fn
    if isinstance(filter_logits_fn, str) and filter_logits_fn in FILTER_LOGITS_FN:
        return FILTER_LOGITS_FN[filter_logits_fn]
    raise ValueError(
        f"filter_logits_fn must be one of {sorted(FILTER_LOGITS_FN)}, a callable or None; "
        f"got filter_logits_fn={filter_logits_fn!r}"
    )


def check_sampling_args(
    temperature: float, filter_logits_fn: str | Callable | None, filter_kwargs: dict | None
) -> Callable | None:
    """Reject bad sampling options before any forward pass is spent; returns the resolved filter."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got temperature={temperature!r}")
    fn = resolve_filter(filter_logits_fn)
    if filter_kwargs is not None and not isinstance(filter_kwargs, dict):
        raise ValueError(f"filter_kwargs must be a dict; got {type(filter_kwargs).__name__}")
    if fn is None or not filter_kwargs:
        return fn
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: its own call will complain
        return fn
    try:
        signature.bind(None, **filter_kwargs)
    except TypeError as err:
        name = getattr(fn, "__name__", repr(fn))
        renamed = {old: new for old, new in _OLD_FILTER_KWARGS.get(fn, {}).items() if old in filter_kwargs}
        hint = "".join(f"; {name} takes {new}= (x-transformers' name), not {old}=" for old, new in renamed.items())
        raise ValueError(f"filter_kwargs {filter_kwargs!r} do not fit {name}{signature}: {err}{hint}") from None
    return fn


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    filter_logits_fn: Callable | None = top_k,
    filter_kwargs: dict | None = None,
) -> torch.Tensor:
    """logits (b, num_tokens) -> token ids (b,): filter, then temperature, then sample. temperature 0 is greedy
    (the argmax of the raw logits; the filter is then irrelevant).

    Every temperature > 0, however small, samples softmax(filtered / temperature), with no floor and no overflow:
    as it approaches 0 the samples become the argmax (uniform over exactly tied maxima)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if filter_logits_fn is not None:
        logits = filter_logits_fn(logits, **(filter_kwargs or {}))
    # Shift each row so its maximum is 0 before dividing (softmax is shift-invariant). The shifted logits are <= 0,
    # so a tiny temperature can only push them towards -inf, where exp underflows to 0 anyway; unshifted, they
    # overflowed to +inf and the softmax gave nan. The maxima are kept at 0 explicitly: 0 / t is nan once t rounds
    # to 0 in fp32 (below ~1e-45), and so is 0 * (1 / t), the form a division by a scalar takes on a GPU, once
    # 1 / t overflows (below ~3e-39). Filters keep each row's maximum, so the shift is finite.
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)
