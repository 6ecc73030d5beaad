"""Model zoo tests: every option against a pure-PyTorch float64 reference of the same blocks on the same weights
(attention written out as softmax(10 · cos) for cosine and softmax(q kᵀ / sqrt(d)) for regular), masks and
causality honoured, DeepNet constants, invalid options, dropout, autocast, Accelerate, the Triton interpreter
path and torch.compile on a GPU."""

import math

import pytest
import torch
import torch.nn.functional as F
import triton  # noqa: F401  (Triton fixes its interpreter mode at first import: do it under conftest's setting)

import cosformer
from cosformer import CrossAttender, Decoder, Encoder, Transformer, TransformerWrapper, XTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# the reference: reads the module's weights, recomputes everything in float64 with explicit attention


def _lin(x, layer):
    w = layer.weight.double()
    return F.linear(x, w, layer.bias.double() if layer.bias is not None else None)


def _ln(x, norm):
    if isinstance(norm, torch.nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return x * (x.pow(2).mean(dim=-1, keepdim=True) + eps).rsqrt() * norm.weight.double()
    return F.layer_norm(x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)


def _group_l2norm(t, groups):
    g = t.unflatten(-1, (groups, -1))
    return (g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)).flatten(-2)


def _rotate_interleaved(t, theta, r):
    # x-transformers' layout: pairs (2i, 2i+1) of the first r channels as complex numbers times
    # e^{i · pos · theta^(-2i/r)}; channels [r, d) unrotated
    n = t.shape[-2]
    freqs = theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
    pairs = torch.view_as_complex(t[..., :r].unflatten(-1, (-1, 2)).contiguous())
    z = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((torch.view_as_real(z).flatten(-2), t[..., r:]), dim=-1)


def _slopes(h):
    def geometric(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(math.log2(h))
    s = geometric(p) + geometric(2 * p)[0::2][: h - p]
    return torch.tensor(s, dtype=torch.float64)


def ref_t5_bias(rel_pos, i, j, causal):
    """T5's bucketed bias, element by element: (h, i, j)."""
    buckets, max_distance = rel_pos.num_buckets, rel_pos.max_distance
    idx = torch.zeros(i, j, dtype=torch.long)
    for r in range(i):
        for c in range(j):
            rel = c - (r + j - i)  # key position − query position
            if causal:
                offset, n, nb = 0, max(-rel, 0), buckets
            else:
                nb = buckets // 2
                offset, n = (nb if rel > 0 else 0), abs(rel)
            exact = nb // 2
            if n < exact:
                idx[r, c] = offset + n
            else:
                far = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (nb - exact))
                idx[r, c] = offset + min(far, nb - 1)
    return rel_pos.relative_attention_bias.weight.double()[idx].permute(2, 0, 1) * rel_pos.scale


def ref_dynamic_bias(rel_pos, i, j):
    """The dynamic position bias' MLP applied to every (query, key) distance: (h, i, j)."""
    dist = (torch.arange(i)[:, None] + (j - i) - torch.arange(j)[None]).double()[..., None]  # (i, j, 1)
    if rel_pos.log_distance:
        dist = torch.sign(dist) * torch.log(dist.abs() + 1)
    t = dist
    for layer in rel_pos.mlp:
        if isinstance(layer, torch.nn.Linear):
            t = _lin(t, layer)
        elif isinstance(layer, torch.nn.LayerNorm):
            t = _ln(t, layer)
        elif isinstance(layer, torch.nn.SiLU):
            t = F.silu(t)
    return t.permute(2, 0, 1)


