"""cosformer.tools.bench_model (scripts/bench_model.py) on CPU: the normalize-sdpa variant against an independent
reference, and a tiny end-to-end run through `main(argv)` (eager rows; CUDA-graph rows are skipped on CPU, and said
so). Its compiled rows run on the GPU in tests/test_compile_gpu.py."""

import json
import math

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
    assert {"device", "torch", "triton", "modes", "timing"} <= set(data["meta"])
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
    assert lines[-6].split()[-2:] == [
        f"{rows['eager', 'cosine']['tokens_per_s'] / rows['eager', 'regular']['tokens_per_s']:.2f}x",
        "n/a",
    ]
    assert lines[-1].endswith("skipped: CUDA graphs need a CUDA device")


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
