"""Generation with x-transformers' signature and semantics: KV-cached decoding equals full recomputation (logits and
greedy tokens), sampling filters against brute force and applied before the temperature, end-of-sequence padding and
early stop, the sliding-window fallback, the loss's mask, and the text-to-image usage. The cache's buffers are
tested in test_kv_cache.py, prompts of different lengths in test_variable_prompts.py."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from cosattn import l2norm_tensors
from cosformer import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper, XTransformer
from cosformer.sampling import FILTER_LOGITS_FN, min_p, sample_next, top_k, top_p

pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = {
    "abs": {},
    "rotary-groups": dict(rotary=True, groups=2),
    "alibi-gqa": dict(alibi=True, kv_heads=1),
    "prenorm-glu": dict(pre_norm=True, ff_glu=True),
}


def make_lm(attn, *, cross=False, max_seq_len=40, num_tokens=37, **opts):
    if attn == "regular":
        opts.pop("groups", None)
    if cross and opts.pop("alibi", False):
        opts["rotary"] = True  # alibi with cross-attention is rejected (test_model): keep the GQA part of the case
    layers = Decoder(dim=32, depth=2, heads=2, dim_head=16, attn=attn, cross_attend=cross, **opts)
    return AutoregressiveWrapper(TransformerWrapper(num_tokens=num_tokens, max_seq_len=max_seq_len, attn_layers=layers))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_cached_logits_equal_full_forward(attn, variant, cross, seed, torch_attention_path):
    model = make_lm(attn, cross=cross, **VARIANTS[variant]).eval()
    net = model.net
    x = torch.randint(0, 37, (2, 19))
    kwargs = {}
    if cross:
        kwargs = dict(context=torch.randn(2, 6, 32), context_mask=torch.rand(2, 6) > 0.3)
    full = net(x, **kwargs)
    # prompt of 7, then chunks of 1, 1 and 10 tokens through the cache
    logits, cache = net(x[:, :7], cache=None, return_cache=True, **kwargs)
    pieces = [logits]
    for start, stop in ((7, 8), (8, 9), (9, 19)):
        logits, cache = net(x[:, start:stop], cache=cache, return_cache=True, **kwargs)
        pieces.append(logits)
    assert cache.length == 19
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("variant", ["abs", "rotary-groups", "alibi-gqa"])
@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_cached_greedy_equals_uncached(attn, variant, cross, seed, torch_attention_path):
    model = make_lm(attn, cross=cross, **VARIANTS[variant])
    prompt = torch.randint(0, 37, (3, 5))
    kwargs = {}
    if cross:
        kwargs = dict(
            context=torch.randn(3, 4, 32), context_mask=torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1] * 4]).bool()
        )
    cached = model.generate(prompt, 12, temperature=0.0, cache_kv=True, **kwargs)
    uncached = model.generate(prompt, 12, temperature=0.0, cache_kv=False, **kwargs)
    assert cached.shape == (3, 12) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    assert model.training  # restored


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_prompt_mask_with_cache(attn, seed, torch_attention_path):
    model = make_lm(attn, rotary=True)
    prompt = torch.randint(0, 37, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    cached = model.generate(prompt, 8, temperature=0.0, mask=mask)
    uncached = model.generate(prompt, 8, temperature=0.0, mask=mask, cache_kv=False)
    assert torch.equal(cached, uncached)
    other = prompt.clone()
    other[0, :3] = (prompt[0, :3] + 1) % 37  # what sits under the mask must not matter
    assert torch.equal(model.generate(other, 8, temperature=0.0, mask=mask), cached)


def test_cached_keys_are_normalised_and_rotated(seed, torch_attention_path):
    net = make_lm("cosine", rotary=True, groups=2).net.eval()
    x = torch.randint(0, 37, (1, 9))
    _, cache = net(x, return_cache=True)
    self_kv, cross = cache.layers[0]
    k, v = self_kv.filled()
    assert k.shape == (1, 2, 9, 16) and v.shape == (1, 2, 9, 16) and cross is None
    attn = net.attn_layers.layers[0].self_attn
    k_normed = l2norm_tensors(attn.to_k(net.token_emb(x)).unflatten(-1, (2, 16)).transpose(1, 2), groups=2)
    torch.testing.assert_close(k[:, :, 0], k_normed[:, :, 0])  # position 0: rotation by angle 0
    assert not torch.allclose(k[:, :, 1:], k_normed[:, :, 1:], atol=1e-3)  # later positions rotated...
    norms = k.unflatten(-1, (2, 8)).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # ...with every group's norm preserved


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_sliding_window_past_max_seq_len(attn, seed, torch_attention_path):
    model = make_lm(attn, max_seq_len=12)
    prompt = torch.randint(0, 37, (2, 4))
    cached = model.generate(prompt, 20, temperature=0.0, cache_kv=True)
    uncached = model.generate(prompt, 20, temperature=0.0, cache_kv=False)
    assert cached.shape == (2, 20) and torch.equal(cached, uncached)
    # past the limit each step sees exactly the last 12 tokens
    seq = torch.cat((prompt, cached), dim=1)
    model.eval()
    last = model.net(seq[:, -13:-1])[:, -1].argmax(dim=-1)
    assert torch.equal(last, cached[:, -1])


@pytest.mark.parametrize("cache_kv", [True, False])
def test_generate_makes_logits_for_the_last_position_only(cache_kv, seed, torch_attention_path, monkeypatch):
    """A prompt's prefill (and, without a cache, every step) computes the logits of the position sampled from only,
    never (b, n, num_tokens) of them; the tokens are the full forward's argmax all the same."""
    model = make_lm("cosine", max_seq_len=12)
    shapes = []
    real = type(model.net)._logits
    monkeypatch.setattr(type(model.net), "_logits", lambda net, h: shapes.append(tuple(h.shape)) or real(net, h))
    prompt = torch.randint(0, 37, (3, 7))
    out = model.generate(prompt, 8, temperature=0.0, cache_kv=cache_kv)  # past max_seq_len: the window path too
    assert shapes and all(len(s) == 2 for s in shapes), shapes
    seq = torch.cat((prompt, out), dim=1)
    shapes.clear()
    model.eval()
    assert torch.equal(model.net(seq[:, -13:-1])[:, -1].argmax(dim=-1), out[:, -1]) and shapes == [(3, 12, 32)]


