"""x-transformers' features beyond the block options (those are in test_model.py's reference cases): memory tokens,
intermediates and attention maps, stochastic depth, the KV cache under the new attention options, and
`ContinuousTransformerWrapper`, each against test_model.py's float64 reference."""

import pytest
import torch
from torch import nn

from cosformer import (
    AutoregressiveWrapper,
    ContinuousTransformerWrapper,
    Decoder,
    Encoder,
    LayerIntermediates,
    Transformer,
    TransformerWrapper,
    XTransformer,
)
from tests.test_model import (
    BASE,
    DPB,
    T5,
    _lin,
    _ln,
    assert_triton_matches_torch_path,
    build,
    ref_layers,
    ref_memory_tokens,
    ref_wrapper,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=2e-4, rtol=1e-4)


def _inputs(b=2, n=11, num_tokens=29):
    x = torch.randint(0, num_tokens, (b, n))
    mask = torch.rand(b, n) > 0.3
    mask[1] = True
    return x, mask


# ---------------------------------------------------------------------------------------------------------------
# memory tokens


@pytest.mark.parametrize("opts", [{}, dict(rotary_pos_emb=True), dict(attn_qk_norm=False)], ids=["abs", "rot", "reg"])
@pytest.mark.parametrize("causal", [False, True], ids=["enc", "dec"])
def test_memory_tokens_match_reference(causal, opts, seed, torch_attention_path):
    layers = Transformer(24, 2, 3, causal=causal, attn_dim_head=16, ff_mult=2, **opts)
    model = TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=layers, num_memory_tokens=3)
    x, mask = _inputs()
    logits = model(x, mask=mask)
    cfg = BASE | dict(attn=layers.attn)
    expected = ref_wrapper(model, x, cfg, mask=mask)
    assert logits.shape == (2, 11, 29)
    torch.testing.assert_close(logits.double(), expected, **TOL)
    (logits * torch.randn_like(logits)).sum().backward()
    assert model.memory_tokens.grad is not None and model.memory_tokens.grad.abs().sum() > 0


def test_memory_tokens_decode_without_a_cache(seed, torch_attention_path):
    net = TransformerWrapper(
        num_tokens=29, max_seq_len=16, attn_layers=Decoder(dim=24, depth=1, heads=3, attn_dim_head=16),
        num_memory_tokens=2,
    )  # fmt: skip
    assert not net.can_cache_kv
    x = torch.randint(0, 29, (2, 5))
    with pytest.raises(ValueError, match="num_memory_tokens"):
        net(x, return_cache=True)
    model = AutoregressiveWrapper(net)
    # as x-transformers: generate quietly recomputes instead of caching (the net cannot cache memory tokens)
    greedy = model.generate(x, 3, temperature=0.0, cache_kv=False)
    assert greedy.shape == (2, 3) and torch.equal(model.generate(x, 3, temperature=0.0), greedy)


def test_xtransformer_routes_memory_tokens_and_every_parameter_gets_a_gradient(seed, torch_attention_path):
    model = XTransformer(
        dim=32, enc_num_tokens=20, enc_depth=2, enc_max_seq_len=12, dec_num_tokens=20, dec_depth=2,
        dec_max_seq_len=10, attn_dim_head=16, enc_num_memory_tokens=2, add_value_residual=True,
        attn_num_mem_kv=2, attn_gate_values=True, attn_gate_value_heads=True, dec_rel_pos_bias=True,
        enc_dynamic_pos_bias=True,
    )  # fmt: skip
    assert model.encoder.num_memory_tokens == 2 and model.decoder.net.num_memory_tokens == 0
    src, tgt = torch.randint(0, 20, (2, 12)), torch.randint(0, 20, (2, 10))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 9:] = False
    model(src, tgt, mask=mask).backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None]


# ---------------------------------------------------------------------------------------------------------------
# intermediates and attention maps (the non-fused path)

MAP_CASES = {
    "cosine-cross": dict(cross=True),
    "regular-gqa": dict(attn="regular", kv_heads=2),
    "cosine-rotary-memkv-alibi": dict(alibi=True, attn_num_mem_kv=2),
    "cosine-rotary-groups-memkv": dict(rotary=True, groups=2, attn_num_mem_kv=2),
    "cosine-t5-value-residual-gates": T5 | dict(add_value_residual=True, attn_gate_value_heads=True),
    "regular-dynamic": DPB | dict(attn="regular"),
}


