"""cosformer.tools.bench_decode (scripts/bench_decode.py): a --device cpu smoke run on a tiny configuration that
takes the decode path, and the op's dispatch left as it was."""

import json

import pytest

from cosattn import decode


@pytest.fixture(scope="module")
def tool():
    import cosformer.tools.bench_decode

    return cosformer.tools.bench_decode


def test_cpu_smoke_run(tool, seed, tmp_path, capsys):
    out = tmp_path / "decode.json"
    n = decode.DECODE_MIN_N
    argv = ["--device", "cpu", "--dtype", "fp32", "--contexts", str(n), "--batches", "1", "--heads", "2"]
    argv += ["--kv-heads", "1", "--dim-head", "16", "--smoke-reps", "1", "--out-json", str(out)]
    assert tool.main(argv) == 0
    assert decode.ENABLED  # restored after the nosplit variant
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["complete"] is True and len(data["rows"]) == 1
    row = data["rows"][0]
    assert row["path"] == "decode" and row["ok"], row
    assert set(row["max_rel_diff"]) == {"split", "nosplit"}
    assert all(row[f"{v}_ms"] > 0 and row[f"{v}_tok_s"] > 0 for v in tool.VARIANTS)
    text = capsys.readouterr().out
    assert "SMOKE RUN" in text and text.rstrip().splitlines()[-1].split()[:2] == ["1", str(n)]


def test_smoke_run_is_never_written_to_docs(tool, tmp_path):
    target = tool.DOCS / "benchmarks" / "cpu-decode.json"
    with pytest.raises(SystemExit, match="never written under docs"):
        tool.main(["--device", "cpu", "--contexts", "8", "--batches", "1", "--out-json", str(target)])
    assert not target.exists()


@pytest.mark.parametrize("argv", [["--contexts", "0"], ["--heads", "6", "--kv-heads", "4"]])
def test_bad_arguments(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(["--device", "cpu", *argv])