@pytest.mark.parametrize("cache_kv", [True, False])
def test_eos_fills_with_pad_and_stops_when_every_row_ended(cache_kv, seed, torch_attention_path):
    """x-transformers' behaviour: after a row's first eos comes pad_value; once every row has produced an eos the
    generation stops and the result is that much shorter than seq_len."""
    model = AutoregressiveWrapper(
        TransformerWrapper(num_tokens=6, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2, dim_head=16)),
        pad_value=-1,
    )
    prompt = torch.randint(0, 6, (4, 3))
    free = model.generate(prompt, 15, temperature=0.0, cache_kv=cache_kv)
    for eos in free.unique().tolist():
        out = model.generate(prompt, 15, eos_token=eos, temperature=0.0, cache_kv=cache_kv)
        stops = []
        for row_free in free:
            hits = (row_free == eos).nonzero()
            stops.append(int(hits[0]) + 1 if len(hits) else None)
        length = 15 if None in stops else max(stops)
        assert out.shape == (4, length)
        for row_free, row, stop in zip(free, out, stops):
            stop = stop or 15
            assert torch.equal(row[:stop], row_free[:stop])
            assert (row[stop:] == -1).all()
    # an eos inside the prompt ends nothing
    eos = int(prompt[0, 0])
    out = model.generate(prompt, 15, eos_token=eos, temperature=0.0, cache_kv=cache_kv)
    hits = (free[0] == eos).nonzero()
    assert (out[0] != -1).sum() == (int(hits[0]) + 1 if len(hits) else 15)


def test_eos_samples_until_every_row_ended(seed, torch_attention_path):
    """Sampling with an eos: each row keeps its tokens up to its first eos and pads after it; the result is as
    long as the last row needed (an eos on every row), or seq_len."""
    model = make_lm("cosine", num_tokens=5)
    prompt = torch.randint(0, 5, (6, 2))
    out = model.generate(prompt, 30, eos_token=2, temperature=1.0, filter_logits_fn=None)
    is_eos = out == 2
    assert out.shape[1] == 30 or (is_eos.any(1).all() and is_eos[:, -1].any())
    for row in out:
        hits = (row == 2).nonzero()
        if len(hits):
            assert (row[int(hits[0]) + 1 :] == model.pad_value).all()


