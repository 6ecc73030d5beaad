"""Attention statistics (cosformer.train.attn_stats) against logits recomputed here in float64 from each attention
module's input and projection weights: scale · cos per l2norm group for cosine attention, q · k / sqrt(d) for
regular attention, causal mask, softmax, entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from cosformer.attention import Attention
from cosformer.train.attn_stats import attention_stats
from cosformer.train.config import load_config
from cosformer.train.tasks.lm import NUM_TOKENS, build_language_model


def tiny_lm(attn, pre_norm, **model):
    overrides = [f"model.attn={attn}", f"model.pre_norm={pre_norm}", "model.dim=32", "model.depth=3", "model.heads=2"]
    overrides += ["model.dim_head=16", "data.seq_len=24", *(f"model.{k}={v}" for k, v in model.items())]
    return build_language_model(load_config([], overrides))


def reference_stats(model, tokens):
    """(max logit per attention module, mean entropy) from each module's own input, recomputed in float64."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for m in modules]
    with torch.no_grad():
        model.eval()
        model(x=tokens)  # the fused path: what the module sees, not how it computed its maps
    for h in handles:
        h.remove()
    peaks, entropies = [], []
    for m in modules:
        x = inputs[m].double()
        b, n, _ = x.shape
        q = (x @ m.to_q.weight.double().T).view(b, n, m.heads, m.dim_head).transpose(1, 2)  # (b, h, n, d)
        k = (x @ m.to_k.weight.double().T).view(b, n, m.kv_heads, m.dim_head).transpose(1, 2)
        if m.kind == "cosine":
            q = F.normalize(q.unflatten(-1, (m.groups, -1)), dim=-1).flatten(-2)
            k = F.normalize(k.unflatten(-1, (m.groups, -1)), dim=-1).flatten(-2)
            logits = m.scale * q @ k.transpose(-1, -2)
        else:
            logits = q @ k.transpose(-1, -2) / math.sqrt(m.dim_head)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        peaks.append(logits.masked_select(causal).max().item())
        p = logits.masked_fill(~causal, -math.inf).softmax(dim=-1)
        entropies.append(-(p * p.clamp_min(1e-300).log()).sum(dim=-1))  # (b, h, n)
    return peaks, torch.stack(entropies).mean().item()


@pytest.mark.parametrize(
    "attn, pre_norm, model",
    [("cosine", False, {}), ("cosine", True, {"scale": 16.0, "groups": 2}), ("regular", False, {}),
     ("regular", True, {})],
)  # fmt: skip
def test_stats_match_logits_recomputed_from_the_projections(attn, pre_norm, model, seed, torch_attention_path):
    net = tiny_lm(attn, pre_norm, **model)
    with torch.no_grad():  # larger q, k than at init, so regular attention's logits are far from uniform
        for m in net.modules():
            if isinstance(m, Attention):
                m.to_q.weight.mul_(4.0)
                m.to_k.weight.mul_(4.0)
    tokens = torch.randint(0, NUM_TOKENS, (3, 25))
    peaks, entropy = reference_stats(net, tokens)
    net.train()
    stats = attention_stats(net, {"x": tokens})
    assert net.training  # mode restored
    assert [stats[f"attn_max_logit/{n}"] for n in range(len(peaks))] == pytest.approx(peaks, rel=1e-4, abs=1e-4)
    assert stats["attn_max_logit"] == pytest.approx(max(peaks), rel=1e-4, abs=1e-4)
    assert stats["attn_entropy"] == pytest.approx(entropy, rel=1e-4, abs=1e-5)
    # a causal row of n keys has entropy at most ln n; with these weights it is well below the uniform mean
    assert 0 < stats["attn_entropy"] < sum(math.log(n) for n in range(1, 26)) / 25
    if attn == "cosine":
        assert stats["attn_max_logit"] <= model.get("scale", 10.0) * model.get("groups", 1) + 1e-4
    # the hooks are gone: the next forward takes the fused path and returns no maps
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules() if isinstance(m, Attention))


def test_a_nan_in_one_layer_shows_as_nan(torch_attention_path):
    net = tiny_lm("regular", False)
    layers = [m for m in net.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        layers[-1].to_q.weight[0, 0] = math.nan  # the last layer only: a max over layers must not drop it
    stats = attention_stats(net, {"x": torch.randint(0, NUM_TOKENS, (2, 25))})
    assert math.isfinite(stats["attn_max_logit/0"])
    assert math.isnan(stats[f"attn_max_logit/{len(layers) - 1}"])
    assert math.isnan(stats["attn_max_logit"]) and math.isnan(stats["attn_entropy"])


def test_a_model_without_attention_gives_no_stats():
    assert attention_stats(torch.nn.Linear(2, 2), {"input": torch.zeros(1, 2)}) == {}
