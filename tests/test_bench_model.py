"""cosformer.tools.bench_model (scripts/bench_model.py) on CPU: the normalize-sdpa variant against an independent
reference, and a tiny end-to-end run through `main(argv)` (eager rows; CUDA-graph rows are skipped on CPU, and said
so). Its compiled rows run on the GPU in tests/test_compile_gpu.py."""

import json
import math
import re
from collections import Counter

import pytest
import torch

from cosformer.tools import bench_model


@pytest.mark.parametrize("causal", [False, True])
def test_normalize_sdpa_is_cosine_attention(seed, causal):
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=torch.float64) for _ in range(3))
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    logits = 10.0 * qn @ kn.transpose(-1, -2)
    if causal:
        logits = logits.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
    want = logits.softmax(-1) @ v
    torch.testing.assert_close(bench_model.normalize_sdpa(q, k, v, causal=causal, scale=10.0), want)
    with pytest.raises(ValueError, match="mask"):
        bench_model.normalize_sdpa(q, k, v, mask=torch.ones(2, 7, dtype=torch.bool))


def test_tiny_cpu_run_end_to_end(tmp_path, capsys, monkeypatch, torch_attention_path, one_thread):
    calls = []
    original = bench_model.normalize_sdpa
    monkeypatch.setattr(bench_model, "normalize_sdpa", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    out = tmp_path / "bm.json"
    argv = ["--device", "cpu", "--tiny", "--out", str(out), "--modes", "eager", "reduce-overhead", "--seqs", "16",
            "--tokens-per-step", "32", "--steps", "1", "--warmup", "1", "--no-autocast"]  # fmt: skip
    assert bench_model.main(argv) == 0
    data = json.loads(out.read_text())
    assert {"device", "torch", "triton", "modes", "timing"} <= set(data["meta"]) and "profile" not in data["meta"]
    assert not any("device_ms" in r or "host_bound" in r for r in data["results"])  # only with --profile
    rows = {(r["mode"], r["attn"]): r for r in data["results"]}
    assert set(rows) == {(m, a) for m in ("eager", "reduce-overhead") for a in bench_model.ATTNS}
    for attn in bench_model.ATTNS:
        assert rows["eager", attn]["tokens_per_s"] > 0 and rows["eager", attn]["batch"] == 2
        assert "CUDA" in rows["reduce-overhead", attn]["skipped"]
    # the variant really ran through normalize_sdpa (once per layer and step), and it is the cosine model's function:
    # same weights, same batches, fp32, so the same loss after the same steps
    assert len(calls) == 2 * bench_model.TINY["depth"]
    cosine, peer = rows["eager", "cosine"]["final_loss"], rows["eager", "normalize-sdpa"]["final_loss"]
    assert peer == pytest.approx(cosine, rel=1e-4) and peer != rows["eager", "regular"]["final_loss"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert "vs regular" in lines[-7] and lines[-6].split()[:3] == ["eager", "cosine", "16"]
    assert lines[-7].endswith("peak MiB")  # no device ms column without --profile
    assert lines[-6].split()[-2:] == [
        f"{rows['eager', 'cosine']['tokens_per_s'] / rows['eager', 'regular']['tokens_per_s']:.2f}x",
        "n/a",
    ]
    assert lines[-1].endswith("skipped: CUDA graphs need a CUDA device")


def test_profile_reports_every_case_after_its_timing(tmp_path, capsys, monkeypatch, torch_attention_path, one_thread):
    """--profile on CPU: rows gain device_ms and host_bound, both null (no device activity); the report has a section
    per timed case, its header naming the case and its timed step, then CPU ops with positive times per step; and no
    timed step runs under the profiler: each group's profiled steps all come after its timed ones."""
    calls = []  # (seq, attn, timing, profiled) per training step after warm-up
    timing = []
    build_case, time_steps = bench_model.build_case, bench_model.time_steps

    def recording_case(attn, mode, seq, *a, **kw):
        case = build_case(attn, mode, seq, *a, **kw)
        step = case.step  # the warm-up steps inside build_case are not recorded

        def recorded():
            calls.append((seq, attn, bool(timing), torch.autograd._profiler_enabled()))
            return step()

        case.step = recorded
        return case

    def flagged_time_steps(*a, **kw):
        timing.append(1)
        try:
            time_steps(*a, **kw)
        finally:
            timing.pop()

    monkeypatch.setattr(bench_model, "build_case", recording_case)
    monkeypatch.setattr(bench_model, "time_steps", flagged_time_steps)
    out, report = tmp_path / "bm.json", tmp_path / "prof" / "prof.txt"
    seqs, steps, profile_steps = (16, 24), 2, 3
    argv = ["--device", "cpu", "--tiny", "--out", str(out), "--modes", "eager", "reduce-overhead", "--seqs", "16", "24",
            "--tokens-per-step", "32", "--steps", str(steps), "--rounds", "2", "--warmup", "1", "--no-autocast",
            "--profile", str(report), "--profile-steps", str(profile_steps), "--profile-top", "4"]  # fmt: skip
    assert bench_model.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["profile"] == dict(report=str(report), steps=profile_steps)
    rows = {(r["mode"], r["seq"], r["attn"]): r for r in data["results"]}
    for seq in seqs:
        for attn in bench_model.ATTNS:
            row = rows["eager", seq, attn]
            assert row["device_ms"] is None and row["host_bound"] is None and len(row["step_ms_all"]) == steps
            assert "device_ms" not in rows["reduce-overhead", seq, attn]  # skipped: nothing timed, nothing profiled

    assert not any(timed and profiled for *_, timed, profiled in calls)
    for seq in seqs:
        group = [(attn, timed, profiled) for s, attn, timed, profiled in calls if s == seq]
        timed = [i for i, (_, t, _) in enumerate(group) if t]
        profiled = [i for i, (_, _, p) in enumerate(group) if p]
        assert len(timed) + len(profiled) == len(group) and max(timed) < min(profiled)
        assert Counter(a for a, t, _ in group if t) == {a: steps for a in bench_model.ATTNS}
        assert Counter(a for a, _, p in group if p) == {a: profile_steps for a in bench_model.ATTNS}

    text = report.read_text().splitlines()
    assert text[0].startswith("# ") and f"{profile_steps} profiled steps" in text[0]
    sections = []
    for line in text[1:]:
        if line.startswith("== "):
            sections.append((line, []))
        else:
            sections[-1][1].append(line)
    assert [header for header, _ in sections] == [
        f"== eager seq={seq} {attn}: step {rows['eager', seq, attn]['step_ms']:.2f} ms, device kernels n/a on CPU"
        for seq in seqs
        for attn in bench_model.ATTNS
    ]
    for _, body in sections:
        ops = [line for line in body if re.match(r"\s+\d+\.\d+ ms x", line)]
        assert 1 <= len(ops) <= bench_model.PROFILE_CPU_TOP and all(float(line.split()[0]) > 0 for line in ops), body
        assert len(body) == len(ops) + 1 and "CPU ops" in body[0]  # on CPU no device section, only CPU ops

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-13].endswith("peak MiB device ms") and lines[-12].split()[-2:] == ["n/a", "n/a"]
    assert lines[-1].endswith("skipped: CUDA graphs need a CUDA device")


def test_profile_options_need_profile(tmp_path):
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--out", str(tmp_path / "m.json"), "--profile-steps", "3"])
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--out", str(tmp_path / "m.json"), "--profile", "p.txt", "--profile-top", "0"])
    args = bench_model.parse_args(["--out", str(tmp_path / "m.json"), "--profile", "p.txt"])
    assert (args.profile_steps, args.profile_top) == (bench_model.PROFILE_STEPS, bench_model.PROFILE_TOP)


@pytest.mark.parametrize("n_cases,steps,rounds", [(3, 20, 4), (3, 7, 3), (2, 5, 4), (1, 3, 2), (3, 2, 4)])
def test_schedule_interleaves_every_variant_through_every_round(n_cases, steps, rounds):
    blocks = bench_model.schedule(n_cases, steps, rounds)
    used = min(rounds, steps)
    assert len(blocks) == used * n_cases
    for case in range(n_cases):
        assert sum(n for c, n in blocks if c == case) == steps  # every variant gets all its steps
    for r in range(used):
        chunk = blocks[r * n_cases : (r + 1) * n_cases]
        assert sorted(c for c, _ in chunk) == list(range(n_cases))  # each round times every variant once
        assert chunk[0][0] == r % n_cases  # ... starting with a different one each round
        assert len({n for _, n in chunk}) == 1  # ... for the same number of steps
    counts = [blocks[r * n_cases][1] for r in range(used)]
    assert max(counts) - min(counts) <= 1
