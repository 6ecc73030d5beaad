"""Load an x-transformers model into the equivalent cosformer model: `from_x_transformers(model)`.

It accepts an x-transformers `TransformerWrapper` whose `attn_layers` is an `Encoder`, a `Decoder` or a plain
`AttentionLayers` stack, or an `AutoregressiveWrapper` around one, reads every hyper-parameter from the module tree
(never from the caller), builds the cosformer model and loads the weights through the key mapping written out in
`_map_weights`. It is strict both ways: every x-transformers parameter and buffer is used, every cosformer parameter
is filled, and an option cosformer cannot express raises `ValueError` naming the x-transformers option.

What converts (x-transformers 2.x option → cosformer):
- pre-norm blocks (`pre_norm=True`, its default) with the final norm → `pre_norm=True`. x-transformers' norms have
  no bias and store weight − 1 by default (`norm_add_unit_offset`): the loaded weight is gamma + offset, the bias 0.
  `use_rmsnorm` → `nn.RMSNorm`, whose eps is set to ~0 so it computes x-transformers' F.normalize(x) · √dim · γ.
- `attn_qk_norm=True` with a fixed `attn_qk_norm_scale` and `attn_qk_norm_groups` → cosine attention, same scale
  and groups; without qk-norm → `attn="regular"` (softmax at dim_head^-½, x-transformers' scale too).
- `attn_dim_head`, `attn_kv_heads` / `attn_one_kv_head`: x-transformers' query head n reads kv head n % kv_heads,
  cosformer's reads n // (heads / kv_heads), so the query heads (rows of to_q, columns of to_out) are permuted.
- `attn_num_mem_kv`, `rotary_pos_emb` (`rotary_emb_dim`, the base), `ff_mult`, `ff_glu`, `ff_swish`,
  `ff_no_bias`, learned absolute positions (x-transformers multiplies them by emb_dim^-½ in forward: folded into
  the loaded table), `emb_dim`, `post_emb_norm`, `num_memory_tokens`, `logits_dim`, `return_only_embed`,
  `emb_dropout`, `ff_dropout`, `attn_sublayer_dropout` (cosformer's attention dropout acts on the output).
- `tie_embedding`: recent x-transformers multiplies tied logits by `tie_embedding_scale` (default dim^-½), cosformer
  does not; the scale is folded into the final norm's weight, so the logits agree and the embeddings stay tied, but
  `return_embeddings=True` gives x-transformers' final embeddings times that scale.
- `ff_glu` with `ff_no_bias`: x-transformers keeps the GLU projection's bias and drops only the output bias;
  cosformer has both biases then, the output bias loaded as zeros.
- `AutoregressiveWrapper` → cosformer's, with `ignore_index` and `pad_value`.

Refused (ValueError naming the option): post-norm (`pre_norm=False`: cosformer's post-LN has DeepNet scaling),
sandwich / pre-and-post norms, other norms, cross-attention, ALiBi / T5 / dynamic position biases (not mapped yet),
learned qk-norm scales (`attn_qk_norm_dim_scale`), qk-norm under x-transformers 2.17.1 to 2.25.4 (they multiply
the logits by the scale three times), `attn_dropout` on the attention weights, `layer_dropout` (cosformer drops
whole blocks), value residuals, gates, and the many other x-transformers extras. Tested against x-transformers 2.0,
2.10, 2.17.0 and 2.25.5 to 2.31 (the dev extra pins the last range).

x-transformers zeroes the attention output at masked query positions; cosformer does not, so with a padding mask the
two agree at the unmasked positions (the only ones later tokens read).
"""

from __future__ import annotations

import functools
import math
import re
from importlib import metadata

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Transformer
from .wrappers import AutoregressiveWrapper, TransformerWrapper