@pytest.mark.parametrize("causal", [False, True], ids=["enc", "dec"])
@pytest.mark.parametrize("case", list(MAP_CASES))
def test_attention_maps_match_reference(case, causal, seed, torch_attention_path):
    cfg = BASE | MAP_CASES[case]
    model = build(cfg, causal=causal, dim_context=20)
    x, mask = _inputs(n=13)
    kwargs = dict(mask=mask)
    if cfg.get("cross"):
        kwargs |= dict(context=torch.randn(2, 7, 20), context_mask=torch.rand(2, 7) > 0.4)
    maps = []
    expected = ref_wrapper(model, x, cfg, maps=maps, **kwargs)

    logits, inter = model(x, return_intermediates=True, **kwargs)
    assert isinstance(inter, LayerIntermediates)
    torch.testing.assert_close(logits.double(), expected, **TOL)
    torch.testing.assert_close(logits, model(x, **kwargs), **TOL)  # the fused path gives the same output
    assert len(inter.hiddens) == len(model.attn_layers.layers) and len(inter.attn_intermediates) == len(maps)
    for got, want in zip(inter.attn_intermediates, maps):
        assert got.post_softmax_attn.shape == want.shape
        torch.testing.assert_close(got.post_softmax_attn.double(), want, atol=1e-5, rtol=1e-4)
        # logits: −inf exactly where a key is hidden (mask, causality), finite elsewhere
        assert torch.isneginf(got.pre_softmax_attn[want == 0]).all()
        assert torch.isfinite(got.pre_softmax_attn[want > 0]).all()
    embeddings = ref_wrapper(model, x, cfg, return_embeddings=True, **kwargs)
    torch.testing.assert_close(inter.last_hidden.double(), embeddings, **TOL)

    out, attn_maps = model(x, return_attn=True, **kwargs)
    assert len(attn_maps) == len(maps)
    torch.testing.assert_close(attn_maps[0].double(), maps[0], atol=1e-5, rtol=1e-4)
    inter.last_hidden.sum().backward()  # the non-fused path is differentiable


def test_intermediates_carry_memory_tokens_and_refuse_a_cache(seed, torch_attention_path):
    model = TransformerWrapper(
        num_tokens=29, max_seq_len=16, attn_layers=Encoder(dim=24, depth=2, heads=3, attn_dim_head=16),
        num_memory_tokens=4,
    )  # fmt: skip
    x, mask = _inputs()
    _, inter = model(x, mask=mask, return_intermediates=True)
    assert inter.memory_tokens.shape == (2, 4, 24)
    assert inter.attn_intermediates[0].post_softmax_attn.shape == (2, 3, 15, 15)
    dec = TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=Decoder(dim=24, depth=1, heads=3, dim_head=16))
    with pytest.raises(ValueError, match="cache"):
        dec(x, return_cache=True, return_attn=True)


# ---------------------------------------------------------------------------------------------------------------
# stochastic depth


def test_layer_dropout_skips_whole_blocks_in_training_only(seed, torch_attention_path, monkeypatch):
    layers = Decoder(dim=24, depth=4, heads=3, attn_dim_head=16, layer_dropout=0.5)
    model = TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=layers)
    x = torch.randint(0, 29, (2, 9))
    model.eval()
    full = model(x)
    draws = iter([0.9, 0.2, 0.7, 0.1])  # blocks 1 and 3 fall below 0.5: skipped
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(next(draws)) if a == ((),) else real_rand(*a, **k))
    model.train()
    dropped = model(x)
    monkeypatch.setattr(torch, "rand", real_rand)
    kept = layers.layers
    layers.layers = nn.ModuleList([kept[0], kept[2]])
    model.eval()
    torch.testing.assert_close(dropped, model(x))  # a skipped block is the identity
    layers.layers = kept
    torch.testing.assert_close(model(x), full)  # never in eval
    model.train()
    _, cache = model(x, return_cache=True)  # never while building a cache
    assert all(kv[0] is not None for kv in cache.layers)
    with pytest.raises(ValueError, match="layer_dropout"):
        Decoder(dim=24, depth=1, heads=3, attn_dim_head=16, layer_dropout=1.0)