def test_filters_against_brute_force(seed):
    logits = torch.randn(5, 50)
    kept = top_k(logits, k=7)
    for row, row_kept in zip(logits, kept):
        expected = set(row.argsort(descending=True)[:7].tolist())
        assert set(torch.isfinite(row_kept).nonzero().flatten().tolist()) == expected
    assert torch.isfinite(top_k(logits)).sum(dim=-1).eq(5).all()  # default: 10% of 50 tokens
    assert torch.isfinite(top_k(logits, 0.2)).sum(dim=-1).eq(10).all()  # x-transformers' order: frac_num_tokens, k

    for thres in (0.05, 0.5, 0.9):
        kept = top_p(logits, thres=thres)
        for row, row_kept in zip(logits, kept):
            probs, order = row.softmax(-1).sort(descending=True)
            n = int((probs.cumsum(-1) < thres).sum()) + 1  # smallest prefix with mass >= thres
            assert set(torch.isfinite(row_kept).nonzero().flatten().tolist()) == set(order[:n].tolist())
    assert torch.equal(top_p(logits, thres=1.0), logits)

    for ratio in (0.0, 0.05, 0.3, 1.0):
        kept = min_p(logits, min_p=ratio)
        for row, row_kept in zip(logits, kept):
            probs = row.softmax(-1)
            expected = (probs >= ratio * probs.max()).nonzero().flatten().tolist()
            assert torch.isfinite(row_kept).nonzero().flatten().tolist() == expected
            assert torch.equal(row_kept[torch.isfinite(row_kept)], row[torch.isfinite(row_kept)])


def test_sampling(seed):
    logits = torch.randn(64, 30)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0.0), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, filter_logits_fn=top_k, filter_kwargs={"k": 1}), greedy)
    samples = sample_next(logits, temperature=2.0, filter_logits_fn=top_k, filter_kwargs={"k": 3})
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == samples[:, None]).any(-1).all()
    assert not torch.equal(sample_next(logits, temperature=5.0, filter_logits_fn=None), greedy)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("name", ["top_p", "min_p"])
def test_filter_comes_before_the_temperature(name, temperature, seed):
    """x-transformers' order: the filter sees the raw logits, so the kept set is the same at every temperature;
    dividing first (the old order) kept token 2 too at temperature 3, and dropped token 1 at 0.3."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]]).expand(20_000, 4)  # probs 0.63, 0.23, 0.14, 0.004
    filter_kwargs = {"thres": 0.8} if name == "top_p" else {"min_p": 0.3}
    samples = sample_next(logits, temperature=temperature, filter_logits_fn=FILTER_LOGITS_FN[name],
                          filter_kwargs=filter_kwargs)  # fmt: skip
    counts = torch.bincount(samples, minlength=4) / len(samples)
    kept = torch.tensor([0, 1])  # top_p 0.8: 0.63 < 0.8 <= 0.86; min_p 0.3: 0.23 >= 0.3 * 0.63 > 0.14
    expected = torch.zeros(4)
    expected[kept] = (logits[0, kept] / temperature).softmax(-1)
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize("filter", [None, "top_k", "top_p", "min_p"])
@pytest.mark.parametrize("temperature", [5e-324, 1e-46, 1e-39, 1e-30, 1e-8])
def test_tiny_temperatures_sample_the_argmax(temperature, filter, seed):
    """logits / temperature overflowed to inf (nan after the softmax) and multinomial raised; the limit of the
    tempered distribution as the temperature goes to 0 is the argmax, whatever the logits' dtype and magnitude."""
    logits = torch.randn(64, 30) * torch.logspace(-3, 10, 64)[:, None]  # rows from tiny to huge logits
    logits[:, 7] = float("-inf")  # a masked token stays masked
    fn = FILTER_LOGITS_FN.get(filter)
    assert torch.equal(sample_next(logits, temperature=temperature, filter_logits_fn=fn), logits.argmax(-1))
    # half-precision logits (a model under autocast) take the same path; integers times 2^10 are exact, no ties
    distinct = torch.stack([torch.randperm(30) for _ in range(8)]).float() * 2**10
    for dtype in (torch.bfloat16, torch.float16):
        sampled = sample_next(distinct.to(dtype), temperature=temperature, filter_logits_fn=fn)
        assert torch.equal(sampled, distinct.argmax(-1))


