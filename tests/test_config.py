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
        inception_fid=False,
        sample_compile=False,
        data_seed=0,
        holdout="none",
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
        ("model.kv_heads=3", "dividing heads (h % hk == 0); got heads=4, kv_heads=3"),
        ("model.groups=5", "groups must be a positive integer dividing dim_head=32; got groups=5"),
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
    with pytest.raises(ConfigError, match="scale applies to attn='cosine' only"):
        load_config([], ["model.attn=regular", "model.scale=20"])
    with pytest.raises(ConfigError, match="groups"):
        load_config([], ["model.attn=regular", "model.groups=2"])
    assert load_config([], ["model.attn=regular"]).model.scale is None  # regular attention has no scale


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


# ---------------------------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.beta1=2", "config key 'train.beta1' must be in [0, 1), got 2.0"),
        ("train.beta1=-0.1", "config key 'train.beta1' must be in [0, 1), got -0.1"),
        ("train.beta2=1", "config key 'train.beta2' must be in [0, 1), got 1.0"),
        ("model.scale=0", "config key 'model.scale' must be in (0, 100], got 0.0"),
        ("model.scale=1000", "config key 'model.scale' must be in (0, 100], got 1000.0"),
        ("model.scale=nan", "config key 'model.scale' must be a finite number, got nan"),
        ("train.lr=inf", "config key 'train.lr' must be a finite number, got inf"),
        ("train.lr=.inf", "config key 'train.lr' must be a finite number, got inf"),
        ("train.grad_clip=nan", "config key 'train.grad_clip' must be a finite number, got nan"),
        ("train.grad_clip=-1", "config key 'train.grad_clip' must be >= 0, got -1.0"),
        ("train.weight_decay=-inf", "config key 'train.weight_decay' must be a finite number, got -inf"),
        ("train.min_lr_ratio=nan", "config key 'train.min_lr_ratio' must be a finite number, got nan"),
        ("model.dropout=nan", "config key 'model.dropout' must be a finite number, got nan"),
        ("train.lr=0", "config key 'train.lr' must be > 0, got 0.0"),
        ("train.max_steps=0", "config key 'train.max_steps' must be >= 1, got 0"),
        ("train.warmup_steps=-1", "config key 'train.warmup_steps' must be >= 0, got -1"),
        ("train.eval_every=-1", "config key 'train.eval_every' must be >= 0, got -1"),
        ("train.checkpoint_every=-1", "config key 'train.checkpoint_every' must be >= 0, got -1"),
        ("train.log_every=0", "config key 'train.log_every' must be >= 1, got 0"),
        ("train.seed=-1", "config key 'train.seed' must be in [0, 4294967295], got -1"),
        ("train.seed=4294967296", "config key 'train.seed' must be in [0, 4294967295], got 4294967296"),
        ("t2i.sample_temperature=-1", "config key 't2i.sample_temperature' must be >= 0, got -1.0"),
        ("t2i.sample_temperature=inf", "config key 't2i.sample_temperature' must be a finite number, got inf"),
        ("t2i.palette=1", "config key 't2i.palette' must be in [2, 256], got 1"),
        ("t2i.palette=257", "config key 't2i.palette' must be in [2, 256], got 257"),
        ("t2i.fid_samples=1", "config key 't2i.fid_samples' must be >= 2, got 1"),
        ("t2i.num_val=0", "config key 't2i.num_val' must be >= 1, got 0"),
        ("t2i.image_size=0", "config key 't2i.image_size' must be >= 1, got 0"),
        ("t2i.enc_depth=0", "config key 't2i.enc_depth' must be >= 1, got 0"),
        ("data.seq_len=0", "config key 'data.seq_len' must be >= 1, got 0"),
        ("model.heads=0", "config key 'model.heads' must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_are_rejected_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert message in str(e.value)


def test_range_edges_are_accepted():
    from cosattn.interface import MAX_SCALE

    edges = [
        "train.beta1=0",
        "train.beta2=0.999",
        f"model.scale={MAX_SCALE}",
        "model.scale=0.01",
        "model.dropout=0",
        "train.min_lr_ratio=1",
        "train.grad_clip=0",
        "train.weight_decay=0",
        "train.warmup_steps=0",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.sample_every=0",
        "train.sample_length=0",
        "train.seed=4294967295",
        "t2i.sample_temperature=0",
        "t2i.palette=256",
        "t2i.fid_samples=2",
    ]
    cfg = load_config([], edges)
    assert (cfg.train.beta1, cfg.model.scale, cfg.t2i.palette) == (0.0, 0.01, 256)


def test_every_numeric_field_has_a_range():
    """A new int or float field must state its valid range in the one table that `validate` reads."""
    from cosformer.train.config import RANGES, SECTIONS

    numeric = {
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[f.name] in (int, float, float | None)
    }
    assert set(RANGES) == numeric


def test_scale_bound_is_the_kernels():
    from cosattn.interface import MAX_SCALE
    from cosformer.train.config import RANGES

    assert RANGES["model.scale"].hi == MAX_SCALE


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.dim_head=8"], "dim_head (the head dim) must be in [16, 256]; got dim_head=8"),
        (["model.dim_head=512"], "dim_head (the head dim) must be in [16, 256]; got dim_head=512"),
        (["model.rotary=true", "model.dim_head=36", "model.groups=4"], "rotary=True needs an even l2norm group size"),
        (["data.name=shapes", "model.alibi=true"], "model.alibi does not apply to data.name=shapes"),
        (["data.name=text"], "data.name=text needs data.path"),
        (["data.name=hf"], "data.name=hf needs t2i.hf_dataset"),
        (["train.patience=3", "train.eval_every=0"], "train.patience=3 counts evaluations: it needs train.eval_every"),
    ],
)
def test_cross_key_checks_that_would_fail_at_build_time(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config([], overrides)
    assert message in str(e.value)


def test_regular_attention_takes_any_head_dim():
    assert load_config([], ["model.attn=regular", "model.dim_head=8"]).model.dim_head == 8


def test_train_script_exits_2_on_a_range_error_naming_the_key(capsys, tmp_path):
    """A value the optimiser or the kernel would reject is a config error (exit 2) before anything is built,
    not a traceback (exit 1) from deep inside the trainer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # paths and sizes that keep even a mistakenly started run small and out of the user's cache
    safe = [f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.max_bytes=100000"]
    for override, key in (("train.beta1=2", "train.beta1"), ("model.scale=1000", "model.scale")):
        assert script.main([override, *safe]) == 2
        err = capsys.readouterr().err
        assert err.startswith("config error:") and f"'{key}'" in err
    assert not (tmp_path / "run").exists()
