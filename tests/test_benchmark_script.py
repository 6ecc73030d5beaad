"""cosformer.tools.benchmark (scripts/benchmark.py) on CPU: its pure pieces (FLOPs, grid, rows, table, summary, JSON,
arguments, do_bench compatibility) and a --device cpu smoke run of the whole pipeline on tiny points."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    import cosformer.tools.benchmark

    return cosformer.tools.benchmark


def _point(bench, **kw):
    base = dict(dtype="bf16", b=4, h=16, hk=16, d=128, n=4096, causal=False, mode="fwd", case="dense")
    return bench.Point(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and rows


@pytest.mark.parametrize("b, h, n, d", [(4, 8, 1024, 64), (1, 3, 17, 40), (2, 16, 16384, 128)])
def test_attention_flops(bench, b, h, n, d):
    fwd = 4 * b * h * n * n * d  # QKᵀ and PV, 2 flops per multiply-add
    assert bench.attention_flops(b, h, n, d, causal=False, mode="fwd") == fwd
    assert bench.attention_flops(b, h, n, d, causal=True, mode="fwd") == fwd / 2
    assert bench.attention_flops(b, h, n, d, causal=False, mode="fwdbwd") == pytest.approx(3.5 * fwd)
    assert bench.attention_flops(b, h, n, d, causal=True, mode="fwdbwd") == pytest.approx(1.75 * fwd)
    with pytest.raises(ValueError, match="mode"):
        bench.attention_flops(b, h, n, d, causal=False, mode="bwd")


def test_tflops(bench):
    p = _point(bench, b=2, h=3, n=1000, d=50, causal=True, mode="fwdbwd")
    flops = 4 * 2 * 3 * 1000**2 * 50 * 0.5 * 3.5
    assert bench.tflops(p, 2.5) == pytest.approx(flops / 2.5e-3 / 1e12)
    assert bench.tflops(p, None) is None


def test_make_row_takes_the_fastest_peer(bench):
    p = _point(bench, dtype="fp16", causal=True, mode="fwdbwd")
    row = bench.make_row(
        p,
        ours_ms=1.25,
        peer_all={"auto": 2.0, "cudnn": None, "flash": 1.5},
        ours_mib=10.0,
        peer_mib_all={"auto": 30.0, "cudnn": None, "flash": 20.0},
        max_abs_diff=1e-4,
        max_rel_diff=4e-3,
    )
    assert row["peer_backend"] == "flash" and row["peer_ms"] == 1.5
    assert row["ratio"] == pytest.approx(1.5 / 1.25)
    assert row["peer_mib"] == 20.0 and row["ours_mib"] == 10.0
    assert row["ours_tflops"] == pytest.approx(bench.point_flops(p) / 1.25e-3 / 1e12)
    assert row["peer_tflops"] == pytest.approx(bench.point_flops(p) / 1.5e-3 / 1e12)
    assert row["ok"] is True and row["hk"] == 16 and row["causal"] is True
    assert bench.make_row(p, ours_ms=1.0, peer_all={"auto": 1.0}, max_rel_diff=6e-3)["ok"] is False  # fp16: 5e-3

    none = bench.make_row(p, ours_ms=None, peer_all={"auto": None, "flash": 3.0})
    assert none["ratio"] is None and none["peer_backend"] == "flash" and none["ok"] is None
    nothing = bench.make_row(p, ours_ms=1.0, peer_all={"auto": None})
    assert nothing["peer_backend"] is None and nothing["peer_ms"] is None and nothing["ratio"] is None


def test_build_grid(bench):
    shapes = [(4, 8, 8, 64), (4, 16, 16, 128)]
    ns = [1024, 2048, 4096, 8192, 16384]
    grid = bench.build_grid(["bf16", "fp16"], shapes, ns, [False, True], ["fwd", "fwdbwd"], extras=True)
    dense = [p for p in grid if p.case == "dense"]
    mask = [p for p in grid if p.case == "mask"]
    gqa = [p for p in grid if p.case == "gqa"]
    assert (len(dense), len(mask), len(gqa)) == (80, 40, 40)
    assert len(set(grid)) == len(grid)
    assert not any(p.causal for p in mask)  # SDPA takes no explicit mask together with is_causal
    assert {(p.b, p.h, p.hk, p.d) for p in gqa} == {(4, 16, 4, 128)}
    assert {p.n for p in grid} == set(ns)
    assert len(bench.build_grid(["fp32"], shapes[:1], [64], [True], ["fwd"], extras=False)) == 1
    causal_only = bench.build_grid(["fp32"], shapes, [64], [True], ["fwd"], extras=True)
    assert [p.case for p in causal_only] == ["dense", "dense", "gqa"] and all(p.causal for p in causal_only)
    # a user shape equal to the GQA extra is not run twice
    repeated = bench.build_grid(["bf16"], [(4, 16, 4, 128)], [1024], [False], ["fwd"], extras=True)
    assert len(repeated) == len(set(repeated)) == 1


def test_estimate_fits_the_budget(bench):
    args = bench.parse_args([])
    grid = bench.build_grid(args.dtype, args.shape, args.n, args.causals, args.modes, extras=args.extras)
    est = bench.estimate_seconds(grid, n_peers=3, ref_max_n=4096, warmup_ms=25, rep_ms=100)
    assert 30 < est < 8 * 60  # the full default grid at ~400 TFLOP/s, before compilation


# ---------------------------------------------------------------------------------------------------------------
# arguments and timing


def test_parse_args(bench):
    a = bench.parse_args([])
    assert a.dtype == ["bf16", "fp16"] and a.n == [1024, 2048, 4096, 8192, 16384]
    assert a.shape == [(4, 8, 8, 64), (4, 16, 16, 128)]
    assert a.causals == [False, True] and a.modes == ["fwd", "fwdbwd"]
    assert a.backends == ["auto", "cudnn", "flash"] and a.extras and a.device == "cuda"
    assert a.time_budget is None and a.out_json is None and not a.no_plot and a.ref_max_n == 4096

    q = bench.parse_args(["--quick"])
    assert q.dtype == ["bf16"] and q.n == [1024, 4096]
    q = bench.parse_args(["--quick", "--n", "2048"])
    assert q.n == [2048]

    a = bench.parse_args(
        "--dtype fp32,bf16 --n 64 128,256 --shape 2x4x32 1x8x2x16 --causal 1 --mode fwdbwd --backends flash,math "
        "--no-extras --no-plot --time-budget 30 --device cpu --out-json x.json".split()
    )
    assert a.dtype == ["fp32", "bf16"] and a.n == [64, 128, 256]
    assert a.shape == [(2, 4, 4, 32), (1, 8, 2, 16)]
    assert a.causals == [True] and a.modes == ["fwdbwd"] and a.backends == ["flash", "math"]
    assert not a.extras and a.no_plot and a.time_budget == 30 and a.device == "cpu" and a.out_json == Path("x.json")
    assert bench.parse_args(["--causal", "0", "--mode", "fwd"]).causals == [False]


@pytest.mark.parametrize(
    "argv",
    [["--dtype", "fp8"], ["--shape", "4x8"], ["--shape", "4x6x4x64"], ["--n", "abc"], ["--backends", "xformers"]],
)
def test_parse_args_rejects(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert argv[1] in capsys.readouterr().err


def test_bench_median_handles_both_do_bench_signatures(bench):
    calls = []

    def with_return_mode(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        calls.append(("return_mode", warmup, rep, return_mode, quantiles))
        fn()
        return 1.5

    def with_quantiles(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, fast_flush=True):
        calls.append(("quantiles", warmup, rep, quantiles))
        fn()
        return [2.5]

    ran = []
    assert bench.bench_median(lambda: ran.append(1), warmup_ms=7, rep_ms=9, do_bench=with_return_mode) == 1.5
    assert bench.bench_median(lambda: ran.append(1), warmup_ms=7, rep_ms=9, do_bench=with_quantiles) == 2.5
    assert calls == [("return_mode", 7, 9, "median", None), ("quantiles", 7, 9, [0.5])] and len(ran) == 2
    with pytest.raises(RuntimeError, match="do_bench"):
        bench.bench_median(lambda: None, warmup_ms=1, rep_ms=1, do_bench=lambda fn, warmup, rep: 1.0)


# ---------------------------------------------------------------------------------------------------------------
# table, summary, JSON


def _rows(bench):
    good = bench.make_row(
        _point(bench, n=1024), ours_ms=0.5, peer_all={"auto": 0.8, "flash": 0.75}, max_rel_diff=1e-3, max_abs_diff=1e-4
    )
    slow = bench.make_row(
        _point(bench, n=16384, causal=True, mode="fwdbwd", dtype="fp16"),
        ours_ms=20.0,
        peer_all={"cudnn": 15.0},
        ours_mib=64.0,
        peer_mib_all={"cudnn": 96.0},
        max_rel_diff=9e-3,
    )
    gqa = bench.make_row(_point(bench, hk=4, case="gqa"), ours_ms=None, peer_all={"auto": None}, errors={"ours": "x"})
    return [good, slow, gqa]


def test_format_table(bench):
    rows = _rows(bench)
    lines = bench.format_table(rows).splitlines()
    assert lines[0].split() == bench.TABLE_COLUMNS
    assert len(lines) == 2 + len(rows)
    cells = [line.split() for line in lines[2:]]
    col = {c: i for i, c in enumerate(bench.TABLE_COLUMNS)}
    assert cells[0][col["ratio"]] == f"{0.75 / 0.5:.2f}" and cells[0][col["peer_backend"]] == "flash"
    assert cells[0][col["ok"]] == "ok" and cells[0][col["ours_mib"]] == "-"
    assert cells[1][col["causal"]] == "1" and cells[1][col["mode"]] == "fwdbwd"
    assert cells[1][col["ours_mib"]] == "64.0" and cells[1][col["peer_mib"]] == "96.0"
    assert "DIFF" in lines[3]  # fp16 tolerance 5e-3 exceeded
    assert cells[2][col["h"]] == "16/4" and cells[2][col["ok"]] == "ERR" and cells[2][col["ratio"]] == "-"


def test_summary_line(bench):
    text = bench.summary_line(_rows(bench))
    assert "worst ratio 0.75" in text and "fp16 dense 4x16x128 n=16384 causal=1 fwdbwd" in text
    assert "1/2 points (50%)" in text and "1/1 n=1024 points at >= 1.3x" in text
    assert "1 correctness warnings" in text and "1 rows without a ratio" in text
    assert "no point" in bench.summary_line(_rows(bench)[2:])


def test_write_json_schema(bench, tmp_path):
    meta = bench.environment(torch.device("cpu"))
    path = tmp_path / "deep" / f"{bench.slugify('NVIDIA H100 80GB HBM3')}.json"
    assert path.name == "nvidia-h100-80gb-hbm3.json"
    bench.write_json(path, meta, _rows(bench))
    data = json.loads(path.read_text())
    assert {"gpu", "torch", "triton", "cuda", "date", "rows"} <= data.keys()
    assert data["torch"] == torch.__version__ and data["smoke"] is True
    required = (
        "dtype b h hk d n causal mode case ours_ms peer_ms peer_backend peer_all ratio ours_tflops peer_tflops "
        "ours_mib peer_mib max_abs_diff"
    ).split()
    for row in data["rows"]:
        assert set(required) <= row.keys()
        assert isinstance(row["peer_all"], dict) and isinstance(row["causal"], bool)
    assert data["rows"][0]["peer_all"] == {"auto": 0.8, "flash": 0.75}
    assert data["rows"][2]["peer_all"] == {"auto": None} and data["rows"][2]["hk"] == 4
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed into place


# ---------------------------------------------------------------------------------------------------------------
# the plot and --replot


def _plot_rows(bench, dtypes=("bf16", "fp16"), modes=("fwd", "fwdbwd")):
    """Rows of a full-grid run on synthetic ratios: 8 lines per (dtype, mode), as the default grid gives."""
    rng = random.Random(0)
    points = bench.build_grid(dtypes, bench.DEFAULT_SHAPES, [1024, 2048, 4096], [False, True], modes)
    return [bench.make_row(p, ours_ms=1.0, peer_all={"flash": rng.uniform(0.7, 2.0)}) for p in points]


def _data_lines(ax):
    return [line for line in ax.lines if not line.get_label().startswith("_")]  # not the 1.0x / 1.3x guides


def test_plot_names_every_line(bench, tmp_path):
    fig = bench.plot(_plot_rows(bench), tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == [
        "bf16, forward", "bf16, forward + backward", "fp16, forward", "fp16, forward + backward"
    ]  # fmt: skip
    style_of = {}
    for ax in fig.axes:
        lines = _data_lines(ax)
        assert len(lines) == 8  # 2 dense shapes and GQA, causal and full; 2 key-padding masks, full only
        styles = [(line.get_color(), line.get_linestyle()) for line in lines]
        assert len(set(styles)) == len(lines)  # no two lines of a panel look alike
        assert ax.get_ylim() == fig.axes[0].get_ylim()  # one y scale for all panels
        for line in lines:
            series, causal = line.get_label().rsplit(" ", 1)
            assert line.get_linestyle() == ("-" if causal == "causal" else "--")
            assert style_of.setdefault(series, line.get_color()) == line.get_color()  # same colour in every panel
    assert len(set(style_of.values())) == len(style_of) == 5
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert set(style_of) | {"causal", "full (not causal)"} <= set(legend)
    assert any(t.startswith("1.0×") for t in legend) and "1.3×" in legend


def test_replot_redraws_a_json(bench, tmp_path, monkeypatch, capsys):
    path = tmp_path / "gpu.json"
    bench.write_json(path, {"gpu": "Some GPU", "smoke": False}, _plot_rows(bench, dtypes=("fp16",)))
    figures = []
    plot = bench.plot
    monkeypatch.setattr(bench, "plot", lambda *a, **kw: figures.append(plot(*a, **kw)) or figures[-1])
    assert bench.main(["--replot", str(path)]) == 0
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    (fig,) = figures
    assert len(fig.axes) == 2 and fig.get_suptitle().startswith("Some GPU:")  # one dtype: fwd and fwd+bwd
    assert all(len(_data_lines(ax)) == 8 for ax in fig.axes)


@pytest.mark.parametrize("extra, message", [(["--n", "64"], "--n"), (["--device", "cpu"], "--device"), ([], "no such")])
def test_replot_takes_a_json_alone(bench, tmp_path, capsys, extra, message):
    path = tmp_path / "gpu.json"
    if extra:  # else the file is missing
        path.write_text("{}")
    with pytest.raises(SystemExit):
        bench.parse_args(["--replot", str(path), *extra])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the pipeline on CPU


def test_cpu_smoke_run(bench, torch_attention_path, seed, tmp_path, capsys):
    out = tmp_path / "smoke.json"
    argv = "--device cpu --dtype fp16 --n 64 --shape 1x2x16 --no-extras --warmup-ms 1 --rep-ms 1".split()
    argv += ["--out-json", str(out)]
    rows = bench.run(bench.parse_args(argv), argv)
    assert len(rows) == 4  # causal × mode
    for row in rows:
        assert row["ours_ms"] > 0 and row["peer_ms"] > 0 and row["ratio"] > 0
        assert row["peer_all"]["cudnn"] is None and row["errors"]["cudnn"] == bench.UNSUPPORTED
        assert row["ok"] is True and row["max_rel_diff"] < bench.TOLERANCE["fp16"]
        assert row["ref_ms"] > 0 and row["ours_mib"] is None  # peak memory is CUDA-only
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["complete"] is True and len(data["rows"]) == 4
    assert out.with_suffix(".png").stat().st_size > 0
    text = capsys.readouterr().out.strip().splitlines()
    assert "SMOKE RUN" in text[0] and text[-1].startswith("summary:")
    assert text[-7].split() == bench.TABLE_COLUMNS  # the table comes last, then the summary


def test_smoke_run_is_never_written_to_docs(bench, torch_attention_path, tmp_path):
    target = bench.DOCS / "benchmarks" / "cpu-smoke.json"
    with pytest.raises(SystemExit, match="never written under docs"):
        bench.main(["--device", "cpu", "--n", "64", "--out-json", str(target)])
    assert not target.exists()
    assert bench.output_paths(bench.parse_args(["--device", "cpu"]), {"smoke": True}) == (None, None)
    gpu = {"smoke": False, "gpu": "NVIDIA H100 80GB HBM3"}
    default = bench.DOCS / "benchmarks" / "nvidia-h100-80gb-hbm3"
    assert bench.output_paths(bench.parse_args([]), gpu) == (default.with_suffix(".json"), default.with_suffix(".png"))
    chosen = tmp_path / "h100.json"
    assert bench.output_paths(bench.parse_args(["--out-json", str(chosen), "--no-plot"]), gpu) == (chosen, None)


def test_time_budget_stops_the_run(bench, torch_attention_path, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["--device", "cpu", "--n", "64", "--shape", "1x2x16", "--time-budget", "0", "--out-json", str(out)]
    rows = bench.run(bench.parse_args(argv), argv)
    assert rows == []
    data = json.loads(out.read_text())
    assert data["complete"] is False and "time budget" in data["stopped"]
    text = capsys.readouterr().out
    assert "STOPPED" in text and text.splitlines()[-3].split() == bench.TABLE_COLUMNS  # an empty table still prints


@pytest.mark.parametrize(
    "dtype, b, h, hk, d, n, causal, case",
    [("fp32", 1, 4, 2, 16, 33, True, "gqa"), ("fp16", 2, 2, 2, 24, 40, False, "mask")],
)
def test_bench_point_extras(bench, torch_attention_path, seed, dtype, b, h, hk, d, n, causal, case):
    runner = bench.Runner(torch.device("cpu"), warmup_ms=1, rep_ms=1, smoke_reps=2)
    p = bench.Point(dtype, b, h, hk, d, n, causal, "fwdbwd", case)
    row = runner.bench_point(p, ["auto", "flash", "math"], ref_max_n=64)
    assert row["ok"] is True, row
    assert row["ours_ms"] > 0 and row["ref_ms"] > 0 and row["peer_backend"] in ("auto", "flash", "math")
    assert row["peer_all"]["math"] is not None


@pytest.mark.parametrize("bug", ["scale", "nan"])
def test_wrong_kernel_is_flagged(bench, torch_attention_path, seed, monkeypatch, tmp_path, bug):
    from cosattn import cosine_sim_attention

    def wrong(x, p):  # plausible bugs: the wrong fixed scale, NaN rows
        def forward():
            if bug == "scale":
                return cosine_sim_attention(x["q"], x["k"], x["v"], causal=p.causal, scale=8.0)
            return cosine_sim_attention(x["q"], x["k"], x["v"], causal=p.causal).index_fill(2, torch.tensor([3]), nan)

        return forward

    nan = float("nan")
    monkeypatch.setattr(bench, "ours_forward", wrong)
    runner = bench.Runner(torch.device("cpu"), warmup_ms=1, rep_ms=1, smoke_reps=1)
    row = runner.bench_point(bench.Point("fp32", 1, 2, 2, 16, 31, True, "fwd"), ["auto", "math"], ref_max_n=0)
    assert row["ok"] is False and row["max_rel_diff"] > 1e-2
    assert "DIFF" in bench.format_table([row])
    bench.write_json(tmp_path / "w.json", {}, [row])  # strict JSON even with a NaN result
    saved = json.loads((tmp_path / "w.json").read_text())["rows"][0]
    assert saved["ok"] is False and (saved["max_rel_diff"] is None) == (bug == "nan")


def test_failures_are_recorded_and_the_run_goes_on(bench, torch_attention_path, seed, monkeypatch):
    def broken(x, p):
        def forward():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

        return forward

    monkeypatch.setattr(bench, "peer_forward", broken)
    runner = bench.Runner(torch.device("cpu"), warmup_ms=1, rep_ms=1, smoke_reps=1)
    row = runner.bench_point(bench.Point("fp32", 1, 2, 2, 16, 20, False, "fwdbwd"), ["auto", "flash"], ref_max_n=0)
    assert row["peer_all"] == {"auto": None, "flash": None} and row["ratio"] is None
    assert row["errors"] == {"auto": "out of memory", "flash": "out of memory"}
    assert row["ours_ms"] > 0 and row["ok"] is None


@pytest.mark.parametrize("repeat_below_ms", [10.0, 0.1])
def test_short_points_keep_the_lower_of_two_rounds(bench, torch_attention_path, seed, monkeypatch, repeat_below_ms):
    # timings in call order: round 1 ours, auto, math; round 2 (only when something ran under the threshold) the same
    times = iter([1.0, 0.5, 3.0, 0.4, 0.9, 2.0])
    runner = bench.Runner(torch.device("cpu"), warmup_ms=1, rep_ms=1, smoke_reps=1, repeat_below_ms=repeat_below_ms)
    monkeypatch.setattr(runner, "time", lambda fn: (fn(), next(times))[1])
    row = runner.bench_point(bench.Point("fp32", 1, 2, 2, 16, 20, False, "fwd"), ["auto", "math"], ref_max_n=0)
    if repeat_below_ms > 1:
        assert row["ours_ms"] == 0.4 and row["peer_all"] == {"auto": 0.5, "math": 2.0}
        assert row["peer_backend"] == "auto" and row["ratio"] == pytest.approx(0.5 / 0.4)
    else:
        assert row["ours_ms"] == 1.0 and row["peer_all"] == {"auto": 0.5, "math": 3.0}
        assert next(times) == 0.4  # no second round was timed


def test_sigterm_still_prints_the_table(tmp_path):
    out = tmp_path / "t.json"
    argv = "--device cpu --dtype fp32 --n 64 65 66 67 68 69 --shape 1x2x16 --no-extras --no-plot".split()
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv, "--out-json", str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        for line in proc.stdout:
            if line.startswith("[1/"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert "STOPPED: interrupted" in rest and "summary:" in rest
    data = json.loads(out.read_text())
    assert data["complete"] is False and 1 <= len(data["rows"]) < 24


# ---------------------------------------------------------------------------------------------------------------
# profiling script


def test_profile_attention_cpu_smoke(tmp_path):
    """scripts/profile_attention.py --device cpu: both views for ours and the peer, written where --out says."""
    out = tmp_path / "profile.txt"
    script = SCRIPT.parent / "profile_attention.py"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "ours fwd+bwd: kernels" in text and "peer fwd+bwd: kernels" in text
    rows = [line for line in text.splitlines() if " host " in line]
    assert [r.split()[0] + " " + r.split()[1] for r in rows] == ["ours fwd", "peer fwd", "ours fwd+bwd", "peer fwd+bwd"]
    for r in rows:
        host = float(r.split("host")[1].split("|")[0])
        assert host > 0
