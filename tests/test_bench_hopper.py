"""cosformer.tools.bench_hopper (scripts/bench_hopper.py) on the CPU: the --points strings, the refusal (status 2, one
line) on a machine that cannot run it, and one point's variant loop with the Hopper path stood in for (its
eligibility and its backward patched), every setting it touches restored after."""

import argparse

import pytest
import torch

from cosattn import attention_reference, hopper, ops


@pytest.fixture(scope="module")
def tool():
    import cosformer.tools.bench_hopper

    return cosformer.tools.bench_hopper


@pytest.mark.parametrize(
    "text, point",
    [
        ("16x8x8x1024x64x1xbnhd", (16, 8, 8, 1024, 64, True, "bnhd")),
        ("4x16x4x4096x128x0xbhnd", (4, 16, 4, 4096, 128, False, "bhnd")),
        (" 2X8X8X8192X64X1XBNHD ", (2, 8, 8, 8192, 64, True, "bnhd")),
    ],
)
def test_parse_point(tool, text, point):
    assert tool.parse_point(text) == point
    assert tool.parse_point(tool.format_point(point)) == point


@pytest.mark.parametrize(
    "text, why",
    [
        ("16x8x8x1024x64x1", "expected"),  # no layout
        ("16x8x8x1024x64x1xbnhdx3", "expected"),
        ("16x8x8x1k24x64x1xbnhd", "integer"),
        ("16x8x3x1024x64x1xbnhd", "multiple of hk"),
        ("0x8x8x1024x64x1xbnhd", "positive"),
        ("16x8x8x1024x64x2xbnhd", "CAUSAL"),
        ("16x8x8x1024x64x1xbhdn", "LAYOUT"),
    ],
)
def test_bad_point_is_a_clear_argparse_error(tool, capsys, text, why):
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        tool.parse_point(text)
    with pytest.raises(SystemExit) as exit_:
        tool.build_parser().parse_args(["--points", "4x16x4x4096x128x0xbhnd", text])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --points" in err and why in err and repr(text) in err


def test_defaults(tool):
    args = tool.build_parser().parse_args([])
    assert args.points == tool.POINTS and args.dtype == "bf16" and args.alternatives and args.out_json is None
    args = tool.build_parser().parse_args(["--points", "1x2x1x128x64x0xbhnd", "--no-alternatives", "--dtype", "fp16"])
    assert args.points == [(1, 2, 1, 128, 64, False, "bhnd")] and not args.alternatives and args.dtype == "fp16"
    with pytest.raises(SystemExit):
        tool.build_parser().parse_args(["--dtype", "fp32"])


def test_variants(tool):
    dkdv, dq = {64: (64, 128, 8, 2), 128: (64, 128, 8, 2)}, {64: (64, 64, 4, 2), 128: (128, 64, 8, 2)}
    assert tool.variants(64, dkdv, dq, False) == [(dkdv[64], dq[64])]
    # the configured pair first, then each pass's alternatives with the other pass as configured, no repeats
    got = tool.variants(128, dkdv, dq, True)
    assert got == [(dkdv[128], dq[128]), ((32, 128, 8, 2), dq[128]), (dkdv[128], (64, 64, 4, 2))]
    assert len(tool.variants(64, dkdv, dq, True)) == 5
    assert tool.variants(96, dkdv, dq, True) == []


