"""Config: dataclass defaults, YAML layering, dotted overrides, strict rejection of unknown keys and wrong types."""

import dataclasses
import pathlib
import typing

import pytest
import yaml

from cosformer.train.config import (
    Config,
    ConfigError,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
    save_yaml,
    to_dict,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg == Config()
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_t2i_section_names_and_defaults():
    expected = dict(
        image_size=32,
        palette=8,
        num_train=20000,
        num_val=1000,
        num_test=1000,
        text_max_len=64,
        enc_depth=2,
        hf_dataset="",
        hf_image_column="image",
        hf_caption_column="text",
        hf_split="train",
        fid_samples=256,
        sample_temperature=1.0,
    )
    assert to_dict(Config())["t2i"] == expected


def test_yaml_layering_later_file_wins(tmp_path):
    a = write(tmp_path / "a.yaml", "model: {dim: 64, depth: 5}\ntrain: {lr: 2.0e-3}\n")
    b = write(tmp_path / "b.yaml", "model:\n  depth: 7\ndata:\n  seq_len: 96\n")
    cfg = load_config([a, b])
    assert (cfg.model.dim, cfg.model.depth, cfg.data.seq_len, cfg.train.lr) == (64, 7, 96, 2e-3)
    assert cfg.model.heads == Config().model.heads  # untouched keys keep their defaults


def test_overrides_beat_files_and_parse_as_yaml_scalars(tmp_path):
    a = write(tmp_path / "a.yaml", "train: {lr: 1.0e-2, max_steps: 10}\nmodel: {pre_norm: false}\n")
    cfg = load_config(
        [a],
        [
            "train.lr=3e-4",  # YAML 1.1 reads this as a string; a float field still accepts it
            "train.max_steps=123",
            "model.pre_norm=True",  # the spelling wandb agents pass for booleans
            "--model.attn=regular",  # the ${args} form
            "log.name=2024",  # a name that looks like a number stays text
            "model.dropout=0",  # int -> float is lossless
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 123
    assert cfg.model.pre_norm is True and cfg.model.attn == "regular"
    assert cfg.log.name == "2024" and cfg.model.dropout == 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1e-3", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1e-3", "unknown config key 'trian.lr' (did you mean 'train.lr'?)"),
        ("model.dim.x=3", "unknown config key 'model.dim.x'"),
        ("train.max_steps=1.5", "config key 'train.max_steps' expects int"),
        ("train.max_steps=true", "config key 'train.max_steps' expects int"),
        ("model.pre_norm=3", "config key 'model.pre_norm' expects bool"),
        ("model.attn=linear", "config key 'model.attn' expects 'cosine' | 'regular'"),
        ("train.lr=fast", "config key 'train.lr' expects float"),
        ("train.mixed_precision=fp8", "config key 'train.mixed_precision'"),
        ("train.lr", "override must look like section.key=value"),
    ],
)
def test_bad_overrides_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert message in str(e.value)


def test_bad_yaml_files_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.dimm'"):
        load_config([write(tmp_path / "a.yaml", "model: {dimm: 3}\n")])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config([write(tmp_path / "b.yaml", "modle: {dim: 3}\n")])
    with pytest.raises(ConfigError, match="'data.seq_len' expects int, got '128'"):
        load_config([write(tmp_path / "c.yaml", "data: {seq_len: '128'}\n")])
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config([write(tmp_path / "d.yaml", "train: 3\n")])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])


def test_resume_takes_bool_or_path():
    assert load_config([], ["train.resume=true"]).train.resume is True
    assert load_config([], ["train.resume=false"]).train.resume is False
    assert load_config([], ["train.resume=runs/x/checkpoints/step_000010"]).train.resume.endswith("step_000010")
    assert load_config([], ["train.resume="]).train.resume is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.kv_heads=3", "model.heads (4) must be a multiple of model.kv_heads (3)"),
        ("model.groups=5", "model.groups (5) must divide model.dim_head (32)"),
        ("train.batch_size=0", "'train.batch_size' must be >= 1"),
        ("model.dropout=1.0", "'model.dropout' must be in [0, 1)"),
        ("train.min_lr_ratio=2", "'train.min_lr_ratio' must be in [0, 1]"),
    ],
)
def test_cross_key_checks(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert message in str(e.value)


def test_cross_key_check_for_position_schemes_and_regular_attention():
    with pytest.raises(ConfigError, match="choose one"):
        load_config([], ["model.rotary=true", "model.alibi=true"])
    with pytest.raises(ConfigError, match="belong to cosine attention"):
        load_config([], ["model.attn=regular", "model.scale=20"])


def test_every_field_has_a_checkable_type():
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            assert f.name in hints, f"{section.name}.{f.name}"


RUN_CONFIGS = sorted(
    str(p.relative_to(ROOT))
    for p in [ROOT / "configs/default.yaml", *(ROOT / "configs").glob("*/*.yaml")]
    if p.parent.name not in ("accelerate", "sweeps")
)


@pytest.mark.parametrize("path", RUN_CONFIGS)
def test_shipped_run_configs_load(path):
    load_config([ROOT / path])


def test_default_config_is_the_small_embedded_job():
    cfg = load_config([ROOT / "configs/default.yaml"])
    assert cfg.data.name == "pystdlib" and cfg.model.attn == "cosine"
    assert cfg.model.dim <= 256 and cfg.train.max_steps <= 500


def test_enwik8_configs_differ_only_in_attention_norm_and_names():
    cfgs = {n: to_dict(load_config([ROOT / f"configs/enwik8/{n}.yaml"])) for n in ("cosine", "regular")}
    cfgs |= {n: to_dict(load_config([ROOT / f"configs/enwik8/{n}.yaml"])) for n in ("cosine_preln", "regular_preln")}
    assert cfgs["cosine"]["model"]["attn"] == "cosine" and cfgs["regular"]["model"]["attn"] == "regular"
    assert cfgs["cosine_preln"]["model"]["pre_norm"] and not cfgs["cosine"]["model"]["pre_norm"]
    for name, cfg in cfgs.items():
        assert cfg["data"]["name"] == "enwik8"
        for section in ("data", "t2i"):
            assert cfg[section] == cfgs["cosine"][section], name
        differing = {k for k in cfg["model"] if cfg["model"][k] != cfgs["cosine"]["model"][k]}
        assert differing <= {"attn", "pre_norm"}, name
        train = {k: v for k, v in cfg["train"].items() if k != "out_dir"}
        assert train == {k: v for k, v in cfgs["cosine"]["train"].items() if k != "out_dir"}, name


def test_accelerate_launch_configs():
    from cosformer import transformer

    configs = {
        n: yaml.safe_load((ROOT / f"configs/accelerate/{n}.yaml").read_text()) for n in ("single", "ddp", "fsdp")
    }
    assert configs["single"]["num_processes"] == 1
    assert configs["ddp"]["distributed_type"] == "MULTI_GPU" and configs["ddp"]["num_processes"] == 2
    fsdp = configs["fsdp"]["fsdp_config"]
    assert configs["fsdp"]["distributed_type"] == "FSDP"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # auto wrap finds blocks by class name: it must name the zoo's block class
    assert isinstance(getattr(transformer, fsdp["fsdp_transformer_layer_cls_to_wrap"]), type)


def test_parse_override_forms():
    assert parse_override("train.lr=1.0e-3") == ("train.lr", 1e-3)
    assert parse_override("--log.group=a=b") == ("log.group", "a=b")
    assert parse_override("data.path=") == ("data.path", "")
