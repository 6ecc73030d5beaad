"""Sweep files and the local sweep runner: the files parse and name real config keys, expand to the intended runs,
fill wandb's command macros as wandb's agent does, and the runner runs, logs, skips finished runs and fails loudly."""

import itertools
import json
import math
import os
import random
import runpy
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cosformer.tools.report import load_metrics
from cosformer.tools.sweep import (
    RUNNER_KEYS,
    Run,
    RunResult,
    build_command,
    config_keys,
    expand_sweep,
    load_sweep,
    macro_values,
    parse_overrides,
    parse_sweep,
    run_params,
    run_sweep,
    summary_table,
    swept_keys,
    unknown_parameters,
)
from cosformer.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SWEEP_DIR = ROOT / "configs" / "sweeps"
SWEEP_FILES = sorted(SWEEP_DIR.glob("*.yaml"))

# file -> (base config, {swept key: values in file order}, constants every run must carry)
EXPECTED = {
    "lm_main": (
        "configs/lm/char_small.yaml",
        {"model.attn": ["cosine", "regular"], "model.pre_norm": [False, True], "train.seed": [0, 1, 2]},
    ),
    "lm_data_limited": (
        "configs/lm/char_small.yaml",
        {"model.attn": ["cosine", "regular"], "model.pre_norm": [False, True], "train.seed": [0, 1]},
    ),
    "lm_scale_groups": (
        "configs/lm/char_small.yaml",
        {"model.scale": [5, 8, 10, 16, 32], "model.groups": [1, 2, 4], "train.seed": [0, 1]},
    ),
    "stability": (
        "configs/lm/char_small.yaml",
        {
            "model.depth": [48, 24, 6],
            "train.lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            "train.mixed_precision": ["bf16", "fp16"],
            "model.attn": ["cosine", "regular"],
            "model.pre_norm": [False, True],
        },
    ),
    "t2i_attn_norm": (
        "configs/t2i/cosine.yaml",
        {"model.attn": ["cosine", "regular"], "model.pre_norm": [False, True]},
    ),
    "t2i_scale": ("configs/t2i/cosine.yaml", {"model.scale": [5, 10, 20]}),
    "t2i_groups": ("configs/t2i/cosine.yaml", {"model.groups": [1, 4, 8]}),
}


def trainer_config_class():
    try:
        from cosformer.train.config import Config
    except ImportError as e:
        pytest.skip(f"cosformer.train.config is not importable ({e}); cannot check keys against the trainer's schema")
    return Config


# ----------------------------------------------------------------------------- the sweep files


