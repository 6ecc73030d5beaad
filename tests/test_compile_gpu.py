"""torch.compile(fullgraph=True) over zoo models at several sequence lengths in one process (GPU only).

The second and third lengths make dynamo switch to dynamic shapes (dynamic=None) or recompile (dynamic=False);
both must run, forward and backward, and agree with the eager model."""

import pytest
import torch

from cosformer import AutoregressiveWrapper, Decoder, TransformerWrapper, XTransformer, compile_model

pytestmark = pytest.mark.gpu

LENGTHS = [(4, 128), (2, 256), (1, 512)]
CASES = {
    "cosine": dict(attn="cosine"),
    "regular": dict(attn="regular"),
    "cosine-rotary-gqa": dict(attn="cosine", rotary=True, kv_heads=2),
    "cosine-alibi-prenorm": dict(attn="cosine", alibi=True, pre_norm=True),
}


def _grads(model):
    return [p.grad.float().clone() for p in model.parameters() if p.grad is not None]


def _check_against_eager(model, compiled, run):
    torch.manual_seed(0)
    loss_c = run(compiled)
    loss_c.backward()
    grads_c = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_e = run(model)
    loss_e.backward()
    grads_e = _grads(model)
    model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss_c) and abs(loss_c.item() - loss_e.item()) <= 2e-2 * abs(loss_e.item())
    num = sum((a - b).norm() ** 2 for a, b in zip(grads_c, grads_e)) ** 0.5
    den = sum(b.norm() ** 2 for b in grads_e) ** 0.5
    assert len(grads_c) == len(grads_e) and num <= 5e-2 * den