def ref_attention(mod, x, src, *, key_mask, cfg, rotary, bias=None, value_residual=None):
    """Returns (output, this layer's own values (b, hk, j, d), attention weights (b, h, i, mem + j))."""
    h, hk, d = mod.heads, mod.kv_heads, mod.dim_head
    b, i, j = x.shape[0], x.shape[1], src.shape[1]
    cosine = mod.kind == "cosine"
    q = _lin(x, mod.to_q).view(b, i, h, d).transpose(1, 2)
    k = _lin(src, mod.to_k).view(b, j, hk, d).transpose(1, 2)
    v = values = _lin(src, mod.to_v).view(b, j, hk, d).transpose(1, 2)
    if value_residual is not None:
        mix = 0.5
        if mod.to_value_residual_mix is not None:
            mix = torch.sigmoid(_lin(x, mod.to_value_residual_mix)).transpose(1, 2)[..., None]  # (b, hk, i, 1)
        v = (1 - mix) * value_residual + mix * v
    if cosine:
        q, k = _group_l2norm(q, mod.groups), _group_l2norm(k, mod.groups)
    if rotary:
        r = cfg.get("rotary_emb_dim") or d // 2  # x-transformers' default: half the head rotates
        q, k = _rotate_interleaved(q, 10000.0, r), _rotate_interleaved(k, 10000.0, r)
    if cfg["alibi"] and not mod.cross:
        dist = (torch.arange(i)[:, None] + (j - i) - torch.arange(j)[None]).abs().double()
        bias = -_slopes(h)[:, None, None] * dist
    n_mem = mod.num_mem_kv
    if n_mem:  # learned keys first: normalised like the others under cosine, never rotated, no position bias
        mem_k = mod.mem_k.double()[None].expand(b, -1, -1, -1)
        k = torch.cat((_group_l2norm(mem_k, mod.groups) if cosine else mem_k, k), dim=2)
        v = torch.cat((mod.mem_v.double()[None].expand(b, -1, -1, -1), v), dim=2)
        if bias is not None:
            bias = F.pad(bias, (n_mem, 0))
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    s = (mod.scale * q @ k.transpose(-1, -2)) if cosine else (q @ k.transpose(-1, -2) / math.sqrt(d))
    if bias is not None:
        s = s + bias
    jt = j + n_mem
    vis = torch.ones(b, 1, i, jt, dtype=torch.bool)
    if mod.causal:
        vis = vis & (torch.arange(jt)[None] <= torch.arange(i)[:, None] + (jt - i))
    if key_mask is not None:
        vis = vis & F.pad(key_mask, (n_mem, 0), value=True)[:, None, None, :]
    p = s.masked_fill(~vis, float("-inf")).softmax(dim=-1).nan_to_num(0.0)  # rows with no key: zeros
    out = p @ v  # (b, h, i, d)
    if mod.to_v_head_gate is not None:
        out = out * torch.sigmoid(_lin(x, mod.to_v_head_gate)).transpose(1, 2)[..., None]
    out = out.transpose(1, 2).reshape(b, i, h * d)
    if mod.to_v_gate is not None:
        out = out * torch.sigmoid(_lin(x, mod.to_v_gate))
    return _lin(out, mod.to_out), values, p


def ref_ff(ff, x, glu, swish=False):
    act = F.silu if swish else F.gelu
    hid = _lin(x, ff.proj_in)
    if glu:
        a, gate = hid.chunk(2, dim=-1)
        hid = a * act(gate)
    else:
        hid = act(hid)
    return _lin(hid, ff.proj_out)