def test_tiny_temperature_keeps_exact_ties(seed):
    """Near zero the tempered distribution is uniform over the tied maxima, not the first of them."""
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]]).expand(4000, 4)
    samples = sample_next(logits, temperature=1e-39, filter_logits_fn=None)
    counts = torch.bincount(samples, minlength=4)
    assert counts[0] == counts[3] == 0 and min(counts[1], counts[2]) > 1700


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_ordinary_temperatures_sample_the_tempered_softmax(temperature, seed):
    logits = torch.tensor([[0.3, -1.2, 1.1, 0.0]]).expand(40_000, 4)
    counts = torch.bincount(sample_next(logits, temperature=temperature, filter_logits_fn=None), minlength=4)
    expected = (logits[0] / temperature).softmax(-1)
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.01, rtol=0)


def test_generate_with_a_tiny_temperature_is_greedy(seed, torch_attention_path):
    model = make_lm("cosine")
    prompt = torch.randint(0, 37, (2, 4))
    greedy = model.generate(prompt, 6, temperature=0.0)
    for temperature in (1e-39, 1e-30, 1e-8):
        assert torch.equal(model.generate(prompt, 6, temperature=temperature), greedy)


def test_generate_rejects_bad_arguments(torch_attention_path):
    model = make_lm("cosine")
    prompt = torch.randint(0, 37, (1, 3))
    for kwargs, name in [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=-1e-39), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(filter_logits_fn="top_z"), "filter_logits_fn"),
        (dict(filter_logits_fn="top_k", filter_kwargs={"k": 0}), "k"),
        (dict(filter_logits_fn="top_p", filter_kwargs={"thres": 1.5}), "thres"),
        (dict(filter_logits_fn="min_p", filter_kwargs={"min_p": -0.1}), "min_p"),
        (dict(filter_logits_fn="top_p", filter_kwargs={"p": 0.9}), "takes thres= .* not p="),
        (dict(filter_logits_fn="top_k", filter_kwargs={"kk": 3}), "filter_kwargs"),
        (dict(eos_token=0.8), "eos_token"),
    ]:
        with pytest.raises(ValueError, match=name):
            model.generate(prompt, 2, **kwargs)
    with pytest.raises(TypeError, match="filter_logits_fn="):
        model.generate(prompt, 2, filter="top_p", filter_kwargs={"p": 0.9})  # the old keywords, named not guessed
    with pytest.raises(ValueError, match="seq_len"):
        model.generate(prompt, 0)


