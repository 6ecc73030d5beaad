"""Local runner for wandb sweep files: the same `configs/sweeps/*.yaml` drives `wandb agent` and a plain grid.

A sweep file is wandb's format (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration):

    name: lm_main
    program: scripts/train.py
    method: grid                       # grid | random
    metric: {name: val_bpc, goal: minimize}
    parameters:
      model.attn: {values: [cosine, regular]}
      train.max_steps: {value: 5000}
    command: [accelerate, launch, "${program}", --config, configs/default.yaml, "${args_no_hyphens}"]

`expand_sweep` turns it into runs (grid: cartesian product, first parameter slowest; random: a seeded sample of
`run_cap` or `max_runs` runs). `build_command` fills the command's macros exactly as wandb's agent does
(`wandb/wandb_agent.py`: `${args}` → `--k=v`, `${args_no_hyphens}` → `k=v`, values formatted with `str`, so a
boolean arrives as `True`/`False`), except that `${interpreter}` is this interpreter rather than `python` on PATH.
Each run also gets `train.out_dir`, `log.group` (the sweep's name), `log.name` and `train.resume=True`, so
the same file gives the same grouping offline and online, and a rerun continues a run that was cut short.
`run_sweep` runs them one after another or one per GPU, skips runs whose `metrics.jsonl` already ends in a
result (a final or a diverged line), and returns one `RunResult` per run. A skipped run keeps the status its log
shows (done or diverged), so a rerun reports the sweep as the first pass did. The best run of a summary is a run
that finished (its final line exists, its process succeeded) with a finite metric: a diverged, failed or
unfinished run is never best, whatever value it logged before it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import queue
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cosformer.tools.report import load_metrics
from cosformer.train.config import Config, ConfigError, parse_override

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ARG_MACROS = (
    "args",
    "args_no_hyphens",
    "args_no_equals",
    "args_no_boolean_flags",
    "args_json",
    "args_json_file",
    "args_append_hydra",
    "args_override_hydra",
)
# Set by the runner for every run; an extra override of these would send all runs to one place.
RUNNER_KEYS = ("train.out_dir", "log.group", "log.name")
_ENVVAR_MACRO = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclass
class Run:
    """One point of a sweep: its name (also its directory name) and the parameters it passes."""

    name: str
    params: dict[str, typing.Any]


@dataclass
class RunResult:
    run: Run
    out_dir: Path
    command: list[str]
    # done (final line written) | diverged | failed | unfinished (exited 0 before its final line: stopped by a
    # signal, resumable) | planned (dry run)
    status: str
    returncode: int | None = None
    seconds: float = 0.0
    metric: float | None = None
    gpu: str | None = None
    skipped: bool = False  # not run this time: its log already held its result (status says which)

    @property
    def can_be_best(self) -> bool:
        """Only a finished run with a finite value of the sweep's metric competes for best."""
        return self.status == "done" and self.metric is not None and math.isfinite(self.metric)


@dataclass
class Sweep:
    name: str
    method: str
    program: str | None
    command: list[str]
    metric: dict[str, str]
    parameters: dict[str, dict]
    run_cap: int | None = None
    raw: dict = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------------------- loading and expansion


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep file; the sweep's name defaults to the file's stem."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"sweep file {path}: expected a mapping at the top level, got {type(raw).__name__}")
    return parse_sweep(raw, default_name=path.stem)


