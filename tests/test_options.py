"""x-transformers' option spellings: each builds the same model as this project's first spelling, `heads` defaults
to 8, disagreeing spellings of one option raise naming both, unknown names raise with a hint, `cross_attn_*`
overrides `attn_*` for cross-attention only."""

import pytest
import torch
from torch import nn

from cosformer import CrossAttender, Decoder, Encoder, Transformer, TransformerWrapper

pytestmark = pytest.mark.usefixtures("one_thread")

# (x-transformers' spelling, this project's first spelling or its plain meaning): same modules, same weights
SAME = [
    (dict(rotary_pos_emb=True), dict(rotary=True)),
    (dict(alibi_pos_bias=True), dict(alibi=True)),
    (dict(attn_dim_head=32), dict(dim_head=32)),
    (dict(attn_kv_heads=2), dict(kv_heads=2)),
    (dict(attn_one_kv_head=True), dict(kv_heads=1)),
    (dict(attn_qk_norm=True), dict(attn="cosine")),
    (dict(attn_qk_norm=False), dict(attn="regular")),
    (dict(attn_qk_norm=True, attn_qk_norm_scale=7.5, attn_qk_norm_groups=2), dict(scale=7.5, groups=2)),
    (dict(ff_no_bias=True), dict(ff_bias=False)),
    (dict(ff_mult=2, ff_glu=True, ff_swish=True), dict(ff_mult=2, ff_glu=True, ff_swish=True)),
    (dict(attn_flash=True), {}),  # accepted, nothing to switch: attention is always fused
]


@pytest.mark.parametrize("xt,ours", SAME, ids=[next(iter(xt)) for xt, _ in SAME])
def test_spellings_build_the_same_model(xt, ours):
    def build(**kwargs):
        torch.manual_seed(0)
        return Decoder(dim=32, depth=2, heads=4, cross_attend=True, **kwargs)

    a = build(**({"attn_dim_head": 16} | xt))
    b = build(**({"dim_head": 16} | ours))
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    attn_a, attn_b = a.layers[0].self_attn, b.layers[0].self_attn
    for name in ("kind", "scale", "groups", "heads", "kv_heads", "dim_head"):
        assert getattr(attn_a, name) == getattr(attn_b, name), name


def test_spellings_take_effect():
    t = Decoder(
        dim=32, depth=1, heads=4, attn_dim_head=16, attn_one_kv_head=True, attn_qk_norm=False, rotary_pos_emb=True,
        ff_mult=2, ff_swish=True, ff_no_bias=True, use_rmsnorm=True, pre_norm=True,
    )  # fmt: skip
    a, ff = t.layers[0].self_attn, t.layers[0].ff
    assert (a.dim_head, a.kv_heads, a.kind, a.scale) == (16, 1, "regular", None) and t.rotary is not None
    assert isinstance(ff.act, nn.SiLU) and ff.proj_in.bias is None and ff.proj_in.out_features == 64
    assert isinstance(t.layers[0].self_norm, nn.RMSNorm) and isinstance(t.final_norm, nn.RMSNorm)
    assert t.attn == "regular"


def test_heads_default_to_eight():
    assert CrossAttender(dim=512, depth=6).heads == 8
    assert Encoder(dim=64, depth=1, attn_dim_head=16).layers[0].self_attn.heads == 8
    assert Transformer(64, 1, attn_dim_head=16).layers[0].self_attn.heads == 8


CONFLICTS = [
    (dict(rotary=True, rotary_pos_emb=False), ("rotary_pos_emb", "rotary")),
    (dict(alibi=True, alibi_pos_bias=False), ("alibi_pos_bias", "alibi")),
    (dict(attn="regular", attn_qk_norm=True), ("attn_qk_norm", "attn")),
    (dict(attn="cosine", attn_qk_norm=False), ("attn_qk_norm", "attn")),
    (dict(dim_head=32, attn_dim_head=16), ("attn_dim_head", "dim_head")),
    (dict(kv_heads=2, attn_one_kv_head=True), ("attn_one_kv_head", "kv_heads")),
    (dict(attn_kv_heads=2, attn_one_kv_head=True), ("attn_one_kv_head", "attn_kv_heads")),
    (dict(scale=5.0, attn_qk_norm_scale=10.0), ("attn_qk_norm_scale", "scale")),
    (dict(groups=2, attn_qk_norm_groups=1), ("attn_qk_norm_groups", "groups")),
    (dict(ff_bias=True, ff_no_bias=True), ("ff_no_bias", "ff_bias")),
    (dict(cross_attn_dim_head=16, cross_attn_one_kv_head=True, cross_attn_kv_heads=2), ("cross_attn_kv_heads",)),
]


