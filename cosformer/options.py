"""Option spellings of the block stack: x-transformers' names, this project's first names, and prefix routing.

`Transformer(**kwargs)` speaks x-transformers' vocabulary: `attn_*` goes to every attention, `ff_*` to every
feed-forward, `cross_attn_*` to cross-attention only (over the `attn_*` values there). It still accepts the
spellings this project used first (`rotary`, `alibi`, `dim_head`, `kv_heads`, `scale`, `groups`, `ff_bias`), so
existing configs and checkpoints' configs keep building. Each option is stored once, under the name the modules
take; two spellings of one option given together must agree, or the call raises naming both (a silent winner would
hide a typo in a sweep). A value of None means "not given", as the config passes unset options. An unknown name
raises TypeError, as Python does for any unexpected keyword, with the closest known name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


def _same(value):
    return value


# Key after the `attn_` / `cross_attn_` prefix -> (the Attention argument, how the value maps onto it).
ATTN_SPELLINGS = {
    "dim_head": ("dim_head", _same),
    "kv_heads": ("kv_heads", _same),
    "one_kv_head": ("kv_heads", lambda on: 1 if on else None),
    # qk_norm is cosine attention (x-transformers' `attn_qk_norm`); without it, softmax attention at 1/sqrt(d)
    "qk_norm": ("attn", lambda on: "cosine" if on else "regular"),
    "qk_norm_scale": ("scale", _same),
    "qk_norm_groups": ("groups", _same),
    "num_mem_kv": ("num_mem_kv", _same),
    "gate_values": ("gate_values", _same),
    "gate_value_heads": ("gate_value_heads", _same),
    "dropout": ("dropout", _same),
    "qkv_bias": ("qkv_bias", _same),
    "out_bias": ("out_bias", _same),
    "flash": (None, _same),  # accepted and ignored: attention is always a fused kernel (or SDPA for regular)
}

# The project's first, unprefixed names of attention options (`attn` is the documented switch itself).
PLAIN_ATTN = {"attn": "attn", "dim_head": "dim_head", "kv_heads": "kv_heads", "scale": "scale", "groups": "groups"}

# Key after the `ff_` prefix -> (the FeedForward argument, how the value maps onto it).
FF_SPELLINGS = {
    "mult": ("mult", _same),
    "glu": ("glu", _same),
    "swish": ("swish", _same),
    "no_bias": ("bias", lambda off: not off),
    "bias": ("bias", _same),
    "dropout": ("dropout", _same),
}

# The project's first names of stack options -> x-transformers' names.
PLAIN_STACK = {"rotary": "rotary_pos_emb", "alibi": "alibi_pos_bias"}


class _Spelled:
    """Options by the name the module takes, remembering the spelling each arrived in."""

    def __init__(self):
        self.values: dict = {}
        self.spelling: dict[str, str] = {}

    def set(self, name: str | None, value, spelling: str, given) -> None:
        if name is None or value is None:
            return
        if name in self.values and self.values[name] != value:
            raise ValueError(
                f"{self.spelling[name]} and {spelling}={given!r} are two spellings of one option that disagree; "
                "pass one of them"
            )
        self.values[name] = value
        self.spelling[name] = f"{spelling}={given!r}"


@dataclass
class StackOptions:
    """The stack's options under one name each: relative positions, and the keyword arguments of every
    self-attention, cross-attention and feed-forward."""

    rotary: bool = False
    alibi: bool = False
    attn: dict = field(default_factory=dict)
    cross_attn: dict = field(default_factory=dict)
    ff: dict = field(default_factory=dict)


def known_spellings(named: tuple[str, ...] = ()) -> list[str]:
    """Every accepted option name: `named` (a constructor's own parameters) and the routed ones."""
    names = list(named) + list(PLAIN_STACK) + list(PLAIN_ATTN)
    names += [f"attn_{k}" for k in ATTN_SPELLINGS] + [f"cross_attn_{k}" for k in ATTN_SPELLINGS]
    names += [f"ff_{k}" for k in FF_SPELLINGS]
    return names


def unknown_option(owner: str, key: str, known: list[str]) -> TypeError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TypeError(f"{owner} got an unexpected keyword argument {key!r}{hint}")


def resolve_stack_options(
    kwargs: dict, *, rotary_pos_emb, alibi_pos_bias, dropout: float, named: tuple[str, ...] = ()
) -> StackOptions:
    """Map `kwargs` (every option a `Transformer` did not name in its signature) and the aliased named ones onto
    one name each. `dropout` is the default of attention and feed-forward dropout; `attn_dropout` / `ff_dropout`
    override it. `named` lists the constructor's own parameters, for the did-you-mean hint."""
    stack, attn, cross, ff = _Spelled(), _Spelled(), _Spelled(), _Spelled()
    stack.set("rotary", rotary_pos_emb, "rotary_pos_emb", rotary_pos_emb)
    stack.set("alibi", alibi_pos_bias, "alibi_pos_bias", alibi_pos_bias)
    for key, value in kwargs.items():
        if key in PLAIN_STACK:
            stack.set(key, value, key, value)
        elif key in PLAIN_ATTN:
            attn.set(PLAIN_ATTN[key], value, key, value)
        elif key.startswith("cross_attn_") and key[len("cross_attn_") :] in ATTN_SPELLINGS:
            name, convert = ATTN_SPELLINGS[key[len("cross_attn_") :]]
            cross.set(name, None if value is None else convert(value), key, value)
        elif key.startswith("attn_") and key[len("attn_") :] in ATTN_SPELLINGS:
            name, convert = ATTN_SPELLINGS[key[len("attn_") :]]
            attn.set(name, None if value is None else convert(value), key, value)
        elif key.startswith("ff_") and key[len("ff_") :] in FF_SPELLINGS:
            name, convert = FF_SPELLINGS[key[len("ff_") :]]
            ff.set(name, None if value is None else convert(value), key, value)
        else:
            raise unknown_option("Transformer", key, known_spellings(named))
    attn_kwargs = {"dropout": dropout} | attn.values
    cross_kwargs = attn_kwargs | cross.values
    if cross_kwargs.get("attn") == "regular":
        # `cross_attn_qk_norm=False` under `attn_qk_norm_scale=...`: the scale was meant for cosine self-attention
        for name in ("scale", "groups"):
            if name not in cross.values:
                cross_kwargs.pop(name, None)
    return StackOptions(
        rotary=bool(stack.values.get("rotary", False)),
        alibi=bool(stack.values.get("alibi", False)),
        attn=attn_kwargs,
        cross_attn=cross_kwargs,
        ff={"dropout": dropout} | ff.values,
    )