# (attribute, value when the option is off, the x-transformers option): parameter-free options checked one by one;
# options with parameters are caught by the strict weight mapping as well (see _OPTION_OF_PARAM). An attribute an
# older x-transformers lacks reads as off.
_WRAPPER_OFF = (
    ("l2norm_embed", False, "l2norm_embed"),
    ("embeds", None, "embed_num_tokens"),
    ("ff_deep_embed", None, "ff_deep_embed"),
    ("emb_frac_gradient", 1.0, "emb_frac_gradient"),
    ("recycling", False, "recycling"),
    ("looped", False, "looped"),
    ("cls_token", None, "use_cls_token"),
    ("attn_pool", None, "attn_pool"),
    ("average_pool_embed", False, "average_pool_embed"),
    ("to_mixture", None, "mixture_of_softmax"),
    ("sigsoftmax_logits", False, "sigsoftmax_logits"),
    ("has_multiple_heads", False, "num_output_heads"),
    ("add_continuous_pred_head", False, "add_continuous_pred_head"),
    ("memory_tokens_interspersed_every", None, "memory_tokens_interspersed_every"),
    ("max_mem_len", 0, "max_mem_len"),
    ("shift_mem_down", 0, "shift_mem_down"),
    ("squeeze_out_last_dim", False, "squeeze_out_last_dim"),
)
_LAYERS_OFF = (
    ("cross_attend", False, "cross_attend"),
    ("residual_attn", False, "residual_attn"),
    ("cross_residual_attn", False, "cross_residual_attn"),
    ("sandwich_norm", False, "sandwich_norm"),
    ("pre_and_post_norm", False, "pre_and_post_norm"),
    ("softclamp_output", False, "softclamp_output"),
    ("reinject_input", False, "reinject_input"),
    ("unet_skips", False, "unet_skips"),
    ("num_residual_streams", 1, "num_residual_streams"),
    ("need_condition", False, "use_adaptive_layernorm / use_adaptive_rmsnorm / use_adaptive_layerscale"),
    ("add_value_residual", False, "add_value_residual"),
    ("polar_pos_emb", None, "polar_pos_emb"),
    ("has_custom_layer_types", False, "custom_layers / par_ratio / sandwich_coef"),
    ("depth_scale_residual", False, "depth_scale_residual"),
    ("residual_scale", None, "scale_residual / depth_scale_residual"),
)
_ATTN_OFF = (
    ("max_attend_past", None, "attn_max_attend_past"),
    ("sparse_topk", None, "attn_sparse_topk"),
    ("laser", False, "attn_laser"),
    ("orthog_projected_values", False, "attn_orthog_projected_values"),
    ("orthog_projected_values_per_head", False, "attn_orthog_projected_values_per_head"),
    ("qkv_receive_diff_residuals", False, "qkv_receive_diff_residuals / integrate_layers"),
    ("qk_norm_dim_scale", False, "attn_qk_norm_dim_scale"),
    ("attn_on_attn", False, "attn_on_attn"),
    ("head_scale", False, "attn_head_scale"),
    ("use_latent_q", False, "attn_use_latent_q"),
    ("use_latent_kv", False, "attn_use_latent_kv"),
    ("q_rmsnorm", None, "attn_qk_rmsnorm"),
    ("k_rmsnorm", None, "attn_qk_rmsnorm / attn_k_rmsnorm"),
    ("value_rmsnorm", None, "attn_value_rmsnorm"),
    ("to_v_gate", None, "attn_gate_values"),
    ("to_v_head_gate", None, "attn_gate_value_heads"),
    ("to_output_gate", None, "attn_output_gate"),
    ("hybrid_module", None, "attn_hybrid_module"),
    ("data_dependent_alibi", None, "attn_data_dependent_alibi"),
    ("rel_proj_pos_bias", None, "attn_use_rel_proj_pos_bias"),
)
_ATTEND_OFF = (
    ("l2_distance", False, "attn_l2_distance"),
    ("add_zero_kv", False, "attn_add_zero_kv"),
    ("head_learned_sink", False, "attn_head_learned_sink"),
    ("softclamp_logits", False, "attn_softclamp_logits"),
    ("cope", None, "attn_use_cope"),
    ("selective", False, "attn_selective"),
    ("cog_signed", False, "attn_cog_signed"),
    ("inverted_attention", False, "cross_attn_inverted_attention"),
    ("pre_softmax_talking_heads", None, "attn_pre_talking_heads"),
    ("post_softmax_talking_heads", None, "attn_post_talking_heads"),
    ("pre_scale_post_talking_heads", None, "attn_pre_scale_post_talking_heads"),
    ("flash_pack_seq", False, "attn_flash_pack_seq"),
)
# x-transformers 2.17.1 to 2.25.4 multiply the l2-normalised q and k by attn_qk_norm_scale and the logits by it again
# (logits scale³ · cos): [first, fixed)
_QK_NORM_SCALED_THRICE = ((2, 17, 1), (2, 25, 5))
# a module wrapping an attention or feed-forward -> the option that put it there
_WRAPPED_BY = {
    "ShiftTokens": "shift_tokens",
    "LayerScale": "use_layerscale",
    "AdaptiveLayerScale": "use_adaptive_layerscale",
    "Scale": "macaron / scale_residual / depth_scale_residual",
}
_POSITION_BIAS = {
    "AlibiPositionalBias": "alibi_pos_bias",
    "RelativePositionBias": "rel_pos_bias",
    "DynamicPositionBias": "dynamic_pos_bias",
}
# a parameter's name (any component of its path) -> the option that creates it: names what a leftover came from
_OPTION_OF_PARAM = {
    "qk_norm_q_scale": "attn_qk_norm_dim_scale",
    "qk_norm_k_scale": "attn_qk_norm_dim_scale",
    "to_value_residual_mix": "add_value_residual",
    "head_attn_sink": "attn_head_learned_sink",
    "mult_bias": "ff_glu_mult_bias",
    "rel_pos": "alibi_pos_bias / rel_pos_bias / dynamic_pos_bias",
    "stream_emb": "num_residual_streams",
    "skip_combines": "unet_skips",
    "layer_integrators": "integrate_layers / attn_aggregated_residuals",
    "learned_reinject_input_gate": "learned_reinject_input_gate",
    "adaptive_mlp": "adaptive_condition_mlp",
    "exit_gate": "looped",
    "recycled_proj": "recycling",
    "to_next_embed_pred": "add_continuous_pred_head",
}