def parse_sweep(raw: dict, default_name: str = "sweep") -> Sweep:
    method = raw.get("method")
    if method not in ("grid", "random", "bayes"):
        raise ValueError(f"sweep {default_name!r}: method must be grid, random or bayes, got {method!r}")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"sweep {default_name!r}: 'parameters' must be a non-empty mapping, got {params!r}")
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise ValueError(f"sweep {default_name!r}: parameter {key!r} must be a mapping, got {spec!r}")
        if "parameters" in spec:
            raise ValueError(
                f"sweep {default_name!r}: parameter {key!r} nests 'parameters'; write dotted keys instead "
                f"(e.g. {key}.attn) so the trainer receives them as overrides"
            )
        if not ({"value", "values", "distribution", "min"} & spec.keys()):
            raise ValueError(
                f"sweep {default_name!r}: parameter {key!r} needs one of value, values, distribution or min/max; "
                f"got keys {sorted(spec)}"
            )
    metric = raw.get("metric") or {}
    if metric and (not isinstance(metric, dict) or "name" not in metric):
        raise ValueError(f"sweep {default_name!r}: metric must be a mapping with a 'name', got {metric!r}")
    if metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise ValueError(f"sweep {default_name!r}: metric goal must be minimize or maximize, got {metric['goal']!r}")
    command = raw.get("command") or list(DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(c, str | int | float) for c in command):
        raise ValueError(f"sweep {default_name!r}: command must be a list of strings, got {command!r}")
    command = [str(c) for c in command]
    if "${program}" in command and not raw.get("program"):
        raise ValueError(f"sweep {default_name!r}: command uses ${{program}} but the file sets no 'program'")
    return Sweep(
        name=str(raw.get("name") or default_name),
        method=method,
        program=raw.get("program"),
        command=command,
        metric=dict(metric),
        parameters=dict(params),
        run_cap=raw.get("run_cap"),
        raw=raw,
    )


def swept_keys(sweep: Sweep) -> list[str]:
    """Parameters that vary between runs (the rest are constants shared by every run)."""
    return [k for k, spec in sweep.parameters.items() if not ("value" in spec or len(spec.get("values", [])) == 1)]


def expand_sweep(sweep: Sweep, max_runs: int | None = None, seed: int = 0) -> list[Run]:
    """The sweep's runs, in a stable order; names are unique and built from the swept values only."""
    if sweep.method == "bayes":
        raise ValueError(
            f"sweep {sweep.name!r}: method 'bayes' needs wandb's server to pick points; run it with "
            f"`wandb sweep` + `wandb agent`, or use grid/random locally"
        )
    if sweep.method == "grid":
        axes = []
        for key, spec in sweep.parameters.items():
            if "value" in spec:
                axes.append([spec["value"]])
            elif "values" in spec:
                axes.append(list(spec["values"]))
            else:
                raise ValueError(
                    f"sweep {sweep.name!r}: grid needs discrete parameters; {key!r} has {spec!r} "
                    f"(give it 'values' or use method: random)"
                )
        points = [dict(zip(sweep.parameters, combo)) for combo in itertools.product(*axes)]
        if max_runs is not None:
            points = points[:max_runs]
    else:
        count = max_runs if max_runs is not None else sweep.run_cap
        if not count:
            raise ValueError(f"sweep {sweep.name!r}: a random sweep needs run_cap in the file or --max-runs")
        rng = random.Random(seed)
        points = [{k: _sample(k, spec, rng) for k, spec in sweep.parameters.items()} for _ in range(count)]
    return _name_runs(points, swept_keys(sweep))


def _sample(key: str, spec: dict, rng: random.Random):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        values, probs = list(spec["values"]), spec.get("probabilities")
        return rng.choices(values, weights=probs)[0] if probs else rng.choice(values)
    lo, hi = spec.get("min"), spec.get("max")
    dist = spec.get("distribution")
    if dist is None:  # wandb infers the distribution from the bounds' type
        dist = "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform"
    if dist == "constant":
        return spec["value"]
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "uniform":
        return rng.uniform(float(lo), float(hi))
    if dist == "q_uniform":
        q = spec.get("q", 1.0)
        return round(rng.uniform(float(lo), float(hi)) / q) * q
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi))))
    if dist == "log_uniform":  # wandb's bounds here are natural-log exponents
        return math.exp(rng.uniform(float(lo), float(hi)))
    if dist == "normal":
        return rng.gauss(float(spec.get("mu", 0.0)), float(spec.get("sigma", 1.0)))
    raise ValueError(f"parameter {key!r}: distribution {dist!r} is not supported by the local runner")


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _name_runs(points: list[dict], keys: list[str]) -> list[Run]:
    # Leaf names keep directory names short; a leaf shared by two keys keeps its full dotted key.
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    labels = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves)]
    runs, seen = [], {}
    for point in points:
        name = ",".join(f"{label}={_format_value(point[k])}" for label, k in zip(labels, keys)) or "run"
        name = _UNSAFE_NAME_CHARS.sub("_", name)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # a random sweep can draw the same point twice
            name = f"{name}-{seen[name]}"
        runs.append(Run(name=name, params=point))
    return runs


# ----------------------------------------------------------------------------- commands


