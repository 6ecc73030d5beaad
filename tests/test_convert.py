"""`from_x_transformers`: x-transformers models (random init, seeded) converted to cosformer give the same logits
(float32, to a tolerance set by float32 rounding), the same loss and the same greedy tokens; options cosformer
cannot express raise naming the x-transformers option; every weight is accounted for both ways."""

import pytest
import torch
from torch import nn

import cosformer
from cosformer import from_x_transformers
from cosformer.positional import RotaryEmbedding, apply_rotary

xt = pytest.importorskip("x_transformers")

pytestmark = pytest.mark.usefixtures("one_thread", "torch_attention_path")

NUM_TOKENS, MAX_SEQ_LEN, DIM = 61, 48, 64
# logits agree to this fraction of the largest logit: ~80 float32 ulps (2^-23 ≈ 1.2e-7) for two blocks whose
# operations round in a different order (observed: under 10 ulps)
TOL = 1e-5

# every rotated pair in both l2norm groups: rotary over the whole head
GROUPS_GQA_ROTARY = dict(
    heads=4, attn_dim_head=32, attn_qk_norm=True, attn_qk_norm_scale=10, attn_qk_norm_groups=2, attn_kv_heads=2,
    rotary_pos_emb=True, rotary_emb_dim=32,
)  # fmt: skip
# name -> (x-transformers stack class name, stack options, wrapper options)
CONFIGS = {
    "prenorm-regular": ("Decoder", dict(heads=4, attn_dim_head=16), {}),
    "qknorm-scale10": ("Decoder", dict(heads=4, attn_dim_head=16, attn_qk_norm=True, attn_qk_norm_scale=10), {}),
    "qknorm-groups2-gqa-rotary": ("Decoder", GROUPS_GQA_ROTARY, {}),
    "swiglu-tied-memkv": (
        "Decoder",
        dict(heads=4, attn_dim_head=16, ff_glu=True, ff_swish=True, ff_no_bias=True, attn_num_mem_kv=3),
        dict(tie_embedding=True),
    ),
    "encoder-abs-qknorm-geglu": (
        "Encoder",
        dict(heads=4, attn_dim_head=16, attn_qk_norm=True, attn_qk_norm_scale=8, ff_glu=True, ff_mult=3),
        {},
    ),
    "rmsnorm-mqa-rotary-memory-tokens": (
        "Decoder",
        dict(heads=4, attn_dim_head=16, attn_one_kv_head=True, rotary_pos_emb=True, use_rmsnorm=True, ff_no_bias=True),
        dict(num_memory_tokens=2, post_emb_norm=True, emb_dim=40),
    ),
    "regular-gqa-logits-dim-emb-dim": (
        "Decoder",
        dict(heads=4, attn_dim_head=16, attn_kv_heads=2),
        dict(logits_dim=7, emb_dim=48),
    ),
    # one head as wide as dim: x-transformers has no output projection (Identity), cosformer an identity matrix
    "encoder-one-head-return-only-embed": ("Encoder", dict(heads=1, attn_dim_head=DIM), dict(return_only_embed=True)),
}
# language models: causal, with logits over the tokens
CAUSAL = [name for name, (cls, _, wrapper) in CONFIGS.items() if cls == "Decoder" and "logits_dim" not in wrapper]