def test_cache_kv_on_a_bidirectional_net_recomputes(seed, torch_attention_path):
    """x-transformers quietly decodes a net that cannot cache without a cache; so does generate (it raised)."""
    enc = AutoregressiveWrapper(
        TransformerWrapper(num_tokens=9, max_seq_len=8, attn_layers=Encoder(dim=32, depth=1, heads=2, dim_head=16))
    )
    prompt = torch.randint(0, 9, (2, 2))
    out = enc.generate(prompt, 9, temperature=0.0)  # cache_kv=True by default; past max_seq_len too
    assert torch.equal(out, enc.generate(prompt, 9, temperature=0.0, cache_kv=False))
    seq = prompt
    enc.eval()
    for _ in range(9):
        seq = torch.cat((seq, enc.net(seq[:, -8:])[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq[:, 2:])
    assert enc.generate(prompt[0], 3).shape == (3,)


def test_loss_mask_is_key_padding_only(seed, torch_attention_path):
    """x-transformers: `mask` is what the net attends with; every target counts unless it is ignore_index (or lies
    beyond `lens`), and an ignore_index input is fed as pad_value. (A mask used to drop targets too.)"""
    model = make_lm("cosine")
    model.pad_value = 5
    x = torch.randint(0, 37, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    logits = model.net(x[:, :-1], mask=mask[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), x[:, 1:])  # all 9 targets of each row
    torch.testing.assert_close(model(x, mask=mask), expected)

    padded = x.masked_fill(~mask, model.ignore_index)  # the way to leave targets out of the loss
    inp = x[:, :-1].masked_fill(~mask[:, :-1], 5)
    logits = model.net(inp, mask=mask[:, :-1])
    expected = F.cross_entropy(logits[:, :6].transpose(1, 2), x[:, 1:7])
    torch.testing.assert_close(model(padded, mask=mask), expected)
    torch.testing.assert_close(model(x, mask=mask, lens=torch.tensor([7, 7])), expected)
    per_row = model(x, mask=mask, lens=torch.tensor([7, 7]), reduction="none")
    per_row_expected = F.cross_entropy(logits[:, :6].transpose(1, 2), x[:, 1:7], reduction="none").mean(1)
    torch.testing.assert_close(per_row, per_row_expected)


def test_xtransformer_generate_cached_equals_uncached(seed, torch_attention_path):
    model = XTransformer(
        dim=32, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=10, dec_num_tokens=15, dec_depth=2,
        dec_heads=2, dec_max_seq_len=16, dim_head=16, dec_rotary=True,
    )  # fmt: skip
    src = torch.randint(0, 20, (2, 10))
    src_mask = torch.ones(2, 10, dtype=torch.bool)
    src_mask[0, 6:] = False
    start = torch.zeros(2, 1, dtype=torch.long)
    cached = model.generate(src, start, 12, mask=src_mask, temperature=0.0)
    uncached = model.generate(src, start, 12, mask=src_mask, temperature=0.0, cache_kv=False)
    assert cached.shape == (2, 12) and torch.equal(cached, uncached)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_text_to_image_usage(attn, seed, torch_attention_path):
    """The exact construction a text-to-image model uses (a shorter generation to stay fast on a CPU)."""
    enc = TransformerWrapper(num_tokens=256, max_seq_len=64, attn_layers=Encoder(dim=256, depth=2, heads=4, attn=attn))
    dec = AutoregressiveWrapper(
        TransformerWrapper(
            num_tokens=512,
            max_seq_len=1025,
            attn_layers=Decoder(dim=256, depth=4, heads=4, cross_attend=True, attn=attn),
        )
    )
    text = torch.randint(0, 256, (2, 40))
    text_mask = torch.ones(2, 40, dtype=torch.bool)
    text_mask[1, 20:] = False
    ctx = enc(text, mask=text_mask, return_embeddings=True)
    assert ctx.shape == (2, 40, 256)
    img_tokens = torch.randint(0, 512, (2, 1025))
    loss = dec(img_tokens, context=ctx, context_mask=text_mask)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 1.5
    assert enc.token_emb.weight.grad is not None  # the loss reaches the text encoder through the context
    start = torch.randint(0, 512, (2, 1))
    ctx = ctx.detach()
    out = dec.generate(start, 48, context=ctx, context_mask=text_mask, cache_kv=True, temperature=0.0)
    ref = dec.generate(start, 48, context=ctx, context_mask=text_mask, cache_kv=False, temperature=0.0)
    assert out.shape == (2, 48) and torch.equal(out, ref)


def test_generate_signature_follows_x_transformers(seed, torch_attention_path):
    """The third positional argument is eos_token (it was the temperature: `generate(p, 5, 3)` sampled at
    temperature 3), then temperature, prompt_lens, filter_logits_fn, filter_kwargs, cache_kv."""
    names = list(inspect.signature(AutoregressiveWrapper.generate).parameters)
    assert names[:9] == [
        "self", "prompts", "seq_len", "eos_token", "temperature", "prompt_lens", "filter_logits_fn", "filter_kwargs",
        "cache_kv",
    ]  # fmt: skip
    model = make_lm("cosine")
    prompt = torch.randint(0, 37, (3, 4))
    free = model.generate(prompt, 10, temperature=0.0)
    eos = int(free[0, 3])
    by_position = model.generate(prompt, 10, eos, 0.0)
    assert torch.equal(by_position, model.generate(prompt, 10, eos_token=eos, temperature=0.0))
    assert (by_position[0, 4:] == model.pad_value).all()  # row 0 ended at its eos


@pytest.mark.parametrize("how", ["name", "callable", "lambda"])
def test_generate_takes_a_filter_by_name_or_callable(how, seed, torch_attention_path):
    model = make_lm("cosine")
    prompt = torch.randint(0, 37, (2, 3))
    greedy = model.generate(prompt, 6, temperature=0.0)
    fn = {"name": "top_k", "callable": top_k, "lambda": lambda logits, k: top_k(logits, k=k)}[how]
    # k=1 keeps only the argmax: any temperature then reproduces greedy decoding
    assert torch.equal(model.generate(prompt, 6, temperature=2.0, filter_logits_fn=fn, filter_kwargs={"k": 1}), greedy)