def parse_overrides(items: list[str]) -> dict[str, typing.Any]:
    """`key=value` strings to a dict, parsed exactly as the trainer parses its overrides (`parse_override`)."""
    out = {}
    for item in items:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        out[key] = value
    return out


def run_params(sweep: Sweep, run: Run, out_dir: Path, extra: dict | None = None) -> dict[str, typing.Any]:
    """Everything a run passes: its sweep point, where it writes and how it is grouped, then the extras.

    Extras may override a sweep constant (e.g. `train.max_steps` for a quick pass), never a swept parameter:
    that would make every run of the sweep the same run."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & (set(swept_keys(sweep)) | set(RUNNER_KEYS)))
    if clash:
        raise ValueError(
            f"override(s) {clash} would replace what sweep {sweep.name!r} varies or sets per run; "
            f"swept: {swept_keys(sweep)}, per run: {list(RUNNER_KEYS)}"
        )
    params = dict(run.params)
    params.update({"train.out_dir": str(out_dir), "log.group": sweep.name, "log.name": run.name})
    # A run cut short (killed, preempted) continues from its last checkpoint when the sweep is rerun; with no
    # checkpoint yet the trainer starts fresh, so the same command starts and restarts a run.
    params.setdefault("train.resume", True)
    params.update(extra)
    return params


def macro_values(params: dict[str, typing.Any], program: str | None, json_file: Path | None) -> dict[str, list[str]]:
    """The argument lists wandb's agent substitutes for each `${...}` macro (same formatting: `str(value)`)."""
    flags = [f"{k}={v}" for k, v in params.items()]
    no_bool = [f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items() if v is not False]
    return {
        "args": ["--" + f for f in flags],
        "args_no_hyphens": flags,
        "args_no_equals": [s for k, v in params.items() for s in (f"--{k}", str(v))],
        "args_no_boolean_flags": no_bool,
        "args_json": [json.dumps(params)],
        "args_json_file": [str(json_file)] if json_file is not None else [],
        "args_append_hydra": ["+" + f for f in flags],
        "args_override_hydra": ["++" + f for f in flags],
        "interpreter": [sys.executable],
        "program": [program] if program else [],
        "env": ["/usr/bin/env"] if os.name != "nt" else [],
    }


def build_command(sweep: Sweep, params: dict[str, typing.Any], json_file: Path | None = None) -> list[str]:
    """The sweep's command for one run, macros filled in (a macro must be a whole element, as in wandb)."""
    if not any(f"${{{m}}}" in sweep.command for m in ARG_MACROS):
        raise ValueError(
            f"sweep {sweep.name!r}: command {sweep.command} has no ${{args...}} macro, so a local run could not "
            f"receive its parameters; add ${{args_no_hyphens}}"
        )
    values = macro_values(params, sweep.program, json_file)
    out = []
    for part in sweep.command:
        part = _ENVVAR_MACRO.sub(lambda m: os.environ.get(m.group(1), m.group(1)), part)
        if part.startswith("${") and part.endswith("}") and part[2:-1] in values:
            out.extend(values[part[2:-1]])
        else:
            out.append(part)
    # `accelerate` lives next to this interpreter in a virtual environment that need not be activated
    beside = Path(sys.executable).parent / out[0] if out else None
    if out and shutil.which(out[0]) is None and beside.is_file() and os.access(beside, os.X_OK):
        out[0] = str(beside)
    return out


# ----------------------------------------------------------------------------- running


