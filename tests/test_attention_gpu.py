"""GPU-only checks of the attention op: bf16, realistic shapes, long sequences, O(n) memory, determinism, and the
error criterion against PyTorch SDPA on normalised q, k (the same function through the regular kernels)."""

import pytest
import torch
import torch.nn.functional as F

from cosattn import cosine_sim_attention
from cosattn.reference import attention_chunked
from tests.test_attention import TIGHT_SCALE_MAX, _inputs, assert_close_to_reference, check_against_torch

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


# (b, h, hk, n, d, dtype, kwargs): each selects the running max (a bias, ALiBi, or scale·groups past the bound)
RUNNING_MAX_CASES = {
    "bias d128 causal": (1, 4, 2, 2048, 128, torch.bfloat16, dict(causal=True, bias=(4, 2048, 2048))),
    "alibi mask gqa": (2, 4, 1, 1000, 64, torch.float16, dict(causal=True, alibi=True, mask=True)),
    "scale 50 d128": (1, 2, 2, 2048, 128, torch.bfloat16, dict(scale=50.0)),
    "groups 4 d96": (1, 2, 2, 777, 96, torch.float16, dict(groups=4, causal=True)),
}


@pytest.mark.parametrize("case", list(RUNNING_MAX_CASES))
def test_running_max_paths(seed, case):
    """The running-max path (USE_MAX) forward and backward under the GPU's launch configurations: whole, diagonal
    and ragged tiles, descriptor loads (head dim 128 from 2048 keys), in-loop k normalisation (the ALiBi case), and
    the bias gradient; tests/test_attention.py has the same features at small sizes."""
    b, h, hk, n, d, dtype, kw = RUNNING_MAX_CASES[case]
    kw = dict(kw)
    q, k, v = _inputs(b, h, hk, n, n, d, dtype, "cuda")
    bias = torch.randn(kw.pop("bias"), device="cuda", dtype=dtype) if "bias" in kw else None
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = 2.0 ** -torch.arange(1, h + 1, device="cuda", dtype=torch.float32)
    if kw.pop("mask", False):
        kw["mask"] = torch.rand(b, n, device="cuda") > 0.25
    check_against_torch(q, k, v, bias=bias, **kw)


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