def test_every_expected_sweep_file_exists():
    assert {p.stem for p in SWEEP_FILES} >= set(EXPECTED), f"missing: {set(EXPECTED) - {p.stem for p in SWEEP_FILES}}"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_is_wandb_format(path):
    raw = yaml.safe_load(path.read_text())
    for key in ("name", "program", "method", "metric", "parameters", "command"):
        assert key in raw, f"{path.name} lacks {key!r}"
    assert raw["name"] == path.stem
    assert raw["method"] in ("grid", "random")
    assert set(raw["metric"]) == {"name", "goal"} and raw["metric"]["goal"] in ("minimize", "maximize")
    for name, spec in raw["parameters"].items():
        assert isinstance(spec, dict) and ({"value", "values"} & spec.keys()), f"{path.name}: {name} -> {spec}"
    assert raw["program"] == "scripts/train.py"
    assert raw["command"][:4] == ["accelerate", "launch", "${program}", "--config"]
    assert raw["command"][-1] == "${args_no_hyphens}"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_parameters_are_trainer_config_keys(path):
    known = config_keys(trainer_config_class())
    assert "model.attn" in known and "train.max_steps" in known  # the schema walk itself works
    sweep = load_sweep(path)
    assert unknown_parameters(sweep, known) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sweep_expands_to_expected_runs(name, tmp_path):
    base, swept = EXPECTED[name]
    sweep = load_sweep(SWEEP_DIR / f"{name}.yaml")
    runs = expand_sweep(sweep)
    expected_points = [dict(zip(swept, combo)) for combo in itertools.product(*swept.values())]
    assert len(runs) == len(expected_points) == math.prod(len(v) for v in swept.values())
    assert [{k: r.params[k] for k in swept} for r in runs] == expected_points
    assert swept_keys(sweep) == list(swept)
    assert len({r.name for r in runs}) == len(runs)
    # equal budgets: every run resolves to the same steps, and to the same seed unless seeds are swept; cosine-only
    # knobs are swept on cosine attention
    resolved = [load_config([base], build_command(sweep, run_params(sweep, r, tmp_path / r.name))[5:]) for r in runs]
    assert len({c.train.max_steps for c in resolved}) == 1
    if "train.seed" not in swept:
        assert len({c.train.seed for c in resolved}) == 1
    if "model.attn" not in swept:
        assert all(r.params["model.attn"] == "cosine" for r in runs)
    for run in runs:
        command = build_command(sweep, run_params(sweep, run, tmp_path / run.name))
        assert [Path(command[0]).name, *command[1:5]] == ["accelerate", "launch", "scripts/train.py", "--config", base]
        assert all("=" in arg and not arg.startswith("-") for arg in command[5:])
        passed = dict(arg.split("=", 1) for arg in command[5:])
        assert passed["train.out_dir"] == str(tmp_path / run.name)
        assert passed["log.group"] == name and passed["log.name"] == run.name


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_runs_resolve_in_trainer_config(path, tmp_path):
    """Every run's overrides, as the command passes them, load through the trainer's own config parser."""
    trainer_config_class()
    from cosformer.train.config import load_config

    sweep = load_sweep(path)
    base = ROOT / build_command(sweep, {"x": 1})[4]
    if not base.exists():
        pytest.skip(f"{base.relative_to(ROOT)} is not in the tree yet")
    for run in expand_sweep(sweep):
        args = build_command(sweep, run_params(sweep, run, tmp_path / run.name))[5:]
        cfg = load_config([base], args)
        for key, value in run.params.items():
            section, leaf = key.split(".")
            assert getattr(getattr(cfg, section), leaf) == value, key


def test_lm_and_t2i_cover_all_four_attention_norm_variants():
    for name in ("lm_main", "lm_data_limited", "t2i_attn_norm"):
        runs = expand_sweep(load_sweep(SWEEP_DIR / f"{name}.yaml"))
        combos = {(r.params["model.attn"], r.params["model.pre_norm"]) for r in runs}
        assert combos == {("cosine", False), ("cosine", True), ("regular", False), ("regular", True)}


# ----------------------------------------------------------------------------- expansion and commands


def make_sweep(parameters, method="grid", **extra):
    raw = {
        "name": "toy",
        "program": "train.py",
        "method": method,
        "metric": {"name": "val_bpc", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "${program}", "--config", "c.yaml", "${args_no_hyphens}"],
    }
    raw.update(extra)
    return parse_sweep(raw)


def test_grid_order_is_cartesian_first_parameter_slowest(seed):
    values = {f"model.k{i}": {"values": random.sample(range(100), n)} for i, n in enumerate((3, 1, 2))}
    values["train.lr"] = {"value": 0.25}
    runs = expand_sweep(make_sweep(values))
    a, b, c = (values[f"model.k{i}"]["values"] for i in range(3))
    assert [(r.params["model.k0"], r.params["model.k1"], r.params["model.k2"]) for r in runs] == list(
        itertools.product(a, b, c)
    )
    assert all(r.params["train.lr"] == 0.25 for r in runs)
    # single-valued parameters are constants: they do not appear in run names
    assert all("k1" not in r.name and "lr" not in r.name for r in runs)
    assert expand_sweep(make_sweep(values), max_runs=4) == runs[:4]


def test_run_names_disambiguate_shared_leaf_names():
    runs = expand_sweep(make_sweep({"model.dropout": {"values": [0.0, 0.1]}, "data.dropout": {"values": [1, 2]}}))
    assert runs[0].name == "model.dropout=0,data.dropout=1"
    assert len({r.name for r in runs}) == 4


