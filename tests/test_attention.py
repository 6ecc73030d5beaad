"""The attention op against a float64 reference and against PyTorch in the same dtype.

On CPU the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1), in fp32 and fp16; on a
GPU the same cases run natively, plus bf16. The criterion for the output and every gradient:
    err(ours) <= 1.25 · err(PyTorch in the same dtype) + floor
with err = rms(x − x_f64) / max(rms(x_f64), 1) and a small per-dtype floor; the largest single
deviation is bounded too, at 2× PyTorch's plus a floor (one element's rounding is too noisy for 1.25×).
"""

import pytest
import torch
import torch.nn.functional as F

from cosattn import MAX_SCALE, attention_reference, cosine_sim_attention, l2norm_tensors

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# the fewest numbers a scale gradient's error is measured over (heads × upstream gradients): the error of a few
# numbers is a few random draws, which PyTorch's may undercut by luck
DSCALE_SAMPLES = 8


def _inputs(b, h, hk, i, j, d, dtype, device, *, kv3d=False, q3d=False):
    q = torch.randn(b, h, i, d, device=device, dtype=dtype)
    shape_kv = (b, j, d) if kv3d else (b, hk, j, d)
    k = torch.randn(shape_kv, device=device, dtype=dtype)
    v = torch.randn(shape_kv, device=device, dtype=dtype)
    if q3d:
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    return q, k, v


def _grads(fn, tensors, do):
    tensors = [t.detach().requires_grad_() for t in tensors]
    o = fn(*tensors)
    grads = torch.autograd.grad(o, tensors, do)
    return o.detach(), grads


def _grads_per_upstream(fn, tensors, dos):
    """One forward, then the gradients for each upstream gradient in `dos`, each stacked over them."""
    tensors = [t.detach().requires_grad_() for t in tensors]
    o = fn(*tensors)
    grads = [torch.autograd.grad(o, tensors, do, retain_graph=True) for do in dos]
    return o.detach(), [torch.stack(g) for g in zip(*grads)]