def make_xt(name: str, seed: int, depth: int = 2):
    cls, layer_kwargs, wrapper_kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    layers = getattr(xt, cls)(dim=DIM, depth=depth, **layer_kwargs)
    return xt.TransformerWrapper(
        num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, attn_layers=layers, **wrapper_kwargs
    ).eval()


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Returns the largest difference as a fraction of the largest logit."""
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=TOL * scale)
    return (ours - theirs).abs().max().item() / scale


@pytest.mark.parametrize("n", [1, 17, 31])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_logits(name, n, seed):
    theirs = make_xt(name, seed)
    ours = from_x_transformers(theirs)
    assert isinstance(ours, cosformer.TransformerWrapper) and not ours.training
    x = torch.randint(0, NUM_TOKENS, (2, n))
    with torch.no_grad():
        assert_logits_close(ours(x), theirs(x))


def test_options_read_from_the_module_tree(seed):
    ours = from_x_transformers(make_xt("qknorm-groups2-gqa-rotary", seed)).attn_layers
    attn = ours.layers[0].self_attn
    assert (ours.pre_norm, ours.causal, ours.depth, ours.attn) == (True, True, 2, "cosine")
    assert (attn.heads, attn.kv_heads, attn.dim_head, attn.scale, attn.groups) == (4, 2, 32, 10.0, 2)
    assert ours.rotary.dim == 32 and ours.rotary.inv_freq[1].item() == pytest.approx(10000.0 ** (-2 / 32))
    ours = from_x_transformers(make_xt("rmsnorm-mqa-rotary-memory-tokens", seed))
    assert ours.num_memory_tokens == 2 and ours.attn_layers.rotary.dim == 8  # x-transformers' dim_head // 2
    assert isinstance(ours.attn_layers.final_norm, nn.RMSNorm) and ours.pos_emb is None
    assert ours.attn_layers.layers[0].self_attn.kv_heads == 1 and ours.attn_layers.layers[0].ff.proj_in.bias is None
    encoder = from_x_transformers(make_xt("encoder-abs-qknorm-geglu", seed))
    assert not encoder.attn_layers.causal and encoder.pos_emb is not None
    assert encoder.attn_layers.layers[0].ff.proj_out.in_features == 3 * DIM


def test_tied_embedding_scale_is_folded_into_the_final_norm(seed):
    theirs = make_xt("swiglu-tied-memkv", seed)
    ours = from_x_transformers(theirs)
    assert ours.tie_embedding and ours.to_logits is None
    scale = getattr(theirs, "tie_embedding_scale", 1.0)  # dim^-0.5 since x-transformers 2.30, 1 before
    x = torch.randint(0, NUM_TOKENS, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, return_embeddings=True), theirs(x, return_embeddings=True) * scale)
        # ff_glu + ff_no_bias: x-transformers' GLU keeps its bias, the output bias is cosformer's only, at zero
        ff = ours.attn_layers.layers[0].ff
        assert ff.proj_in.bias is not None and not ff.proj_out.bias.any()


@pytest.mark.parametrize("name", CAUSAL)
def test_same_loss_and_greedy_tokens(name, seed):
    theirs = xt.AutoregressiveWrapper(make_xt(name, seed), pad_value=3)
    ours = from_x_transformers(theirs)
    assert isinstance(ours, cosformer.AutoregressiveWrapper) and ours.pad_value == 3
    x = torch.randint(0, NUM_TOKENS, (3, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=TOL, atol=0.0)
    prompts = torch.randint(0, NUM_TOKENS, (3, 5))
    expected = theirs.generate(prompts, 15, temperature=0.0)  # x-transformers: temperature 0 is the argmax
    assert torch.equal(ours.generate(prompts, 15, temperature=0.0), expected)
    if theirs.net.num_memory_tokens:
        return  # cosformer refuses left padding with memory tokens, which would take the padding's positions
    # prompts of different lengths, left-padded inside generate by both libraries
    lens = torch.tensor([5, 2, 4])
    expected = theirs.generate(prompts, 9, temperature=0.0, prompt_lens=lens)
    assert torch.equal(ours.generate(prompts, 9, temperature=0.0, prompt_lens=lens), expected)


def test_training_mode_and_dropouts_carry_over(seed):
    torch.manual_seed(seed)
    theirs = xt.TransformerWrapper(
        num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, emb_dropout=0.1,
        attn_layers=xt.Decoder(dim=DIM, depth=1, heads=4, attn_dim_head=16, ff_dropout=0.2, attn_sublayer_dropout=0.3),
    )  # fmt: skip
    ours = from_x_transformers(theirs)
    assert ours.training and ours.emb_dropout.p == 0.1
    block = ours.attn_layers.layers[0]
    assert block.ff.dropout.p == 0.2 and block.self_attn.dropout.p == 0.3


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("whole_head", [False, True])
def test_rotation_keeps_every_l2norm_group_unit_norm(groups, whole_head, seed):
    """The fused op is told the rotated q, k are normalised already: every group must stay unit-norm, and rotating
    before or after the l2norm (x-transformers normalises first too) must not matter."""
    d = 32
    rotary = RotaryEmbedding(d if whole_head else d // 2, head_dim=d)
    t = torch.randn(2, 3, 11, d, dtype=torch.float64)
    cos, sin = (c.double() for c in rotary(11))
    normed = cosformer.l2norm_tensors(t, groups=groups)
    rotated = apply_rotary(normed, cos, sin)
    torch.testing.assert_close(rotated.unflatten(-1, (groups, -1)).norm(dim=-1), torch.ones(2, 3, 11, groups).double())
    torch.testing.assert_close(rotated, cosformer.l2norm_tensors(apply_rotary(t, cos, sin), groups=groups))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, r", [(64, 32), (64, 64), (40, 20), (32, 2)])
def test_rotary_tables_rotate_as_the_pairwise_formula(d, r, dtype, seed):
    """apply_rotary's table form gives bitwise the values of the pairwise rotation (x1 cos − x2 sin, x1 sin + x2 cos
    on the first r channels, the rest unchanged), per-row positions included."""
    rotary = RotaryEmbedding(r, head_dim=d)
    t = torch.randn(2, 3, 17, d).mul(4).to(dtype)
    for pos in (None, torch.randint(0, 300, (2, 17))):
        cos, sin = rotary(17, 5, pos=pos)
        angles = (torch.arange(5, 22).float() if pos is None else pos.float()[:, None])[..., None] * rotary.inv_freq
        c, s = angles.cos(), angles.sin()
        x1, x2 = t[..., :r].float().unflatten(-1, (-1, 2)).unbind(-1)
        pairwise = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
        want = torch.cat((pairwise, t[..., r:].float()), dim=-1).to(dtype)
        assert torch.equal(apply_rotary(t, cos, sin), want)
    with pytest.raises(ValueError, match=f"width {d} for a head of {d - 2} channels"):
        apply_rotary(t[..., :-2], cos, sin)


def xt_model(layer_kwargs=None, wrapper_kwargs=None, cls="Decoder"):
    layers = getattr(xt, cls)(dim=DIM, depth=2, heads=4, attn_dim_head=16, **(layer_kwargs or {}))
    return xt.TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, attn_layers=layers,
                                 **(wrapper_kwargs or {}))  # fmt: skip


# (stack options, wrapper options, the option the error must name)
UNSUPPORTED = [
    (dict(pre_norm=False), {}, "pre_norm=False"),
    (dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True), {}, "attn_qk_norm_dim_scale"),
    (dict(alibi_pos_bias=True), {}, "alibi_pos_bias"),
    (dict(rel_pos_bias=True), {}, "rel_pos_bias"),
    (dict(sandwich_norm=True), {}, "sandwich_norm"),
    (dict(use_scalenorm=True), {}, "use_scalenorm"),
    (dict(attn_gate_values=True), {}, "attn_gate_values"),
    (dict(attn_dropout=0.1), {}, "attn_dropout"),
    (dict(layer_dropout=0.1), {}, "layer_dropout"),
    (dict(ff_relu_squared=True), {}, "ff_relu_squared"),
    (dict(ff_post_act_ln=True), {}, "ff_post_act_ln"),
    (dict(rotary_xpos=True, rotary_pos_emb=True), {}, "rotary_xpos"),
    (dict(macaron=True), {}, "macaron"),
    (dict(residual_attn=True), {}, "residual_attn"),
    (dict(add_value_residual=True), {}, "add_value_residual"),
    (dict(cross_attend=True), {}, "cross_attend"),
    (dict(attn_num_mem_kv=(1, 2)), {}, "per-layer attn_*"),
    ({}, dict(l2norm_embed=True), "l2norm_embed"),
    ({}, dict(scaled_sinu_pos_emb=True), "scaled_sinu_pos_emb"),
]


@pytest.mark.parametrize("layer_kwargs,wrapper_kwargs,option", UNSUPPORTED, ids=[o for *_, o in UNSUPPORTED])
def test_unsupported_option_raises_naming_it(layer_kwargs, wrapper_kwargs, option):
    model = xt_model(layer_kwargs, wrapper_kwargs)
    with pytest.raises(ValueError, match=f"x-transformers option .*{option}"):
        from_x_transformers(model)


def test_every_x_transformers_weight_must_be_used():
    model = xt_model()
    model.attn_layers.layers[0][1].register_parameter("mystery", nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"no cosformer counterpart.*attn_layers\.layers\.0\.1\.mystery"):
        from_x_transformers(model)
    model = xt_model(dict(attn_qk_norm=True))
    model.attn_layers.layers[0][1].qk_norm_scale = model.attn_layers.layers[0][1].attend.scale = torch.tensor(10.0)
    with pytest.raises(ValueError, match="attn_qk_norm_scale"):  # a learned scale, not a fixed number
        from_x_transformers(model)


def test_versions_that_scale_qk_norm_thrice_are_refused(monkeypatch):
    """x-transformers 2.17.1 to 2.25.4 multiply the normalised q and k by attn_qk_norm_scale too (logits scale³ · cos):
    no cosformer scale expresses that; without qk-norm those versions convert."""
    monkeypatch.setattr("cosformer.convert._xt_version", lambda: (2, 20, 0))
    with pytest.raises(ValueError, match="attn_qk_norm_scale.*2.20.0"):
        from_x_transformers(xt_model(dict(attn_qk_norm=True)))
    assert from_x_transformers(xt_model()).attn_layers.attn == "regular"


def test_not_an_x_transformers_model_raises():
    with pytest.raises(ValueError, match="TransformerWrapper"):
        from_x_transformers(nn.Linear(2, 2))
    layers = cosformer.Decoder(dim=32, depth=1, heads=2, attn_dim_head=16)
    with pytest.raises(ValueError, match="TransformerWrapper"):
        from_x_transformers(cosformer.TransformerWrapper(num_tokens=8, max_seq_len=8, attn_layers=layers))


def test_group_straddling_rotary_is_refused():
    """x-transformers accepts 9-channel l2norm groups with rotary; cosformer keeps every group unit-norm after the
    rotation only when no rotated pair straddles two groups."""
    model = xt.TransformerWrapper(
        num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
        attn_layers=xt.Decoder(dim=DIM, depth=1, heads=2, attn_dim_head=18, attn_qk_norm=True, attn_qk_norm_groups=2,
                               rotary_pos_emb=True, rotary_emb_dim=18),
    )  # fmt: skip
    with pytest.raises(ValueError, match="rotary"):
        from_x_transformers(model)
