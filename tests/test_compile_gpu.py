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