# ---------------------------------------------------------------------------------------------------------------
# the KV cache under the new attention options

CACHE_VARIANTS = {
    "memkv-gates": dict(attn_num_mem_kv=2, attn_gate_values=True, attn_gate_value_heads=True),
    "memkv-rotary-groups-gqa": dict(attn_num_mem_kv=3, rotary_pos_emb=True, attn_qk_norm_groups=2, attn_kv_heads=1),
    "memkv-alibi": dict(attn_num_mem_kv=2, alibi_pos_bias=True),
    "value-residual-rotary": dict(add_value_residual=True, rotary_pos_emb=True),
    "t5": dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=12),
    "dynamic": dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True),
}


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("variant", list(CACHE_VARIANTS))
@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_cached_logits_equal_full_forward(attn, variant, cross, seed, torch_attention_path):
    opts = dict(CACHE_VARIANTS[variant])
    if attn == "regular":
        opts.pop("attn_qk_norm_groups", None)
    layers = Decoder(dim=32, depth=3, heads=2, attn_dim_head=16, attn=attn, cross_attend=cross, **opts)
    with torch.no_grad():
        for name, p in layers.named_parameters():
            if "gate" in name or "value_residual_mix" in name:
                p.normal_(0.0, 0.5)
    net = TransformerWrapper(num_tokens=37, max_seq_len=40, attn_layers=layers).eval()
    x = torch.randint(0, 37, (2, 19))
    kwargs = dict(context=torch.randn(2, 6, 32), context_mask=torch.rand(2, 6) > 0.3) if cross else {}
    full = net(x, **kwargs)
    logits, cache = net(x[:, :7], return_cache=True, **kwargs)
    pieces = [logits]
    for start, stop in ((7, 8), (8, 9), (9, 19)):
        logits, cache = net(x[:, start:stop], cache=cache, return_cache=True, **kwargs)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# ContinuousTransformerWrapper


def ref_continuous(model, x, cfg, mask=None):
    h = _lin(x.double(), model.project_in) if isinstance(model.project_in, nn.Linear) else x.double()
    if model.pos_emb is not None:
        h = h + model.pos_emb.emb.weight.double()[: x.shape[1]]
    if isinstance(model.post_emb_norm, nn.LayerNorm):
        h = _ln(h, model.post_emb_norm)
    h, mask = ref_memory_tokens(model, h, mask)
    h = ref_layers(model.attn_layers, h, cfg, mask)[:, model.num_memory_tokens :]
    return _lin(h, model.project_out) if isinstance(model.project_out, nn.Linear) else h