def ref_layers(layers, h, cfg, mask=None, context=None, context_mask=None, maps=None):
    """The stack on float64 embeddings h (b, n, dim); appends every attention's weights to `maps` if given."""
    depth, pre_norm = len(layers.layers), layers.pre_norm
    alpha = (2 * depth) ** 0.25  # DeepNet, post-LN
    ctx = context.double() if context is not None else None
    n = h.shape[1]
    bias = None
    if cfg.get("rel_pos") == "t5":
        bias = ref_t5_bias(layers.rel_pos, n, n, layers.causal)
    elif cfg.get("rel_pos") == "dynamic":
        bias = ref_dynamic_bias(layers.rel_pos, n, n)

    def sublayer(h, norm, f):
        return h + f(_ln(h, norm)) if pre_norm else _ln(alpha * h + f(h), norm)

    first = {}  # the value residual's sources: the first self- and cross-attention's values

    def attend(mod, t, src, kind, **kwargs):
        vr = first.get(kind) if layers.add_value_residual else None
        out, values, p = ref_attention(mod, t, src, cfg=cfg, value_residual=vr, **kwargs)
        first.setdefault(kind, values)
        if maps is not None:
            maps.append(p)
        return out

    for blk in layers.layers:
        if blk.self_attn is not None:
            a = blk.self_attn
            h = sublayer(
                h,
                blk.self_norm,
                lambda t, a=a: attend(a, t, t, "self", key_mask=mask, rotary=layers.rotary is not None, bias=bias),
            )
        if blk.cross_attn is not None:
            a = blk.cross_attn
            h = sublayer(
                h, blk.cross_norm, lambda t, a=a: attend(a, t, ctx, "cross", key_mask=context_mask, rotary=False)
            )
        h = sublayer(h, blk.ff_norm, lambda t, blk=blk: ref_ff(blk.ff, t, cfg["ff_glu"], cfg["ff_swish"]))
    if pre_norm:
        h = _ln(h, layers.final_norm)
    return h


def ref_memory_tokens(model, h, mask):
    """Prepends the wrapper's memory tokens (unmasked) to h and, if given, to the mask."""
    n_mem = model.num_memory_tokens
    if n_mem:
        h = torch.cat((model.memory_tokens.double()[None].expand(h.shape[0], -1, -1), h), dim=1)
        mask = F.pad(mask, (n_mem, 0), value=True) if mask is not None else None
    return h, mask


def ref_wrapper(model, x, cfg, mask=None, context=None, context_mask=None, return_embeddings=False, maps=None):
    """The token wrapper's logits (or embeddings) in float64."""
    h = model.token_emb.weight.double()[x]
    if model.pos_emb is not None:
        h = h + model.pos_emb.emb.weight.double()[: x.shape[1]]
    if isinstance(model.post_emb_norm, torch.nn.LayerNorm):
        h = _ln(h, model.post_emb_norm)
    if isinstance(model.project_emb, torch.nn.Linear):
        h = _lin(h, model.project_emb)
    h, mask = ref_memory_tokens(model, h, mask)
    h = ref_layers(model.attn_layers, h, cfg, mask, context, context_mask, maps)[:, model.num_memory_tokens :]
    if return_embeddings:
        return h
    w = model.token_emb.weight if model.tie_embedding else model.to_logits.weight
    return h @ w.double().t()


# ---------------------------------------------------------------------------------------------------------------

BASE = dict(
    attn="cosine", pre_norm=False, kv_heads=None, groups=1, rotary=False, alibi=False, ff_glu=False, scale=None,
    ff_swish=False, ff_no_bias=False, use_rmsnorm=False,
)  # fmt: skip
# options the reference reads from the module (or from `rel_pos` / `add_value_residual` in the case)
EXTRA = (
    "attn_num_mem_kv", "attn_gate_values", "attn_gate_value_heads", "add_value_residual", "learned_value_residual_mix",
    "rel_pos_bias", "rel_pos_num_buckets", "rel_pos_max_distance", "dynamic_pos_bias", "dynamic_pos_bias_log_distance",
    "dynamic_pos_bias_norm", "dynamic_pos_bias_mlp_depth", "rotary_emb_dim",
)  # fmt: skip
T5 = dict(rel_pos="t5", rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=10)  # log buckets from 2 or 4
DPB = dict(rel_pos="dynamic", dynamic_pos_bias=True)