def _offset_copy(t, elems):
    """t's values in a fresh buffer starting `elems` elements past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 16, device=t.device, dtype=t.dtype)
    return buf[elems : elems + t.numel()].view(t.shape).copy_(t)


@pytest.mark.parametrize(
    "case", ["short", "tma d128", "gqa mask", "bias grad", "strided", "misaligned", "fp32", "no grad"]
)
def test_direct_launch_matches_jit(seed, monkeypatch, case):
    from cosattn import kernels as K
    from cosattn import launch, ops

    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    b, h, hk, n, d = {"tma d128": (1, 2, 2, 2048, 128), "gqa mask": (2, 4, 2, 1000, 64)}.get(case, (2, 2, 2, 300, 64))
    q = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hk, n, d, device="cuda", dtype=dtype)
    kw = dict(causal=True)
    if case == "gqa mask":
        kw["mask"] = torch.rand(b, n, device="cuda") > 0.25
    if case == "strided":
        q = torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    tensors = [q, k, v]
    if case == "bias grad":
        tensors.append(torch.randn(h, n, n, device="cuda"))
    do = torch.randn(b, h, n, d, device="cuda", dtype=dtype)

    def fn(*t):
        return cosine_sim_attention(*t[:3], attn_bias=t[3] if len(t) > 3 else None, **kw)

    def run():
        if case == "no grad":
            with torch.no_grad():
                return [fn(*tensors)]
        return _fwd_bwd(fn, tensors, do)

    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    via_jit = run()
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    ops._launchers.clear()
    first, again = run(), run()  # the first fills the cache through the JIT, the second launches directly
    assert ops._launchers[K._fwd_kernel].cache, "no compiled kernel was cached"
    if case == "misaligned":
        # same shapes, pointers off the 16-byte boundary: a new specialisation, never the cached one
        tensors = [_offset_copy(t, 1) for t in tensors]
        via_jit_mis = (monkeypatch.setattr(launch, "FAST_LAUNCH", False), run())[1]
        monkeypatch.setattr(launch, "FAST_LAUNCH", True)
        for a, c in zip(via_jit_mis, run()):
            assert torch.equal(a, c)
    for a, x, y in zip(via_jit, first, again):
        assert torch.equal(a, x) and torch.equal(a, y)


# ---------------------------------------------------------------------------------------------------- per-head scale


def _count_descriptors(monkeypatch):
    """Counts the tensor descriptors the host builds: proof that the descriptor-load path ran."""
    from cosattn import ops

    calls = []
    real = ops._desc
    monkeypatch.setattr(ops, "_desc", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("bound", ["tight", "default"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,d", [(1024, 64), (1024, 128), (2048, 64), (2048, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_per_head(seed, monkeypatch, dtype, n, d, causal, bound):
    """(h,) scales with GQA: the output and every gradient, dscale included, against the float64 reference under the
    GPU's launch configurations: in-loop k normalisation (d 64, 1024 keys), descriptor loads in the forward and
    both backward passes (d 128, 2048 keys), the fixed offset (a tight scale_max) and the running max (the default
    bound)."""
    descriptors = _count_descriptors(monkeypatch)
    q, k, v = _inputs(2, 4, 2, n, n, d, dtype, "cuda")
    if bound == "tight":
        kw = dict(scale_max=TIGHT_SCALE_MAX[dtype])
        scale = torch.empty(4, device="cuda").uniform_(0.25 * kw["scale_max"], kw["scale_max"])
    else:
        kw = {}
        scale = torch.empty(4, device="cuda").uniform_(5.0, 40.0)
    _, grads = check_against_torch(q, k, v, causal=causal, scale=scale, **kw)
    assert grads[-1].shape == (4,)
    if (n, d) == (2048, 128) and torch.cuda.get_device_capability()[0] >= 9:
        assert descriptors, "the descriptor-load path did not run"


@pytest.mark.parametrize("scale", [10.0, 50.0])
@pytest.mark.parametrize("n,d", [(1024, 64), (2048, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_tensor_of_equal_values_matches_float(seed, dtype, n, d, scale):
    """Equal per-head scales with scale_max = the float scale: the float path's bits (10: the fixed offset; 50: the
    running max), for the output and the q, k, v gradients; and dscale bitwise the same run to run."""
    q, k, v = _inputs(2, 4, 2, n, n, d, dtype, "cuda")
    do = torch.randn_like(q)
    scales = torch.full((4,), scale, device="cuda")
    ours_float = _fwd_bwd(lambda *t: cosine_sim_attention(*t, scale=scale, causal=True), [q, k, v], do)

    def per_head(q, k, v, s):
        return cosine_sim_attention(q, k, v, scale=s, scale_max=scale, causal=True)

    ours_tensor = _fwd_bwd(per_head, [q, k, v, scales], do)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours_float, ours_tensor):
        assert torch.equal(a, b), name
    assert torch.equal(ours_tensor[-1], _fwd_bwd(per_head, [q, k, v, scales], do)[-1])


def test_scale_compile_fullgraph_inductor(seed):
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = torch.randn_like(q), torch.randn_like(q)
    log_scale = torch.full((4,), 2.3, device="cuda", requires_grad=True)

    def f(q, k, v, log_scale):
        return (cosine_sim_attention(q, k, v, causal=True, scale=log_scale.exp(), scale_max=32.0) * 2).sum()

    out = torch.compile(f, fullgraph=True)(q, k, v, log_scale)
    out.backward()
    q_ref, s_ref = q.detach().requires_grad_(), log_scale.detach().requires_grad_()
    f(q_ref, k, v, s_ref).backward()
    torch.testing.assert_close(q.grad, q_ref.grad)
    torch.testing.assert_close(log_scale.grad, s_ref.grad)


def test_scale_cuda_graph_capture(seed):
    """A tensor scale needs no device-to-host sync: forward and backward capture in a CUDA graph and replay to the
    eager results."""
    q, k, v = _inputs(2, 4, 2, 512, 512, 64, torch.bfloat16, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = torch.empty(4, device="cuda").uniform_(4.0, 16.0).requires_grad_()
    do = torch.randn_like(q)

    def step():
        o = cosine_sim_attention(q, k, v, causal=True, scale=scale, scale_max=16.0)
        return (o, *torch.autograd.grad(o, (q, k, v, scale), do))

    # detached: the eager outputs must not keep their autograd graph alive, or its AccumulateGrad nodes, made on the
    # default stream, would serve the captured backward too and tie the legacy stream into the capture
    eager = [t.detach() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(["out", "dq", "dk", "dv", "dscale"], eager, captured):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------- segment ids


def _documents(b, n, *, max_len):
    """(b, n) int32 non-decreasing ids of packed documents of random lengths in [1, max_len]."""
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < n:
            lengths.append(int(torch.randint(1, max_len + 1, ())))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:n])
    return torch.stack(rows).to(device="cuda", dtype=torch.int32)


def _sdpa_segments(q, k, v, seg, causal):
    vis = seg[:, None, :, None] == seg[:, None, None, :]
    if causal:
        vis = vis & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device="cuda").tril()
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return F.scaled_dot_product_attention(qn, kn, v, attn_mask=vis, scale=10.0, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "b,h,hk,n,d,max_len", [(2, 4, 2, 1024, 64, 300), (1, 4, 4, 2048, 128, 700), (1, 2, 1, 4096, 64, 1500)]
)
def test_segments_vs_sdpa(seed, dtype, causal, b, h, hk, n, d, max_len):
    """Packed documents of random lengths under the GPU's launch configurations (in-loop k normalisation at 1024
    keys, descriptor loads at head dim 128 from 2048 keys): error against the float64 reference no worse than SDPA's
    with the same visibility as a boolean mask."""
    q, k, v = _inputs(b, h, hk, n, n, d, dtype, "cuda")
    seg = _documents(b, n, max_len=max_len)
    do = torch.randn_like(q)
    ours = _fwd_bwd(lambda *t: cosine_sim_attention(*t, causal=causal, segment_ids=seg), [q, k, v], do)
    peer = _fwd_bwd(lambda *t: _sdpa_segments(*t, seg, causal), [q, k, v], do)
    ref = _fwd_bwd(
        lambda *t: attention_chunked(*t, causal=causal, segment_ids=seg, chunk_size=256),
        [q.double(), k.double(), v.double()],
        do.double(),
    )
    for name, a, p, r in zip(["out", "dq", "dk", "dv"], ours, peer, ref):
        assert_close_to_reference(name, a, r, p, FLOOR[dtype])


def test_segments_with_everything(seed):
    """Segment ids with a key mask, a bias (and its gradient), ALiBi and GQA, pair ids with rows that see no key, on
    the running-max path."""
    b, h, hk, i, j, d = 2, 4, 2, 700, 1100, 64
    q, k, v = _inputs(b, h, hk, i, j, d, torch.bfloat16, "cuda")
    q_seg = _documents(b, i, max_len=200)
    k_seg = _documents(b, j, max_len=300)
    kw = dict(
        causal=True,
        mask=torch.rand(b, j, device="cuda") > 0.1,
        alibi_slopes=2.0 ** -torch.arange(1, h + 1, device="cuda", dtype=torch.float32),
        segment_ids=(q_seg, k_seg),
    )
    check_against_torch(q, k, v, bias=torch.randn(h, i, j, device="cuda", dtype=torch.bfloat16), **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_segment_tiles_are_skipped(seed, causal, d):
    """As the CPU test: documents aligned to the GPU's tiles, every other document NaN-poisoned; a document's outputs
    and gradients stay bitwise the clean run's only if no pass reads another document's tiles."""
    from cosattn import ops

    dtype = torch.bfloat16
    kernels = ("fwd", "fwd_tma", "dkdv", "dq", "dq_tma")
    align = max(max(ops.launch_config(name, d, dtype, causal)[:2]) for name in kernels)
    lengths = [4 * align, 8 * align, 5 * align]  # over 2048 keys at d 128: descriptor loads too
    seg = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])[None].cuda()
    n = seg.shape[1]
    q, k, v = _inputs(1, 4, 2, n, n, d, dtype, "cuda")
    do = torch.randn_like(q)

    def run(*t):
        return _fwd_bwd(lambda *x: cosine_sim_attention(*x, causal=causal, segment_ids=seg), list(t), do)

    clean = run(q, k, v)
    rows = seg[0] == 1
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t[:, :, ~rows] = float("nan")
    for name, a, c in zip(["out", "dq", "dk", "dv"], run(*poisoned), clean):
        assert torch.equal(a[:, :, rows], c[:, :, rows]), name