@pytest.mark.parametrize(
    "opts",
    [dict(dim_in=5, dim_out=3), dict(dim_in=5, post_emb_norm=True, num_memory_tokens=2), dict(dim_out=7)],
    ids=["in-out", "in-norm-memory", "out"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["enc", "dec"])
def test_continuous_wrapper_matches_reference(causal, opts, seed, torch_attention_path):
    layers = Transformer(24, 2, 3, causal=causal, attn_dim_head=16, ff_mult=2)
    model = ContinuousTransformerWrapper(max_seq_len=16, attn_layers=layers, **opts)
    x = torch.randn(2, 11, opts.get("dim_in", 24))
    mask = torch.rand(2, 11) > 0.3
    out = model(x, mask=mask)
    assert out.shape == (2, 11, opts.get("dim_out", 24))
    torch.testing.assert_close(out.double(), ref_continuous(model, x, BASE, mask), **TOL)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_continuous_wrapper_positional_form_and_checks(seed, torch_attention_path):
    layers = Decoder(dim=24, depth=1, heads=3, attn_dim_head=16, rotary_pos_emb=True)
    model = ContinuousTransformerWrapper(4, 6, 32, layers)  # (dim_in, dim_out, max_seq_len, attn_layers)
    assert model.pos_emb is None  # the layers encode positions
    x = torch.randn(2, 9, 4)
    _, cache = model(x[:, :5], return_cache=True)
    step, _ = model(x[:, 5:], cache=cache, return_cache=True)
    torch.testing.assert_close(step, model(x)[:, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dim_in"):
        model(torch.randn(2, 9, 5))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randn(2, 33, 4))
    with pytest.raises(ValueError, match="use_abs_pos_emb"):
        ContinuousTransformerWrapper(attn_layers=layers, use_abs_pos_emb=True)
    with pytest.raises(ValueError, match="attn_layers"):
        ContinuousTransformerWrapper(4, 6, 32)


# ---------------------------------------------------------------------------------------------------------------
# mixed precision and torch.compile under the new options

NEW_OPTIONS = dict(
    attn_num_mem_kv=2, attn_gate_values=True, attn_gate_value_heads=True, add_value_residual=True,
    rel_pos_bias=True, use_rmsnorm=True, ff_glu=True, ff_swish=True,
)  # fmt: skip


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_new_options_under_bf16_autocast(attn, seed, torch_attention_path):
    layers = Decoder(dim=64, depth=2, heads=4, attn_dim_head=16, attn_kv_heads=2, attn=attn, cross_attend=True,
                     **NEW_OPTIONS)  # fmt: skip
    model = AutoregressiveWrapper(TransformerWrapper(num_tokens=40, max_seq_len=32, attn_layers=layers))
    x, context = torch.randint(0, 40, (2, 20)), torch.randn(2, 5, 64)
    loss32 = model(x, context=context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(x, context=context)
    loss16.backward()
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_new_options_compile_without_graph_breaks(attn, seed, torch_attention_path):
    layers = Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, attn=attn, cross_attend=True, **NEW_OPTIONS)
    model = AutoregressiveWrapper(TransformerWrapper(num_tokens=30, max_seq_len=16, attn_layers=layers))
    x, context = torch.randint(0, 30, (2, 16)), torch.randn(2, 5, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, context=context)
    loss.backward()
    torch.testing.assert_close(loss, model(x, context=context))


def test_triton_interpreter_matches_torch_path_with_bias_and_memory(seed, monkeypatch):
    """The op's Triton kernels (interpreted on CPU) with a learned position bias and memory key/values: the bias
    gradient comes back from the kernel. Tiny on purpose."""
    layers = Decoder(dim=32, depth=1, heads=2, attn_dim_head=16, rel_pos_bias=True, attn_num_mem_kv=2)
    model = TransformerWrapper(num_tokens=16, max_seq_len=8, attn_layers=layers)
    assert_triton_matches_torch_path(model, torch.randint(0, 16, (1, 8)), monkeypatch)
    assert layers.rel_pos.relative_attention_bias.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-ln", "pre-ln"])
def test_a_forward_without_grad_frees_each_block_input(pre_norm, seed, torch_attention_path):
    """Without return_intermediates, nothing holds a block's input or its attention values past the next block: a
    long prefill's memory is one layer's, not every layer's. Watched from inside the forward (a hook on the last
    block); asking for the intermediates keeps them all, which shows the watch can see them."""
    import weakref

    layers = Decoder(dim=24, depth=5, heads=3, attn_dim_head=16, pre_norm=pre_norm)
    model = TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=layers)
    blocks = model.attn_layers.layers
    inputs, values, alive_at_last = [], [], []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0]))) for b in blocks]
    # a block returns (x, kv, (self-attention intermediates, cross-attention's)): the values of its attention
    hooks += [
        b.register_forward_hook(lambda m, args, out: values.append(weakref.ref(out[2][0].values))) for b in blocks
    ]
    hooks.append(blocks[-1].register_forward_pre_hook(lambda m, args: alive_at_last.append(
        sum(r() is not None for r in inputs[1:-2] + values[:-1]))))  # fmt: skip
    x = torch.randint(0, 29, (2, 11))
    with torch.no_grad():
        model(x)
        assert alive_at_last == [0], "block inputs held to the end of the forward"
        inputs.clear(), values.clear()
        _, inter = model(x, return_intermediates=True)
        assert alive_at_last[-1] == 2 * len(blocks) - 5 and len(inter.hiddens) == len(blocks)
    for hook in hooks:
        hook.remove()
