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
    rule = (data["split_waves"], data["tile_keys"], data["num_warps"], data["num_stages"])
    assert rule == (decode.SPLIT_WAVES, decode.TILE_KEYS, decode.NUM_WARPS, decode.NUM_STAGES)
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


@pytest.mark.parametrize("argv", [["--contexts", "0"], ["--heads", "6", "--kv-heads", "4"], ["--timer", "host"]])
def test_bad_arguments(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(["--device", "cpu", *argv])


def test_tune_smoke_run_records_every_configuration_and_restores_the_rule(tool, seed, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tune.json"
    rule = tool.current_rule()
    real = decode.decode_forward

    def failing_at_stages_3(*args, **kwargs):  # stands in for a configuration the GPU cannot run
        if decode.NUM_STAGES == 3:
            raise RuntimeError("out of resource: shared memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_forward", failing_at_stages_3)
    argv = ["--device", "cpu", "--dtype", "fp32", "--contexts", str(decode.DECODE_MIN_N), "--batches", "1", "2"]
    argv += ["--heads", "2", "--kv-heads", "1", "--dim-head", "16", "--smoke-reps", "1", "--out-json", str(out)]
    argv += ["--tune", "--tune-waves", "2", "8", "--tune-tile-keys", "64", "--tune-warps", "4"]
    argv += ["--tune-stages", "2", "3"]
    assert tool.main(argv) == 0
    assert tool.current_rule() == rule  # every constant restored, the failing configurations' included
    data = json.loads(out.read_text())
    assert data["complete"] and data["rule"] == rule
    rows = data["rows"]
    assert len(rows) == 2 * 4  # points × configurations
    for r in rows:
        if r["stages"] == 3:
            assert not r["ok"] and r["ms"] is None and "shared memory" in r["error"]
        else:
            assert r["ok"] and r["ms"] > 0 and r["max_rel_diff"] <= 1e-4
    text = capsys.readouterr().out
    assert "configurations by geomean" in text and "(8, 64, 4, 3)" not in text


def test_tune_summary_ranks_by_geomean_over_points(tool):
    def row(b, waves, ms):
        return dict(b=b, n=1024, waves=waves, tile_keys=64, warps=4, stages=2, ms=ms, sdpa_ms=1.0, current_ms=2.0)

    rows = [row(1, 2, 1.0), row(1, 4, 2.1), row(1, 8, 1.1), row(8, 2, 4.0), row(8, 4, 2.0), row(8, 8, 2.2)]
    rows.append(row(8, 16, 1.0) | {"ms": None, "ok": False})  # failed at one point: never ranked
    rows.append(row(1, 16, 0.9))
    text = tool.tune_summary(rows)
    ranked = [line.split("  ")[1] for line in text.splitlines() if line.startswith("  (")]
    # relative to each point's best (0.9 at b=1, 2.0 at b=8): waves 8 √(1.22·1.1), 2 √(1.11·2), 4 √(2.33·1)
    assert ranked == ["(8, 64, 4, 2)", "(2, 64, 4, 2)", "(4, 64, 4, 2)"]
    assert "waves 16" in text.splitlines()[1] and "waves 4" in text.splitlines()[2]
