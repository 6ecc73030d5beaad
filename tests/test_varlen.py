"""FlashAttention's variable-length form, `cosine_sim_attention_varlen`: sequences concatenated without padding
give, output and gradients, what each sequence gives alone, against the float64 reference and within PyTorch's own
error in the same dtype; odd lengths, an empty sequence, GQA, k laid out apart from q (non-causal); misuse errors."""

import pytest
import torch

from cosattn import attention_reference, cosine_sim_attention_varlen

from .test_attention import DTYPES, FLOOR, _grads, assert_close_to_reference


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _per_sequence(q, k, v, lq, lk, **kwargs):
    """The reference: each sequence through `attention_reference` alone, outputs concatenated (total_q, h, d)."""
    outs, sq, sk = [], 0, 0
    for a, b in zip(lq, lk):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[sq : sq + a], k[sk : sk + b], v[sk : sk + b]))
        outs.append(attention_reference(qs, ks, vs, **kwargs)[0].transpose(0, 1))
        sq, sk = sq + a, sk + b
    return torch.cat(outs)


CASES = {
    # (query lengths, key lengths or None for the same layout, h, hk, d)
    "self": ([17, 1, 30, 5], None, 2, 2, 16),
    "self-gqa-d40": ([9, 33, 0, 12], None, 4, 2, 40),
    "kv-apart": ([5, 12, 7], [20, 3, 9], 2, 1, 16),
}


@pytest.mark.parametrize("dtype", DTYPES)
# causal needs one layout for q and k (test_varlen_rejects_misuse)
@pytest.mark.parametrize("case, causal", [(c, x) for c in CASES for x in (False, True) if not (x and CASES[c][1])])
def test_varlen_matches_each_sequence_alone(seed, backend_device, case, causal, dtype):
    lq, lk, h, hk, d = CASES[case]
    lk_ = lq if lk is None else lk
    device = backend_device
    q = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
    k, v = (torch.randn(sum(lk_), hk, d, device=device, dtype=dtype) for _ in range(2))
    cu_q, cu_k = _cu(lq, device), (None if lk is None else _cu(lk, device))

    def ours(q, k, v):
        return cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk_), causal=causal)

    def ref(q, k, v):
        if hk != h:  # the reference takes GQA by repeated kv heads
            k, v = (t.repeat_interleave(h // hk, dim=1) for t in (k, v))
        return _per_sequence(q, k, v, lq, lk_, causal=causal)

    do = torch.randn_like(q, dtype=torch.float32).to(dtype)
    o, g = _grads(ours, [q, k, v], do)
    o64, g64 = _grads(ref, [t.double() for t in (q, k, v)], do.double())
    ot, gt = _grads(ref, [q, k, v], do)
    assert o.shape == q.shape and o.dtype == dtype
    for name, a, r, t in zip(["out", "dq", "dk", "dv"], [o, *g], [o64, *g64], [ot, *gt]):
        assert torch.isfinite(a).all(), name
        assert_close_to_reference(name, a, r, t, FLOOR[dtype])


def test_varlen_rejects_misuse(seed):
    q = torch.randn(10, 2, 16)
    cu = _cu([4, 6], "cpu")
    with pytest.raises(ValueError, match=r"q must be \(total, heads, d\)"):
        cosine_sim_attention_varlen(q[None], q[None], q[None], cu)
    with pytest.raises(TypeError, match="cu_seqlens_q must hold integers"):
        cosine_sim_attention_varlen(q, q, q, cu.float())
    with pytest.raises(ValueError, match="cu_seqlens_k must be a 1-D"):
        cosine_sim_attention_varlen(q, q, q, cu, cu[None])
    with pytest.raises(ValueError, match="same sequences; got 2 and 3"):
        cosine_sim_attention_varlen(q, q, q, cu, _cu([4, 3, 3], "cpu"))
    with pytest.raises(ValueError, match="causal=True in the varlen form needs q and k laid out alike"):
        cosine_sim_attention_varlen(q, q, q, cu, _cu([5, 5], "cpu"), causal=True)
    # equal offsets in another tensor are the same layout (compared on the device)
    same = cosine_sim_attention_varlen(q, q, q, cu, cu.clone(), causal=True)
    assert torch.equal(same, cosine_sim_attention_varlen(q, q, q, cu, causal=True))


def test_varlen_compiles_without_graph_breaks(seed, backend_device):
    """torch.compile(fullgraph=True) traces the conversion (segment ids by searchsorted on the device) and the op."""
    q, k, v = (torch.randn(23, 2, 16, device=backend_device, requires_grad=True) for _ in range(3))
    cu = _cu([7, 16], backend_device)
    fn = torch.compile(cosine_sim_attention_varlen, fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, cu, causal=True)
    out.sum().backward()
    torch.testing.assert_close(out, cosine_sim_attention_varlen(q, k, v, cu, causal=True))
    assert q.grad is not None and torch.isfinite(q.grad).all()
