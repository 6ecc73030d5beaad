"""cosformer.tools.bench_generate (scripts/bench_generate.py): a --device cpu smoke run of a tiny model (eager rows
timed, compiled rows skipped with the reason), its compiled rows run through generate's fixed-shape step left eager
(no C++ compiler needed), the rates derived from the medians, and argument errors."""

import json

import pytest

import cosformer.wrappers as wrappers

pytestmark = pytest.mark.usefixtures("torch_attention_path", "one_thread")

# 12 new tokens against an 8-token prompt and medians of 3: generate's time clearly exceeds the prefill's even on a
# busy 2-core runner (one sample each, with 4 new tokens, once timed a slow prefill above generate)
REPEATS = 3
SMOKE = [
    "--device",
    "cpu",
    "--tiny",
    "--batches",
    "1",
    "--contexts",
    "8",
    "--new-tokens",
    "12",
    "--repeats",
    str(REPEATS),
]


@pytest.fixture(scope="module")
def tool():
    import cosformer.tools.bench_generate

    return cosformer.tools.bench_generate


def check_rates(row):
    """The row's rates follow from its own medians: decoding is the new - 1 steps after the prefill."""
    b, new, gen, pre = row["b"], row["new"], row["generate_ms"], row["prefill_ms"]
    assert gen > pre > 0, row
    assert row["e2e_tok_s"] == pytest.approx(b * new / (gen * 1e-3))
    assert row["decode_tok_s"] == pytest.approx(b * (new - 1) / ((gen - pre) * 1e-3))
    assert row["ms_per_token"] == pytest.approx((gen - pre) / (new - 1))
    assert row["first_call_s"] > 0 and len(row["generate_ms_all"]) == REPEATS