def test_random_sweep_is_seeded_and_respects_bounds():
    params = {
        "train.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
        "model.depth": {"min": 2, "max": 7},
        "train.beta2": {"distribution": "uniform", "min": 0.9, "max": 0.999},
        "model.attn": {"values": ["cosine", "regular"]},
    }
    sweep = make_sweep(params, method="random", run_cap=25)
    runs = expand_sweep(sweep, seed=3)
    assert len(runs) == 25 and len({r.name for r in runs}) == 25
    assert runs == expand_sweep(sweep, seed=3)
    assert runs != expand_sweep(sweep, seed=4)
    assert len(expand_sweep(sweep, seed=3, max_runs=5)) == 5
    for r in runs:
        assert 1e-5 <= r.params["train.lr"] <= 1e-2
        assert isinstance(r.params["model.depth"], int) and 2 <= r.params["model.depth"] <= 7
        assert 0.9 <= r.params["train.beta2"] <= 0.999
    assert {r.params["model.attn"] for r in runs} == {"cosine", "regular"}
    with pytest.raises(ValueError, match="run_cap"):
        expand_sweep(make_sweep(params, method="random"))


def test_bad_sweeps_are_rejected_with_names():
    with pytest.raises(ValueError, match="grid needs discrete.*train.lr"):
        expand_sweep(make_sweep({"train.lr": {"min": 0.1, "max": 0.2}}))
    with pytest.raises(ValueError, match="bayes"):
        expand_sweep(make_sweep({"train.lr": {"values": [1]}}, method="bayes"))
    with pytest.raises(ValueError, match="method"):
        make_sweep({"train.lr": {"values": [1]}}, method="hyperband")
    with pytest.raises(ValueError, match="model"):
        make_sweep({"model": {"parameters": {"attn": {"values": ["cosine"]}}}})
    with pytest.raises(ValueError, match="train.lr"):
        make_sweep({"train.lr": {"q": 3}})
    with pytest.raises(ValueError, match="no \\$\\{args"):
        build_command(make_sweep({"train.lr": {"values": [1]}}, command=["python", "train.py"]), {"a": 1})


def test_macros_match_wandb_agent():
    """Our argument macros against wandb's own implementation (the agent's source of truth)."""
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    params = {"model.attn": "regular", "model.pre_norm": False, "train.lr": 3e-4, "model.depth": 7, "x.flag": True}
    ours = macro_values(params, "train.py", None)
    theirs = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    for macro in ("args", "args_no_hyphens", "args_no_equals", "args_no_boolean_flags", "args_json"):
        assert ours[macro] == theirs[macro], macro
    for macro in ("args_append_hydra", "args_override_hydra"):
        assert ours[macro] == theirs[macro], macro


def test_build_command_fills_program_interpreter_env_and_envvars(monkeypatch):
    monkeypatch.setenv("COSFORMER_TEST_LAUNCHER", "my-launcher")
    sweep = make_sweep(
        {"model.depth": {"values": [3]}},
        command=["${envvar:COSFORMER_TEST_LAUNCHER}", "${interpreter}", "${program}", "${args}", "--tail"],
    )
    assert build_command(sweep, {"model.depth": 3, "log.name": "a b"}) == [
        "my-launcher",
        sys.executable,
        "train.py",
        "--model.depth=3",
        "--log.name=a b",
        "--tail",
    ]


def test_launcher_from_an_inactive_virtualenv_is_found(monkeypatch):
    beside = Path(sys.executable).parent / "accelerate"
    if not beside.is_file():
        pytest.skip(f"no accelerate next to {sys.executable}")
    monkeypatch.setenv("PATH", "/nonexistent")
    sweep = make_sweep({"model.depth": {"values": [3]}}, command=["accelerate", "launch", "${program}", "${args}"])
    assert build_command(sweep, {"model.depth": 3}) == [str(beside), "launch", "train.py", "--model.depth=3"]


