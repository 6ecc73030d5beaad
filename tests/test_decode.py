"""The split-KV decode path (cosattn.decode) against a float64 reference and against PyTorch SDPA in the same
dtype, with the criterion of tests/test_attention.py; and its dispatch: taken for calls that need no gradient with
few queries and many keys, never when a gradient is needed.

The dispatch threshold on the number of keys is lowered to 1 here (fixture `decode_spy`) so small lengths exercise
the path under the interpreter; every case asserts that the decode launcher really ran."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from cosattn import attention_reference, cosine_sim_attention, decode, l2norm_tensors, ops
from cosattn.reference import alibi_bias, visibility
from tests.test_attention import FLOOR, _inputs, assert_close_to_reference


@pytest.fixture
def decode_spy(monkeypatch):
    """Counts decode launches and main-forward launches; lets every length take the decode path."""
    calls = {"decode": 0, "main": 0}
    decode_forward, attention_forward = decode.decode_forward, ops.attention_forward

    def spy_decode(*args):
        calls["decode"] += 1
        return decode_forward(*args)

    def spy_main(*args):
        calls["main"] += 1
        return attention_forward(*args)

    monkeypatch.setattr(decode, "DECODE_MIN_N", 1)
    monkeypatch.setattr(decode, "decode_forward", spy_decode)
    monkeypatch.setattr(ops, "attention_forward", spy_main)
    return calls


def _peer_and_reference(
    q, k, v, *, mask=None, causal=False, scale=10.0, groups=1, l2norm_qk=True, alibi_slopes=None, attn_bias=None
):
    """(SDPA in q's dtype on normalised q, k, float64 reference) for canonical 4-D inputs. SDPA gets the op's
    bottom-right causal mask and key mask as a boolean (or, with a bias, additive) mask; its rows with no visible
    key (NaN there) are set to the op's zeros."""
    b, h, i, _ = q.shape
    j = k.shape[2]
    ref = attention_reference(
        q.double(),
        k.double(),
        v.double(),
        mask=mask,
        causal=causal,
        scale=scale,
        groups=groups,
        l2norm_qk=l2norm_qk,
        alibi_slopes=alibi_slopes,
        attn_bias=None if attn_bias is None else attn_bias.double(),
    )
    qn, kn = l2norm_tensors(q, k, groups=groups) if l2norm_qk else (q, k)
    kn, vn = kn.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // k.shape[1], 1)
    vis = visibility(i, j, causal=causal, mask=mask, device=q.device)
    vis = torch.ones(1, 1, i, j, dtype=torch.bool, device=q.device) if vis is None else vis.expand(-1, 1, i, j)
    attn_mask = vis
    if alibi_slopes is not None or attn_bias is not None:
        add = torch.zeros(1, h, i, j, dtype=torch.float64, device=q.device)
        add = add + alibi_bias(alibi_slopes.double(), i, j, torch.float64) if alibi_slopes is not None else add
        add = add + attn_bias.double() if attn_bias is not None else add
        attn_mask = add.masked_fill(~vis, float("-inf")).to(q.dtype)
    peer = F.scaled_dot_product_attention(qn, kn, vn, attn_mask=attn_mask, scale=scale)
    peer = torch.where(vis.any(-1, keepdim=True), peer, torch.zeros((), dtype=peer.dtype))
    return peer, ref


def _check(q, k, v, **kw):
    """Runs the op (expecting the decode path) and asserts the error criterion; returns its output."""
    with torch.no_grad():
        o = cosine_sim_attention(q, k, v, **kw)
    q4, k4, v4 = (q[:, None], k[:, None], v[:, None]) if q.dim() == 3 else (q, k, v)
    if q.dim() == 4 and k.dim() == 3:
        k4, v4 = k[:, None], v[:, None]
    peer, ref = _peer_and_reference(q4, k4, v4, **kw)
    o4 = o[:, None] if q.dim() == 3 else o
    assert o.dtype == q.dtype and o.shape == q.shape
    assert torch.isfinite(o).all()
    assert_close_to_reference("out", o4, ref, peer, FLOOR[q.dtype])
    return o


# i ∈ {1, 3} × j ∈ {1, 17, 130, 300} × {fp32, fp16}; head dim, GQA ratio (h / hk) and causality rotate through the
# cases so each value meets several others without the full product
_MATRIX = [
    (i, j, dtype, (16, 40, 64)[n % 3], (1, 2, 4)[(n // 3) % 3], n % 2 == 0)
    for n, (i, j, dtype) in enumerate(itertools.product((1, 3), (1, 17, 130, 300), (torch.float32, torch.float16)))
]


@pytest.mark.parametrize(
    "i,j,dtype,d,ratio,causal",
    _MATRIX,
    ids=[f"i{i}-j{j}-{str(dt)[6:]}-d{d}-gqa{r}-{'causal' if c else 'full'}" for i, j, dt, d, r, c in _MATRIX],
)
def test_decode_matches_reference(seed, device, decode_spy, i, j, dtype, d, ratio, causal):
    hk = 2 if ratio < 4 else 1
    q, k, v = _inputs(2, hk * ratio, hk, i, j, d, dtype, device)
    o = _check(q, k, v, causal=causal)
    assert decode_spy == {"decode": 1, "main": 0}
    if causal and i > j:
        # bottom-right alignment: query r sees keys c <= r + j - i, none for the first i - j rows
        assert o[:, :, : i - j].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_decode_key_padding_mask(seed, device, decode_spy, causal):
    q, k, v = _inputs(3, 4, 2, 3, 130, 32, torch.float16, device)
    mask = torch.rand(3, 130, device=device) > 0.3
    mask[1, 40:] = False  # whole splits with no visible key for this batch element
    mask[2] = False  # no visible key at all: zeros
    o = _check(q, k, v, mask=mask, causal=causal)
    assert o[2].abs().max() == 0
    assert decode_spy["decode"] == 1


def test_decode_prenormalised_inputs(seed, device, decode_spy):
    q, k, v = _inputs(2, 4, 2, 3, 130, 40, torch.float32, device)
    q, k = l2norm_tensors(q, k)
    _check(q, k, v, causal=True, l2norm_qk=False)
    assert decode_spy["decode"] == 1


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.float32, dict(groups=2)),  # fixed offset, keys normalised per group in the loop
        (torch.float16, dict(groups=2)),  # past fp16's bound: per-split max, log-sum-exp combine
        (torch.float32, dict(scale=50.0)),
        (torch.float32, dict(alibi=True)),
        (torch.float16, dict(bias=True)),
    ],
    ids=["groups2-fp32", "groups2-fp16", "scale50", "alibi", "bias"],
)
def test_decode_running_max_and_groups(seed, device, decode_spy, dtype, kw):
    q, k, v = _inputs(1, 4, 2, 3, 130, 32, dtype, device)
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = 2.0 ** -torch.arange(1, 5, device=device, dtype=torch.float32)
    if kw.pop("bias", False):
        kw["attn_bias"] = 3 * torch.randn(4, 3, 130, device=device, dtype=dtype)  # (h, i, j)
    uses_max = ops._use_max(
        dtype, kw.get("attn_bias"), kw.get("alibi_slopes"), kw.get("scale", 10.0), kw.get("groups", 1)
    )
    assert uses_max == (kw != dict(groups=2) or dtype == torch.float16)
    _check(q, k, v, causal=True, **kw)
    assert decode_spy["decode"] == 1


def test_decode_layouts(seed, device, decode_spy):
    """3-D inputs (batch and heads merged), one kv head shared as (b, j, d), a KV cache's strided prefix, and a
    (b, n, h, d) q seen as (b, h, n, d)."""
    q, k, v = _inputs(2, 3, 3, 1, 70, 16, torch.float32, device, q3d=True)
    _check(q, k, v, causal=True)
    q, k, v = _inputs(2, 4, 1, 3, 70, 16, torch.float16, device, kv3d=True)
    _check(q, k, v, causal=True)
    cache = torch.randn(2, 2, 2, 100, 32, device=device)  # (k|v, b, hk, capacity, d), 70 positions filled
    q = torch.randn(2, 4, 1, 32, device=device)
    _check(q, cache[0, :, :, :70], cache[1, :, :, :70], causal=True)
    q = torch.randn(2, 3, 4, 32, device=device).transpose(1, 2)  # (b, n, h, d) seen as (b, h, n, d)
    o = _check(q, cache[0, :, :, :70], cache[1, :, :, :70], causal=True)
    assert o.stride() == q.stride()  # the output in q's layout, as the main forward gives it
    assert decode_spy == {"decode": 4, "main": 0}


def test_decode_row_chunks(seed, device, decode_spy):
    """More query rows per kv head ((h / hk) · i) than one program holds: several row chunks per kv head."""
    q, k, v = _inputs(1, 24, 1, 3, 40, 16, torch.float32, device)
    block_r = decode.decode_config(24 * 3, 16, torch.float32)[0]
    assert 24 * 3 > block_r
    _check(q, k, v, causal=True)
    assert decode_spy["decode"] == 1


def test_num_splits():
    for n in (1, 15, 16, 17, 130, 300, 4096):
        splits, split_len = decode.num_splits(n, 8, 16, torch.device("cpu"))
        assert split_len % 16 == 0 and (splits - 1) * split_len < n <= splits * split_len  # none empty
        assert 1 <= splits <= decode.INTERPRET_SPLITS


def test_num_splits_on_a_gpu_follows_the_waves(monkeypatch):
    """The GPU rule, computed here for a 132-SM device: enough splits for SPLIT_WAVES programs per SM, capped by
    MAX_SPLITS and by MIN_SPLIT_KEYS keys per split; one split (the direct path) once the programs fill the waves."""
    sms = 132
    monkeypatch.setattr(decode, "_sm_count", lambda index: sms)
    monkeypatch.setattr(decode.ops, "_interpreting", lambda: False)
    cuda = torch.device("cuda")
    waves = decode.SPLIT_WAVES * sms
    assert decode.num_splits(32768, waves, 64, cuda)[0] == 1
    assert decode.num_splits(32768, 8, 64, cuda)[0] == min(-(-waves // 8), decode.MAX_SPLITS)
    assert decode.num_splits(32768, 64 * 8, 64, cuda)[0] == -(-waves // (64 * 8))  # batch 64, 8 kv heads
    assert decode.num_splits(1024, 8, 64, cuda)[0] == 1024 // decode.MIN_SPLIT_KEYS  # short caches: few splits
    for programs in (1, 8, 100, 512, waves - 1, waves):
        splits, split_len = decode.num_splits(5000, programs, 64, cuda)
        assert split_len % 64 == 0 and (splits - 1) * split_len < 5000 <= splits * split_len


def test_dispatch_rule_and_gradients(seed, device, decode_spy, monkeypatch):
    """A call that needs a gradient never takes the decode path (it saves nothing for a backward); the same call
    without one does, and gives the main forward's result up to rounding."""
    q, k, v = _inputs(1, 4, 2, 1, 40, 16, torch.float32, device)
    q.requires_grad_()
    o_grad = cosine_sim_attention(q, k, v, causal=True)
    assert o_grad.grad_fn is not None and decode_spy == {"decode": 0, "main": 1}
    o_grad.sum().backward()
    assert q.grad is not None
    with torch.no_grad():
        o = cosine_sim_attention(q, k, v, causal=True)
    assert decode_spy == {"decode": 1, "main": 1}
    torch.testing.assert_close(o, o_grad.detach(), rtol=1e-5, atol=1e-6)
    # the thresholds, on shapes alone (no launch)
    monkeypatch.setattr(decode, "DECODE_MIN_N", 512)
    t = lambda *shape: torch.empty(shape)  # noqa: E731
    assert decode.use_decode(t(1, 8, 1, 64), t(1, 2, 512, 64))
    assert decode.use_decode(t(1, 8, decode.DECODE_MAX_Q, 64), t(1, 2, 4096, 64))
    assert not decode.use_decode(t(1, 8, 1, 64), t(1, 2, 511, 64))
    assert not decode.use_decode(t(1, 8, decode.DECODE_MAX_Q + 1, 64), t(1, 2, 4096, 64))
    monkeypatch.setattr(decode, "ENABLED", False)
    assert not decode.use_decode(t(1, 8, 1, 64), t(1, 2, 4096, 64))


def test_decode_under_torch_compile(seed, device, decode_spy):
    """torch.compile traces the decode path as one custom op (no graph break) when no gradient is needed."""
    q, k, v = _inputs(1, 4, 2, 1, 40, 16, torch.float32, device)
    f = torch.compile(
        lambda q, k, v: cosine_sim_attention(q * 2, k, v, causal=True), fullgraph=True, backend="aot_eager"
    )
    with torch.no_grad():
        o = f(q, k, v)
        expected = cosine_sim_attention(q * 2, k, v, causal=True)
    assert decode_spy["decode"] >= 2 and decode_spy["main"] == 0
    torch.testing.assert_close(o, expected)
    torch.library.opcheck(
        decode._decode_op,
        (q, k, v, None, None, None, True, 10.0, True, 1),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_zoo_decoding_through_the_kv_cache(seed, device, decode_spy, monkeypatch, one_thread):
    """The zoo's cached decoding (strided views of KVBuffer, bottom-right causal, GQA) takes the decode path, and
    its logits match a full forward pass with the path disabled."""
    from cosformer import Decoder, TransformerWrapper

    net = (
        TransformerWrapper(
            num_tokens=37, max_seq_len=16, attn_layers=Decoder(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16)
        )
        .to(device)
        .eval()
    )
    x = torch.randint(0, 37, (2, 9), device=device)
    with torch.no_grad():
        _, cache = net(x[:, :6], return_cache=True)
        steps = [net(x[:, t : t + 1], cache=cache) for t in range(6, 9)]
        assert decode_spy["decode"] == 4  # the prompt (6 queries) and each of the 3 steps
        monkeypatch.setattr(decode, "ENABLED", False)
        full = net(x)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], atol=1e-5, rtol=1e-5)
