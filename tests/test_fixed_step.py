"""Fixed-shape decoding steps (`cache_position`, what `generate(..., compile=...)` compiles): every step gives the
logits of the eager cached step, with every position scheme and attention option; generate with them gives the
tokens of eager decoding; the step traces as one graph that later steps and later calls of the same reserve reuse
(no recompile, which is what lets CUDA graphs replay it); and misuse fails with a message."""

import pytest
import torch

import cosformer.wrappers as wrappers
from cosformer import AutoregressiveWrapper, Decoder, KVCache, TransformerWrapper, XTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "abs": {},
    "rotary-groups": dict(rotary_pos_emb=True, attn_qk_norm_groups=2),
    "alibi-gqa": dict(alibi_pos_bias=True, attn_kv_heads=1),
    "t5-bias": dict(rel_pos_bias=True),
    "dynamic-bias": dict(dynamic_pos_bias=True),
    "value-residual-mem-kv": dict(add_value_residual=True, attn_num_mem_kv=2, attn_kv_heads=1),
}


def make_lm(attn, *, cross=False, max_seq_len=24, **opts):
    if attn == "regular":
        opts.pop("attn_qk_norm_groups", None)
    layers = Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, attn=attn, cross_attend=cross, **opts)
    return AutoregressiveWrapper(TransformerWrapper(num_tokens=29, max_seq_len=max_seq_len, attn_layers=layers))