CASES = {
    "cosine": {},
    "cosine-prenorm": dict(pre_norm=True),
    "cosine-gqa": dict(kv_heads=1),
    "cosine-groups-rotary": dict(groups=2, rotary=True),
    "cosine-groups-rotary-whole-head": dict(groups=2, rotary=True, rotary_emb_dim=16),
    "cosine-alibi": dict(alibi=True),
    "cosine-alibi-cross": dict(alibi=True, cross=True),  # ALiBi on the self-attention of a cross-attending stack
    "cosine-glu-scale": dict(ff_glu=True, scale=7.5),
    "cosine-cross": dict(cross=True),
    "regular": dict(attn="regular"),
    "regular-prenorm-gqa": dict(attn="regular", pre_norm=True, kv_heads=1),
    "regular-rotary": dict(attn="regular", rotary=True),
    "regular-rotary-quarter": dict(attn="regular", rotary=True, rotary_emb_dim=4),
    "regular-alibi": dict(attn="regular", alibi=True),
    "regular-glu-cross": dict(attn="regular", ff_glu=True, cross=True),
    "cosine-rmsnorm-swiglu": dict(use_rmsnorm=True, ff_glu=True, ff_swish=True),
    "cosine-prenorm-rmsnorm-cross": dict(pre_norm=True, use_rmsnorm=True, cross=True),
    "regular-swish-nobias": dict(attn="regular", ff_swish=True, ff_no_bias=True),
    "cosine-memkv-gates-cross": dict(attn_num_mem_kv=3, attn_gate_values=True, attn_gate_value_heads=True, cross=True),
    "cosine-memkv-groups-rotary-gqa": dict(attn_num_mem_kv=2, groups=2, rotary=True, kv_heads=2),
    "cosine-memkv-alibi": dict(attn_num_mem_kv=2, alibi=True),
    "regular-memkv-gates-prenorm": dict(attn="regular", attn_num_mem_kv=2, attn_gate_values=True, pre_norm=True),
    "cosine-value-residual-cross": dict(add_value_residual=True, cross=True, kv_heads=2),
    "regular-value-residual-fixed": dict(attn="regular", add_value_residual=True, learned_value_residual_mix=False),
    "cosine-t5": T5,
    "regular-t5-cross-memkv": T5 | dict(attn="regular", cross=True, attn_num_mem_kv=2),
    "cosine-dynamic-log-norm": DPB | dict(dynamic_pos_bias_log_distance=True, dynamic_pos_bias_norm=True),
    "regular-dynamic-prenorm": DPB | dict(attn="regular", pre_norm=True),
}


def build(cfg, *, causal, heads=3, dim=24, dim_head=16, depth=3, num_tokens=29, max_seq_len=32, dim_context=None):
    kw = {k: v for k, v in cfg.items() if k in BASE or k in EXTRA}
    if cfg.get("kv_heads"):
        heads = 4
    cross = cfg.get("cross", False)
    layers = Transformer(
        dim,
        depth,
        heads,
        causal=causal,
        dim_head=dim_head,
        cross_attend=cross,
        dim_context=dim_context if cross else None,
        ff_mult=2,
        **kw,
    )
    with torch.no_grad():  # gates and mixes start constant (zero weights): make them depend on their input
        for name, p in layers.named_parameters():
            if "gate" in name or "value_residual_mix" in name:
                p.normal_(0.0, 0.5)
    return TransformerWrapper(num_tokens=num_tokens, max_seq_len=max_seq_len, attn_layers=layers, use_abs_pos_emb=True)


@pytest.mark.parametrize("causal", [False, True], ids=["enc", "dec"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, causal, seed, torch_attention_path):
    cfg = BASE | CASES[case]
    b, n, m, dim_context = 2, 13, 7, 20
    model = build(cfg, causal=causal, dim_context=dim_context)
    x = torch.randint(0, 29, (b, n))
    mask = torch.rand(b, n) > 0.3
    mask[1] = True  # one row unpadded, one with holes (possibly a query with no visible key)
    context = context_mask = None
    if cfg.get("cross"):
        context = torch.randn(b, m, dim_context)
        context_mask = torch.rand(b, m) > 0.4
        context_mask[0, 0] = True
    kwargs = dict(mask=mask, context=context, context_mask=context_mask)

    logits = model(x, **kwargs)
    assert logits.shape == (b, n, 29)
    expected = ref_wrapper(model, x, cfg, **kwargs)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=1e-4)

    # gradients of both flow into the same fp32 parameters
    upstream = torch.randn_like(logits)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logits * upstream).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((expected * upstream.double()).sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:
            continue
        assert g is not None and torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref.float(), atol=5e-4, rtol=1e-3)

    emb = model(x, return_embeddings=True, **kwargs)
    assert emb.shape == (b, n, 24)
    torch.testing.assert_close(
        emb.double(), ref_wrapper(model, x, cfg, return_embeddings=True, **kwargs), atol=2e-4, rtol=1e-4
    )


