"""Attention statistics for the stability experiments: the largest pre-softmax logit and the mean attention entropy.

Why: a run that diverges usually shows it first in its attention (logits growing without bound, entropy collapsing
to one key), and the two attention kinds bound their logits differently: cosine attention's logits are
scale · cos(q, k) (plus any bias), within ±scale · groups; regular attention's q · k / sqrt(d) have no bound.

How: for one forward pass every `Attention` module of the model is called with `return_attn=True` (a forward
pre-hook sets the keyword), so it runs its non-fused path, which writes out the (b, h, i, j) logits it softmaxes:
scaled cosine or dot product, plus biases, −inf where masked. A forward hook reduces them on the spot (nothing of
size i · j outlives its layer) to

- `attn_max_logit`: the largest visible logit over every layer, head, query and key;
- `attn_max_logit/<n>`: the same for the n-th attention module in `model.modules()` order (for a language model,
  layer n's self-attention);
- `attn_entropy`: the mean over layers, heads and query rows of −Σ_j p_j ln p_j (nats) of the softmax weights
  (rows with no visible key, which attend to nothing, are left out).

The trainer computes them at every evaluation on one fixed slice of the validation set (`train.attn_stats`).
"""

from __future__ import annotations

import torch

from cosformer.attention import Attention

# Sequences of the fixed validation batch the statistics use: enough rows for a stable mean, few enough that the
# non-fused path's (b, h, n, n) logits stay cheap beside the evaluation itself.
ATTN_STATS_ITEMS = 8


class _Collector:
    """Per attention module: the running max logit and the sums that make the mean entropy."""

    def __init__(self, modules: list[Attention]):
        self.index = {id(m): n for n, m in enumerate(modules)}
        self.max_logit = [None] * len(modules)
        self.entropy_sum = torch.zeros((), dtype=torch.float64)
        self.rows = 0

    def pre_hook(self, module, args, kwargs):
        return args, {**kwargs, "return_attn": True}

    def hook(self, module, args, kwargs, output):
        inter = output[2]
        logits, weights = inter.pre_softmax_attn.float(), inter.post_softmax_attn.float()  # (b, h, i, j)
        visible = logits != float("-inf")
        n = self.index[id(module)]
        if visible.any():
            peak = logits.amax().cpu()  # masked entries are -inf already; a NaN logit makes the max NaN
            self.max_logit[n] = peak if self.max_logit[n] is None else torch.maximum(self.max_logit[n], peak)
        rows = visible.any(dim=-1)  # (b, h, i): rows that attend to something
        entropy = torch.special.entr(weights).sum(dim=-1)  # entr(0) = 0: masked keys add nothing
        self.entropy_sum += entropy[rows].double().sum().cpu()
        self.rows += int(rows.sum())


@torch.no_grad()
def attention_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """`model(**batch)` once in eval mode (its train/eval mode is restored), every attention through its non-fused
    path; returns {"attn_max_logit", "attn_entropy", "attn_max_logit/<n>"...} (see the module docstring), or {}
    when the model has no `Attention` module. A non-finite logit or weight propagates as NaN or inf: a run that
    blew up shows it here too."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        return {}
    collector = _Collector(modules)
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(collector.pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(collector.hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        # a compiled model (train.compile) runs this one call eagerly: the hooks and the non-fused path are for one
        # batch, not worth a graph of their own (and their data-dependent checks would break a fullgraph trace)
        with torch.compiler.set_stance("force_eager"):
            model(**batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    peaks = {n: p for n, p in enumerate(collector.max_logit) if p is not None}
    out = {
        # torch.stack(...).amax() rather than max(): Python's max drops a NaN that is not first
        "attn_max_logit": torch.stack(list(peaks.values())).amax().item() if peaks else float("nan"),
        "attn_entropy": float(collector.entropy_sum) / collector.rows if collector.rows else float("nan"),
    }
    out.update({f"attn_max_logit/{n}": p.item() for n, p in peaks.items()})
    return out


__all__ = ["ATTN_STATS_ITEMS", "attention_stats"]