def test_run_params_order_and_override_rules(tmp_path):
    sweep = make_sweep({"model.attn": {"values": ["cosine", "regular"]}, "train.max_steps": {"value": 2000}})
    run = expand_sweep(sweep)[1]
    params = run_params(sweep, run, tmp_path / run.name, {"train.max_steps": 5, "train.lr": 0.1})
    assert list(params) == ["model.attn", "train.max_steps", *RUNNER_KEYS, "train.resume", "train.lr"]
    assert params["train.resume"] is True
    assert run_params(sweep, run, tmp_path, {"train.resume": False})["train.resume"] is False
    assert params["train.max_steps"] == 5 and params["model.attn"] == "regular"
    assert params["log.group"] == "toy" and params["log.name"] == run.name == "attn=regular"
    for key in ("model.attn", "train.out_dir", "log.name"):
        with pytest.raises(ValueError, match=key):
            run_params(sweep, run, tmp_path, {key: "x"})


def test_parse_overrides():
    assert parse_overrides(["train.max_steps=50", "model.pre_norm=true", "log.name=a=b", "train.lr=0.5"]) == {
        "train.max_steps": 50,
        "model.pre_norm": True,
        "log.name": "a=b",
        "train.lr": 0.5,
    }
    # the trainer's own parser: leading dashes are tolerated there (wandb's `${args}` form), so here too
    assert parse_overrides(["--train.max_steps=5"]) == {"train.max_steps": 5}
    for bad in ("train.max_steps", "=3", "--=1"):
        with pytest.raises(ValueError, match="key=value"):
            parse_overrides([bad])


def starred(table: str) -> list[str]:
    """Names of the runs a summary table marks best."""
    return [line.split()[0] for line in table.splitlines()[2:] if line.rstrip().endswith(" *")]


# ----------------------------------------------------------------------------- the runner, on a stub program

STUB = textwrap.dedent(
    """
    import json, os, sys
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out = args["train.out_dir"]
    os.makedirs(out, exist_ok=True)
    print("stub run", args["log.name"], "gpu", os.environ.get("CUDA_VISIBLE_DEVICES"))
    with open(os.path.join(out, "calls.txt"), "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    depth = int(args["model.depth"])
    if depth == int(os.environ.get("STUB_FAIL_DEPTH", "-1")):
        sys.exit(3)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 10.0, "memory_mib": 1.0}) + "\\n")
        if depth == int(os.environ.get("STUB_DIVERGE_DEPTH", "-1")):
            # the best value of the sweep, logged before the run went non-finite: a diverged run is never best
            f.write(json.dumps({"step": 2, "val_loss": 0.01, "val_bpc": 0.01}) + "\\n")
            f.write(json.dumps({"step": 3, "diverged": True}) + "\\n")
            sys.exit(1)
        if depth == int(os.environ.get("STUB_STOP_DEPTH", "-1")):  # stopped by a signal: exit 0, no final line
            f.write(json.dumps({"step": 2, "val_loss": 0.01, "val_bpc": 0.01}) + "\\n")
            sys.exit(0)
        f.write(json.dumps({"step": 2, "val_loss": 1.0, "val_bpc": depth / 10}) + "\\n")
        f.write(json.dumps({"step": 2, "final": True, "test_bpc": depth / 10 + 0.01}) + "\\n")
    """
)


