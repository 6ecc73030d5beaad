"""The preallocated KV cache: generate with it gives exactly the tokens of full recomputation (a plain loop that
feeds the whole sequence every step), keys and values are written in place into buffers reserved up front (the
attention reads views of them; nothing is concatenated per step), the buffers grow by doubling when a sequence
outlives them, and feeding the whole sequence again with a cache is an error."""

import pytest
import torch

import cosformer.attention
from cosformer import AutoregressiveWrapper, Decoder, KVCache, TransformerWrapper, XTransformer
from cosformer.attention import Attention, KVBuffer

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "abs": {},
    "rotary-groups": dict(rotary=True, groups=2),
    "alibi-gqa": dict(alibi=True, kv_heads=1),
    "abs-gqa": dict(kv_heads=2, heads=4),
}


def make_lm(attn, *, cross=False, max_seq_len=40, num_tokens=37, **opts):
    if attn == "regular":
        opts.pop("groups", None)
    if cross and opts.pop("alibi", False):
        opts["rotary"] = True  # alibi with cross-attention is rejected: keep the GQA part of the case
    opts = dict(dim=32, depth=2, heads=2, dim_head=16) | opts
    layers = Decoder(attn=attn, cross_attend=cross, **opts)
    return AutoregressiveWrapper(TransformerWrapper(num_tokens=num_tokens, max_seq_len=max_seq_len, attn_layers=layers))


@torch.no_grad()
def greedy_by_recomputation(net, prompt, steps, **kwargs):
    """The reference: every step runs the whole sequence (its last max_seq_len tokens) through the net."""
    net.eval()
    seq = prompt
    for _ in range(steps):
        logits = net(seq[:, -net.max_seq_len :], **kwargs)[:, -1]
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq[:, prompt.shape[1] :]


def context_kwargs(b, cross):
    if not cross:
        return {}
    return dict(context=torch.randn(b, 5, 32), context_mask=torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]]).bool())


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_cached_generate_equals_full_recomputation(attn, variant, cross, seed, torch_attention_path):
    model = make_lm(attn, cross=cross, **VARIANTS[variant])
    prompt = torch.randint(0, 37, (2, 5))
    kwargs = context_kwargs(2, cross)
    out = model.generate(prompt, 14, temperature=0.0, **kwargs)
    assert torch.equal(out, greedy_by_recomputation(model.net, prompt, 14, **kwargs))


def test_xtransformer_cached_generate_equals_full_recomputation(seed, torch_attention_path):
    """Cross-attention to the encoder with GQA in the decoder: the cache holds the context's keys once."""
    model = XTransformer(
        dim=32, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=10, dec_num_tokens=15, dec_depth=2,
        dec_heads=4, dec_kv_heads=2, dec_max_seq_len=16, dim_head=16, dec_rotary=True,
    )  # fmt: skip
    src = torch.randint(0, 20, (2, 10))
    src_mask = torch.ones(2, 10, dtype=torch.bool)
    src_mask[0, 6:] = False
    start = torch.randint(0, 15, (2, 2))
    out = model.generate(src, start, 12, mask=src_mask, temperature=0.0)
    model.eval()
    enc = model.encoder(src, mask=src_mask, return_embeddings=True)
    assert torch.equal(out, greedy_by_recomputation(model.decoder.net, start, 12, context=enc, context_mask=src_mask))


