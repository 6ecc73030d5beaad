"""GPU-only checks of the split-KV decode path: bf16 at realistic decode shapes (contexts 1k–32k, batch 1 and 8,
GQA) against the float64 reference with the error criterion of tests/test_attention.py relative to PyTorch SDPA
on normalised q, k; the split count the GPU picks; and a decode step captured in a CUDA graph."""

import pytest
import torch
import torch.nn.functional as F

from cosattn import attention_reference, cosine_sim_attention, decode
from tests.test_attention import assert_close_to_reference

pytestmark = pytest.mark.gpu

FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture
def decode_calls(monkeypatch):
    calls = []
    forward = decode.decode_forward

    def spy(*args):
        calls.append(args[0].shape)
        return forward(*args)

    monkeypatch.setattr(decode, "decode_forward", spy)
    return calls


def _cache(b, h, hk, i, n, d, dtype):
    """q and k, v as views of a longer cache, as KVBuffer passes them."""
    q = torch.randn(b, h, i, d, device="cuda", dtype=dtype)
    cache = torch.randn(2, b, hk, n + 64, d, device="cuda", dtype=dtype)
    return q, cache[0, :, :, :n], cache[1, :, :, :n]


def _reference(q, k, v, mask=None, **kw):
    """float64 reference, one batch element at a time (the expanded float64 keys of batch 8 at 32k are 8 GiB)."""
    outs = []
    for i in range(len(q)):
        m = None if mask is None else mask[i : i + 1]
        outs.append(attention_reference(*(t[i : i + 1].double() for t in (q, k, v)), mask=m, **kw))
    return torch.cat(outs)


def _sdpa(q, k, v, mask_bool):
    kn = F.normalize(k, dim=-1)
    return F.scaled_dot_product_attention(
        F.normalize(q, dim=-1), kn, v, attn_mask=mask_bool, scale=10.0, enable_gqa=q.shape[1] != k.shape[1]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1024, 4096, 32768])
@pytest.mark.parametrize("b,h,hk,i,d", [(1, 32, 8, 1, 128), (8, 32, 8, 1, 128), (8, 8, 1, 4, 64), (1, 16, 16, 1, 64)])
def test_decode_vs_sdpa(seed, decode_calls, dtype, n, b, h, hk, i, d):
    q, k, v = _cache(b, h, hk, i, n, d, dtype)
    with torch.inference_mode():
        o = cosine_sim_attention(q, k, v, causal=True)
        vis = torch.ones(i, n, dtype=torch.bool, device="cuda").tril(n - i)  # bottom-right causal
        peer = _sdpa(q, k, v, vis)
        ref = _reference(q, k, v, causal=True)
    assert decode_calls == [q.shape]
    assert_close_to_reference("out", o, ref, peer, FLOOR[dtype])


def test_decode_mask_and_running_max(seed, decode_calls):
    """A key-padding mask with a fully masked batch element, and the running-max path (ALiBi), at 8k keys."""
    b, h, hk, i, n, d = 4, 16, 4, 2, 8192, 128
    q, k, v = _cache(b, h, hk, i, n, d, torch.bfloat16)
    mask = torch.rand(b, n, device="cuda") > 0.2
    mask[3] = False
    slopes = 2.0 ** -torch.arange(1, h + 1, device="cuda", dtype=torch.float32)
    with torch.inference_mode():
        for kw in (dict(mask=mask), dict(mask=mask, alibi_slopes=slopes)):
            o = cosine_sim_attention(q, k, v, causal=True, **kw)
            ref = _reference(q, k, v, causal=True, **kw)
            rel = ((o[:3].double() - ref[:3]).norm() / ref[:3].norm()).item()
            assert rel < 2e-2, f"{list(kw)}: relative error {rel:.2e}"
            assert o[3].abs().max() == 0
    assert len(decode_calls) == 2


def test_decode_matches_main_forward(seed):
    """The decode path and the main forward compute one function: close in bf16 at every batch the benchmark uses."""
    for b in (1, 8, 64):
        q, k, v = _cache(b, 32, 8, 1, 4096, 128, torch.bfloat16)
        with torch.inference_mode():
            o = cosine_sim_attention(q, k, v, causal=True)
            decode.ENABLED = False
            try:
                o_main = cosine_sim_attention(q, k, v, causal=True)
            finally:
                decode.ENABLED = True
        torch.testing.assert_close(o, o_main, rtol=2e-2, atol=2e-2)


def test_split_count_fills_the_gpu():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits, split_len = decode.num_splits(32768, 8, 64, torch.device("cuda"))
    assert splits * 8 >= min(sms, 32768 // decode.MIN_SPLIT_KEYS * 8) and split_len >= decode.MIN_SPLIT_KEYS
    waves = decode.SPLIT_WAVES * sms
    assert decode.num_splits(32768, waves, 64, torch.device("cuda"))[0] == 1  # the waves are full: direct
    assert decode.num_splits(32768, 64 * 8, 64, torch.device("cuda"))[0] == -(-waves // (64 * 8))  # batch 64


def test_cuda_graph_decode_step(seed, decode_calls):
    """A decode step captured in a CUDA graph replays correctly with new queries and new cache contents."""
    b, h, hk, n, d = 2, 16, 4, 2048, 128
    q, k, v = _cache(b, h, hk, 1, n, d, torch.bfloat16)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles, caches launchers) outside the capture
            for _ in range(2):
                cosine_sim_attention(q, k, v, causal=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o = cosine_sim_attention(q, k, v, causal=True)
        for _ in range(2):
            q.copy_(torch.randn_like(q))
            k.copy_(torch.randn_like(k))
            graph.replay()
            torch.cuda.synchronize()
            expected = cosine_sim_attention(q, k, v, causal=True)
            torch.testing.assert_close(o, expected, rtol=0, atol=0)
    assert len(decode_calls) >= 4