WRAPPER_CASES = {
    "emb_dim-post_emb_norm-logits_dim": dict(emb_dim=16, post_emb_norm=True, logits_dim=11),
    "tied-post_emb_norm": dict(tie_embedding=True, post_emb_norm=True),
}


@pytest.mark.parametrize("case", list(WRAPPER_CASES))
def test_wrapper_options_match_reference(case, seed, torch_attention_path):
    layers = Decoder(dim=24, depth=2, heads=3, attn_dim_head=16, ff_mult=2)
    model = TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=layers, **WRAPPER_CASES[case])
    x = torch.randint(0, 29, (2, 13))
    logits = model(x)
    expected = ref_wrapper(model, x, BASE)
    assert logits.shape == (2, 13, WRAPPER_CASES[case].get("logits_dim", 29))
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=1e-4)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_return_only_embed_has_no_logits_layer(seed, torch_attention_path):
    layers = Encoder(dim=24, depth=1, heads=3, attn_dim_head=16)
    model = TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=layers, return_only_embed=True)
    assert model.to_logits is None
    x = torch.randint(0, 29, (2, 9))
    out = model(x)
    torch.testing.assert_close(out.double(), ref_wrapper(model, x, BASE, return_embeddings=True), atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="logits_dim"):
        TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=layers, return_only_embed=True, logits_dim=3)
    with pytest.raises(ValueError, match="emb_dim"):
        TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=layers, tie_embedding=True, emb_dim=8)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_cross_attender_and_tied_embedding(attn, seed, torch_attention_path):
    layers = CrossAttender(dim=32, depth=2, heads=2, dim_head=16, attn=attn, pre_norm=True)
    model = TransformerWrapper(num_tokens=17, max_seq_len=16, attn_layers=layers, tie_embedding=True)
    assert all(blk.self_attn is None for blk in layers.layers)
    x, context = torch.randint(0, 17, (3, 9)), torch.randn(3, 5, 32)
    context_mask = torch.rand(3, 5) > 0.5
    out = model(x, context=context, context_mask=context_mask)
    cfg = BASE | dict(attn=attn, pre_norm=True)
    expected = ref_wrapper(model, x, cfg, context=context, context_mask=context_mask)
    torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=1e-4)
    out.sum().backward()
    assert model.token_emb.weight.grad is not None and model.to_logits is None


@pytest.mark.parametrize("attn", ["cosine", "regular"])
@pytest.mark.parametrize(
    "opts", [{}, dict(rotary=True), dict(alibi=True, kv_heads=1, heads=2)], ids=["abs", "rot", "alibi"]
)
def test_masked_keys_do_not_leak(attn, opts, seed, torch_attention_path):
    opts = dict(opts)
    heads = opts.pop("heads", 2)
    model = TransformerWrapper(
        num_tokens=50, max_seq_len=20, attn_layers=Encoder(dim=32, depth=2, heads=heads, dim_head=16, attn=attn, **opts)
    ).eval()
    x = torch.randint(0, 50, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, [2, 7, 10]] = False
    mask[1, 4:] = False
    y = x.clone()
    y[~mask] = torch.randint(0, 50, (int((~mask).sum()),))
    a, b = model(x, mask=mask), model(y, mask=mask)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(y), model(x), atol=1e-3)  # the change is visible without the mask


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_causal_future_does_not_leak(attn, seed, torch_attention_path):
    model = TransformerWrapper(
        num_tokens=50, max_seq_len=20, attn_layers=Decoder(dim=32, depth=2, heads=2, dim_head=16, attn=attn)
    ).eval()
    x = torch.randint(0, 50, (2, 15))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(model(x)[:, :9], model(y)[:, :9], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x)[:, 9:], model(y)[:, 9:], atol=1e-3)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_masked_context_does_not_leak(attn, seed, torch_attention_path):
    layers = Decoder(dim=32, depth=2, heads=2, dim_head=16, attn=attn, cross_attend=True, dim_context=24)
    model = TransformerWrapper(num_tokens=50, max_seq_len=20, attn_layers=layers).eval()
    x, context = torch.randint(0, 50, (2, 10)), torch.randn(2, 6, 24)
    context_mask = torch.tensor([[True, False, True, True, False, False], [False, False, True, False, False, False]])
    other = torch.where(context_mask[..., None], context, torch.randn_like(context) * 5)
    a = model(x, context=context, context_mask=context_mask)
    b = model(x, context=other, context_mask=context_mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x, context=context), model(x, context=other), atol=1e-3)