def self_buffers(cache):
    return [self_kv for self_kv, _ in cache.layers]


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_decoding_writes_in_place_and_attends_to_views(attn, seed, torch_attention_path, monkeypatch):
    """Within the reserved capacity every step writes into the same storage (no torch.cat, no reallocation), and
    the attention reads the filled prefix as a view of it."""
    net = make_lm(attn, kv_heads=1, cross=True).net.eval()
    x = torch.randint(0, 37, (2, 16))
    kwargs = context_kwargs(2, True)
    seen = []  # (k's and v's data pointers, k's length) as the attention received them
    if attn == "cosine":
        op = cosformer.attention.cosine_sim_attention

        def spy(q, k, v, **kw):
            seen.append((k.data_ptr(), v.data_ptr(), k.shape[-2]))
            return op(q, k, v, **kw)

        monkeypatch.setattr(cosformer.attention, "cosine_sim_attention", spy)
    else:
        regular = Attention._regular

        def spy(self, q, k, v, *args):
            seen.append((k.data_ptr(), v.data_ptr(), k.shape[-2]))
            return regular(self, q, k, v, *args)

        monkeypatch.setattr(Attention, "_regular", spy)

    cache = KVCache(capacity=16)
    with torch.no_grad():
        pieces = [net(x[:, :5], cache=cache, **kwargs)]
        storage = [(buf.storage[0].data_ptr(), buf.storage[1].data_ptr()) for buf in self_buffers(cache)]
        assert all(buf.capacity == 16 for buf in self_buffers(cache))
        for t in range(5, 16):
            seen.clear()
            pieces.append(net(x[:, t : t + 1], cache=cache))  # the context is cached: no need to pass it again
            now = [(buf.storage[0].data_ptr(), buf.storage[1].data_ptr()) for buf in self_buffers(cache)]
            assert now == storage  # the same buffers every step
            self_reads = seen[0::2]  # per block: self-attention, then cross-attention
            assert [(k, v) for k, v, _ in self_reads] == storage  # views starting at the buffers
            assert all(length == t + 1 for _, _, length in self_reads)
        assert cache.length == 16
        full = net(x, **kwargs)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_buffers_grow_by_doubling_past_their_capacity(attn, seed, torch_attention_path):
    net = make_lm(attn, rotary=True).net.eval()
    x = torch.randint(0, 37, (2, 30))
    with torch.no_grad():
        logits, cache = net(x[:, :3], return_cache=True)  # no reserve: the first write allocates what it needs
        pieces, capacities = [logits], [self_buffers(cache)[0].capacity]
        for t in range(3, 30):
            storage = self_buffers(cache)[0].storage
            pieces.append(net(x[:, t : t + 1], cache=cache))
            buf = self_buffers(cache)[0]
            capacities.append(buf.capacity)
            # the same storage unless the capacity changed (an address may come back from the allocator)
            assert buf.storage is storage or capacities[-1] != capacities[-2]
        full = net(x)
    assert capacities[0] == 3 and capacities[1] == 6 and capacities[-1] == 48
    assert sorted(set(capacities)) == [3, 6, 12, 24, 48]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_reserves_what_it_needs(seed, torch_attention_path, monkeypatch):
    """generate sizes the cache for the prompt plus the tokens it feeds back: no buffer is ever reallocated."""
    grown = []
    append = KVBuffer.append

    def tracking(self, *tensors):
        before = self.capacity
        out = append(self, *tensors)
        if before and self.capacity != before:
            grown.append((before, self.capacity))
        return out

    monkeypatch.setattr(KVBuffer, "append", tracking)
    model = make_lm("cosine", cross=True, max_seq_len=64)
    prompt = torch.randint(0, 37, (2, 7))
    out = model.generate(prompt, 20, temperature=0.0, **context_kwargs(2, True))
    assert out.shape == (2, 20) and grown == []


def test_feeding_the_whole_sequence_with_a_cache_is_an_error(seed, torch_attention_path):
    net = make_lm("cosine").net.eval()
    x = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        _, cache = net(x[:, :5], return_cache=True)
        with pytest.raises(ValueError, match=r"only the new tokens, x\[:, 5:\]"):
            net(x[:, :6], cache=cache)  # x-transformers' convention: the whole sequence every step
        assert cache.length == 5  # the rejected call left the cache as it was
        step = net(x[:, 5:6], cache=cache)
        chunk = net(x[:, 6:12], cache=cache)  # a chunk longer than the cache, of new tokens: fine
        full = net(x)
    torch.testing.assert_close(torch.cat((step, chunk), dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)


def test_cache_rejects_mismatches(seed, torch_attention_path):
    net = make_lm("cosine").net.eval()
    with pytest.raises(ValueError, match="capacity"):
        KVCache(capacity=-1)
    with torch.no_grad():
        _, cache = net(torch.randint(0, 37, (2, 4)), return_cache=True)
        with pytest.raises(ValueError, match="batch"):
            net(torch.randint(0, 37, (3, 1)), cache=cache)
        other = make_lm("cosine", depth=3).net.eval()
        with pytest.raises(ValueError, match="depth"):
            other(torch.randint(0, 37, (2, 1)), cache=cache)