def context(b, cross):
    if not cross:
        return {}
    return dict(context=torch.randn(b, 5, 32), context_mask=torch.tensor([[1, 1, 0, 1, 1], [0, 1, 0, 0, 0]]).bool())


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", ["cosine", "regular"])
@torch.no_grad()
def test_fixed_steps_give_the_eager_steps_logits(attn, variant, cross, seed, torch_attention_path):
    """Two caches filled with the same left-padded prompts; then each token goes through an eager step on one and
    a fixed-shape step (the whole reserve read, positions beyond masked) on the other: the same logits."""
    net = make_lm(attn, cross=cross, **VARIANTS[variant]).net.eval()
    prompt, start = torch.randint(0, 29, (2, 6)), torch.tensor([0, 3])
    eager, fixed = KVCache(capacity=16), KVCache(capacity=16)
    kwargs = context(2, cross)
    first = net(prompt, cache=eager, seq_start_pos=start, **kwargs)
    torch.testing.assert_close(net(prompt, cache=fixed, seq_start_pos=start, **kwargs), first)
    for token in torch.randint(0, 29, (9, 2, 1)):
        want = net(token, cache=eager)[:, -1]
        got = net(token, cache=fixed, cache_position=fixed.step_position("cpu"))[:, -1]
        fixed.advance(1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert fixed.length == eager.length == 15


@torch.no_grad()
def test_fixed_steps_through_the_kernels(seed):
    """The same with the op's Triton kernels (the interpreter on CPU): the one-query split path with a key mask."""
    net = make_lm("cosine", rotary_pos_emb=True, attn_kv_heads=1).net.eval()
    prompt = torch.randint(0, 29, (2, 5))
    eager, fixed = KVCache(capacity=12), KVCache(capacity=12)
    net(prompt, cache=eager), net(prompt, cache=fixed)
    for token in torch.randint(0, 29, (3, 2, 1)):
        want = net(token, cache=eager)[:, -1]
        got = net(token, cache=fixed, cache_position=fixed.step_position("cpu"))[:, -1]
        fixed.advance(1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def eager_step(monkeypatch):
    """generate's compiled step replaced by the same step run eagerly (what a compile must reproduce)."""
    monkeypatch.setattr(wrappers, "compiled_decode_step", lambda mode: wrappers._decode_step)


@pytest.mark.parametrize("variant", ["abs", "rotary-groups", "alibi-gqa"])
def test_generate_with_fixed_steps_gives_the_eager_tokens(variant, seed, torch_attention_path, monkeypatch):
    """Greedy tokens: prompts of different lengths, and a run past max_seq_len (the sliding window stays eager)."""
    model = make_lm("cosine", **VARIANTS[variant])
    prompts = [torch.randint(0, 29, (n,)) for n in (3, 7)]
    want = model.generate(prompts, 22, temperature=0.0)
    eager_step(monkeypatch)
    got = model.generate(prompts, 22, temperature=0.0, compile="default")
    assert torch.equal(got, want)


def test_xtransformer_generate_with_fixed_steps(seed, torch_attention_path, monkeypatch):
    model = XTransformer(32, enc_num_tokens=19, enc_depth=1, enc_max_seq_len=8, dec_num_tokens=19, dec_depth=2,
                         dec_max_seq_len=20, enc_heads=2, dec_heads=2, dec_rotary_pos_emb=True)  # fmt: skip
    src, start = torch.randint(0, 19, (2, 8)), torch.randint(0, 19, (2, 2))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    want = model.generate(src, start, 12, mask=mask, temperature=0.0)
    eager_step(monkeypatch)
    assert torch.equal(model.generate(src, start, 12, mask=mask, temperature=0.0, compile=True), want)


def test_the_step_compiles_once_per_reserve(seed, torch_attention_path, monkeypatch):
    """One graph, fullgraph (no break), for all steps of a generation and for another generation whose reserve
    rounds to the same power of two; a new reserve is one more graph. A graph per step would defeat CUDA graphs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(wrappers, "_COMPILED_STEPS", {})
    monkeypatch.setattr(wrappers, "compile_kwargs", lambda **kw: dict(backend=backend, fullgraph=True, dynamic=False))
    model = make_lm("cosine", rotary_pos_emb=True, max_seq_len=64)
    prompt = torch.randint(0, 29, (2, 4))
    want = model.generate(prompt, 12, temperature=0.0)
    assert torch.equal(model.generate(prompt, 12, temperature=0.0, compile="default"), want)  # reserve 16
    assert len(graphs) == 1
    model.generate(prompt, 9, temperature=0.0, compile="default")  # 4 + 9 - 1 = 12 positions: reserve 16 again
    assert len(graphs) == 1
    model.generate(prompt, 20, temperature=0.0, compile="default")  # reserve 32
    assert len(graphs) == 2
    # batch 1: the fed token's strides must not follow the growing sequence (a (1, 1) view of it is "contiguous")
    model.generate(prompt[:1], 12, temperature=0.0, compile="default")
    assert len(graphs) == 3
    # more graphs than dynamo's default limit of 8 per function (fullgraph turns reaching it into an error)
    for b in range(2, 10):
        model.generate(torch.randint(0, 29, (b, 4)), 6, temperature=0.0, compile="default")
    assert len(graphs) == 3 + 7  # batch 2 at reserve 16 was compiled already (9 steps of 4 + 6 - 1 fit in 16)
    torch._dynamo.reset()


def test_fixed_step_misuse_is_rejected(seed, torch_attention_path):
    model = make_lm("cosine")
    net = model.net.eval()
    with pytest.raises(ValueError, match="filled cache"):
        KVCache(capacity=8).step_position("cpu")
    cache = KVCache(capacity=8)
    net(torch.randint(0, 29, (2, 8)), cache=cache)
    with pytest.raises(ValueError, match="cannot grow"):
        cache.step_position("cpu")
    cache = KVCache(capacity=8)
    net(torch.randint(0, 29, (2, 3)), cache=cache)
    position = cache.step_position("cpu")
    with pytest.raises(ValueError, match="one token"):
        net(torch.randint(0, 29, (2, 2)), cache=cache, cache_position=position)
    with pytest.raises(ValueError, match="no mask"):
        net(torch.randint(0, 29, (2, 1)), cache=cache, cache_position=position, mask=torch.ones(2, 8).bool())
    with pytest.raises(ValueError, match="filled by an earlier call"):
        net(torch.randint(0, 29, (2, 1)), cache=KVCache(), cache_position=position)
    with pytest.raises(ValueError, match="compile must be"):
        model.generate(torch.randint(0, 29, (2, 3)), 4, compile="fast")
    with pytest.raises(ValueError, match="cache_kv=False"):
        model.generate(torch.randint(0, 29, (2, 3)), 4, cache_kv=False, compile=True)