def test_main_refuses_without_an_sm90_gpu(tool, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, and on a GPU one too
    assert tool.main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert "sm_90" in out.err and "no CUDA device" in out.err


def test_main_refuses_another_gpu(tool, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    assert tool.main(["--no-alternatives"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sm_80" in err and "A100" in err


def test_bench_point_variant_loop(tool, seed, monkeypatch):
    """One small point on the CPU (fp32: the interpreter's 16-bit backward is no reference) with the Hopper path stood
    in for: per variant a correct backward (ok, timed), a
    wrong one (MISMATCH), one that raises (FAILED), one the op does not take (not eligible); the configurations,
    HOPPER_BWD, hopper.backward and K_INLINE_MAX_WORK restored after."""
    d = 64
    ok_cfg, wrong_cfg, raising_cfg, refused_cfg = (64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3), (128, 128, 8, 2)

    def backward(q_s, q, k, k_hat, v, do, lse, delta, dq, dk, dv, *, causal, qk_scale, scale):
        if hopper.DKDV_CONFIG[d] == raising_cfg:
            raise RuntimeError("out of resource: shared memory")
        if hopper.DKDV_CONFIG[d] == wrong_cfg:
            dq.zero_(), dk.zero_(), dv.zero_()
            return
        with torch.enable_grad():  # (called from within autograd's backward)
            x = [t.detach().double().requires_grad_() for t in (q, k, v)]
            out = attention_reference(*x, causal=causal, scale=scale)
            grads = torch.autograd.grad(out, x, do.double())
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)

    monkeypatch.setattr(hopper, "backward", backward)
    monkeypatch.setattr(hopper, "eligible", lambda *a, **kw: hopper.DQ_CONFIG[d] != refused_cfg)
    monkeypatch.setattr(hopper, "DKDV_CONFIG", {d: ok_cfg})
    monkeypatch.setattr(hopper, "DQ_CONFIG", {d: (64, 64, 4, 2)})
    monkeypatch.setattr(tool, "DKDV_ALT", {d: [ok_cfg, wrong_cfg, raising_cfg]})
    monkeypatch.setattr(tool, "DQ_ALT", {d: [refused_cfg]})
    timed = []

    def device_median(fn, clock=None):
        fn()
        timed.append((hopper.HOPPER_BWD, hopper.DKDV_CONFIG[d], hopper.DQ_CONFIG[d]))
        return 2.0 if hopper.HOPPER_BWD else 3.0

    monkeypatch.setattr(tool, "device_median", device_median)
    saved_work, saved_backward = ops.K_INLINE_MAX_WORK, hopper.backward
    seen = []
    with tool.hopper_run(hopper) as calls:
        assert ops.K_INLINE_MAX_WORK == 0
        rows = tool.bench_point(
            (1, 2, 1, 64, d, True, "bnhd"), hopper, calls, dtype="fp32", alternatives=True, clock=None,
            on_row=lambda rs: seen.append(len(rs)), device="cpu",
        )  # fmt: skip
    assert ops.K_INLINE_MAX_WORK == saved_work and hopper.backward is saved_backward
    assert not hopper.HOPPER_BWD and hopper.DKDV_CONFIG == {d: ok_cfg} and hopper.DQ_CONFIG == {d: (64, 64, 4, 2)}
    assert seen == [1, 2, 3, 4]
    by_cfg = {(tuple(r["dkdv_cfg"]), tuple(r["dq_cfg"])): r for r in rows}
    ok = by_cfg[(ok_cfg, (64, 64, 4, 2))]
    assert ok["configured"] and ok["status"] == "ok" and ok["ok"] and ok["err_gluon"] <= 1.5 * ok["err_triton"] + 1e-4
    assert ok["gluon_ms"] == 2.0 and ok["triton_ms"] == 3.0 and ok["speedup"] == 1.5
    wrong = by_cfg[(wrong_cfg, (64, 64, 4, 2))]
    assert wrong["status"] == "MISMATCH" and not wrong["ok"] and wrong["gluon_ms"] is None and wrong["err_gluon"] > 0.5
    failed = by_cfg[(raising_cfg, (64, 64, 4, 2))]
    assert failed["status"] == "FAILED" and "shared memory" in failed["error"] and failed["speedup"] is None
    refused = by_cfg[(ok_cfg, refused_cfg)]
    assert refused["status"] == "not eligible" and refused["gluon_ms"] is None and refused["err_gluon"] is None
    # timed: the Triton path once, then only the variant that took the Hopper path and matched
    assert timed == [(False, ok_cfg, (64, 64, 4, 2)), (True, ok_cfg, (64, 64, 4, 2))]
    assert len(calls) == 4  # ok (checked, timed), wrong and raising reached hopper.backward; the refused one did not
    table = tool.format_table(rows).splitlines()
    assert table[0].split() == list(tool.COLUMNS) and len(table) == 5
    assert table[1].split()[-4:] == ["ok", "3.0000", "2.0000", "1.500x"]
