"""Prompts of different lengths (x-transformers' prompt_lens / seq_start_pos): a left-padded row gets exactly the
logits and greedy tokens it gets alone, under learned absolute positions, rotary and ALiBi, with cosine and regular
attention, with and without the KV cache, and past max_seq_len."""

import pytest
import torch

from cosformer import AutoregressiveWrapper, Decoder, TransformerWrapper

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = {"absolute": {}, "rotary": dict(rotary=True), "alibi": dict(alibi=True)}


def make_lm(attn, scheme, max_seq_len=40):
    layers = Decoder(dim=32, depth=2, heads=2, dim_head=16, attn=attn, **SCHEMES[scheme])
    return AutoregressiveWrapper(TransformerWrapper(num_tokens=37, max_seq_len=max_seq_len, attn_layers=layers))


def left_aligned(lens, n):
    """(b, n) prompts with row r's prompt in its first lens[r] places and junk after it."""
    return torch.randint(0, 37, (len(lens), n)), torch.tensor(lens)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_left_padded_logits_equal_the_row_alone(attn, scheme, seed, torch_attention_path):
    """seq_start_pos masks the padding and counts positions from each row's first real token. A mask alone hides
    the padding but leaves absolute positions shifted: what generate(mask=) used to do."""
    net = make_lm(attn, scheme).net.eval()
    short = torch.randint(0, 37, (1, 5))
    padded = torch.cat((torch.randint(0, 37, (1, 4)), short), dim=1)  # 4 tokens of left padding
    start = torch.tensor([4])
    alone = net(short)
    torch.testing.assert_close(net(padded, seq_start_pos=start)[:, 4:], alone, atol=1e-5, rtol=1e-5)
    # the same through a cache: the prompt, then token by token; the cache remembers seq_start_pos
    _, cache = net(padded[:, :6], seq_start_pos=start, return_cache=True)
    step = net(padded[:, 6:7], cache=cache)
    torch.testing.assert_close(step, alone[:, 2:3], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="seq_start_pos"):
        net(padded[:, 7:8], cache=cache, seq_start_pos=torch.tensor([3]))
    masked = net(padded, mask=torch.arange(9)[None] >= 4)[:, 4:]
    assert torch.allclose(masked, alone, atol=1e-4) == (scheme != "absolute")


@pytest.mark.parametrize("cache_kv", [True, False], ids=["cache", "recompute"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_prompt_lens_give_the_tokens_of_each_prompt_alone(attn, scheme, cache_kv, seed, torch_attention_path):
    model = make_lm(attn, scheme)
    prompts, lens = left_aligned([7, 3, 5, 2], 7)
    out = model.generate(prompts, 10, temperature=0.0, prompt_lens=lens, cache_kv=cache_kv)
    assert out.shape == (4, 10)
    for r, n in enumerate(lens.tolist()):
        alone = model.generate(prompts[r : r + 1, :n], 10, temperature=0.0, cache_kv=cache_kv)
        assert torch.equal(out[r : r + 1], alone), f"row {r} (prompt of {n})"
    # the same prompts as a list, and left-padded with a mask
    as_list = model.generate([p[:n] for p, n in zip(prompts, lens.tolist())], 10, temperature=0.0, cache_kv=cache_kv)
    assert torch.equal(as_list, out)
    right = torch.stack([torch.cat((torch.full((7 - n,), 36), p[:n])) for p, n in zip(prompts, lens.tolist())])
    mask = torch.arange(7)[None] >= (7 - lens)[:, None]
    assert torch.equal(model.generate(right, 10, temperature=0.0, mask=mask, cache_kv=cache_kv), out)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_prompt_lens_past_max_seq_len(scheme, seed, torch_attention_path):
    """Beyond max_seq_len the sliding window keeps each row's remaining padding masked: rows still match."""
    model = make_lm("cosine", scheme, max_seq_len=12)
    prompts, lens = left_aligned([6, 2], 6)
    out = model.generate(prompts, 15, temperature=0.0, prompt_lens=lens)
    for r, n in enumerate(lens.tolist()):
        assert torch.equal(out[r : r + 1], model.generate(prompts[r : r + 1, :n], 15, temperature=0.0))


def test_shared_padding_is_cut_and_eos_still_applies(seed, torch_attention_path):
    model = make_lm("cosine", "absolute", max_seq_len=12)
    prompts, lens = left_aligned([3, 2], 20)  # 17 columns of padding every row shares: longer than max_seq_len
    out = model.generate(prompts, 8, temperature=0.0, prompt_lens=lens)
    alone = [model.generate(prompts[r : r + 1, :n], 8, temperature=0.0) for r, n in enumerate(lens.tolist())]
    assert torch.equal(out, torch.cat(alone))
    eos = int(out[0, 2])
    ended = model.generate(prompts, 8, eos_token=eos, temperature=0.0, prompt_lens=lens)
    first = (out[0] == eos).nonzero()[0].item()
    assert torch.equal(ended[0, : first + 1], out[0, : first + 1]) and (ended[0, first + 1 :] == 0).all()


def test_variable_prompts_reject_bad_arguments(torch_attention_path):
    model = make_lm("cosine", "rotary")
    prompts = torch.randint(0, 37, (2, 4))
    for kwargs, message in [
        (dict(prompt_lens=torch.tensor([4])), "prompt_lens must be a .*2"),
        (dict(prompt_lens=torch.tensor([0, 2])), r"prompt_lens must be integers in \[1, n=4\]"),
        (dict(prompt_lens=torch.tensor([5, 2])), r"prompt_lens must be integers in \[1, n=4\]"),
        (dict(prompt_lens=torch.tensor([2.0, 3.0])), "prompt_lens must be integers"),
        (dict(prompt_lens=torch.tensor([2, 3]), mask=torch.ones(2, 4, dtype=torch.bool)), "not both"),
        (dict(mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]).bool()), "left padding"),
        (dict(mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()), "left padding"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), "mask must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(prompts, 2, **kwargs)
    with pytest.raises(ValueError, match="list"):
        model.generate([prompts[0], prompts[1]], 2, prompt_lens=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="seq_start_pos"):
        model.net(prompts, seq_start_pos=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="seq_start_pos"):
        model.net(prompts, seq_start_pos=torch.tensor([1.0, 2.0]))
