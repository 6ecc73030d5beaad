"""GPU-only checks of the attention op: bf16, realistic shapes, long sequences, O(n) memory, determinism, and the
error criterion against PyTorch SDPA on normalised q, k (the same function through the regular kernels)."""

import pytest
import torch
import torch.nn.functional as F

from cosattn import cosine_sim_attention
from cosattn.reference import attention_chunked
from tests.test_attention import assert_close_to_reference

pytestmark = pytest.mark.gpu

FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _sdpa(q, k, v, causal):
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return F.scaled_dot_product_attention(qn, kn, v, scale=10.0, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _fwd_bwd(fn, tensors, do):
    tensors = [t.detach().requires_grad_() for t in tensors]
    o = fn(*tensors)
    return [o.detach(), *torch.autograd.grad(o, tensors, do)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "b,h,hk,n,d", [(2, 4, 4, 1024, 64), (1, 4, 2, 777, 128), (1, 2, 2, 300, 96), (1, 2, 1, 129, 256)]
)
def test_vs_sdpa_error(seed, dtype, causal, b, h, hk, n, d):
    q = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hk, n, d, device="cuda", dtype=dtype)
    do = torch.randn_like(q)
    ours = _fwd_bwd(lambda *t: cosine_sim_attention(*t, causal=causal), [q, k, v], do)
    peer = _fwd_bwd(lambda *t: _sdpa(*t, causal), [q, k, v], do)
    ref = _fwd_bwd(
        lambda *t: attention_chunked(*t, causal=causal, chunk_size=256),
        [q.double(), k.double(), v.double()],
        do.double(),
    )
    for name, a, p, r in zip(["out", "dq", "dk", "dv"], ours, peer, ref):
        assert_close_to_reference(name, a, r, p, FLOOR[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_sequence(seed, dtype):
    n = 8192
    q = torch.randn(1, 2, n, 64, device="cuda", dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = torch.rand(1, n, device="cuda") > 0.1
    do = torch.randn_like(q)
    ours = _fwd_bwd(lambda *t: cosine_sim_attention(*t, causal=True, mask=mask), [q, k, v], do)
    ref = _fwd_bwd(
        lambda *t: attention_chunked(*t, causal=True, mask=mask, chunk_size=512),
        [q.double(), k.double(), v.double()],
        do.double(),
    )
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    for name, a, r in zip(["out", "dq", "dk", "dv"], ours, ref):
        rel = ((a.double() - r).norm() / r.norm()).item()
        assert rel < tol, f"{name}: relative error {rel:.2e}"


def test_memory_is_linear(seed):
    n, d = 16384, 64
    q = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    do = torch.randn_like(q)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o = cosine_sim_attention(q, k, v, causal=True)
    o.backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    per_tensor = q.numel() * q.element_size()
    # o, lse, grads (3), normalised q and k, delta: ~8 tensors of q's size; an i·j buffer alone would be 4 GiB
    assert extra < 12 * per_tensor, f"extra memory {extra / 2**20:.0f} MiB for {per_tensor / 2**20:.0f} MiB inputs"


def test_deterministic_backward_large(seed):
    q = torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 2048, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bias = torch.randn(8, 2048, 2048, device="cuda")
    do = torch.randn_like(q)
    f = lambda *t: cosine_sim_attention(*t[:3], attn_bias=t[3], causal=True)  # noqa: E731
    g1 = _fwd_bwd(f, [q, k, v, bias], do)
    g2 = _fwd_bwd(f, [q, k, v, bias], do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_compile_fullgraph_inductor(seed):
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = torch.randn_like(q), torch.randn_like(q)

    def f(q, k, v):
        return (cosine_sim_attention(q, k, v, causal=True) * 2).sum()

    out = torch.compile(f, fullgraph=True)(q, k, v)
    out.backward()
    assert torch.isfinite(q.grad).all()