def run_state(out_dir: Path) -> str | None:
    """'final' or 'diverged' when the run's log already holds its result, else None (absent or cut short)."""
    records = load_metrics(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").exists() else []
    if any(r.get("final") for r in records):
        return "final"
    if any(r.get("diverged") for r in records):
        return "diverged"
    return None


def final_metric(out_dir: Path, name: str | None) -> float | None:
    """The run's value of the sweep metric: from the final line when it has one, else the last logged."""
    if not name or not (out_dir / "metrics.jsonl").exists():
        return None
    records = load_metrics(out_dir / "metrics.jsonl")
    for record in [r for r in records if r.get("final")] + records[::-1]:
        if isinstance(record.get(name), int | float):
            return float(record[name])
    return None


def plan_sweep(
    sweep: Sweep, out_root: str | os.PathLike, extra: dict | None = None, max_runs: int | None = None, seed: int = 0
) -> list[tuple[Run, Path, dict]]:
    """(run, out_dir, params) for every run, checked up front so a bad override fails before anything starts."""
    root = Path(out_root) / sweep.name
    plan = []
    for run in expand_sweep(sweep, max_runs=max_runs, seed=seed):
        out_dir = root / run.name
        plan.append((run, out_dir, run_params(sweep, run, out_dir, extra)))
    return plan


def run_sweep(
    sweep: Sweep,
    out_root: str | os.PathLike = "runs/sweeps",
    extra: dict | None = None,
    gpus: list[str] | None = None,
    max_runs: int | None = None,
    seed: int = 0,
    dry_run: bool = False,
    env: dict[str, str] | None = None,
    echo=print,
) -> list[RunResult]:
    """Run every point of the sweep: sequentially, or one run per GPU at a time (`CUDA_VISIBLE_DEVICES`).

    A run's output goes to `<out_dir>/stdout.log`; a run whose log already has its final (or diverged) line is
    skipped, so an interrupted sweep resumes where it stopped. A diverged run is a result, not a failure."""
    plan = plan_sweep(sweep, out_root, extra, max_runs=max_runs, seed=seed)
    results: list[RunResult | None] = [None] * len(plan)
    pending = queue.Queue()
    for index, (run, out_dir, params) in enumerate(plan):
        command = build_command(sweep, params, out_dir / "sweep_args.json")
        state = run_state(out_dir)
        if state is not None:
            metric = final_metric(out_dir, sweep.metric.get("name"))
            status = "done" if state == "final" else "diverged"
            results[index] = RunResult(run, out_dir, command, status, metric=metric, skipped=True)
            echo(f"[{index + 1}/{len(plan)}] {run.name}: skipped ({state} line in {out_dir / 'metrics.jsonl'})")
        elif dry_run:
            results[index] = RunResult(run, out_dir, command, "planned")
            echo(shlex.join(command))
        else:
            pending.put((index, run, out_dir, params, command))
    if dry_run or pending.empty():
        return results

    base_env = dict(os.environ if env is None else env)
    lock = threading.Lock()
    procs: dict[int, subprocess.Popen] = {}
    stop = threading.Event()

    def work(gpu: str | None):
        while not stop.is_set():
            try:
                index, run, out_dir, params, command = pending.get_nowait()
            except queue.Empty:
                return
            run_env = dict(base_env)
            if gpu is not None:
                run_env["CUDA_VISIBLE_DEVICES"] = gpu
            where = f" on GPU {gpu}" if gpu is not None else ""
            with lock:
                echo(f"[{index + 1}/{len(plan)}] {run.name}{where}: {shlex.join(command)}")
            out_dir.mkdir(parents=True, exist_ok=True)
            if any(p == "${args_json_file}" for p in sweep.command):
                (out_dir / "sweep_args.json").write_text(json.dumps(params))
            start = time.monotonic()
            rc = None
            with open(out_dir / "stdout.log", "a") as log:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                try:
                    proc = subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, env=run_env, start_new_session=True
                    )
                except OSError as e:  # e.g. the launcher is not installed: a failed run, not a dead worker
                    log.write(f"could not start: {e}\n")
                else:
                    with lock:
                        procs[index] = proc
                    rc = proc.wait()
                    with lock:
                        procs.pop(index, None)
            seconds = time.monotonic() - start
            state = run_state(out_dir)
            if state == "diverged":
                status = "diverged"
            elif rc == 0:
                status = "done" if state == "final" else "unfinished"
            else:
                status = "failed"
            result = RunResult(
                run, out_dir, command, status, rc, seconds, final_metric(out_dir, sweep.metric.get("name")), gpu
            )
            with lock:
                results[index] = result
                tail = f" (see {out_dir / 'stdout.log'})" if status == "failed" else ""
                echo(f"[{index + 1}/{len(plan)}] {run.name}: {status} in {seconds:.0f}s, rc={rc}{tail}")

    workers = [threading.Thread(target=work, args=(gpu,), daemon=True) for gpu in (gpus or [None])]
    for w in workers:
        w.start()
    try:
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(timeout=0.2)
    except KeyboardInterrupt:
        stop.set()
        with lock:
            # Each run has its own session: end the launcher and the processes it spawned, nothing else.
            for proc in procs.values():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        raise
    for index, result in enumerate(results):
        if result is None:  # its worker died outside the run itself: count it, never drop it
            run, out_dir, _ = plan[index]
            results[index] = RunResult(run, out_dir, [], "failed")
    return results