def _refuse(option: str, detail: str) -> ValueError:
    return ValueError(f"from_x_transformers: x-transformers option {option} ({detail}) has no cosformer counterpart")


def _require_off(obj, flags, where: str) -> None:
    for attr, off, option in flags:
        if not hasattr(obj, attr):
            continue
        value = getattr(obj, attr)
        if (value is not None) if off is None else (value != off):
            shown = type(value).__name__ if isinstance(value, nn.Module) else repr(value)
            raise _refuse(option, f"{where}.{attr} = {shown}")


def _is_identity(module) -> bool:
    """torch's nn.Identity or the Identity of torch-einops-utils, which x-transformers uses in places."""
    return isinstance(module, nn.Module) and type(module).__name__ == "Identity" and not list(module.parameters())


def _dropout_p(module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _xt():
    try:
        import x_transformers.x_transformers as xt
        from x_transformers.attend import Attend
        from x_transformers.autoregressive_wrapper import AutoregressiveWrapper as XTAutoregressive
    except ImportError as err:  # pragma: no cover - the caller holds an x-transformers model
        raise ImportError("from_x_transformers needs the x-transformers package (pip install x-transformers)") from err
    return xt, Attend, XTAutoregressive


def _xt_version() -> tuple[int, ...]:
    """The installed x-transformers version as numbers, (2, 31, 10)."""
    return tuple(int(part) for part in re.findall(r"\d+", metadata.version("x-transformers"))[:3])


def _read_norm(norm, xt, where: str) -> tuple[str, float]:
    """An x-transformers norm -> ("layernorm" | "rmsnorm", the unit offset added to its stored weight)."""
    if type(norm) is xt.LayerNorm:
        return "layernorm", float(getattr(norm, "unit_offset", False))
    if type(norm) is xt.RMSNorm:
        return "rmsnorm", float(getattr(norm, "unit_offset", False))
    name = type(norm).__name__
    options = {"ScaleNorm": "use_scalenorm", "SimpleRMSNorm": "use_simple_rmsnorm", "DynamicTanh": "use_dynamic_tanh",
               "Derf": "use_derf", "AdaptiveLayerNorm": "use_adaptive_layernorm",
               "AdaptiveRMSNorm": "use_adaptive_rmsnorm"}  # fmt: skip
    raise _refuse(options.get(name, f"a {name} norm"), f"{where} is {name}")


def _read_attention(attn, layers, xt, Attend, where: str) -> dict:
    """One self-attention's options, in cosformer's Transformer keywords (x-transformers' spellings)."""
    if type(attn) is not xt.Attention:
        name = type(attn).__name__
        raise _refuse(_WRAPPED_BY.get(name, name), f"{where} is {name}, not an Attention")
    _require_off(attn, _ATTN_OFF, where)
    attend = attn.attend
    if type(attend) is not Attend:
        raise _refuse("attend", f"{where}.attend is {type(attend).__name__}")
    _require_off(attend, _ATTEND_OFF, f"{where}.attend")
    fn = attend.attn_fn
    if not (isinstance(fn, functools.partial) and fn.func is F.softmax and fn.keywords.get("dim", -1) == -1):
        raise _refuse("attn_sigmoid / attn_hard / attn_sparse_topk / attn_gumbel_softmax / attn_custom_attn_fn",
                      f"{where}.attend.attn_fn is {fn!r}")  # fmt: skip
    if attend.dropout:
        raise _refuse("attn_dropout", f"p = {attend.dropout} on the attention weights, which the fused op lacks; "
                      "cosformer's attention dropout is x-transformers' attn_sublayer_dropout")  # fmt: skip
    if getattr(attn, "rotate_num_heads", attn.heads) != attn.heads:
        raise _refuse("rotate_num_heads", f"{where} rotates {attn.rotate_num_heads} of {attn.heads} heads")
    if attn.causal != layers.causal or attend.causal != layers.causal:
        raise _refuse("causal", f"{where}.causal = {attn.causal} in a stack with causal = {layers.causal}")
    heads, kv_heads, dim = attn.heads, attn.kv_heads, layers.dim
    for name in ("to_q", "to_k", "to_v"):
        lin = getattr(attn, name)
        if type(lin) is not nn.Linear or lin.bias is not None or lin.in_features != dim:
            raise _refuse(f"attn {name}", f"{where}.{name} is {lin}")
    dim_head = attn.to_q.out_features // heads
    if attn.to_k.out_features != kv_heads * dim_head:
        raise _refuse("attn_latent_rope_subheads", f"{where}.to_k has {attn.to_k.out_features} outputs")
    if attn.to_v.out_features != kv_heads * dim_head:
        raise _refuse("attn_value_dim_head", f"{where}.to_v gives {attn.to_v.out_features // kv_heads} per head")
    out = attn.to_out
    square = _is_identity(out) and heads * dim_head == dim
    if not square and not (type(out) is nn.Linear and out.bias is None and out.out_features == dim):
        raise _refuse("attn_dim_out / attn_on_attn", f"{where}.to_out is {out}")
    opts = dict(attn_dim_head=dim_head, attn_kv_heads=kv_heads, attn_num_mem_kv=attn.num_mem_kv,
                attn_dropout=_dropout_p(getattr(attn, "sublayer_dropout", None)))  # fmt: skip
    if attn.qk_norm:
        first, fixed = _QK_NORM_SCALED_THRICE
        installed = _xt_version()
        if first <= installed < fixed:
            shown = ".".join(map(str, installed))
            raise _refuse("attn_qk_norm_scale", f"x-transformers {shown} multiplies q, k and the logits by it, "
                          "scale³ · cos; cosformer's, like x-transformers' >= 2.25.5, is scale · cos")  # fmt: skip
        scale = attend.scale
        if not isinstance(scale, (int, float)) or scale != attn.qk_norm_scale:
            raise _refuse("attn_qk_norm_scale", f"{where} scales the logits by {scale!r}, not a fixed number")
        opts |= dict(attn_qk_norm=True, attn_qk_norm_scale=float(scale), attn_qk_norm_groups=attn.qk_norm_groups)
    else:
        if attend.scale is not None and not math.isclose(attend.scale, dim_head**-0.5, rel_tol=1e-12):
            raise _refuse("attn scale", f"{where} scales the logits by {attend.scale}, not dim_head^-0.5")
        opts |= dict(attn_qk_norm=False)
    return opts


def _read_feedforward(ff, xt, dim: int, where: str) -> dict:
    """One feed-forward's options, in cosformer's Transformer keywords."""
    if type(ff) is not xt.FeedForward:
        name = type(ff).__name__
        raise _refuse(_WRAPPED_BY.get(name, name), f"{where} is {name}, not a FeedForward")
    parts = list(ff.ff)
    proj_in, rest = parts[0], parts[1:]
    if rest and isinstance(rest[0], xt.LayerNorm):
        raise _refuse("ff_post_act_ln", f"{where} normalises after the activation")
    if len(rest) == 3 and _dropout_p(rest[2]) > 0:
        raise _refuse("ff_sublayer_dropout", f"{where} drops its output with p = {_dropout_p(rest[2])}")
    if not (len(rest) in (2, 3) and isinstance(rest[0], nn.Dropout) and type(rest[1]) is nn.Linear):
        raise _refuse("ff", f"{where} is {ff.ff}")
    proj_out = rest[1]
    glu = type(proj_in) is xt.GLU
    if glu:
        if isinstance(proj_in.mult_bias, nn.Parameter):
            raise _refuse("ff_glu_mult_bias", f"{where} has a learned GLU multiplier")
        if getattr(proj_in, "up_softclamp_value", None) is not None:
            raise _refuse("ff_glu_softclamp", f"{where} soft-clamps its GLU")
        act, linear = proj_in.act, proj_in.proj
    else:
        inner = list(proj_in)
        if len(inner) != 2 or type(inner[0]) is not nn.Linear:
            raise _refuse("ff_softclamp_value", f"{where}.ff.0 is {proj_in}")
        linear, act = inner
    if type(act) is nn.GELU and act.approximate == "none":
        swish = False
    elif type(act) is nn.SiLU:
        swish = True
    else:
        raise _refuse("ff_relu_squared / ff_solu / ff_custom_activation", f"{where} activation is {act}")
    inner_dim = proj_out.in_features
    if linear.in_features != dim or proj_out.out_features != dim:
        raise _refuse("ff_dim_out", f"{where} maps {linear.in_features} -> {proj_out.out_features}")
    if not glu and (linear.bias is None) != (proj_out.bias is None):
        raise _refuse("ff bias", f"{where} has a bias on one projection only")
    if glu and linear.bias is None:  # x-transformers' GLU projection always has one
        raise _refuse("ff_glu", f"{where} GLU projection without a bias")
    mult = inner_dim / dim
    if int(dim * mult) != inner_dim:  # cosformer's inner width is int(dim * mult): round mult up to hit it
        mult = math.nextafter(mult, math.inf)
    # the GLU projection always has a bias in x-transformers: ff_no_bias there drops only the output's (see above)
    no_bias, dropout = linear.bias is None, _dropout_p(rest[0])
    return dict(ff_mult=mult, ff_glu=glu, ff_swish=swish, ff_no_bias=no_bias, ff_dropout=dropout)


def _read_rotary(layers, xt) -> dict:
    """The rotary keywords (none without rotary). The frequencies themselves are copied after the build."""
    rotary = layers.rotary_pos_emb
    if rotary is None:
        return {}
    if type(rotary) is not xt.RotaryEmbedding:
        raise _refuse("rotary_pos_emb", f"attn_layers.rotary_pos_emb is {type(rotary).__name__}")
    if rotary.scale is not None:
        raise _refuse("rotary_xpos", "the rotary embedding has an xpos scale")
    if rotary.interpolation_factor != 1.0:
        raise _refuse("rotary_interpolation_factor", f"factor {rotary.interpolation_factor}")
    inv_freq = rotary.inv_freq
    dim = 2 * inv_freq.numel()
    theta = 10000.0  # with one frequency (dim 2) it is 1 whatever the base
    if inv_freq.numel() > 1:
        # inv_freq[i] = theta^(-2i/dim); snapped to 6 digits, exact for the usual bases (10000, 500000, ...)
        estimate = inv_freq[1].double().item() ** (-dim / 2)
        theta = float(f"{estimate:.6g}")
    return dict(rotary_pos_emb=True, rotary_emb_dim=dim, rotary_theta=theta)


def _read_layers(layers, xt, Attend) -> tuple[dict, list, str, float]:
    """The stack -> (cosformer Transformer keywords, [attention, feed-forward] per block, the norm kind, its unit
    offset)."""
    if type(layers) not in (xt.Encoder, xt.Decoder, xt.AttentionLayers):
        name = type(layers).__name__
        raise _refuse(name, f"attn_layers is a {name}; only Encoder, Decoder and AttentionLayers convert")
    _require_off(layers, _LAYERS_OFF, "attn_layers")
    if layers.rel_pos is not None:
        name = type(layers.rel_pos).__name__
        raise _refuse(_POSITION_BIAS.get(name, name), f"attn_layers.rel_pos is {name}")
    types = tuple(layers.layer_types)
    depth = len(types) // 2
    if depth < 1 or types != ("a", "f") * depth:
        raise _refuse("macaron / only_attn / cross_attend / custom_layers", f"layer types {''.join(types)}")
    if tuple(layers.layers_execute_order) != tuple(range(len(types))):
        raise _refuse("weight_tie_layers / layers_execute_order", f"order {layers.layers_execute_order}")
    if any(p > 0 for p in layers.layer_dropouts):
        raise _refuse("layer_dropout", "x-transformers skips single sublayers, cosformer whole blocks")
    if not layers.pre_norm:
        raise _refuse("pre_norm=False", "post-norm blocks; cosformer's post-LN adds DeepNet's residual scaling")
    if _is_identity(layers.final_norm):
        raise _refuse("pre_norm_has_final_norm=False", "a pre-norm stack without a final norm")
    kind, offset = _read_norm(layers.final_norm, xt, "attn_layers.final_norm")

    blocks, attn_opts, ff_opts = [], [], []
    for index, (norms, layer, residual) in enumerate(layers.layers):
        where = f"attn_layers.layers.{index}"
        pre, post_branch, post_main = norms
        if post_branch is not None or post_main is not None or pre is None:
            raise _refuse("sandwich_norm / pre_and_post_norm", f"{where} norms {list(norms)}")
        if _read_norm(pre, xt, f"{where}.0.0") != (kind, offset):
            raise _refuse("use_rmsnorm", f"{where} has a different norm from the final norm")
        if type(residual) is not xt.Residual:
            name = type(residual).__name__
            options = {"GRUGating": "gate_residual", "HyperConnection": "num_residual_streams"}
            raise _refuse(options.get(name, name), f"{where}.2 is {name}")
        if residual.residual_scale is not None or residual.scale_residual_constant != 1:
            raise _refuse("scale_residual / scale_residual_constant", f"{where}.2 scales the residual")
        if index % 2 == 0:
            attn_opts.append(_read_attention(layer, layers, xt, Attend, f"{where}.1"))
            blocks.append([layer, None])
        else:
            ff_opts.append(_read_feedforward(layer, xt, layers.dim, f"{where}.1"))
            blocks[-1][1] = layer
    for opts, what in ((attn_opts, "attn_*"), (ff_opts, "ff_*")):
        differ = {k for o in opts for k in o if o[k] != opts[0][k]}
        if differ:
            raise _refuse(f"per-layer {what} values", f"{sorted(differ)} differ between layers; cosformer uses one")
    rotary_kwargs = _read_rotary(layers, xt)
    kwargs = dict(dim=layers.dim, depth=depth, heads=layers.layers[0][1].heads, causal=layers.causal, pre_norm=True,
                  use_rmsnorm=kind == "rmsnorm", **attn_opts[0], **ff_opts[0], **rotary_kwargs)  # fmt: skip
    return kwargs, blocks, kind, offset


def _read_wrapper(net, xt) -> dict:
    """TransformerWrapper options, in cosformer's keywords, plus "tie_scale" (1.0 unless tied with a scale)."""
    _require_off(net, _WRAPPER_OFF, "net")
    if type(net.token_emb) is not xt.TokenEmbedding:
        raise _refuse("token_emb", f"a custom token embedding {type(net.token_emb).__name__}")
    pos_emb = net.pos_emb
    if type(pos_emb) is xt.AbsolutePositionalEmbedding:
        use_abs = True
    elif type(pos_emb) is xt.always:
        use_abs = False
    else:
        raise _refuse("scaled_sinu_pos_emb", f"net.pos_emb is {type(pos_emb).__name__}")
    if net.max_seq_len < 1:
        raise _refuse("max_seq_len=0", "no maximum length")
    post = net.post_emb_norm
    if not _is_identity(post) and type(post) is not xt.LayerNorm:
        raise _refuse("post_emb_norm", f"net.post_emb_norm is {type(post).__name__}")
    project = net.project_emb
    if not _is_identity(project) and (type(project) is not nn.Linear or project.bias is None):
        raise _refuse("emb_dim", f"net.project_emb is {project}")
    kwargs = dict(emb_dim=net.emb_dim, emb_dropout=_dropout_p(net.emb_dropout), use_abs_pos_emb=use_abs,
                  post_emb_norm=type(post) is xt.LayerNorm, num_memory_tokens=net.num_memory_tokens,
                  tie_scale=1.0)  # fmt: skip
    dim, to_logits = net.attn_layers.dim, net.to_logits
    if to_logits is None:
        kwargs["return_only_embed"] = True
    elif type(to_logits) is nn.Linear and to_logits.bias is None and to_logits.in_features == dim:
        kwargs["logits_dim"] = to_logits.out_features
    elif isinstance(to_logits, nn.Module):
        raise _refuse("to_logits", f"net.to_logits is {to_logits}")
    else:  # tie_embedding: a lambda over the token embedding; check it is nothing else
        scale = float(getattr(net, "tie_embedding_scale", 1.0))
        weight = net.token_emb.emb.weight
        probe = torch.randn(2, dim, generator=torch.Generator().manual_seed(0)).to(weight)
        with torch.no_grad():
            if not torch.allclose(to_logits(probe), probe @ weight.t() * scale, rtol=1e-4, atol=1e-6):
                raise _refuse("to_logits", "net.to_logits is a callable other than the tied embedding")
        kwargs |= dict(tie_embedding=True, tie_scale=scale)
    return kwargs


def _norm_weights(target: dict, key: str, take, xt_key: str, kind: str, offset: float, scale: float = 1.0) -> None:
    name = "gamma" if kind == "layernorm" else "g"
    weight = take(f"{xt_key}.{name}")
    target[f"{key}.weight"] = (weight + offset) * scale
    if kind == "layernorm":  # x-transformers' LayerNorm has no bias
        target[f"{key}.bias"] = torch.zeros_like(weight)


def _head_order(heads: int, kv_heads: int) -> list[int]:
    """x-transformers' head for each cosformer query head: x-transformers' head n reads kv head n % kv_heads (einops
    '(r kvh)'), cosformer's head m reads kv head m // g (g = heads / kv_heads, repeat_interleave)."""
    g = heads // kv_heads
    return [(m % g) * kv_heads + m // g for m in range(heads)]


def _map_weights(net, blocks, kind: str, offset: float, wrapper_kwargs: dict) -> tuple[dict, set]:
    """x-transformers' state dict -> cosformer's, key by key: (cosformer's state dict, the x-transformers keys used)."""
    xt_state = net.state_dict()
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return xt_state[key]

    target: dict[str, torch.Tensor] = {}
    target["token_emb.weight"] = take("token_emb.emb.weight")
    if wrapper_kwargs["use_abs_pos_emb"]:  # x-transformers multiplies by pos_emb.scale (emb_dim^-0.5) in forward
        target["pos_emb.emb.weight"] = take("pos_emb.emb.weight") * net.pos_emb.scale
    if wrapper_kwargs["post_emb_norm"]:
        _norm_weights(target, "post_emb_norm", take, "post_emb_norm", "layernorm",
                      float(getattr(net.post_emb_norm, "unit_offset", False)))  # fmt: skip
    if isinstance(net.project_emb, nn.Linear):
        target["project_emb.weight"], target["project_emb.bias"] = take("project_emb.weight"), take("project_emb.bias")
    if net.num_memory_tokens:
        target["memory_tokens"] = take("memory_tokens")
    if isinstance(net.to_logits, nn.Linear):
        target["to_logits.weight"] = take("to_logits.weight")

    for block, (attn, ff) in enumerate(blocks):
        # x-transformers' layers alternate [norms, Attention, Residual] and [norms, FeedForward, Residual]
        xa, xf = f"attn_layers.layers.{2 * block}", f"attn_layers.layers.{2 * block + 1}"
        ours = f"attn_layers.layers.{block}"
        _norm_weights(target, f"{ours}.self_norm", take, f"{xa}.0.0", kind, offset)
        _norm_weights(target, f"{ours}.ff_norm", take, f"{xf}.0.0", kind, offset)

        order = _head_order(attn.heads, attn.kv_heads)  # permute the query heads (identity without GQA)
        to_q = take(f"{xa}.1.to_q.weight")
        target[f"{ours}.self_attn.to_q.weight"] = to_q.unflatten(0, (attn.heads, -1))[order].flatten(0, 1)
        target[f"{ours}.self_attn.to_k.weight"] = take(f"{xa}.1.to_k.weight")
        target[f"{ours}.self_attn.to_v.weight"] = take(f"{xa}.1.to_v.weight")
        if isinstance(attn.to_out, nn.Linear):
            to_out = take(f"{xa}.1.to_out.weight")
        else:  # one head spanning dim: x-transformers projects nothing; the identity does the same
            to_out = torch.eye(to_q.shape[1], dtype=to_q.dtype, device=to_q.device)
        target[f"{ours}.self_attn.to_out.weight"] = to_out.unflatten(1, (attn.heads, -1))[:, order].flatten(1, 2)
        if attn.num_mem_kv:
            target[f"{ours}.self_attn.mem_k"] = take(f"{xa}.1.mem_k")
            target[f"{ours}.self_attn.mem_v"] = take(f"{xa}.1.mem_v")

        # ff.ff is Sequential(proj_in, Dropout, Linear[, Dropout]); proj_in is a GLU (.proj) or (Linear, act)
        proj_in = f"{xf}.1.ff.0.proj" if hasattr(ff.ff[0], "proj") else f"{xf}.1.ff.0.0"
        proj_out = f"{xf}.1.ff.2"
        target[f"{ours}.ff.proj_in.weight"] = take(f"{proj_in}.weight")
        if f"{proj_in}.bias" in xt_state:
            target[f"{ours}.ff.proj_in.bias"] = take(f"{proj_in}.bias")
        target[f"{ours}.ff.proj_out.weight"] = out_w = take(f"{proj_out}.weight")
        if f"{proj_out}.bias" in xt_state:
            target[f"{ours}.ff.proj_out.bias"] = take(f"{proj_out}.bias")
        elif f"{proj_in}.bias" in xt_state:  # ff_glu + ff_no_bias: cosformer keeps both biases or neither
            target[f"{ours}.ff.proj_out.bias"] = out_w.new_zeros(out_w.shape[0])

    # tied logits times tie_scale = the final norm's weight times it (see the module docstring)
    _norm_weights(target, "attn_layers.final_norm", take, "attn_layers.final_norm", kind, offset,
                  wrapper_kwargs["tie_scale"])  # fmt: skip
    if net.attn_layers.rotary_pos_emb is not None:
        take("attn_layers.rotary_pos_emb.inv_freq")  # a buffer: copied into cosformer's rotary by the caller
    return target, used


def _leftover_message(keys) -> str:
    def option(key: str) -> str:
        hits = [_OPTION_OF_PARAM[part] for part in key.split(".") if part in _OPTION_OF_PARAM]
        return f"{key} ({hits[0]})" if hits else key

    return ", ".join(option(k) for k in sorted(keys))


def from_x_transformers(model: nn.Module) -> TransformerWrapper | AutoregressiveWrapper:
    """An x-transformers `TransformerWrapper` (or `AutoregressiveWrapper` around one) -> the cosformer model that
    computes the same logits, with its weights: a cosformer `TransformerWrapper` (or `AutoregressiveWrapper`), on the
    model's device and dtype, in its training mode. See the module docstring for what converts and what raises."""
    xt, Attend, XTAutoregressive = _xt()
    wrapper = None
    net = model
    if isinstance(model, XTAutoregressive):
        wrapper, net = model, model.net
        if getattr(model, "mask_prob", 0.0) > 0:
            raise _refuse("mask_prob", f"the loss masks inputs with p = {model.mask_prob}")
        if getattr(model, "add_attn_z_loss", False):
            raise _refuse("add_attn_z_loss", "an attention z-loss")
    if not isinstance(net, xt.TransformerWrapper):
        raise ValueError(
            "from_x_transformers takes an x-transformers TransformerWrapper or an AutoregressiveWrapper around one; "
            f"got {type(model).__name__}"
        )
    layer_kwargs, blocks, kind, offset = _read_layers(net.attn_layers, xt, Attend)
    wrapper_kwargs = _read_wrapper(net, xt)

    layers = Transformer(**layer_kwargs)
    tie_scale = wrapper_kwargs.pop("tie_scale")
    ours = TransformerWrapper(num_tokens=net.num_tokens, max_seq_len=net.max_seq_len, attn_layers=layers,
                              **wrapper_kwargs)  # fmt: skip
    source = next(net.parameters())
    ours.to(device=source.device, dtype=source.dtype)

    target, used = _map_weights(net, blocks, kind, offset, wrapper_kwargs | {"tie_scale": tie_scale})
    leftover = set(net.state_dict()) - used
    if leftover:
        raise ValueError(
            "from_x_transformers: these x-transformers weights have no cosformer counterpart (the option in "
            f"parentheses where known): {_leftover_message(leftover)}"
        )
    expected = set(ours.state_dict())
    missing, extra = expected - set(target), set(target) - expected
    if missing or extra:  # a mapping bug, never the user's
        raise ValueError(f"from_x_transformers: cosformer weights unfilled {sorted(missing)}, unknown {sorted(extra)}")
    state = ours.state_dict()
    for key, value in target.items():
        if value.shape != state[key].shape:
            raise ValueError(f"from_x_transformers: {key} is {tuple(state[key].shape)} in cosformer, "
                             f"{tuple(value.shape)} from x-transformers")  # fmt: skip
    ours.load_state_dict(target, strict=True)
    if layers.rotary is not None:
        # bitwise x-transformers' frequencies; `rotary_theta` was read back from them (see _read_rotary)
        xt_freq = net.attn_layers.rotary_pos_emb.inv_freq
        if not torch.allclose(layers.rotary.inv_freq.to(xt_freq), xt_freq, rtol=1e-5, atol=0.0):
            raise _refuse("rotary_pos_emb", "rotary frequencies that are not base^(-2i/rotary_emb_dim)")
        layers.rotary.inv_freq.copy_(xt_freq)
    if kind == "rmsnorm":
        for module in ours.modules():
            if isinstance(module, nn.RMSNorm):
                # x-transformers: F.normalize(x) · √dim · γ, eps 1e-12 on the norm; torch's default eps would add
                # finfo.eps to mean(x²). This eps is (1e-12)² / dim: the same clamp, no visible difference above it.
                module.eps = 1e-24 / module.normalized_shape[0]
    ours.train(net.training)
    if wrapper is None:
        return ours
    result = AutoregressiveWrapper(ours, ignore_index=wrapper.ignore_index, pad_value=wrapper.pad_value)
    return result.train(wrapper.training)