def test_deepnet_constants(seed):
    depth = 4
    post = Transformer(dim=256, depth=depth, heads=4, dim_head=64)
    alpha, beta = (2 * depth) ** 0.25, (8 * depth) ** -0.25
    assert post.alpha == pytest.approx(alpha) and post.beta == pytest.approx(beta)
    assert all(blk.alpha == pytest.approx(alpha) for blk in post.layers)

    def gain(linear):
        fan_out, fan_in = linear.weight.shape
        return linear.weight.std().item() / math.sqrt(2.0 / (fan_in + fan_out))

    for blk in post.layers:
        a, ff = blk.self_attn, blk.ff
        assert gain(a.to_q) == pytest.approx(1.0, rel=0.05) and gain(a.to_k) == pytest.approx(1.0, rel=0.05)
        for lin in (a.to_v, a.to_out, ff.proj_in, ff.proj_out):
            assert gain(lin) == pytest.approx(beta, rel=0.05)
        assert (ff.proj_in.bias == 0).all()

    pre = Transformer(dim=256, depth=depth, heads=4, dim_head=64, pre_norm=True)
    assert pre.alpha == 1.0 and isinstance(pre.final_norm, torch.nn.LayerNorm)
    assert gain(pre.layers[0].self_attn.to_v) == pytest.approx(1.0, rel=0.05)

    # alpha scales the residual: one post-LN sublayer is LN(alpha · x + f(x))
    blk, x = post.layers[0], torch.randn(2, 5, 256)
    expected = blk.ff_norm(alpha * x + blk.ff(x))
    torch.testing.assert_close(blk._out(x, blk.ff(blk._in(x, blk.ff_norm)), blk.ff_norm), expected)


INVALID = [
    (dict(attn="flash"), "attn"),
    (dict(heads=4, kv_heads=3), "kv_heads"),
    (dict(groups=3), "groups"),
    (dict(rotary=True, alibi=True), "rotary"),
    (dict(dim_head=8), "dim_head"),
    (dict(attn="regular", groups=2), "groups"),
    (dict(attn="regular", scale=5.0), "scale"),
    (dict(scale=0.0), "scale"),
    (dict(dropout=1.0), "dropout"),
    (dict(dim_context=16), "dim_context"),
    (dict(rotary=True, dim_head=18, groups=2), "rotary"),
    (dict(rotary=True, rotary_emb_dim=7), "rotary_emb_dim"),
    (dict(rotary=True, rotary_emb_dim=18, dim_head=16), "rotary_emb_dim"),
    (dict(rotary_emb_dim=8), "rotary_emb_dim"),
    (dict(depth=0), "depth"),
    (dict(only_cross=True), "only_cross"),
]


@pytest.mark.parametrize("kwargs,name", INVALID, ids=[n + str(i) for i, (_, n) in enumerate(INVALID)])
def test_invalid_options_raise(kwargs, name):
    args = dict(dim=32, depth=1, heads=2, dim_head=16) | kwargs
    with pytest.raises(ValueError, match=name):
        Transformer(**args)


