"""Typed run configuration: dataclass sections, YAML layering and dotted `key=value` overrides.

A run is described by one `Config` (sections model / data / train / log / t2i). It is built from the dataclass
defaults, then each YAML file in order (a later file overrides an earlier one), then `section.key=value`
overrides as wandb sweeps pass them (`${args_no_hyphens}`). Every key and value is checked against the
dataclass fields before anything is built: an unknown key, a value of the wrong type or out of its range (the
`RANGES` table) raises `ConfigError` naming the key, so a typo in a sweep fails at once instead of silently
training the default, and a value the optimiser or the kernel would reject fails before a model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
import yaml

from cosattn import MAX_SCALE


class ConfigError(ValueError):
    """A config file or override names an unknown key, or carries a value of the wrong type or out of range."""


@dataclass
class ModelConfig:
    dim: int = 128
    depth: int = 3
    heads: int = 4
    dim_head: int = 32
    kv_heads: int = 0  # 0 = as many as `heads`; fewer is grouped-query attention
    attn: Literal["cosine", "regular"] = "cosine"
    pre_norm: bool = False
    scale: float | None = None  # fixed logit scale of cosine attention (None: 10); regular takes none
    groups: int = 1  # l2norm groups of q, k
    ff_mult: int = 4
    ff_glu: bool = False
    dropout: float = 0.0
    rotary: bool = False
    alibi: bool = False
    abs_pos_emb: bool | Literal["auto"] = "auto"  # auto = learned positions unless rotary/alibi
    tie_embedding: bool = False

    @property
    def use_abs_pos_emb(self) -> bool | None:
        """`abs_pos_emb` in the wrappers' terms: "auto" is None (learned positions unless rotary or alibi)."""
        return None if self.abs_pos_emb == "auto" else self.abs_pos_emb

    def layer_kwargs(self) -> dict:
        """The options every attention stack built from this config shares (zoo keyword names)."""
        return dict(
            attn=self.attn,
            scale=self.scale,
            groups=self.groups,
            kv_heads=self.kv_heads or None,
            dim_head=self.dim_head,
            pre_norm=self.pre_norm,
            ff_mult=self.ff_mult,
            ff_glu=self.ff_glu,
            dropout=self.dropout,
            rotary=self.rotary,
            alibi=self.alibi,
        )


# data.name values served by the text-to-image task: the procedural pairs and scenes, and Hugging Face sets
T2I_DATA = ("shapes", "scenes", "hf")
PROCEDURAL_T2I_DATA = ("shapes", "scenes")


@dataclass
class DataConfig:
    name: Literal["enwik8", "text", "pystdlib", "shapes", "scenes", "hf"] = "pystdlib"
    path: str = ""  # a local copy of the corpus (enwik8 or its zip; the file for `text`)
    seq_len: int = 128
    cache_dir: str = "~/.cache/cosformer"
    max_bytes: int = 20_000_000  # cap on the embedded `pystdlib` corpus
    # language modelling: items carry segment ids of the documents they cross (data.py), so attention and positions
    # restart at each document and no byte is predicted across a boundary
    pack: bool = False
    # with pack, data.name=text: this string ends a document (default: runs of blank lines do); taken literally, so
    # write control characters in a YAML double-quoted string ("\n\n")
    separator: str = ""


@dataclass
class TrainConfig:
    batch_size: int = 16  # per process and micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    max_steps: int = 250
    warmup_steps: int = 25
    min_lr_ratio: float = 0.1
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 8
    eval_train: bool = True  # also the loss on as many fixed training items, in eval mode: the train–val gap
    patience: int = 0  # stop after this many evaluations in a row without a lower val loss; 0 = never stop early
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0 = at every evaluation
    sample_length: int = 96  # bytes generated after the prompt; within data.seq_len the KV cache serves them
    final_eval: bool = True  # full-split val and test at the end
    attn_stats: bool = True  # at each evaluation: max pre-softmax logit, mean attention entropy (train/attn_stats.py)
    out_dir: str = "runs/default"
    resume: bool | str = False  # true = latest checkpoint in out_dir, or a checkpoint path
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    grad_clip: float = 1.0  # 0 = no clipping
    num_workers: int = 0
    compile: bool | Literal["auto"] = "auto"  # torch.compile the model (trainer.resolve_compile): auto = on CUDA only


@dataclass
class LogConfig:
    tracker: Literal["wandb", "none"] = "none"
    project: str = "cosformer"
    group: str = ""
    name: str = ""


