"""cosformer.tools.tune_attention (scripts/tune_attention.py): a --device cpu smoke run of the sweep, with a
configuration that fails to compile and one that computes something else; the op's configuration left as it was."""

import json

import pytest
import torch

from cosattn import ops


@pytest.fixture(scope="module")
def tool():
    import cosformer.tools.tune_attention

    return cosformer.tools.tune_attention


def test_cpu_smoke_run(tool, seed, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tune.json"
    original = ops.launch_config
    real_op = tool.cosine_sim_attention

    def op(q, k, v, **kw):  # a configuration computing something else: block_m 32 in the dq pass, 1% off
        o = real_op(q, k, v, **kw)
        return o * 1.01 if ops.launch_config("dq", 16, torch.float32, True)[0] == 32 else o

    monkeypatch.setattr(tool, "cosine_sim_attention", op)
    argv = ["--device", "cpu", "--dtype", "fp32", "--shapes", "1x2x33x16", "2x1x17x16", "--kernels", "fwd", "dq"]
    argv += ["--block-m", "16", "24", "32", "--block-n", "16", "--warps", "1", "--stages", "1", "--out-json", str(out)]
    assert tool.main(argv) == 0
    assert ops.launch_config is original  # restored after every configuration, the failing ones included
    data = json.loads(out.read_text())
    assert data["smoke"] and data["complete"] and data["layout"] == "bnhd"
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 3  # kernels × points × configurations
    for r in rows:
        assert r["current"] == [16, 16, 1, 1] and r["current_ms"] > 0
        if r["block_m"] == 24:  # not a power of two: Triton refuses it
            assert not r["ok"] and r["ms"] is None and r["error"]
        elif r["block_m"] == 32 and r["kernel"] == "dq":
            assert not r["ok"] and r["ms"] is None and r["max_rel_diff"] > 1e-3
        else:
            assert r["ok"] and r["ms"] > 0 and r["max_rel_diff"] <= 1e-4
    text = capsys.readouterr().out
    dq_part = text[text.index("dq: point") :]
    assert "(32, 16, 1, 1)" not in dq_part and "(16, 16, 1, 1)  1.000" in dq_part


@pytest.mark.parametrize(
    "argv", [["--shapes", "4x8x64"], ["--shapes", "4x8x0x64"], ["--warps", "0"], ["--timer", "host"]]
)
def test_bad_arguments(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(["--device", "cpu", *argv])


def test_smoke_run_is_never_written_to_docs(tool):
    target = tool.DOCS / "benchmarks" / "cpu-tune.json"
    with pytest.raises(SystemExit, match="never written under docs"):
        tool.main(["--device", "cpu", "--shapes", "1x1x8x16", "--out-json", str(target)])
    assert not target.exists()