def test_invalid_usage_raises(torch_attention_path):
    with pytest.raises(ValueError, match="causal"):
        Decoder(dim=32, depth=1, heads=2, causal=False)
    with pytest.raises(ValueError, match="alibi"):
        CrossAttender(dim=32, depth=1, heads=2, dim_head=16, alibi=True)
    with pytest.raises(TypeError, match="attn_foo"):
        Transformer(dim=32, depth=1, heads=2, dim_head=16, attn_foo=1)
    model = TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Encoder(dim=32, depth=1, heads=2, dim_head=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        model(torch.zeros(1, 5, dtype=torch.long), mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 5, dtype=torch.long), context=torch.randn(1, 3, 32))
    dec = TransformerWrapper(
        num_tokens=10, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1, heads=2, dim_head=16, cross_attend=True)
    )
    with pytest.raises(ValueError, match="context is required"):
        dec(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="tie_token_emb"):
        XTransformer(
            dim=32, enc_num_tokens=10, enc_depth=1, enc_heads=2, enc_max_seq_len=8, dec_num_tokens=11, dec_depth=1,
            dec_heads=2, dec_max_seq_len=8, tie_token_emb=True, dim_head=16,
        )  # fmt: skip


def test_prefixed_kwargs_are_routed():
    t = Transformer(dim=32, depth=1, heads=2, dim_head=16, attn_dropout=0.25, ff_dropout=0.5, ff_bias=False)
    blk = t.layers[0]
    assert blk.self_attn.dropout.p == 0.25 and blk.ff.dropout.p == 0.5 and blk.ff.proj_in.bias is None