def best_result(results: list[RunResult], metric: dict | None = None) -> RunResult | None:
    """The best run by the sweep's metric among those that can be best (`RunResult.can_be_best`), or None."""
    scored = [r for r in results if r is not None and r.can_be_best]
    if not scored:
        return None
    pick = max if (metric or {}).get("goal") == "maximize" else min
    return pick(scored, key=lambda r: r.metric)


def summary_table(results: list[RunResult], metric: dict | None = None) -> str:
    """A plain-text table of the runs; the best finished run by the sweep's metric is starred."""
    name = (metric or {}).get("name")
    best = best_result(results, metric)
    header = ["run", "status", "rc", "time", name or "metric"]
    rows = []
    for r in results:
        if r is None:
            continue
        value = "" if r.metric is None else f"{r.metric:.4f}" + (" *" if r is best else "")
        rc = "" if r.returncode is None else str(r.returncode)
        status = f"{r.status} (skipped)" if r.skipped else r.status
        rows.append([r.run.name, status, rc, f"{r.seconds:.0f}s" if r.seconds else "", value])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation against the config schema


def config_keys(config_cls: type) -> set[str]:
    """Every dotted leaf key of a nested config dataclass, e.g. {'model.attn', 'train.max_steps', ...}."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls: expected a dataclass type, got {config_cls!r}")
    hints = typing.get_type_hints(config_cls)
    keys = set()
    for f in dataclasses.fields(config_cls):
        sub = hints.get(f.name, f.type)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            keys |= {f"{f.name}.{k}" for k in config_keys(sub)}
        else:
            keys.add(f.name)
    return keys


def unknown_parameters(sweep: Sweep, known: set[str]) -> list[str]:
    """Parameter names of the sweep that the trainer's schema does not have."""
    return [k for k in sweep.parameters if k not in known]


# ---------------------------------------------------------------------------------------------------------------
# command line (scripts/sweep.py)

_USAGE = """Run a wandb sweep file locally: every grid point (or a seeded random sample), sequentially or one per GPU.

    python scripts/sweep.py configs/sweeps/lm_main.yaml --dry-run
    python scripts/sweep.py configs/sweeps/lm_main.yaml --gpus 0,1,2,3 train.max_steps=50

The same file runs online with `wandb sweep configs/sweeps/lm_main.yaml` + `wandb agent <id>`.
Runs land in <out-root>/<sweep name>/<run name>; finished runs are skipped, so rerunning resumes the sweep.
Then: python scripts/report.py runs/sweeps/lm_main --out docs/results/lm_main
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="sweep file in wandb's format (configs/sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. train.max_steps=50")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids: one run per GPU at a time")
    parser.add_argument("--out-root", default="runs/sweeps", help="runs go to <out-root>/<sweep name>/<run name>")
    parser.add_argument("--max-runs", type=int, default=None, help="first N grid points, or N random samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random sweep's sample")
    args = parser.parse_intermixed_args(argv)

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] or None
    try:
        sweep = load_sweep(args.file)
        extra = parse_overrides(args.overrides)
        known = config_keys(Config)
        unknown = unknown_parameters(sweep, known) + [k for k in extra if k not in known]
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} in {args.file} or the overrides")
        results = run_sweep(
            sweep, args.out_root, extra, gpus=gpus, max_runs=args.max_runs, seed=args.seed, dry_run=args.dry_run
        )
    except (OSError, ValueError) as e:  # a bad file or override: say so before any run starts
        parser.error(str(e))
    if args.dry_run:
        return 0
    print(f"\nsweep {sweep.name} ({args.out_root}/{sweep.name})")
    print(summary_table(results, sweep.metric))
    failed = [r.run.name for r in results if r.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    unfinished = [r.run.name for r in results if r.status == "unfinished"]
    if unfinished:
        print(f"{len(unfinished)} run(s) unfinished, rerun to resume: {', '.join(unfinished)}", file=sys.stderr)
    return 1 if failed or unfinished else 0