@pytest.fixture
def stub_sweep(tmp_path):
    program = tmp_path / "stub_train.py"
    program.write_text(STUB)
    path = tmp_path / "stub.yaml"
    raw = {
        "name": "stub",
        "program": str(program),
        "method": "grid",
        "metric": {"name": "val_bpc", "goal": "minimize"},
        "parameters": {"model.depth": {"values": [5, 2, 9, 4]}, "train.seed": {"value": 0}},
        "command": ["${interpreter}", "${program}", "--config", "none.yaml", "${args_no_hyphens}"],
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_runner_runs_logs_skips_and_reports_failures(stub_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_FAIL_DEPTH", "9")
    monkeypatch.setenv("STUB_DIVERGE_DEPTH", "4")
    sweep = load_sweep(stub_sweep)
    root = tmp_path / "runs"
    lines = []
    results = run_sweep(sweep, root, {"train.seed": 1}, echo=lines.append)
    status = {r.run.name: r.status for r in results}
    assert status == {"depth=5": "done", "depth=2": "done", "depth=9": "failed", "depth=4": "diverged"}
    by_name = {r.run.name: r for r in results}
    assert by_name["depth=2"].metric == pytest.approx(0.2) and by_name["depth=9"].returncode == 3
    assert "stub run depth=5" in (root / "stub" / "depth=5" / "stdout.log").read_text()
    call = json.loads((root / "stub" / "depth=5" / "calls.txt").read_text())
    assert call["argv"][:2] == ["--config", "none.yaml"] and "train.seed=1" in call["argv"]
    assert "log.group=stub" in call["argv"]
    table = summary_table(results, sweep.metric)
    assert starred(table) == ["depth=2"] and "failed" in table and "diverged" in table
    assert any("depth=9: failed" in line and "stdout.log" in line for line in lines)

    # second pass: finished and diverged runs are skipped, keeping their status; only the failed one runs again
    monkeypatch.setenv("STUB_FAIL_DEPTH", "-1")
    again = run_sweep(sweep, root, {"train.seed": 1}, echo=lines.append)
    assert {r.run.name: (r.status, r.skipped) for r in again} == {
        "depth=5": ("done", True),
        "depth=2": ("done", True),
        "depth=9": ("done", False),
        "depth=4": ("diverged", True),
    }
    assert len((root / "stub" / "depth=5" / "calls.txt").read_text().splitlines()) == 1
    assert len((root / "stub" / "depth=9" / "calls.txt").read_text().splitlines()) == 2
    assert {r.run.name: r.metric for r in again}["depth=5"] == pytest.approx(0.5)
    # the diverged run's last value (0.01, logged before it diverged) is the lowest, and still not the best
    assert {r.run.name: r.metric for r in again}["depth=4"] == pytest.approx(0.01)
    table = summary_table(again, sweep.metric)
    assert starred(table) == ["depth=2"]
    assert "diverged (skipped)" in table and "done (skipped)" in table


def test_runner_a_run_that_ends_without_its_final_line_is_unfinished(stub_sweep, tmp_path, monkeypatch, capsys):
    """Exit status 0 without a final line (stopped by a signal, resumable): neither done nor best."""
    monkeypatch.setenv("STUB_STOP_DEPTH", "5")
    sweep = load_sweep(stub_sweep)
    results = run_sweep(sweep, tmp_path / "runs", echo=lambda s: None)
    assert {r.run.name: r.status for r in results}["depth=5"] == "unfinished"
    assert starred(summary_table(results, sweep.metric)) == ["depth=2"]
    trainer_config_class()
    main = runpy.run_path(str(ROOT / "scripts" / "sweep.py"), run_name="sweep_script")["main"]
    assert main([str(stub_sweep), "--out-root", str(tmp_path / "again")]) == 1  # the sweep is not complete
    assert "1 run(s) unfinished, rerun to resume: depth=5" in capsys.readouterr().err


def _result(name, status, metric, skipped=False):
    return RunResult(Run(name, {}), Path(name), [], status, metric=metric, skipped=skipped)


@pytest.mark.parametrize("goal", ["minimize", "maximize"])
def test_summary_never_stars_a_failed_run_or_a_non_finite_metric(goal):
    results = [
        _result("nan-first", "done", math.nan),
        _result("diverged", "diverged", -5.0, skipped=True),
        _result("diverged-high", "diverged", 50.0),
        _result("failed", "failed", -4.0),
        _result("unfinished", "unfinished", 40.0),
        _result("inf", "done", math.inf if goal == "maximize" else -math.inf),
        _result("a", "done", 0.3),
        _result("b", "done", 0.2, skipped=True),
        _result("none", "done", None),
    ]
    assert starred(summary_table(results, {"name": "val_bpc", "goal": goal})) == ["a" if goal == "maximize" else "b"]
    assert starred(summary_table(results[:6], {"name": "val_bpc", "goal": goal})) == []


def test_runner_counts_a_launcher_that_cannot_start(tmp_path):
    sweep = make_sweep({"model.depth": {"values": [1, 2]}}, command=["/nonexistent/launcher", "${args}"])
    results = run_sweep(sweep, tmp_path, echo=lambda s: None)
    assert [(r.status, r.returncode) for r in results] == [("failed", None), ("failed", None)]
    assert "could not start" in (results[0].out_dir / "stdout.log").read_text()


def test_runner_one_run_per_gpu(stub_sweep, tmp_path):
    results = run_sweep(load_sweep(stub_sweep), tmp_path / "runs", gpus=["3", "5"], echo=lambda s: None)
    assert all(r.status == "done" for r in results)
    for r in results:
        calls = [json.loads(line) for line in (r.out_dir / "calls.txt").read_text().splitlines()]
        assert [c["gpu"] for c in calls] == [r.gpu] and r.gpu in ("3", "5")


def test_sweep_script_exit_code_dry_run_and_key_check(stub_sweep, tmp_path, monkeypatch, capsys):
    trainer_config_class()
    main = runpy.run_path(str(ROOT / "scripts" / "sweep.py"), run_name="sweep_script")["main"]
    root = tmp_path / "runs"
    assert main([str(stub_sweep), "--dry-run", "--out-root", str(root), "train.max_steps=7"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and all("train.max_steps=7" in line for line in out) and not root.exists()

    monkeypatch.setenv("STUB_FAIL_DEPTH", "2")
    assert main([str(stub_sweep), "--out-root", str(root), "--max-runs", "2"]) == 1
    assert "1 run(s) failed: depth=2" in capsys.readouterr().err
    monkeypatch.setenv("STUB_FAIL_DEPTH", "-1")
    assert main([str(stub_sweep), "--out-root", str(root)]) == 0
    assert "done (skipped)" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        main([str(stub_sweep), "model.not_a_key=1"])
    assert "model.not_a_key" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real trainer, tiny


@pytest.mark.usefixtures("torch_attention_path")
def test_two_run_grid_with_real_trainer(tmp_path, seed):
    train_script = ROOT / "scripts" / "train.py"
    if not train_script.exists():
        pytest.skip("scripts/train.py is not in the tree yet: the real-trainer sweep runs once it lands")
    launcher = ["accelerate", "launch", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(seed)
    corpus.write_text("".join(rng.choice("abcdefgh \n") for _ in range(20_000)))
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "program": str(train_script),
                "method": "grid",
                "metric": {"name": "val_bpc", "goal": "minimize"},
                "parameters": {"model.attn": {"values": ["cosine", "regular"]}, "train.max_steps": {"value": 3}},
                "command": [*launcher, "${program}", "${args_no_hyphens}"],
            },
            sort_keys=False,
        )
    )
    extra = parse_overrides(
        [
            "data.name=text",
            f"data.path={corpus}",
            "model.dim=32",
            "model.depth=1",
            "model.heads=2",
            "model.dim_head=16",
            "data.seq_len=32",
            "train.batch_size=4",
            "train.eval_every=3",
            "train.eval_batches=1",
            "train.log_every=1",
            "train.sample_length=8",
            "log.tracker=none",
        ]
    )
    env = dict(os.environ, TRITON_INTERPRET="0", WANDB_MODE="disabled")
    results = run_sweep(load_sweep(sweep_file), tmp_path / "runs", extra, env=env, echo=lambda s: None)
    logs = {r.run.name: (r.out_dir / "stdout.log").read_text()[-3000:] for r in results}
    assert [r.status for r in results] == ["done", "done"], logs
    for r in results:
        records = load_metrics(r.out_dir / "metrics.jsonl")
        assert records[-1].get("final") is True, logs[r.run.name]
        assert any("loss" in rec for rec in records)
        config = yaml.safe_load((r.out_dir / "config.yaml").read_text())
        assert config["model"]["attn"] == r.run.params["model.attn"] and config["model"]["dim"] == 32
        assert config["log"]["group"] == "tiny" and config["log"]["name"] == r.run.name

    again = run_sweep(load_sweep(sweep_file), tmp_path / "runs", extra, env=env, echo=lambda s: None)
    assert [(r.status, r.skipped) for r in again] == [("done", True), ("done", True)]
    assert [r.metric for r in again] == [r.metric for r in results] and None not in [r.metric for r in results]

    from cosformer.tools.report import write_report

    report = write_report([tmp_path / "runs" / "tiny"], tmp_path / "report")
    assert report["curves"].stat().st_size > 0
    assert [row.split(" | ")[0] for row in report["table"].splitlines()[2:]] == ["| cosine", "| regular"]