@pytest.mark.parametrize("kwargs,names", CONFLICTS, ids=[n[0] for _, n in CONFLICTS])
def test_disagreeing_spellings_raise(kwargs, names):
    with pytest.raises(ValueError, match="disagree") as info:
        Decoder(dim=32, depth=1, heads=4, cross_attend=True, **kwargs)
    for name in names:
        assert f"{name}=" in str(info.value)


def test_agreeing_spellings_are_accepted():
    pairs = dict(dim_head=16, attn_dim_head=16, rotary=True, rotary_pos_emb=True, ff_bias=False, ff_no_bias=True)
    pairs |= dict(attn="cosine", attn_qk_norm=True, kv_heads=1, attn_one_kv_head=True)
    t = Decoder(dim=32, depth=1, heads=4, **pairs)
    assert t.rotary is not None and t.layers[0].ff.proj_in.bias is None and t.layers[0].self_attn.kv_heads == 1
    # None means "not given" (the config passes unset options so)
    t = Decoder(dim=32, depth=1, heads=4, attn_dim_head=16, kv_heads=None, scale=None, attn_qk_norm_scale=7.0)
    assert t.layers[0].self_attn.scale == 7.0


@pytest.mark.parametrize(
    "key,hint",
    [("rotary_pos_embs", "rotary_pos_emb"), ("attn_qk_norm_scal", "attn_qk_norm_scale"), ("ff_swiss", "ff_swish"),
     ("use_rms_norm", "use_rmsnorm"), ("cross_attn_dim_heads", "cross_attn_dim_head")],
)  # fmt: skip
def test_unknown_option_raises_with_hint(key, hint):
    with pytest.raises(TypeError, match=f"{key}.*did you mean '{hint}'"):
        Decoder(dim=32, depth=1, heads=4, attn_dim_head=16, **{key: True})


def test_cross_attn_prefix_overrides_attn_for_cross_attention_only():
    t = Decoder(dim=32, depth=1, heads=4, cross_attend=True, attn_dim_head=32, attn_qk_norm_scale=8.0,
                cross_attn_dim_head=16, cross_attn_qk_norm=False, attn_dropout=0.1)  # fmt: skip
    s, c = t.layers[0].self_attn, t.layers[0].cross_attn
    assert (s.dim_head, s.kind, s.scale) == (32, "cosine", 8.0)
    assert (c.dim_head, c.kind, c.scale) == (16, "regular", None)
    assert s.dropout.p == c.dropout.p == 0.1  # an attn_* option reaches cross-attention unless overridden


def test_regular_attention_refuses_cosine_options_by_their_spelling():
    with pytest.raises(ValueError, match="attn_qk_norm_scale"):
        Decoder(dim=32, depth=1, heads=4, attn_dim_head=16, attn_qk_norm=False, attn_qk_norm_scale=10.0)
    with pytest.raises(ValueError, match="attn_qk_norm_groups"):
        Decoder(dim=32, depth=1, heads=4, attn_dim_head=16, attn_qk_norm=False, attn_qk_norm_groups=2)


XT_CONFIG = dict(
    dim=64, depth=2, heads=4, rotary_pos_emb=True, attn_dim_head=16, attn_kv_heads=2, attn_qk_norm=True,
    attn_qk_norm_scale=10, ff_mult=2, ff_glu=True, ff_swish=True, ff_no_bias=True, use_rmsnorm=True,
)  # fmt: skip


def test_an_x_transformers_config_runs(seed, torch_attention_path):
    model = TransformerWrapper(num_tokens=64, max_seq_len=32, attn_layers=Decoder(**XT_CONFIG))
    x = torch.randint(0, 64, (2, 17))
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (2, 17, 64) and torch.isfinite(logits).all()