def test_abs_pos_emb_default_follows_relative_positions():
    def wrap(**kw):
        return TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Encoder(dim=32, depth=1, heads=2, **kw))

    assert wrap().pos_emb is not None
    assert wrap(rotary=True).pos_emb is None and wrap(alibi=True).pos_emb is None
    forced = TransformerWrapper(
        num_tokens=10, max_seq_len=8, attn_layers=Encoder(dim=32, depth=1, heads=2, rotary=True), use_abs_pos_emb=True
    )
    assert forced.pos_emb is not None


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_dropout_in_train_mode(attn, seed, torch_attention_path):
    layers = Decoder(dim=32, depth=2, heads=2, dim_head=16, attn=attn, dropout=0.3)
    model = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=layers, emb_dropout=0.1)
    x = torch.randint(0, 20, (2, 12))
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_bf16_autocast(attn, seed, torch_attention_path):
    layers = Decoder(dim=64, depth=2, heads=4, dim_head=16, kv_heads=2, attn=attn, rotary=True, cross_attend=True)
    model = cosformer.AutoregressiveWrapper(TransformerWrapper(num_tokens=40, max_seq_len=32, attn_layers=layers))
    x, context = torch.randint(0, 40, (2, 20)), torch.randn(2, 5, 64)
    loss32 = model(x, context=context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(x, context=context)
    loss16.backward()
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_accelerate_step(seed, torch_attention_path, monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    # Accelerate's state is process-wide: another test may have set it up on a GPU already
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    model = cosformer.AutoregressiveWrapper(
        TransformerWrapper(num_tokens=30, max_seq_len=16, attn_layers=Decoder(dim=32, depth=1, heads=2, dim_head=16))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    x = torch.randint(0, 30, (4, 16))
    losses = []
    for _ in range(5):
        loss = model(x)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert losses[-1] < losses[0]


def test_xtransformer_loss_and_routing(seed, torch_attention_path):
    model = XTransformer(
        dim=32, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=12, dec_num_tokens=20, dec_depth=2,
        dec_heads=2, dec_max_seq_len=10, tie_token_emb=True, dim_head=16, enc_attn="regular", dec_rotary=True,
        dec_emb_dropout=0.1,
    )  # fmt: skip
    assert model.encoder.attn_layers.attn == "regular" and model.decoder.net.attn_layers.attn == "cosine"
    assert model.decoder.net.attn_layers.rotary is not None and model.decoder.net.pos_emb is None
    assert model.decoder.net.token_emb is model.encoder.token_emb
    assert model.decoder.net.emb_dropout.p == 0.1 and len(model.decoder.net.attn_layers.layers) == 2
    src, tgt = torch.randint(0, 20, (2, 12)), torch.randint(0, 20, (2, 10))
    src_mask = torch.ones(2, 12, dtype=torch.bool)
    src_mask[1, 8:] = False
    loss = model(src, tgt, mask=src_mask)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.encoder.token_emb.weight.grad is not None


@pytest.mark.parametrize("tie_token_emb", [False, True], ids=["untied", "tied"])
def test_xtransformer_every_parameter_gets_a_gradient(tie_token_emb, seed, torch_attention_path):
    """DDP refuses a parameter without a gradient: the encoder must keep no logits layer it never uses."""
    model = XTransformer(
        dim=32, enc_num_tokens=20, enc_depth=1, enc_max_seq_len=12, dec_num_tokens=20, dec_depth=1,
        dec_max_seq_len=10, attn_dim_head=16, tie_token_emb=tie_token_emb,
    )  # fmt: skip
    assert model.encoder.to_logits is None and model.encoder.attn_layers.heads == 8
    src, tgt = torch.randint(0, 20, (2, 12)), torch.randint(0, 20, (2, 10))
    model(src, tgt).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused


def assert_triton_matches_torch_path(model, x, monkeypatch):
    """Output and every parameter gradient of `model(x)` through the op's Triton kernels (interpreted on CPU) and
    through its PyTorch path. The parameters keep the PyTorch path's gradients."""
    pytest.importorskip("cosattn.ops", reason="the Triton kernels of cosattn are not importable")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    out_triton = model(x)
    out_triton.sum().backward()
    grads_triton = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out_torch = model(x)
    out_torch.sum().backward()
    torch.testing.assert_close(out_triton, out_torch, atol=1e-4, rtol=1e-4)
    for g, p in zip(grads_triton, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-3)


def test_triton_interpreter_matches_torch_path(seed, monkeypatch):
    """Runs the fused op's Triton kernels (interpreted on CPU) inside the model; tiny on purpose."""
    layers = Decoder(dim=32, depth=1, heads=2, dim_head=16)
    model = TransformerWrapper(num_tokens=16, max_seq_len=8, attn_layers=layers)
    assert_triton_matches_torch_path(model, torch.randint(0, 16, (1, 8)), monkeypatch)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_compile_fullgraph_traces_without_breaks(attn, seed, torch_attention_path):
    """fullgraph=True fails on any graph break in the model code; aot_eager also traces the backward."""
    layers = Decoder(dim=32, depth=1, heads=2, dim_head=16, kv_heads=1, attn=attn, rotary=True, cross_attend=True)
    model = cosformer.AutoregressiveWrapper(TransformerWrapper(num_tokens=30, max_seq_len=16, attn_layers=layers))
    x, context = torch.randint(0, 30, (2, 16)), torch.randn(2, 5, 32)
    context_mask = torch.rand(2, 5) > 0.3
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, context=context, context_mask=context_mask)
    loss.backward()
    torch.testing.assert_close(loss, model(x, context=context, context_mask=context_mask))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_compile_fullgraph_bf16(attn, seed):
    layers = Decoder(dim=128, depth=2, heads=4, dim_head=32, kv_heads=2, attn=attn, rotary=True, cross_attend=True)
    model = cosformer.AutoregressiveWrapper(
        TransformerWrapper(num_tokens=64, max_seq_len=256, attn_layers=layers)
    ).cuda()
    x, context = torch.randint(0, 64, (2, 200), device="cuda"), torch.randn(2, 17, 128, device="cuda")
    context_mask = torch.rand(2, 17, device="cuda") > 0.3
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_eager = model(x, context=context, context_mask=context_mask)
        loss_compiled = compiled(x, context=context, context_mask=context_mask)
    loss_compiled.backward()
    assert torch.isfinite(loss_compiled)
    torch.testing.assert_close(loss_compiled, loss_eager, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