def check_against_torch(q, k, v, do=None, *, bias=None, **kwargs):
    """Runs ours, the float64 reference and PyTorch in q's dtype; asserts the error criterion. Differentiates q, k,
    v, the bias if given, and `scale` if it is a tensor (per-head scales), in that order. With fewer than
    DSCALE_SAMPLES heads every gradient is checked over several upstream gradients (one forward)."""
    dtype = q.dtype
    scale = kwargs.pop("scale") if isinstance(kwargs.get("scale"), torch.Tensor) else None
    # the differentiable extras: (gradient's name, argument name, tensor)
    extras = [e for e in (("dbias", "attn_bias", bias), ("dscale", "scale", scale)) if e[2] is not None]
    tensors = [q, k, v] + [e[2] for e in extras]

    def ours(*ts):
        return cosine_sim_attention(*ts[:3], **kwargs, **{e[1]: t for e, t in zip(extras, ts[3:])})

    # the op's default bound for a scale tensor, which the reference does not assume
    ref_kwargs = dict(kwargs, scale_max=kwargs.get("scale_max") or MAX_SCALE) if scale is not None else kwargs

    def torch_ref(*ts):
        return _reference_any_rank(*ts[:3], **ref_kwargs, **{e[1]: t for e, t in zip(extras, ts[3:])})

    draws = 1 if scale is None else -(-DSCALE_SAMPLES // scale.numel())
    dos = [do] if do is not None else [torch.randn_like(q, dtype=torch.float32).to(dtype) for _ in range(draws)]
    o, g = _grads_per_upstream(ours, tensors, dos)
    o64, g64 = _grads_per_upstream(torch_ref, [t.double() for t in tensors], [do.double() for do in dos])
    # PyTorch in the same dtype; CPU half matmuls are slow but fine at these sizes
    ot, gt = _grads_per_upstream(torch_ref, tensors, dos)
    assert o.dtype == dtype and o.shape == q.shape
    names = ["out", "dq", "dk", "dv"] + [e[0] for e in extras]
    floor = FLOOR[dtype] + _lse_floor(kwargs, scale)
    for name, a, ref, tor in zip(names, [o, *g], [o64, *g64], [ot, *gt]):
        assert a.shape == ref.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert_close_to_reference(name, a, ref, tor, floor)
    return o, [t[0] for t in g]


def _lse_floor(kwargs, scale_tensor=None):
    """The backward recomputes P from one saved fp32 log-sum-exp per row, whose rounding (half an ulp of |lse|,
    up to scale·groups) scales a whole row of P: a floor that matters only for fp32 at large scale·groups."""
    scale = kwargs.get("scale", 10.0)
    if scale_tensor is not None:
        scale = min(scale_tensor.max().item(), kwargs.get("scale_max") or MAX_SCALE)
    return 2.0**-24 * 2 * scale * kwargs.get("groups", 1)


def assert_close_to_reference(name, ours, ref, torch_same_dtype, floor):
    """ours vs the float64 `ref`, no worse than PyTorch in the same dtype (see module docstring)."""
    # RMS errors relative to the reference's RMS, or to 1 (the inputs' scale) where the reference is smaller,
    # e.g. dq of a row that sees one key is exactly zero and any rounding would be infinitely "relative"
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    scale = max(rms(ref), 1.0)
    err = rms(ours.double() - ref) / scale
    err_torch = rms(torch_same_dtype.double() - ref) / scale
    assert err <= 1.25 * err_torch + floor, f"{name}: relative error {err:.3e} vs PyTorch {err_torch:.3e}"
    big = max(1.0, ref.abs().max().item())
    err_max = (ours.double() - ref).abs().max().item()
    err_max_torch = (torch_same_dtype.double() - ref).abs().max().item()
    assert err_max <= 2 * err_max_torch + 4 * floor * big, f"{name}: max error {err_max:.3e} vs {err_max_torch:.3e}"


def _reference_any_rank(q, k, v, *, attn_bias=None, mask=None, attn_bias_batch_dim=False, **kwargs):
    """attention_reference on the op's accepted input ranks (3-D merged q, 3-D shared k/v, bias conventions)."""
    bias = attn_bias
    merged = q.dim() == 3
    if merged:
        q, k, v = q[:, None], k[:, None], v[:, None]
    elif k.dim() == 3:
        k, v = k[:, None], v[:, None]
    if bias is not None:
        if bias.dim() == 2:
            bias = bias[None, None]
        elif bias.dim() == 3:
            bias = bias[:, None] if (attn_bias_batch_dim or merged) else bias[None]
    o = attention_reference(q, k, v, attn_bias=bias, mask=mask, **kwargs)
    return o[:, 0] if merged else o


# ---------------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 2, 17, 23, 32), (2, 2, 1, 40, 33, 64), (1, 1, 1, 63, 63, 16)])
def test_matches_reference(seed, device, dtype, causal, shape):
    q, k, v = _inputs(*shape, dtype, device)
    check_against_torch(q, k, v, causal=causal)


@pytest.mark.parametrize("i,j", [(1, 1), (1, 37), (5, 31), (31, 5), (130, 17)])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths(seed, device, i, j, causal):
    # i < j with causal is the KV-cache case (bottom-right aligned); i > j leaves early rows with no key
    q, k, v = _inputs(1, 2, 1, i, j, 32, torch.float32, device)
    check_against_torch(q, k, v, causal=causal)


@pytest.mark.parametrize("d", [16, 24, 40, 80, 96, 128, 256])
def test_head_dims(seed, device, d):
    q, k, v = _inputs(1, 1, 1, 19, 21, d, torch.float32, device)
    check_against_torch(q, k, v, causal=d % 32 == 0)


def test_fp16_head_dims(seed, device):
    for d in (40, 128):
        q, k, v = _inputs(1, 2, 1, 33, 18, d, torch.float16, device)
        check_against_torch(q, k, v, causal=True)


# ---------------------------------------------------------------------------------------------------- layouts


def test_gqa(seed, device):
    q, k, v = _inputs(2, 6, 2, 21, 26, 32, torch.float32, device)
    check_against_torch(q, k, v, causal=True)


def test_mqa_3d_kv(seed, device):
    q, k, v = _inputs(2, 3, 1, 19, 22, 32, torch.float32, device, kv3d=True)
    o, _ = check_against_torch(q, k, v)
    assert o.shape == q.shape


def test_merged_batch_heads(seed, device):
    q, k, v = _inputs(2, 2, 2, 19, 22, 32, torch.float16, device, q3d=True)
    assert q.dim() == 3
    check_against_torch(q, k, v, causal=True)


def test_non_contiguous(seed, device):
    # (b, i, h, d) storage seen as (b, h, i, d), and v from a slice of a wider tensor
    b, h, i, j, d = 2, 2, 19, 23, 32
    q = torch.randn(b, i, h, d, device=device).transpose(1, 2)
    k = torch.randn(b, j, h, d, device=device).transpose(1, 2)
    v = torch.randn(b, h, j, 2 * d, device=device)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_torch(q, k, v, causal=True)


def test_outputs_and_gradients_follow_the_inputs_layout(seed, device):
    """q, k, v as (b, n, h, d) projections seen as (b, h, n, d) (how the model calls the op): the output and the
    gradients come back in that layout, so the model's reshape to (b, n, h·d) is a view, with the values that
    contiguous inputs give; a v strided along d gets a dense gradient. The fake impls give the same strides
    (opcheck), which compiled graphs assert."""
    from cosattn.ops import _attention_bwd_op, _attention_fwd_op

    b, h, hk, i, j, d = 2, 4, 2, 19, 23, 32
    q = torch.randn(b, i, h, d, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(b, j, hk, d, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(b, hk, j, 2 * d, device=device)[..., ::2].detach().requires_grad_()
    do = torch.randn(b, i, h, d, device=device).transpose(1, 2)
    o = cosine_sim_attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert o.stride() == q.stride() and dq.stride() == q.stride() and dk.stride() == k.stride()
    assert dv.shape == v.shape and dv.stride()[-1] == 1
    o.transpose(1, 2).view(b, i, h * d)  # a view: raises if the layout were (b, h, n, d)
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    o_dense = cosine_sim_attention(*dense, causal=True)
    assert o_dense.is_contiguous()
    for ours, want in zip((o, dq, dk, dv), (o_dense, *torch.autograd.grad(o_dense, dense, do.contiguous()))):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    args = (q.detach(), k.detach(), v.detach(), None, None, None, None, None, None)
    flags = (True, 10.0, True, 1)
    torch.library.opcheck(_attention_fwd_op, (*args, *flags), test_utils=("test_faketensor",))
    o, lse = _attention_fwd_op(*args, *flags)
    bwd = (do, *args[:3], o, lse, *args[3:], *flags, False, False)
    torch.library.opcheck(_attention_bwd_op, bwd, test_utils=("test_faketensor",))


# ---------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(seed, device, causal):
    q, k, v = _inputs(3, 2, 1, 20, 29, 32, torch.float32, device)
    mask = torch.rand(3, 29, device=device) > 0.4
    mask[2] = False  # a batch element with no visible key at all
    o, grads = check_against_torch(q, k, v, mask=mask, causal=causal)
    assert o[2].abs().max() == 0 and all(g[2].abs().max() == 0 for g in grads)


def test_masked_keys_do_not_matter(seed, device):
    q, k, v = _inputs(1, 2, 1, 9, 14, 16, torch.float32, device)
    mask = torch.ones(1, 14, dtype=torch.bool, device=device)
    mask[:, 5:9] = False
    o1 = cosine_sim_attention(q, k, v, mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[..., 5:9, :] = torch.randn_like(k2[..., 5:9, :])
    v2[..., 5:9, :] = 100.0
    torch.testing.assert_close(cosine_sim_attention(q, k2, v2, mask=mask), o1, rtol=0, atol=0)


def test_causal_rows_without_keys_are_zero(seed, device):
    # more queries than keys with bottom-right alignment: the first i − j rows see nothing
    q, k, v = _inputs(1, 1, 1, 12, 4, 16, torch.float32, device)
    q.requires_grad_()
    o = cosine_sim_attention(q, k, v, causal=True)
    (o * torch.randn_like(o)).sum().backward()
    assert o[..., :8, :].abs().max() == 0 and q.grad[..., :8, :].abs().max() == 0
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------------- bias, alibi


@pytest.mark.parametrize(
    "bias_shape,batch_dim",
    [((17, 23), False), ((2, 17, 23), False), ((2, 1, 17, 23), False), ((2, 2, 17, 23), False), ((2, 17, 23), True)],
)
def test_attn_bias_shapes_and_grad(seed, device, bias_shape, batch_dim):
    q, k, v = _inputs(2, 2, 1, 17, 23, 32, torch.float32, device)
    bias = torch.randn(bias_shape, device=device)
    _, grads = check_against_torch(q, k, v, bias=bias, causal=True, attn_bias_batch_dim=batch_dim)
    assert grads[3].shape == bias.shape


def test_attn_bias_large_positive_and_inf(seed, device):
    # a large positive bias breaks the cosine bound: the kernel must still be exact
    q, k, v = _inputs(1, 2, 1, 16, 20, 32, torch.float32, device)
    bias = 30 * torch.randn(2, 16, 20, device=device)
    bias[:, :, :3] = float("-inf")
    check_against_torch(q, k, v, bias=bias)


def test_attn_bias_merged_batch(seed, device):
    q, k, v = _inputs(2, 2, 2, 11, 13, 16, torch.float32, device, q3d=True)
    bias = torch.randn(4, 11, 13, device=device)
    check_against_torch(q, k, v, bias=bias)


@pytest.mark.parametrize(
    "bias_dims,batch_dim",
    [
        ("j", False),
        ("1j", False),
        ("i1", False),
        ("b11j", False),
        ("h11", False),
        ("1111", False),
        ("111j", False),
        ("b1i1", False),
        ("1h1j", False),
        ("b11", True),
    ],
)
@pytest.mark.parametrize("i,j", [(17, 23), (1, 33)])
def test_attn_bias_broadcast_shapes(seed, backend_device, bias_dims, batch_dim, i, j):
    # every shape that broadcasts to (b, h, i, j): forward, and the gradient reduced to the bias's own shape
    b, h = 2, 3
    size = {"b": b, "h": h, "i": i, "j": j, "1": 1}
    bias = torch.randn([size[c] for c in bias_dims], device=backend_device)
    q, k, v = _inputs(b, h, 1, i, j, 32, torch.float32, backend_device)
    _, grads = check_against_torch(q, k, v, bias=bias, causal=True, attn_bias_batch_dim=batch_dim)
    assert grads[3].shape == bias.shape


@pytest.mark.parametrize("bias_shape", [(13,), (1, 13), (4, 1, 13), (4, 11, 1)])
def test_attn_bias_broadcast_merged_batch(seed, backend_device, bias_shape):
    # a 3-D q (B, i, d): a 3-D bias is (B, i, j)
    q, k, v = _inputs(2, 2, 2, 11, 13, 16, torch.float32, backend_device, q3d=True)
    check_against_torch(q, k, v, bias=torch.randn(bias_shape, device=backend_device))


def test_attn_bias_broadcast_inf_masks(seed, backend_device):
    # −inf in a key-only bias masks those keys for every query; −inf in a query-only bias empties whole rows
    b, h, i, j = 2, 2, 17, 23
    q, k, v = _inputs(b, h, 1, i, j, 32, torch.float32, backend_device)
    key_bias = torch.randn(j, device=backend_device)
    key_bias[5:9] = float("-inf")
    check_against_torch(q, k, v, bias=key_bias)
    visible = torch.isfinite(key_bias).expand(b, j)
    o_masked = cosine_sim_attention(q, k, v, attn_bias=key_bias.masked_fill(~visible[0], 0.0), mask=visible)
    torch.testing.assert_close(cosine_sim_attention(q, k, v, attn_bias=key_bias), o_masked, rtol=1e-6, atol=1e-6)

    row_bias = torch.randn(i, 1, device=backend_device)
    row_bias[3:6] = float("-inf")
    o, grads = check_against_torch(q, k, v, bias=row_bias, causal=True)
    assert o[:, :, 3:6].abs().max() == 0 and grads[0][:, :, 3:6].abs().max() == 0
    assert grads[3][3:6].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_alibi(seed, device, causal):
    q, k, v = _inputs(2, 4, 2, 15, 27, 32, torch.float32, device)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    check_against_torch(q, k, v, alibi_slopes=slopes, causal=causal, mask=torch.rand(2, 27, device=device) > 0.2)


def test_alibi_slopes_requiring_grad_rejected(seed, backend_device):
    # no backend returns a gradient for the slopes: a slope that asks for one is refused, not silently dropped
    q, k, v = _inputs(1, 2, 1, 17, 17, 16, torch.float32, backend_device)
    slopes = torch.tensor([0.5, 0.25], device=backend_device, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes"):
        cosine_sim_attention(q.requires_grad_(), k, v, alibi_slopes=slopes)
    with pytest.raises(ValueError, match="alibi_slopes"), torch.no_grad():
        cosine_sim_attention(q, k, v, alibi_slopes=slopes)
    check_against_torch(q.detach(), k, v, alibi_slopes=slopes.detach(), causal=True)


# ---------------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale,groups", [(5.0, 1), (10.0, 4), (10.0, 8), (50.0, 1), (100.0, 1)])
def test_scale_and_groups(seed, device, dtype, scale, groups):
    # large scale·groups leaves the fixed-offset range: exp(-2·scale·groups) underflows; must stay exact
    q, k, v = _inputs(1, 2, 1, 18, 21, 64, dtype, device)
    check_against_torch(q, k, v, scale=scale, groups=groups, causal=True)


def test_prenormalised_inputs(seed, device):
    q, k, v = _inputs(1, 2, 1, 18, 21, 32, torch.float32, device)
    qn, kn = l2norm_tensors(q, k, groups=2)
    o = cosine_sim_attention(qn, kn, v, l2norm_qk=False, groups=2)
    torch.testing.assert_close(o, cosine_sim_attention(q, k, v, groups=2), rtol=1e-5, atol=1e-5)
    check_against_torch(qn, kn, v, l2norm_qk=False, causal=True)


def test_zero_vectors_follow_f_normalize(seed, device):
    q, k, v = _inputs(1, 1, 1, 9, 9, 16, torch.float32, device)
    q[..., 3, :] = 0
    k[..., 5, :] = 0
    check_against_torch(q, k, v)


def test_l2norm_tensors_matches_f_normalize(seed, device):
    x = torch.randn(3, 5, 32, device=device)
    torch.testing.assert_close(l2norm_tensors(x), F.normalize(x, dim=-1))
    a, b = l2norm_tensors(x, x * 2, groups=4)
    torch.testing.assert_close(a.view(3, 5, 4, 8).norm(dim=-1), torch.ones(3, 5, 4, device=device))
    torch.testing.assert_close(a, b)


def test_backward_is_deterministic(seed, device):
    q, k, v = _inputs(2, 4, 2, 37, 45, 32, torch.float32, device)
    bias = torch.randn(4, 37, 45, device=device)
    do = torch.randn_like(q)
    f = lambda *t: cosine_sim_attention(*t[:3], attn_bias=t[3], causal=True)  # noqa: E731
    _, g1 = _grads(f, [q, k, v, bias], do)
    _, g2 = _grads(f, [q, k, v, bias], do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- per-head scale

# the bound that keeps a fixed exponent offset exact per dtype at one group (see ops.fixed_offset_ok): a tight
# scale_max selects the fixed-offset path, the default (MAX_SCALE) the running max
TIGHT_SCALE_MAX = {torch.float32: 32.0, torch.float16: 10.0, torch.bfloat16: 32.0}

# (b, h, hk, i, j, d) and options: lengths 1, 17, 33, GQA, masks, bias, ALiBi, groups, pre-normalised inputs, and the
# 3-D layouts (shared k/v; merged q with a (1,) scale)
SCALE_CASES = {
    "1x1": ((1, 4, 1, 1, 1, 16), {}),
    "1x17": ((2, 4, 1, 1, 17, 16), {}),
    "17x33 gqa": ((2, 4, 2, 17, 33, 32), {}),
    "33x17": ((1, 4, 4, 33, 17, 32), {}),
    "mask": ((2, 4, 1, 17, 33, 16), dict(mask=True)),
    "bias": ((1, 4, 1, 33, 33, 16), dict(bias=True)),
    "alibi": ((1, 4, 2, 17, 33, 16), dict(alibi=True)),
    "groups 2": ((1, 4, 1, 17, 17, 32), dict(groups=2)),
    "prenormalised": ((1, 4, 2, 33, 17, 32), dict(l2norm_qk=False)),
    "mqa 3-D kv": ((2, 4, 1, 17, 33, 16), dict(kv3d=True)),
    "merged 3-D q": ((2, 2, 2, 17, 17, 16), dict(q3d=True)),  # one scale: checked over DSCALE_SAMPLES upstreams
}


def _scale_case(case, dtype, device, tight):
    """Inputs and keyword arguments for SCALE_CASES[case]: per-head scales in the upper part of (0, scale_max] for a
    tight scale_max, or in [5, 40] / groups under the default bound."""
    (b, h, hk, i, j, d), opts = SCALE_CASES[case]
    opts = dict(opts)
    kv3d, q3d = opts.pop("kv3d", False), opts.pop("q3d", False)
    q, k, v = _inputs(b, h, hk, i, j, d, dtype, device, kv3d=kv3d, q3d=q3d)
    groups = opts.get("groups", 1)
    kw = dict(opts)
    if kw.pop("mask", False):
        kw["mask"] = torch.rand(b, j, device=device) > 0.3
    bias = torch.randn(h, i, j, device=device) if kw.pop("bias", False) else None
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = 2.0 ** -torch.arange(1, h + 1, device=device, dtype=torch.float32)
    if kw.get("l2norm_qk") is False:
        q, k = l2norm_tensors(q, k, groups=groups)
    if tight:
        kw["scale_max"] = TIGHT_SCALE_MAX[dtype] / groups
        low, high = 0.25 * kw["scale_max"], kw["scale_max"]
    else:
        low, high = 5.0 / groups, 40.0 / groups
    kw["scale"] = torch.empty(1 if q3d else h, device=device).uniform_(low, high)
    return q, k, v, bias, kw


@pytest.mark.parametrize("case", list(SCALE_CASES))
@pytest.mark.parametrize("tight", [True, False], ids=["tight", "default-bound"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_per_head(seed, backend_device, dtype, causal, tight, case):
    """A (h,) scale tensor: the output and every gradient, dscale included, against the float64 reference, on the
    fixed-offset path (a tight scale_max) and the running max (the default bound, or a bias / ALiBi)."""
    if case == "1x1" and dtype == torch.float16:
        # with one key PyTorch is exact (P = 1), while the kernels round P to fp16 for the P·V product and divide by
        # the fp32 row sum: an error of up to 2^-11 whatever the scale (float scales too), which no ratio bounds
        pytest.skip("one key in fp16: PyTorch's error is 0")
    q, k, v, bias, kw = _scale_case(case, dtype, backend_device, tight)
    o, grads = check_against_torch(q, k, v, bias=bias, causal=causal, **kw)
    assert grads[-1].shape == kw["scale"].shape and grads[-1].dtype == kw["scale"].dtype


def test_scale_max_selects_the_path():
    """What the docs promise: a tight scale_max keeps the fixed offset (16 or 32 in bf16/fp32, 10 in fp16), the
    default bound runs the running max."""
    from cosattn import ops

    for dtype in (torch.float32, torch.bfloat16):
        assert ops.fixed_offset_ok(dtype, 16.0, 1) and ops.fixed_offset_ok(dtype, 32.0, 1)
        assert not ops.fixed_offset_ok(dtype, 32.0, 2) and not ops.fixed_offset_ok(dtype, MAX_SCALE, 1)
    assert ops.fixed_offset_ok(torch.float16, 10.0, 1) and not ops.fixed_offset_ok(torch.float16, 16.0, 1)
    for dtype, bound in TIGHT_SCALE_MAX.items():
        assert ops.fixed_offset_ok(dtype, bound, 1)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("k_inline", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_per_head_load_paths(seed, device, monkeypatch, tma, k_inline, dtype):
    """Per-head scales through every tile-load path (as test_load_paths): descriptors or pointers, k normalised in
    the loop or by the pre-pass; fixed offset and running max."""
    from cosattn import ops

    monkeypatch.setattr(ops, "USE_TMA", tma)
    monkeypatch.setattr(ops, "TMA_MIN_D", 16)
    monkeypatch.setattr(ops, "TMA_MIN_N", 1)
    monkeypatch.setattr(ops, "K_INLINE_MAX_N", 1 << 30 if k_inline else 0)
    q, k, v = _inputs(2, 4, 2, 37, 45, 32, dtype, device)
    scale = torch.empty(4, device=device).uniform_(2.0, TIGHT_SCALE_MAX[dtype])
    check_against_torch(q, k, v, causal=True, scale=scale, scale_max=TIGHT_SCALE_MAX[dtype])
    check_against_torch(q, k, v, causal=False, scale=4 * scale)


@pytest.mark.parametrize("load", ["default", "descriptors + pre-pass"])
@pytest.mark.parametrize("scale,causal", [(10.0, True), (10.0, False), (50.0, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_tensor_of_equal_values_matches_float(seed, backend_device, monkeypatch, dtype, scale, causal, load):
    """A tensor of equal scales with scale_max = that scale takes the float scale's path, and the kernels derive the
    same fp32 numbers from it: bitwise the same output and q, k, v gradients (10: the fixed offset in both dtypes;
    50: the running max)."""
    from cosattn import ops

    if load != "default":
        monkeypatch.setattr(ops, "TMA_MIN_D", 16)
        monkeypatch.setattr(ops, "TMA_MIN_N", 1)
        monkeypatch.setattr(ops, "K_INLINE_MAX_N", 0)
    q, k, v = _inputs(2, 4, 2, 37, 45, 32, dtype, backend_device)
    do = torch.randn_like(q)
    o_f, g_f = _grads(lambda *t: cosine_sim_attention(*t, scale=scale, causal=causal), [q, k, v], do)
    scales = torch.full((4,), scale, device=backend_device)

    def per_head(q, k, v, s):
        return cosine_sim_attention(q, k, v, scale=s, scale_max=scale, causal=causal)

    o_t, g_t = _grads(per_head, [q, k, v, scales], do)
    for name, a, b in zip(["out", "dq", "dk", "dv"], [o_f, *g_f], [o_t, *g_t]):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(per_head(q, k, v, scales), o_f)


def test_scale_clamped_heads_get_zero_gradient(seed, backend_device):
    """Scales are clamped to [0, scale_max] with torch.clamp's gradient: zero outside the range, passed at its ends;
    a head clamped to 0 attends uniformly; a NaN scale gives NaN for its head only."""
    q, k, v = _inputs(2, 5, 1, 17, 23, 32, torch.float32, backend_device)
    scale = torch.tensor([-2.0, 0.0, 6.0, 20.0, 40.0], device=backend_device)
    _, grads = check_against_torch(q, k, v, causal=True, scale=scale, scale_max=20.0)
    dscale = grads[-1]
    assert dscale[0] == 0 and dscale[4] == 0 and (dscale[1:4] != 0).all()
    clamped = torch.tensor([0.0, 0.0, 6.0, 20.0, 20.0], device=backend_device)
    o = cosine_sim_attention(q, k, v, causal=True, scale=scale, scale_max=20.0)
    torch.testing.assert_close(o, cosine_sim_attention(q, k, v, causal=True, scale=clamped, scale_max=20.0))
    # scale 0: every visible key weighs the same, so the last query row (it sees every key) averages v
    torch.testing.assert_close(o[:, 0, -1], v[:, 0].mean(dim=1), rtol=1e-5, atol=1e-5)
    scale[2] = float("nan")
    o = cosine_sim_attention(q, k, v, causal=True, scale=scale, scale_max=20.0)
    assert torch.isnan(o[:, 2]).all() and torch.isfinite(o[:, [0, 1, 3, 4]]).all()


def test_scale_backward_is_deterministic(seed, device):
    q, k, v = _inputs(2, 4, 2, 37, 45, 32, torch.float32, device)
    scale = torch.rand(4, device=device) * 20
    do = torch.randn_like(q)
    f = lambda *t: cosine_sim_attention(*t[:3], scale=t[3], scale_max=24.0, causal=True)  # noqa: E731
    _, g1 = _grads(f, [q, k, v, scale], do)
    _, g2 = _grads(f, [q, k, v, scale], do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_scale_gradient_formula(seed, one_thread):
    """dL/dscale_h = Σ_{b,i,j} dS_ij (q̂_i·k̂_j) = Σ_{b,i} ⟨dq̂_i, q̂_i⟩ / scale_h, on the float64 reference with
    autograd, and the chunked path's autograd against finite differences (gradcheck)."""
    from cosattn.reference import attention_chunked

    q, k, v = (t.double() for t in _inputs(2, 4, 2, 9, 13, 16, torch.float32, "cpu"))
    qh, kh = l2norm_tensors(q, k)
    qh.requires_grad_()
    scale = torch.tensor([2.0, 5.0, 9.0, 12.0], dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 13) > 0.2
    o = attention_reference(qh, kh, v, scale=scale, l2norm_qk=False, causal=True, mask=mask)
    dqh, dscale = torch.autograd.grad(o, (qh, scale), torch.randn_like(o))
    torch.testing.assert_close(dscale, (dqh * qh).sum(dim=(0, 2, 3)) / scale, rtol=1e-10, atol=1e-12)

    # q's gradient, the bias's (dS itself) and the scale's: k and v enter dscale only through dS
    q, k, v = (t[:1, :, :5].detach() for t in (q, k, v))
    q.requires_grad_()
    bias = torch.randn(4, 5, 5, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=torch.float64)

    kw = dict(scale_max=10.0, causal=True, alibi_slopes=slopes, groups=2, chunk_size=2)

    def chunked(q, k, v, bias, scale):
        return attention_chunked(q, k, v, attn_bias=bias, scale=scale, **kw)

    torch.autograd.gradcheck(chunked, (q, k, v, bias, scale))


def test_torch_compile_fullgraph_scale_tensor(seed, device):
    q, k, v = _inputs(1, 2, 1, 17, 17, 16, torch.float32, device)
    q.requires_grad_()
    scale = torch.tensor([4.0, 12.0], device=device, requires_grad=True)

    def f(q, k, v, scale):
        return cosine_sim_attention(q * 2, k, v, causal=True, scale=scale * 1.5, scale_max=16.0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, scale)
    out.backward()
    ref_q, ref_scale = q.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
    ref = f(ref_q, k, v, ref_scale)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(q.grad, ref_q.grad)
    torch.testing.assert_close(scale.grad, ref_scale.grad)


def test_custom_op_opcheck_scale_tensor(seed, device):
    from cosattn.ops import _attention_bwd_op, _attention_fwd_op, attention_forward

    q, k, v = _inputs(1, 2, 1, 17, 19, 16, torch.float32, device)
    scales = torch.tensor([3.0, 9.0], dtype=torch.float64, device=device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, None, scales.requires_grad_())
    args = (*args, None, None)  # no segment ids
    flags = (True, 16.0, True, 1)
    torch.library.opcheck(
        _attention_fwd_op, (*args, *flags), test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )
    q, k, v, scales = (t.detach() for t in (q, k, v, scales))
    o, lse = attention_forward(q, k, v, None, None, None, scales, None, None, *flags)
    for scale_grad in (True, False):
        bwd_args = (
            torch.randn_like(o),
            q,
            k,
            v,
            o,
            lse,
            None,
            None,
            None,
            scales,
            None,
            None,
            *flags,
            False,
            scale_grad,
        )
        torch.library.opcheck(_attention_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------- segment ids


def packed_segment_ids(b, n, device, *, max_docs=4, dtype=torch.int64):
    """(b, n) non-decreasing ids of packed documents of random lengths: a random number of documents per row, ids
    starting anywhere and with gaps (only equality matters)."""
    rows = []
    for _ in range(b):
        docs = int(torch.randint(1, max_docs + 1, ()))
        cuts = torch.randperm(max(n - 1, 1))[: docs - 1].add(1).sort().values if n > 1 else torch.zeros(0, dtype=int)
        starts = torch.zeros(n, dtype=torch.int64)
        starts[cuts] = torch.randint(1, 3, (len(cuts),))
        rows.append(starts.cumsum(0) + int(torch.randint(0, 5, ())))
    return torch.stack(rows).to(device=device, dtype=dtype)


# (b, h, hk, i, j, d, dtype) and options: self-attention (one (b, n) tensor) unless "pair"; lengths 1, 17, 63, 130;
# head dims 16, 32, 40, 64; GQA, MQA, a merged 3-D q, and a mask, bias and ALiBi together
SEGMENT_CASES = {
    "1": ((1, 2, 1, 1, 1, 16, torch.float32), {}),
    "17 gqa d32 fp16": ((2, 4, 2, 17, 17, 32, torch.float16), {}),
    "63 d40": ((1, 1, 1, 63, 63, 40, torch.float32), {}),
    "130 d16 fp16": ((1, 1, 1, 130, 130, 16, torch.float16), {}),
    "pair 17x63 d64": ((2, 2, 1, 17, 63, 64, torch.float32), dict(pair=True)),
    "mask bias alibi": ((2, 2, 1, 33, 33, 16, torch.float32), dict(mask=True, bias=True, alibi=True)),
    "mqa 3-D kv fp16": ((2, 2, 1, 30, 30, 32, torch.float16), dict(kv3d=True)),
    "merged 3-D q": ((2, 2, 2, 17, 17, 16, torch.float32), dict(q3d=True)),
}


def _segment_case(case, device):
    (b, h, hk, i, j, d, dtype), opts = SEGMENT_CASES[case]
    q, k, v = _inputs(b, h, hk, i, j, d, dtype, device, kv3d=opts.get("kv3d", False), q3d=opts.get("q3d", False))
    rows = q.shape[0]  # b, or b·h for a merged q
    kw, bias = {}, None
    if opts.get("pair"):
        # both sides cut from one id range, so some query segments may find no key
        kw["segment_ids"] = (packed_segment_ids(rows, i, device), packed_segment_ids(rows, j, device))
    else:
        kw["segment_ids"] = packed_segment_ids(rows, i, device)
    if opts.get("mask"):
        kw["mask"] = torch.rand(b, j, device=device) > 0.2
    if opts.get("bias"):
        bias = torch.randn(h, i, j, device=device)
    if opts.get("alibi"):
        kw["alibi_slopes"] = 2.0 ** -torch.arange(1, h + 1, device=device, dtype=torch.float32)
    return q, k, v, bias, kw


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_segments(seed, backend_device, causal, case):
    """Packed documents: the output and every gradient (q, k, v, bias) against the float64 reference, on both
    backends, with every other option."""
    q, k, v, bias, kw = _segment_case(case, backend_device)
    _, grads = check_against_torch(q, k, v, bias=bias, causal=causal, **kw)
    if bias is not None:
        assert grads[3].shape == bias.shape


def _sdpa_with_mask(q, k, v, *, segment_ids, causal, scale=10.0):
    """PyTorch SDPA on normalised q, k with the segment (and causal) visibility as an explicit boolean mask."""
    vis = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        vis = vis & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return F.scaled_dot_product_attention(qn, kn, v, attn_mask=vis, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize(
    "dtype,causal",
    [(torch.float32, False), (torch.float16, True)] + ([(torch.bfloat16, True)] if len(DTYPES) > 2 else []),
)
def test_segments_vs_sdpa(seed, device, dtype, causal):
    """Error against the float64 reference no worse than SDPA's with the same visibility as a boolean mask, in the
    same dtype (self-attention: every query sees at least itself, so SDPA has no empty rows)."""
    q, k, v = _inputs(1, 4, 2, 50, 50, 32, dtype, device)
    seg = packed_segment_ids(1, 50, device, max_docs=5)
    do = torch.randn_like(q)
    ours = _grads(lambda *t: cosine_sim_attention(*t, segment_ids=seg, causal=causal), [q, k, v], do)
    ref = _grads(
        lambda *t: attention_reference(*t, segment_ids=seg, causal=causal), [t.double() for t in (q, k, v)], do.double()
    )
    peer = _grads(lambda *t: _sdpa_with_mask(*t, segment_ids=seg, causal=causal), [q, k, v], do)
    for name, a, r, p in zip(["out", "dq", "dk", "dv"], [ours[0], *ours[1]], [ref[0], *ref[1]], [peer[0], *peer[1]]):
        assert_close_to_reference(name, a, r, p, FLOOR[dtype])


def test_segment_rows_without_keys(seed, backend_device):
    """A query whose segment has no visible key returns zeros with zero gradients: with causal alignment (i < j),
    its segment starts later on the key side than its position reaches; or its id is absent from the keys."""
    i, j = 6, 10  # bottom-right: query r sees keys c <= r + 4
    q, k, v = _inputs(2, 2, 1, i, j, 16, torch.float32, backend_device)
    q_seg = torch.tensor([[0, 0, 0, 1, 1, 1], [4, 4, 7, 7, 9, 9]], device=backend_device)
    k_seg = torch.tensor([[0] * 8 + [1] * 2, [4] * 5 + [9] * 5], device=backend_device)
    o, grads = check_against_torch(q, k, v, causal=True, segment_ids=(q_seg, k_seg))
    empty = [(0, 3), (1, 2), (1, 3)]  # query 3 of row 0 sees keys 0..7 (segment 0); segment 7 has no keys
    for b, r in empty:
        assert o[b, :, r].abs().max() == 0 and grads[0][b, :, r].abs().max() == 0
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)


def test_unsorted_segment_ids(seed, backend_device):
    """Ids in any order are exact (the masks decide; only sorted ids let whole tiles be skipped), per batch element:
    one row sorted, one not, and sorted queries with unsorted keys. Two integer dtypes in a pair are promoted."""
    q, k, v = _inputs(2, 1, 1, 40, 40, 16, torch.float32, backend_device)
    seg = packed_segment_ids(2, 40, backend_device)
    seg[1] = torch.randint(0, 3, (40,), device=backend_device)
    check_against_torch(q, k, v, segment_ids=seg, causal=True)
    q, k, v = _inputs(2, 1, 1, 33, 40, 16, torch.float32, backend_device)
    q_seg = packed_segment_ids(2, 33, backend_device, dtype=torch.uint8)
    k_seg = torch.randint(0, 4, (2, 40), device=backend_device, dtype=torch.int16)
    check_against_torch(q, k, v, segment_ids=(q_seg, k_seg))
    check_against_torch(q, k, v, segment_ids=(k_seg[:, :33], q_seg[:, 0, None].expand(2, 40)), causal=True)


def test_one_segment_is_no_segments(seed, backend_device):
    """Every id equal: the same output and gradients, bit for bit, as without segment ids."""
    q, k, v = _inputs(2, 1, 1, 37, 37, 16, torch.float32, backend_device)
    do = torch.randn_like(q)
    seg = torch.full((2, 37), 3, device=backend_device, dtype=torch.int32)
    o, g = _grads(lambda *t: cosine_sim_attention(*t, causal=True), [q, k, v], do)
    o_s, g_s = _grads(lambda *t: cosine_sim_attention(*t, causal=True, segment_ids=seg), [q, k, v], do)
    for a, b in zip([o, *g], [o_s, *g_s]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_segment_tiles_are_skipped(seed, device, monkeypatch, causal):
    """With sorted ids, tiles of other segments are never read. Documents aligned to the kernels' tiles; q, k and v
    of every other document poisoned with NaN: a visited tile would spread it (P·V with P = 0 and V = NaN is NaN, in
    the forward, and likewise in dq and, through D = rowsum(dO ⊙ O), in dk). So a document's outputs and gradients
    stay finite and bitwise equal to the clean run's only if all three passes skip those tiles; with skipping
    disabled (every row treated as unsorted) the poison does reach them, which shows the test can fail."""
    from cosattn import ops

    d, dtype = 16, torch.float32
    kernels = ("fwd", "fwd_tma", "dkdv", "dq", "dq_tma")
    align = max(max(ops.launch_config(name, d, dtype, causal)[:2]) for name in kernels)
    lengths = [align, 2 * align, align]
    seg = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])[None].to(device)
    n = seg.shape[1]
    q, k, v = _inputs(1, 2, 1, n, n, d, dtype, device)  # GQA: the dk/dv pass loops over two query heads
    do = torch.randn_like(q)

    def run(q, k, v):
        return _grads(lambda *t: cosine_sim_attention(*t, causal=causal, segment_ids=seg), [q, k, v], do)

    clean = run(q, k, v)
    rows = seg[0] == 1  # the middle document: tiles on both sides of it are to be skipped
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t[:, :, ~rows] = float("nan")
    o, grads = run(*poisoned)
    for name, a, b in zip(["out", "dq", "dk", "dv"], [o, *grads], [clean[0], *clean[1]]):
        assert torch.equal(a[:, :, rows], b[:, :, rows]), name
    monkeypatch.setattr(ops, "_non_decreasing", lambda ids: torch.zeros_like(ids[:, 0], dtype=torch.bool))
    o, grads = run(*poisoned)
    assert torch.isnan(o[:, :, rows]).any() and torch.isnan(grads[0][:, :, rows]).any()
    assert torch.isnan(grads[1][:, :, rows]).any()


def test_chunked_path_segments(seed, one_thread):
    """The CPU path's query chunks slice the query ids: chunks smaller than a document, pair ids, ALiBi, causal."""
    from cosattn.reference import attention_chunked

    q, k, v = (t.double() for t in _inputs(2, 2, 1, 23, 31, 16, torch.float32, "cpu"))
    q_seg, k_seg = packed_segment_ids(2, 23, "cpu"), packed_segment_ids(2, 31, "cpu")
    kw = dict(causal=True, alibi_slopes=torch.tensor([0.5, 0.25], dtype=torch.float64), segment_ids=(q_seg, k_seg))
    torch.testing.assert_close(attention_chunked(q, k, v, chunk_size=5, **kw), attention_reference(q, k, v, **kw))


def test_torch_compile_fullgraph_segments(seed, device):
    q, k, v = _inputs(1, 2, 1, 17, 17, 16, torch.float32, device)
    seg = packed_segment_ids(1, 17, device)

    def f(q, k, v):
        return cosine_sim_attention(q * 2, k, v, causal=True, segment_ids=seg).sum()

    q.requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    out.backward()
    ref_q = q.detach().clone().requires_grad_()
    ref = f(ref_q, k, v)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(q.grad, ref_q.grad)


# ---------------------------------------------------------------------------------------------------- integration


def test_chunked_cpu_path_matches(seed, monkeypatch):
    # without the interpreter, CPU inputs take the chunked PyTorch path; same function
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(2, 4, 2, 21, 30, 32, torch.float32, "cpu")
    mask = torch.rand(2, 30) > 0.3
    slopes = torch.rand(4)
    do = torch.randn_like(q)
    o, g = _grads(lambda *t: cosine_sim_attention(*t, mask=mask, alibi_slopes=slopes, causal=True), [q, k, v], do)
    o64, g64 = _grads(
        lambda *t: attention_reference(*t, mask=mask, alibi_slopes=slopes.double(), causal=True),
        [q.double(), k.double(), v.double()],
        do.double(),
    )
    for a, b in zip([o, *g], [o64, *g64]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_inference_skips_autograd(seed, device):
    """Without a gradient to track the op launches directly: same output bits, nothing recorded for autograd."""
    q, k, v = _inputs(1, 2, 1, 19, 23, 32, torch.float32, device)
    o_plain = cosine_sim_attention(q, k, v, causal=True)
    q.requires_grad_()
    o_grad = cosine_sim_attention(q, k, v, causal=True)
    with torch.no_grad():
        o_nograd = cosine_sim_attention(q, k, v, causal=True)
    assert o_plain.grad_fn is None and o_nograd.grad_fn is None and o_grad.grad_fn is not None
    assert torch.equal(o_plain, o_grad.detach()) and torch.equal(o_nograd, o_grad.detach())


def test_torch_compile_fullgraph(seed, device):
    q, k, v = _inputs(1, 2, 1, 17, 17, 16, torch.float32, device)
    q.requires_grad_()

    def f(q, k, v):
        return cosine_sim_attention(q * 2, k, v, causal=True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.backward()
    ref_q = q.detach().clone().requires_grad_()
    f(ref_q, k, v).backward()
    torch.testing.assert_close(out, f(ref_q, k, v))
    torch.testing.assert_close(q.grad, ref_q.grad)


def test_custom_op_opcheck(seed, device):
    from cosattn.ops import _attention_fwd_op

    q, k, v = _inputs(1, 2, 1, 17, 19, 16, torch.float32, device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, None, None, None, None)
    args = (*args, True, 10.0, True, 1)
    torch.library.opcheck(
        _attention_fwd_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda t: dict(q=t(2, 16)), ValueError, "q must be"),
        (lambda t: dict(k=t(1, 3, 8, 16), v=t(1, 3, 8, 16)), ValueError, "h % hk"),
        (lambda t: dict(v=t(1, 1, 9, 16)), ValueError, "k and v"),
        (lambda t: dict(k=t(2, 1, 8, 16), v=t(2, 1, 8, 16)), ValueError, "batch"),
        (lambda t: dict(q=t(1, 2, 8, 8), k=t(1, 1, 8, 8), v=t(1, 1, 8, 8)), ValueError, "head dim"),
        (lambda t: dict(q=t(1, 2, 8, 512), k=t(1, 1, 8, 512), v=t(1, 1, 8, 512)), ValueError, "head dim"),
        (lambda t: dict(k=t(1, 1, 8, 16).double()), TypeError, "dtype"),
        (
            lambda t: dict(q=t(1, 2, 8, 16).long(), k=t(1, 1, 8, 16).long(), v=t(1, 1, 8, 16).long()),
            TypeError,
            "q must",
        ),
        (lambda t: dict(mask=torch.ones(1, 7, dtype=torch.bool)), ValueError, "mask must be (b, j)"),
        (lambda t: dict(mask=torch.ones(1, 8)), TypeError, "mask must be a bool"),
        (lambda t: dict(attn_bias=t(3, 8, 8)), ValueError, "attn_bias"),
        (lambda t: dict(alibi_slopes=t(3)), ValueError, "alibi_slopes"),
        (lambda t: dict(groups=3), ValueError, "groups"),
        (lambda t: dict(scale=0.0), ValueError, "scale"),
        (lambda t: dict(scale=101.0), ValueError, "scale"),
        (lambda t: dict(scale=t(3)), ValueError, "scale must be a float or an (h,) = (2,) tensor"),
        (lambda t: dict(scale=t(1, 2)), ValueError, "scale must be a float or an (h,)"),
        (lambda t: dict(scale=torch.tensor(10.0)), ValueError, "scale must be a float or an (h,)"),
        (lambda t: dict(scale=torch.ones(2, dtype=torch.long)), TypeError, "scale must be a float or a floating"),
        (lambda t: dict(scale=torch.ones(2, device="meta")), ValueError, "scale must be on cpu"),
        (lambda t: dict(q=t(2, 8, 16), k=t(2, 8, 16), v=t(2, 8, 16), scale=t(2)), ValueError, "must be (1,)"),
        (lambda t: dict(scale=t(2), scale_max=0.0), ValueError, "scale_max"),
        (lambda t: dict(scale=t(2), scale_max=101.0), ValueError, "scale_max"),
        (lambda t: dict(scale=t(2), scale_max=float("nan")), ValueError, "scale_max"),
        (lambda t: dict(scale=t(2), scale_max=True), ValueError, "scale_max"),
        (lambda t: dict(scale_max=16.0), ValueError, "scale_max bounds a per-head scale tensor"),
        (lambda t: dict(segment_ids=t(1, 8)), TypeError, "segment_ids must be an integer tensor"),
        (lambda t: dict(segment_ids=torch.ones(1, 8, dtype=torch.bool)), TypeError, "segment_ids must be an integer"),
        (
            lambda t: dict(segment_ids=torch.ones(1, 7, dtype=torch.long)),
            ValueError,
            "segment_ids must be (b, n) = (1, 8)",
        ),
        (lambda t: dict(segment_ids=torch.ones(8, dtype=torch.long)), ValueError, "segment_ids must be (b, n)"),
        (
            lambda t: dict(k=t(1, 1, 9, 16), v=t(1, 1, 9, 16), segment_ids=torch.ones(1, 8, dtype=torch.long)),
            ValueError,
            "q_len == k_len",
        ),
        (
            lambda t: dict(segment_ids=(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 7, dtype=torch.long))),
            ValueError,
            "k_segment_ids must be (b, j) = (1, 8); got (1, 7)",
        ),
        (
            lambda t: dict(segment_ids=(t(1, 8), torch.ones(1, 8, dtype=torch.long))),
            TypeError,
            "q_segment_ids must be an integer tensor",
        ),
        (lambda t: dict(segment_ids=[torch.ones(1, 8, dtype=torch.long)] * 3), TypeError, "a pair"),
        (
            lambda t: dict(segment_ids=torch.ones(1, 8, dtype=torch.long, device="meta")),
            ValueError,
            "segment_ids must be on cpu",
        ),
    ],
)
def test_bad_inputs_raise(make, exc, words):
    t = lambda *s: torch.randn(*s)  # noqa: E731
    args = dict(q=t(1, 2, 8, 16), k=t(1, 1, 8, 16), v=t(1, 1, 8, 16))
    args.update(make(t))
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)").replace("%", "%")):
        cosine_sim_attention(q, k, v, **args)


@pytest.mark.parametrize(
    "name,value",
    [
        ("groups", True),
        ("groups", 2.0),
        ("groups", "2"),
        ("groups", None),
        ("scale", True),
        ("scale", "10"),
        ("scale", float("nan")),
        ("causal", 1),
        ("causal", None),
        ("l2norm_qk", 0),
        ("l2norm_qk", "yes"),
        ("attn_bias_batch_dim", 1),
    ],
)
def test_bad_scalar_arguments_raise(backend_device, name, value):
    # the same refusal on every backend, before any launch, naming the argument (True is not groups=1)
    q, k, v = _inputs(1, 2, 1, 8, 8, 16, torch.float32, backend_device)
    with pytest.raises(ValueError, match=name):
        cosine_sim_attention(q, k, v, **{name: value})


def test_integer_like_scalars_accepted(seed, backend_device):
    np = pytest.importorskip("numpy")
    q, k, v = _inputs(1, 2, 1, 9, 11, 32, torch.float32, backend_device)
    o = cosine_sim_attention(q, k, v, groups=np.int64(2), scale=np.float32(5.0))
    torch.testing.assert_close(o, cosine_sim_attention(q, k, v, groups=2, scale=5.0), rtol=0, atol=0)
    torch.testing.assert_close(o, cosine_sim_attention(q, k, v, groups=2, scale=5), rtol=0, atol=0)


def test_check_attention_config():
    """The op's scalar rules, for a model to check at construction time without tensors; the op itself applies
    the same function, so both give the same message."""
    from cosattn import MAX_HEAD_DIM, MAX_SCALE, MIN_HEAD_DIM, check_attention_config

    assert (MIN_HEAD_DIM, MAX_HEAD_DIM, MAX_SCALE) == (16, 256, 100.0)
    assert check_attention_config(64, 8, 2, 10.0, 4) is None
    assert check_attention_config(MIN_HEAD_DIM, 1, 1, MAX_SCALE, 1) is None
    assert check_attention_config(dim_head=MAX_HEAD_DIM, heads=3, kv_heads=3, scale=1e-3, groups=256) is None
    bad = [
        (dict(dim_head=MIN_HEAD_DIM - 1), "dim_head"),
        (dict(dim_head=MAX_HEAD_DIM + 1), "dim_head"),
        (dict(dim_head=64.0), "dim_head"),
        (dict(dim_head=True), "dim_head"),
        (dict(heads=0), "heads"),
        (dict(heads=8.0), "heads"),
        (dict(kv_heads=3), "kv_heads"),
        (dict(kv_heads=0), "kv_heads"),
        (dict(kv_heads=False), "kv_heads"),
        (dict(scale=0.0), "scale"),
        (dict(scale=-1.0), "scale"),
        (dict(scale=MAX_SCALE * 1.01), "scale"),
        (dict(scale=float("inf")), "scale"),
        (dict(scale=True), "scale"),
        (dict(groups=3), "groups"),
        (dict(groups=0), "groups"),
        (dict(groups=True), "groups"),
        (dict(groups=2.0), "groups"),
    ]
    for change, name in bad:
        args = dict(dim_head=64, heads=8, kv_heads=2, scale=10.0, groups=4) | change
        with pytest.raises(ValueError, match=rf"\b{name}\b") as info:
            check_attention_config(**args)
        assert repr(change[name]) in str(info.value), (change, str(info.value))

    # one rule, one message: the op reports what the config check reports
    q, k, v = _inputs(1, 2, 1, 8, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError) as from_config:
        check_attention_config(16, 2, 1, 10.0, 3)
    with pytest.raises(ValueError) as from_op:
        cosine_sim_attention(q, k, v, groups=3)
    assert str(from_config.value) in str(from_op.value)


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_nan_propagates(seed, device, monkeypatch, interpret):
    # a NaN input must surface in the output (and so in the loss), never be masked out as an "empty" row
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q, k, v = _inputs(1, 2, 1, 9, 11, 16, torch.float32, device)
    q[0, 1, 4, 3] = float("nan")
    o = cosine_sim_attention(q, k, v, causal=True)
    assert torch.isnan(o[0, 1, 4]).all() and torch.isfinite(o[0, 0]).all()


# ---------------------------------------------------------------------------------------------------- load paths


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("k_inline", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_load_paths(seed, device, monkeypatch, tma, k_inline, dtype):
    """Every combination of tile loads (tensor descriptors or pointers) and k normalisation (in the loop or by a
    pre-pass), forward and backward, on ragged lengths, whole tiles, GQA, causal, a non-contiguous v, a padded head
    dim, and a key mask with a bias gradient."""
    from cosattn import ops

    monkeypatch.setattr(ops, "USE_TMA", tma)
    monkeypatch.setattr(ops, "TMA_MIN_D", 16)
    monkeypatch.setattr(ops, "TMA_MIN_N", 1)
    monkeypatch.setattr(ops, "K_INLINE_MAX_N", 1 << 30 if k_inline else 0)
    q, k, v = _inputs(2, 4, 2, 37, 45, 32, dtype, device)
    check_against_torch(q, k, v, causal=True)
    q, k, v = _inputs(1, 2, 1, 50, 19, 40, dtype, device)
    v = torch.randn(1, 1, 19, 80, device=device, dtype=dtype)[..., :40]
    check_against_torch(q, k, v, causal=False)
    q, k, v = _inputs(1, 2, 1, 64, 64, 32, dtype, device)  # whole tiles everywhere: the unmasked loads and stores
    check_against_torch(q, k, v, causal=False)
    q, k, v = _inputs(2, 2, 2, 21, 26, 16, dtype, device)
    mask = torch.rand(2, 26, device=device) > 0.3
    bias = torch.randn(2, 21, 26, device=device, dtype=dtype)
    check_against_torch(q, k, v, bias=bias, mask=mask, causal=True)


def test_k_inline_policy():
    """In-loop k normalisation only where it pays: short keys, small heads, and calls small enough to be
    host-bound; the backward asks the same question with the same arguments, so both passes agree."""
    from cosattn import ops

    assert ops._k_inline(4 * 8 * 1024, 1024, 64, 1, True)  # 4×8×1024×64: host-bound, one launch less
    assert not ops._k_inline(16 * 8 * 1024, 1024, 64, 1, True)  # 4× the work: the pre-pass is faster
    assert not ops._k_inline(4 * 8 * 2048, 2048, 64, 1, True)
    assert not ops._k_inline(4 * 16 * 1024, 1024, 128, 1, True)  # head dim above K_INLINE_MAX_D
    assert not ops._k_inline(64, 4096, 64, 1, True)  # keys above K_INLINE_MAX_N
    assert not ops._k_inline(64, 64, 64, 2, True) and not ops._k_inline(64, 64, 64, 1, False)