def test_cpu_smoke_run(tool, tmp_path, capsys):
    out = tmp_path / "generate.json"
    assert tool.main([*SMOKE, "--out-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["complete"] is True and data["compile_mode"] is None
    assert {"gpu", "torch", "triton", "model", "argv"} <= set(data) and data["model"]["dim"] == tool.TINY["dim"]
    rows = {(r["attn"], r["mode"]): r for r in data["rows"]}
    assert list(rows) == [("cosine", "eager"), ("cosine", "compiled"), ("regular", "eager"), ("regular", "compiled")]
    for attn in tool.ATTNS:
        eager, compiled = rows[attn, "eager"], rows[attn, "compiled"]
        assert (eager["b"], eager["context"], eager["new"], eager["dtype"]) == (1, 8, 12, "fp32")
        check_rates(eager)
        assert eager["agree"] is None and "skipped" not in eager
        assert compiled["skipped"] == tool.CPU_COMPILED and "generate_ms" not in compiled
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert "SMOKE RUN" in lines[0] and "SMOKE RUN" in lines[-6]
    assert lines[-5].split()[:3] == ["attn", "mode", "b"] and lines[-5].endswith("peak GiB")  # the table comes last
    cosine = rows["cosine", "eager"]
    assert cosine["held_gib"] is None and cosine["peak_gib"] is None  # no device memory to read on CPU
    assert lines[-4].split() == ["cosine", "eager", "1", "8", "12", f"{cosine['ms_per_token']:.3f}",
                                 f"{cosine['decode_tok_s']:,.0f}", f"{cosine['e2e_tok_s']:,.0f}",
                                 f"{cosine['first_call_s']:.2f}", "-", "-"]  # fmt: skip
    assert lines[-1].split()[:5] == ["regular", "compiled", "1", "8", "12"]
    assert lines[-1].endswith(f"skipped: {tool.CPU_COMPILED}")


def argmin_step(net, token, cache, position):
    """A compiled step that goes wrong: negated logits, so greedy decoding picks each step's least likely token."""
    return -wrappers._decode_step(net, token, cache, position)


@pytest.mark.parametrize("step", ["eager", "argmin"])
def test_compiled_rows_on_cpu_when_asked(tool, step, tmp_path, capsys, monkeypatch):
    """--compile-mode on CPU runs the compiled rows; here generate's compiled step is replaced (no C++ compiler
    needed). Left eager, it gives exactly the eager tokens (fp32) and nothing compiles during the timed calls; made
    wrong, only the first token (the prefill's, never a compiled step's) agrees."""
    compiled_step = wrappers._decode_step if step == "eager" else argmin_step
    monkeypatch.setattr(wrappers, "compiled_decode_step", lambda mode: compiled_step)
    out = tmp_path / "generate.json"
    assert tool.main([*SMOKE, "--attn", "cosine", "--compile-mode", "default", "--out-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["compile_mode"] == "default"
    eager, compiled = data["rows"]
    assert (eager["mode"], compiled["mode"], compiled["compile_mode"]) == ("eager", "compiled", "default")
    check_rates(compiled)
    assert compiled["timed_compiles"] == 0 and eager["timed_compiles"] is None and eager["agree"] is None
    assert compiled["prefill_ms"] == eager["prefill_ms"]  # one prefill timing serves both variants
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-4].startswith("decode tok/s, compiled over eager (geomean): cosine ")
    assert lines[-1].split()[:2] == ["cosine", "compiled"]
    if step == "eager":
        assert compiled["agree"] == 1.0 and lines[-1].split()[-2] == "100.0%"
    else:  # 4 new tokens: the first from the prefill; the next is the argmin, never the argmax
        assert 1 / 12 - 1e-6 <= compiled["agree"] <= 0.5, compiled["agree"]  # the prefill's token of 12


def test_rows_carry_memory_held_and_peak(tool, tmp_path, capsys, monkeypatch):
    """Each row: held_gib read when its point began, peak_gib the most its own calls held (read after each call,
    reset before it); here a stand-in device memory whose peak grows with every reading."""
    readings = []

    def allocated_gib(device, peak=False):
        if not peak:
            return 2.0
        readings.append(3.0 + len(readings))
        return readings[-1]

    monkeypatch.setattr(tool, "allocated_gib", allocated_gib)
    out = tmp_path / "generate.json"
    assert tool.main([*SMOKE, "--attn", "cosine", "--out-json", str(out)]) == 0
    eager, compiled = json.loads(out.read_text())["rows"]
    # calls in order: prefill, eager; then REPEATS rounds of both: eager's peak is its last reading, the highest
    assert len(readings) == 2 * (1 + REPEATS) and eager["peak_gib"] == readings[-1] and eager["held_gib"] == 2.0
    assert compiled["peak_gib"] is None and "skipped" in compiled  # never ran
    assert capsys.readouterr().out.rstrip().splitlines()[-2].split()[-1] == f"{readings[-1]:.1f}"


def test_make_row_rates(tool):
    point = dict(attn="cosine", mode="eager", compile_mode=None, b=2, context=16, new=4, dtype="fp32")
    row = tool.make_row(point, generate_ms_all=[30.0, 10.0, 20.0], prefill_ms=8.0, first_call_s=1.0)
    assert row["generate_ms"] == 20.0 and row["ms_per_token"] == pytest.approx(4.0)  # (20 - 8) ms over 3 steps
    assert row["decode_tok_s"] == pytest.approx(500.0) and row["e2e_tok_s"] == pytest.approx(400.0)
    noisy = tool.make_row(point, generate_ms_all=[5.0], prefill_ms=8.0, first_call_s=1.0)
    assert noisy["decode_tok_s"] is None and noisy["ms_per_token"] is None and noisy["e2e_tok_s"] > 0


def test_smoke_run_is_never_written_to_docs(tool, tmp_path):
    target = tool.DOCS / "benchmarks" / "cpu-generate.json"
    with pytest.raises(SystemExit, match="never written under docs"):
        tool.main([*SMOKE, "--out-json", str(target)])
    assert not target.exists()


@pytest.mark.parametrize(
    "argv, flag",
    [(["--new-tokens", "0"], "--new-tokens"), (["--new-tokens", "1"], "--new-tokens"), (["--contexts", "0"],
     "--contexts"), (["--batches", "-2"], "--batches"), (["--repeats", "0"], "--repeats"),
     (["--compile-mode", "fast"], "--compile-mode")],
)  # fmt: skip
def test_bad_arguments(tool, argv, flag, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--device", "cpu", "--tiny", *argv])
    assert flag in capsys.readouterr().err


def test_nosplit_variant_switches_the_split_path_off_while_it_runs(tool, tmp_path):
    from cosattn import decode

    seen = []
    call = tool.without_split(lambda: seen.append(decode.ENABLED))
    call()
    assert seen == [False] and decode.ENABLED is True

    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tool.without_split(fails)()
    assert decode.ENABLED is True  # restored after an error too
    out = tmp_path / "g.json"
    assert tool.main([*SMOKE, "--attn", "cosine", tool.NOSPLIT, "--out-json", str(out)]) == 0
    rows = {(r["attn"], r["mode"]) for r in json.loads(out.read_text())["rows"]}
    assert rows == {(a, m) for a in ("cosine", tool.NOSPLIT) for m in ("eager", "compiled")}
