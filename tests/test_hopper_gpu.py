"""The Hopper backward (cosattn.hopper, Gluon) on an sm_90 GPU: switched on, every eligible call takes it, and its
dq, dk, dv are as close to the float64 reference as PyTorch's own (SDPA on normalised q, k in the same dtype), by
the criterion of tests/test_attention.py; switched on, a call it does not cover gives the Triton path's gradients
bit for bit. Skipped elsewhere."""

import pytest
import torch
import torch.nn.functional as F

import cosattn.ops as ops
from cosattn import attention_reference, cosine_sim_attention
from tests.test_attention import assert_close_to_reference

hopper = pytest.importorskip("cosattn.hopper")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"
    ),
]

FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
SCALE = 10.0

# b, h, hk, m, n, d, causal, layout, dtype
CASES = [
    (2, 8, 8, 1024, 1024, 64, True, "bnhd", torch.bfloat16),
    (2, 8, 8, 1024, 1024, 64, False, "bhnd", torch.bfloat16),
    (2, 4, 2, 512, 768, 128, True, "bhnd", torch.bfloat16),  # GQA, more keys than queries
    (1, 8, 8, 2048, 2048, 128, False, "bnhd", torch.bfloat16),
    (2, 4, 4, 512, 768, 64, True, "bhnd", torch.float16),
    (1, 6, 3, 1024, 1024, 128, True, "bnhd", torch.float16),
]


@pytest.fixture
def hopper_calls(monkeypatch):
    calls = []
    real = hopper.backward

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(hopper, "backward", spy)
    monkeypatch.setattr(hopper, "HOPPER_BWD", True)
    # these test shapes are small enough for the forward to normalise k in its loop, which the Hopper path does not
    # cover; the pre-pass instead, as at training sizes
    monkeypatch.setattr(ops, "K_INLINE_MAX_WORK", 0)
    return calls


def _inputs(b, h, hk, m, n, d, layout, dtype):
    def make(heads, length):
        if layout == "bnhd":  # views of (b, n, h, d) projections, as the model zoo passes them
            return torch.randn(b, length, heads, d, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(b, heads, length, d, device="cuda", dtype=dtype)

    return make(h, m), make(hk, n), make(hk, n), make(h, m)


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn(q, k, v).backward(do)
    return q.grad, k.grad, v.grad


def _sdpa(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    m, n = q.shape[2], k.shape[2]
    mask = None
    if causal:  # bottom-right aligned, as the op
        mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(m, device=q.device)[:, None] + (n - m)
    return F.scaled_dot_product_attention(
        F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, attn_mask=mask, scale=SCALE
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}-{c[7]}-{c[8]}")
def test_gradients_as_close_as_pytorch(seed, hopper_calls, case):
    b, h, hk, m, n, d, causal, layout, dtype = case
    q, k, v, do = _inputs(b, h, hk, m, n, d, layout, dtype)
    ours = _grads(lambda q, k, v: cosine_sim_attention(q, k, v, causal=causal), q, k, v, do)
    assert len(hopper_calls) == 1, "the call was not eligible"
    torch_same = _grads(lambda q, k, v: _sdpa(q, k, v, causal), q, k, v, do)
    ref = _grads(lambda q, k, v: attention_reference(q, k, v, causal=causal), *(t.double() for t in (q, k, v, do)))
    for name, o, r, t in zip(("dq", "dk", "dv"), ours, ref, torch_same):
        assert torch.isfinite(o).all(), name
        assert_close_to_reference(name, o, r, t, FLOOR[dtype])


def test_rows_that_see_no_key(seed, hopper_calls, monkeypatch):
    """Causal with more queries than keys (the first m − n rows see nothing: zero output, zero dq): against the
    float64 reference, no worse than the Triton passes in the same dtype (SDPA gives NaN rows there)."""
    q, k, v, do = _inputs(2, 4, 2, 768, 512, 64, "bnhd", torch.bfloat16)
    ours = _grads(lambda q, k, v: cosine_sim_attention(q, k, v, causal=True), q, k, v, do)
    assert len(hopper_calls) == 1
    monkeypatch.setattr(hopper, "HOPPER_BWD", False)
    triton_same = _grads(lambda q, k, v: cosine_sim_attention(q, k, v, causal=True), q, k, v, do)
    ref = _grads(lambda q, k, v: attention_reference(q, k, v, causal=True), *(t.double() for t in (q, k, v, do)))
    for name, o, r, t in zip(("dq", "dk", "dv"), ours, ref, triton_same):
        assert torch.isfinite(o).all(), name
        assert_close_to_reference(name, o, r, t, FLOOR[torch.bfloat16])
    assert ours[0][:, :, :256].abs().max() == 0  # the rows that see no key


def test_uncovered_options_take_the_triton_path(seed, hopper_calls):
    """A mask (not covered) with the path switched on: the Triton passes run, bit for bit the same gradients."""
    q, k, v, do = _inputs(2, 4, 4, 512, 512, 64, "bhnd", torch.bfloat16)
    mask = torch.rand(2, 512, device="cuda") > 0.1
    on = _grads(lambda q, k, v: cosine_sim_attention(q, k, v, mask=mask), q, k, v, do)
    assert hopper_calls == []
    hopper.HOPPER_BWD = False  # (the fixture's monkeypatch restores it)
    off = _grads(lambda q, k, v: cosine_sim_attention(q, k, v, mask=mask), q, k, v, do)
    for a, b_ in zip(on, off):
        assert torch.equal(a, b_)