@pytest.mark.parametrize("dynamic", [None, False], ids=["dynamic-auto", "static"])
@pytest.mark.parametrize("case", list(CASES))
def test_decoder_compiles_across_lengths(case, dynamic):
    torch._dynamo.reset()
    layers = Decoder(dim=128, depth=2, heads=4, dim_head=32, **CASES[case])
    model = AutoregressiveWrapper(TransformerWrapper(num_tokens=256, max_seq_len=512, attn_layers=layers)).cuda()
    compiled = compile_model(model, dynamic=dynamic)
    for b, n in LENGTHS:
        x = torch.randint(0, 256, (b, n + 1), device="cuda")
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[0, : n // 4] = False  # left padding in the first row

        def run(m, x=x, mask=mask):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return m(x, mask=mask)

        _check_against_eager(model, compiled, run)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_encoder_decoder_compiles_across_lengths(attn):
    torch._dynamo.reset()
    model = XTransformer(
        dim=128,
        enc_num_tokens=256,
        enc_depth=2,
        enc_heads=4,
        enc_max_seq_len=256,
        dec_num_tokens=256,
        dec_depth=2,
        dec_heads=4,
        dec_max_seq_len=512,
        attn=attn,
    ).cuda()
    compiled = compile_model(model)
    for (b, n), m in zip(LENGTHS, (64, 100, 256)):
        src = torch.randint(0, 256, (b, m), device="cuda")
        src_mask = torch.ones_like(src, dtype=torch.bool)
        src_mask[:, m // 2 :] = False
        tgt = torch.randint(0, 256, (b, n + 1), device="cuda")

        def run(mod, src=src, tgt=tgt, src_mask=src_mask):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return mod(src, tgt, mask=src_mask)

        _check_against_eager(model, compiled, run)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_text_to_image_model_compiles_across_caption_lengths(attn):
    """The text-to-image model (caption encoder, cross-attending image decoder): batches of other sizes and other
    caption lengths (dynamic shapes), forward and backward as the eager model; its sampling with compiled steps."""
    from cosformer.t2i.model import TextToImage

    torch._dynamo.reset()
    palette = torch.randint(0, 256, (12, 3), dtype=torch.uint8)
    model = TextToImage(palette, image_size=8, text_max_len=24, dim=128, depth=2, heads=4, attn=attn,
                        rotary_pos_emb=True).cuda()  # fmt: skip
    compiled = compile_model(model)
    for b, length in ((4, 9), (2, 17), (3, 24)):
        text = torch.randint(0, 128, (b, length), device="cuda")
        text_mask = torch.ones_like(text, dtype=torch.bool)
        text_mask[0, length // 2 :] = False
        image = torch.randint(0, 12, (b, 65), device="cuda")

        def run(mod, text=text, text_mask=text_mask, image=image):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return mod(text, text_mask, image)

        _check_against_eager(model, compiled, run)
    text, text_mask = torch.randint(0, 128, (2, 9), device="cuda"), torch.ones(2, 9, dtype=torch.bool, device="cuda")
    tokens = model.generate(text, text_mask, temperature=0.0, compile=True, return_tokens=True)  # (2, 64)
    assert tokens.shape == (2, 64)
    with torch.no_grad():  # each greedy token is the eager model's argmax (within rounding) given the ones before
        context = model.encode(text, text_mask)
        seq = torch.cat((torch.full((2, 1), model.bos, device="cuda"), tokens), dim=1)
        logits = model.decoder.net(seq[:, :-1], context=context, context_mask=text_mask).float()
        gap = logits.max(dim=-1).values - logits.gather(-1, tokens[..., None])[..., 0]
        assert (gap <= 1e-3 * logits.abs().max()).all(), gap.max().item()


# ---------------------------------------------------------------------------------------------- trainer and bench


def test_trainer_compiled_on_cuda_matches_eager_and_resumes_either_way(tmp_path, fresh_accelerate, capsys):
    """train.compile=auto on a CUDA device (turns it on there): losses as the eager run's within fp32 rounding (TF32
    off by default), generation stays out of the compiled code, and checkpoints resume across compile on/off."""
    import random

    from torch._dynamo.utils import counters

    from cosformer.train import checkpoint as ckpt
    from cosformer.train.config import load_config
    from cosformer.train.tracking import MetricsLog
    from cosformer.train.trainer import run

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and cat sat".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(words) for _ in range(6)) + ".\n" for _ in range(2500)))

    def cfg(out, *extra):
        return load_config([], ["data.name=text", f"data.path={corpus}", "data.seq_len=64", "model.dim=64",
                                "model.depth=2", "model.heads=2", "model.dim_head=32", "train.batch_size=8",
                                "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=0",
                                "train.eval_batches=2", "train.log_every=1", "train.sample_length=16",
                                "train.final_eval=true", "train.mixed_precision=no", f"train.out_dir={out}",
                                *extra])  # fmt: skip

    def losses(out):
        return {r["step"]: r["loss"] for r in MetricsLog(out / "metrics.jsonl").records() if "loss" in r}

    torch._dynamo.reset()
    counters.clear()
    run(cfg(tmp_path / "eager", "train.compile=false"))
    run(cfg(tmp_path / "compiled", "train.compile=auto"))  # on, on a CUDA device
    assert "compile: on (inductor)" in capsys.readouterr().out
    # training, evaluation, the final full-split batches (another batch size: dynamic shapes): never generation
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert compiled.keys() == eager.keys() == set(range(1, 7))
    assert all(compiled[s] == pytest.approx(eager[s], rel=2e-3) for s in eager), (compiled, eager)
    for kind, other in (("eager", "true"), ("compiled", "false")):
        resumed = tmp_path / f"from_{kind}"
        run(cfg(resumed, f"train.resume={ckpt.checkpoint_dir(tmp_path / kind, 3)}", f"train.compile={other}"))
        got = losses(resumed)
        assert got.keys() == {4, 5, 6} and all(got[s] == pytest.approx(eager[s], rel=2e-3) for s in got), got


def test_bench_model_compiled_rows_on_a_tiny_config(tmp_path, capsys):
    """Eager, compiled and CUDA-graph rows for every variant in one process; normalize-sdpa computes the cosine
    model's function (fp32: the same loss after the same steps)."""
    import json

    from cosformer.tools import bench_model

    out = tmp_path / "bm.json"
    argv = ["--tiny", "--out", str(out), "--modes", "eager", "default", "reduce-overhead", "--seqs", "64", "128",
            "--steps", "3", "--warmup", "2", "--no-autocast", "--profile", str(tmp_path / "p.txt")]  # fmt: skip
    assert bench_model.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == torch.cuda.get_device_name()
    rows = data["results"]
    assert len(rows) == 3 * 2 * 3 and all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows), rows
    by = {(r["mode"], r["seq"], r["attn"]): r for r in rows}
    for mode in ("eager", "default", "reduce-overhead"):
        for seq in (64, 128):
            cosine, peer = by[mode, seq, "cosine"]["final_loss"], by[mode, seq, "normalize-sdpa"]["final_loss"]
            assert peer == pytest.approx(cosine, rel=1e-3), (mode, seq)
    assert "vs regular" in capsys.readouterr().out
    # the profile saw device kernels wherever they are launched one by one (CUDA graph replays may hide theirs)
    assert all(r["device_ms"] > 0 and r["host_bound"] > 0 for r in rows if r["mode"] != "reduce-overhead"), rows
    assert (tmp_path / "p.txt").read_text().count("== ") == len(rows)


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
@pytest.mark.parametrize("case", ["cosine-rotary-gqa", "regular", "cosine-alibi-prenorm"])
def test_generate_compiled_steps_replay(case, mode):
    """generate(compile=mode): each greedy token is the eager model's argmax (within rounding) over the sequence so
    far, left-padded prompts included; under reduce-overhead the step runs as CUDA graphs (no skip); a second call
    of another length in the same reserve compiles nothing new."""
    from torch._dynamo.utils import counters

    from cosformer.wrappers import _COMPILED_STEPS

    torch._dynamo.reset()
    _COMPILED_STEPS.clear()
    counters.clear()
    torch.manual_seed(0)
    layers = Decoder(dim=128, depth=2, heads=4, dim_head=32, **CASES[case])
    model = AutoregressiveWrapper(TransformerWrapper(num_tokens=256, max_seq_len=512, attn_layers=layers)).cuda()
    prompts = [torch.randint(0, 256, (n,), device="cuda") for n in (40, 57, 33)]
    out = model.generate(prompts, 60, temperature=0.0, compile=mode)
    assert out.shape == (3, 60)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    out2 = model.generate(prompts, 40, temperature=0.0, compile=mode)  # 57 + 40 - 1 positions: reserve 128 again
    assert counters["stats"]["unique_graphs"] == graphs, "a second generation of the same reserve recompiled"
    assert torch.equal(out2, out[:, :40])
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    model.eval()
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            seq = torch.cat((prompt, out[r]))[None]
            logits = model.net(seq[:, :-1])[0, len(prompt) - 1 :].float()  # (60, num_tokens): each token's scores
            chosen = logits.gather(1, out[r][:, None])[:, 0]
            gap = logits.max(dim=1).values - chosen
            assert (gap <= 1e-3 * logits.abs().max()).all(), (r, gap.max().item())