@dataclass
class T2IConfig:
    image_size: int = 32
    palette: int = 8  # colour tokens
    num_train: int = 20000
    num_val: int = 1000
    num_test: int = 1000
    text_max_len: int = 64
    enc_depth: int = 2
    hf_dataset: str = ""
    hf_image_column: str = "image"
    hf_caption_column: str = "text"
    hf_split: str = "train"
    fid_samples: int = 256
    sample_temperature: float = 1.0
    # standard Inception FID beside the in-project metrics (torchmetrics and its weights, fetched when the run starts)
    inception_fid: bool = False
    # sampling steps compiled once and replayed (TextToImage.generate(compile=True): CUDA graphs on a GPU), several
    # times faster than eager steps; the same sampler, though a rounding difference can flip a draw (and what follows)
    sample_compile: bool = False
    data_seed: int = 0  # draws (shapes) / shuffles (hf) the data; independent of train.seed
    # combinations: val / test hold (colour, shape, relation) triples train never has (data.name shapes or scenes)
    holdout: Literal["none", "combinations"] = "none"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    t2i: T2IConfig = field(default_factory=T2IConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys() + list(SECTIONS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(key: str, value: Any, tp) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming `key`. Only lossless conversions happen:
    int -> float, and strings such as '3e-4' (which YAML 1.1 reads as a string) -> float."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `no` / `off` as False: map it back when the choice exists
            spelled = [c for c in (_YAML_BOOL_WORDS[value]) if c in choices]
            if spelled:
                return spelled[0]
        elif value in choices:
            return value
    elif origin in (Union, types.UnionType):
        # bool first, so that a YAML `true` never becomes the string 'True'
        for arm in sorted(typing.get_args(tp), key=lambda a: a is not bool):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name or "." in name:
        raise _unknown(key)
    types_ = _field_types(SECTIONS[section])
    if name not in types_:
        raise _unknown(key)
    setattr(getattr(cfg, section), name, _coerce(key, value, types_[name]))


def apply_dict(cfg: Config, tree: Any, source: str = "config") -> Config:
    """Apply a nested mapping {section: {key: value}} onto `cfg` in place, checking every key."""
    if tree is None:
        return cfg
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    for section, values in tree.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        for name, value in values.items():
            _apply(cfg, f"{section}.{name}", value)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 3e-4). Values are YAML scalars; leading dashes are tolerated so that
    both `key=value` and `--key=value` work."""
    key, sep, raw = text.lstrip("-").partition("=")
    if not sep or not key:
        raise ConfigError(f"override must look like section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        value = raw  # only scalars are config values; keep the text so the type check names the key
    return key.strip(), value


def _text_field(key: str) -> bool:
    """Fields whose values are always text (plain str or a choice of strings): an override is taken verbatim."""
    section, _, name = key.partition(".")
    tp = _field_types(SECTIONS[section]).get(name) if section in SECTIONS else None
    return tp is str or (typing.get_origin(tp) is Literal and all(isinstance(c, str) for c in typing.get_args(tp)))


def load_config(paths: list[str | pathlib.Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults, then each YAML file in order, then dotted overrides; every key and type is checked."""
    cfg = Config()
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        apply_dict(cfg, yaml.safe_load(path.read_text()), source=str(path))
    for text in overrides:
        key, value = parse_override(text)
        # `log.name=2024` or `train.mixed_precision=no` is text, not a number or a YAML boolean
        if not isinstance(value, str) and _text_field(key):
            value = text.lstrip("-").partition("=")[2].strip()
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class Interval:
    """The valid values of one numeric key; `str` is the condition an error message states."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


AT_LEAST_1 = Interval(1)  # sizes and counts
AT_LEAST_0 = Interval(0)  # amounts that may be zero; for an every-N interval, 0 means what its field's comment says
POSITIVE = Interval(0, lo_open=True)
UNIT = Interval(0, 1)
UNIT_OPEN = Interval(0, 1, hi_open=True)

# Every int and float field, with its valid range (a test keeps this table complete). Floats must also be finite.
RANGES: dict[str, Interval] = {
    "model.dim": AT_LEAST_1,
    "model.depth": AT_LEAST_1,
    "model.heads": AT_LEAST_1,
    "model.dim_head": AT_LEAST_1,  # cosine attention narrows it to the kernel's head dims (below)
    "model.kv_heads": AT_LEAST_0,
    "model.scale": Interval(0, MAX_SCALE, lo_open=True),  # the logit bound the kernel keeps exact
    "model.groups": AT_LEAST_1,
    "model.ff_mult": AT_LEAST_1,
    "model.dropout": UNIT_OPEN,
    "data.seq_len": AT_LEAST_1,
    "data.max_bytes": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.weight_decay": AT_LEAST_0,
    "train.beta1": UNIT_OPEN,  # AdamW's own range
    "train.beta2": UNIT_OPEN,
    "train.max_steps": AT_LEAST_1,
    "train.warmup_steps": AT_LEAST_0,
    "train.min_lr_ratio": UNIT,
    "train.eval_every": AT_LEAST_0,
    "train.eval_batches": AT_LEAST_1,
    "train.patience": AT_LEAST_0,  # 0 = off
    "train.checkpoint_every": AT_LEAST_0,
    "train.keep_checkpoints": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,  # a modulus: 0 would divide by zero rather than switch logging off
    "train.sample_every": AT_LEAST_0,
    "train.sample_length": AT_LEAST_0,  # 0 = no text samples
    "train.seed": Interval(0, 2**32 - 1),  # numpy's seed range: accelerate's set_seed seeds numpy too
    "train.grad_clip": AT_LEAST_0,
    "train.num_workers": AT_LEAST_0,
    "t2i.image_size": AT_LEAST_1,  # shapes and scenes need more (8, 32), and say so when built
    "t2i.palette": Interval(2, 256),  # colour indices are stored as uint8
    "t2i.num_train": AT_LEAST_1,
    "t2i.num_val": AT_LEAST_1,
    "t2i.num_test": AT_LEAST_1,
    "t2i.text_max_len": AT_LEAST_1,
    "t2i.enc_depth": AT_LEAST_1,
    "t2i.fid_samples": Interval(2),  # FID needs a covariance
    "t2i.sample_temperature": AT_LEAST_0,  # 0 = greedy
    "t2i.data_seed": Interval(0, 2**32 - 1),  # numpy's seed range
}


def check_model_options(m: ModelConfig, cross_attend: bool) -> None:
    """The model section's options against the model zoo's own rules (attention limits, position schemes, ...):
    the layer stack is built on the meta device, so nothing is allocated and each rule lives in the zoo only."""
    from cosformer.transformer import Decoder

    try:
        with torch.device("meta"):
            Decoder(m.dim, m.depth, m.heads, cross_attend=cross_attend, **m.layer_kwargs())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model options rejected by the model: {e} (config keys model.*)") from None


def validate(cfg: Config) -> Config:
    """Value ranges (the RANGES table), then checks across keys that single types cannot express. Anything that
    would otherwise fail once the run is being built fails here, as a ConfigError naming the key."""
    for key, interval in RANGES.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:  # "not set" (model.scale): the zoo's default applies
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        if value not in interval:
            raise ConfigError(f"config key '{key}' must be {interval}, got {value!r}")
    m, t, d = cfg.model, cfg.train, cfg.data
    check_model_options(m, cross_attend=d.name in T2I_DATA)
    if m.alibi and d.name in T2I_DATA:
        raise ConfigError(
            f"model.alibi does not apply to data.name={d.name}: the text-to-image decoder cross-attends, and ALiBi "
            "is defined for self-attention only (use model.rotary)"
        )
    if t.patience and not t.eval_every:
        raise ConfigError(
            f"train.patience={t.patience} counts evaluations: it needs train.eval_every > 0 (with 0 the only "
            "evaluation is the last one)"
        )
    if d.pack and d.name in T2I_DATA:
        raise ConfigError(f"data.pack packs text documents; data.name={d.name} is a text-to-image data set")
    if d.separator and not (d.pack and d.name == "text"):
        raise ConfigError(
            f"data.separator={d.separator!r} splits a text file into documents: it needs data.name=text and "
            f"data.pack=true (got data.name={d.name}, data.pack={d.pack})"
        )
    if d.name == "text" and not d.path:
        raise ConfigError("data.name=text needs data.path=/path/to/file")
    if d.name == "hf" and not cfg.t2i.hf_dataset:
        raise ConfigError("data.name=hf needs t2i.hf_dataset (a Hugging Face dataset name)")
    if isinstance(t.resume, str) and not t.resume:
        t.resume = False
    return cfg


# Keys whose default changed after they were added, with what a run recorded before the key existed ran with (a
# resolved config records every key, so only such runs lack one): train.compile came with the default false.
FORMER_DEFAULTS: dict[str, Any] = {"train.compile": False}


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's config.yaml), with the same checks."""
    return validate(apply_dict(Config(), tree))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Config, path: str | pathlib.Path) -> None:
    """Write the resolved config atomically (tmp file + rename) so a reader never sees half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(path)


def load_yaml(path: str | pathlib.Path) -> Config:
    return from_dict(yaml.safe_load(pathlib.Path(path).read_text()))
