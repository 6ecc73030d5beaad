"""cosformer.tools.bench_packed (scripts/bench_packed.py): the packed rows (segment ids, visible pairs, SDPA's mask)
against brute force, and a --device cpu smoke run on a tiny point (flex may read n/a on CPU: nothing here needs it)."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def tool():
    import cosformer.tools.bench_packed

    return cosformer.tools.bench_packed


def _runs(row: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(row, return_counts=True)[1].tolist()


@pytest.mark.parametrize("b, n, doc_len", [(1, 1000, 300), (2, 64, 16), (3, 17, 64), (1, 5, 1)])
def test_fixed_length_segment_ids(tool, b, n, doc_len):
    seg = tool.packed_segment_ids(b, n, doc_len)
    assert seg.dtype == torch.int32 and tuple(seg.shape) == (b, n)
    full, rest = divmod(n, doc_len)
    for row in seg:
        assert (row[1:] >= row[:-1]).all() and row[0] == 0
        assert _runs(row) == [doc_len] * full + ([rest] if rest else [])
        assert row.unique().numel() == -(-n // doc_len)


def test_random_length_segment_ids(tool):
    lo, hi, n = 50, 200, 5000
    seg = tool.packed_segment_ids(3, n, None, length_range=(lo, hi), seed=7)
    for row in seg:
        assert (row[1:] >= row[:-1]).all()
        lengths = _runs(row)
        assert sum(lengths) == n and row.unique().numel() == len(lengths) == int(row[-1]) + 1
        assert all(lo <= m <= hi for m in lengths[:-1]) and 1 <= lengths[-1] <= hi
        assert -(-n // hi) <= len(lengths) <= -(-n // lo)
    assert not torch.equal(seg[0], seg[1])  # rows draw their own lengths
    assert torch.equal(seg, tool.packed_segment_ids(3, n, None, length_range=(lo, hi), seed=7))
    assert not torch.equal(seg, tool.packed_segment_ids(3, n, None, length_range=(lo, hi), seed=8))


def _brute_force_mask(seg: torch.Tensor) -> torch.Tensor:
    """(b, n, n): query r sees key c iff same id and c <= r, element by element."""
    b, n = seg.shape
    mask = torch.zeros(b, n, n, dtype=torch.bool)
    for i in range(b):
        for r in range(n):
            for c in range(r + 1):
                mask[i, r, c] = bool(seg[i, r] == seg[i, c])
    return mask


@pytest.mark.parametrize("doc_len", [1, 7, 16, None])
def test_visible_pairs_and_mask_against_brute_force(tool, seed, doc_len):
    seg = tool.packed_segment_ids(2, 45, doc_len, length_range=(3, 20), seed=seed)
    mask = _brute_force_mask(seg)
    assert tool.visible_pairs(seg) == int(mask.sum())
    assert torch.equal(tool.document_mask(seg), mask[:, None])
    shuffled = seg[:, torch.randperm(seg.shape[1])]  # ids in any order: same rule
    assert tool.visible_pairs(shuffled) == int(_brute_force_mask(shuffled).sum())


def test_flops_count_visible_pairs(tool):
    assert tool.packed_flops(10, 8, 128, "fwd") == 4 * 128 * 8 * 10
    assert tool.packed_flops(10, 8, 128, "fwdbwd") == pytest.approx(3.5 * 4 * 128 * 8 * 10)


def test_cpu_smoke_run(tool, seed, tmp_path, capsys, one_thread):
    out = tmp_path / "packed.json"
    argv = ["--device", "cpu", "--dtype", "fp32", "--ns", "64", "--doc-lens", "16", "--heads", "1"]
    argv += ["--dim-heads", "16", "--smoke-reps", "1", "--out-json", str(out)]
    assert tool.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["complete"] is True and data["target"]["vs_flex"] == tool.TARGET_VS_FLEX
    rows = data["rows"]
    assert [r["mode"] for r in rows] == ["fwd", "fwdbwd"]
    for r in rows:
        assert (r["n"], r["doc_len"], r["docs"], r["visible_pairs"]) == (64, 16, 4, 4 * 16 * 17 // 2)
        assert r["ok_by_variant"]["ours"] is True and max(r["max_rel_diff"]["ours"].values()) <= 1e-4, r
        assert set(r["max_rel_diff"]["ours"]) == {"o", "dq", "dk", "dv"}
        assert all(r[f"{v}_ms"] > 0 for v in ("ours", "sdpa_mask", "ours_dense")), r
        assert r["vs_sdpa_mask"] > 0 and r["ours_tflops"] > 0
        assert r["flex_ms"] is None or r["vs_flex"] > 0  # on CPU flex may be n/a, with its reason
        assert r["flex_ms"] is not None or r["errors"]["flex"]
    text = capsys.readouterr().out
    assert "SMOKE RUN" in text and "not in this run's grid" in text.splitlines()[-1]
    header, *lines = text.rstrip().splitlines()[-4:-1]
    assert header.split() == list(tool.COLUMNS)
    assert [line.split()[:6] for line in lines] == [["1", "64", "1", "16", "16", "fwd"]] + [
        ["1", "64", "1", "16", "16", "fwd+bwd"]
    ]
    assert all(line.split()[-1] == "ok" for line in lines)


def test_failing_variant_reads_na(tool, monkeypatch, capsys, one_thread):
    def refuse(seg):
        raise RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(tool, "document_mask", refuse)
    argv = ["--device", "cpu", "--dtype", "fp32", "--ns", "32", "--doc-lens", "16", "--heads", "1", "--dim-heads", "16"]
    assert tool.main([*argv, "--smoke-reps", "1", "--modes", "fwd"]) == 0
    text = capsys.readouterr().out
    assert text.count("sdpa_mask: n/a (RuntimeError: CUDA out of memory.") == 1  # the reason, once
    row = text.rstrip().splitlines()[-2].split()
    assert row[tool.COLUMNS.index("sdpa_mask_ms")] == "n/a" and row[tool.COLUMNS.index("vs_sdpa_mask")] == "n/a"
    assert row[-1] == "-"  # nothing to check against
    assert row[tool.COLUMNS.index("ours_ms")] != "n/a"


def test_target_line(tool):
    base = dict(n=16384, doc_len=1024, d=128, mode="fwdbwd", h=8, b=1, dtype="bf16", errors={})
    assert "1.80x" in tool.target_line([{**base, "vs_flex": 1.8, "flex_ms": 9.0, "ours_ms": 5.0}])
    assert "NOT met" in tool.target_line([{**base, "vs_flex": 1.2, "flex_ms": 6.0, "ours_ms": 5.0}])
    assert "n/a (out of memory)" in tool.target_line([{**base, "vs_flex": None, "errors": {"flex": "out of memory"}}])
    assert "not in this run's grid" in tool.target_line([{**base, "d": 64, "vs_flex": 2.0}])


def test_smoke_run_is_never_written_to_docs(tool, tmp_path):
    target = tool.DOCS / "benchmarks" / "cpu-packed.json"
    with pytest.raises(SystemExit, match="never written under docs"):
        tool.main(["--device", "cpu", "--ns", "8", "--doc-lens", "4", "--out-json", str(target)])
    assert not target.exists()


@pytest.mark.parametrize(
    "argv", [["--ns", "0"], ["--doc-lens"], ["--length-range", "9", "3"], ["--heads", "0"], ["--doc-lens", "-2"]]
)
def test_bad_arguments(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(["--device", "cpu", *argv])
