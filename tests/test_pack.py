"""Packed documents (`segment_ids`): a packed row gives every document the logits, loss and gradients it gets when it
runs alone, unpacked, with positions from 0; positions restart per document; the loss predicts nothing across a
boundary; combinations that cannot hold are refused. Tiny models on short rows: the op runs under the Triton
interpreter without a GPU."""

import random

import pytest
import torch
import torch.nn.functional as F

from cosformer import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper
from cosformer.positional import segment_positions

NUM_TOKENS = 48
POSITIONS = {"absolute": {}, "rotary": {"rotary_pos_emb": True}, "alibi": {"alibi_pos_bias": True}}


def make_net(attn, position, stack=Decoder, **kwargs):
    layers = stack(32, 2, 2, attn=attn, attn_dim_head=16, pre_norm=attn == "regular", **POSITIONS[position], **kwargs)
    return TransformerWrapper(NUM_TOKENS, 64, layers).eval()


def random_packing(b, n):
    """(b, n) ids of documents with random lengths (some of length 1), ids increasing from a random start per row."""
    rows = []
    for _ in range(b):
        ids, doc = [], random.randrange(5)
        while len(ids) < n:
            ids += [doc] * random.choice((1, 2, 5, 9, 13))
            doc += random.randrange(1, 3)
        rows.append(ids[:n])
    return torch.tensor(rows)


def documents(segment_ids):
    """[(row, start, end)] of every contiguous run of one id."""
    out = []
    for r, row in enumerate(segment_ids.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                out.append((r, start, t))
                start = t
    return out


def test_segment_positions_count_within_each_document(seed):
    ids = random_packing(3, 40)
    ids[1, 5:9] = ids[1, 0]  # an id that comes back continues its count: the attention treats it as one segment
    want = torch.tensor([[row[:t].count(row[t]) for t in range(len(row))] for row in ids.tolist()])
    assert torch.equal(segment_positions(ids), want)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
@pytest.mark.parametrize("position", ["absolute", "rotary", "alibi"])
def test_packed_logits_and_loss_equal_each_document_alone(attn, position, seed):
    net = make_net(attn, position)
    model = AutoregressiveWrapper(net)
    ids = random_packing(2, 33)
    x = torch.randint(0, NUM_TOKENS, ids.shape)
    with torch.no_grad():
        packed = net(x, segment_ids=ids)
        loss = model(x, segment_ids=ids)
        per_row = model(x, segment_ids=ids, reduction="none")
    total, count = 0.0, 0
    row_total, row_count = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
    for r, start, end in documents(ids):
        doc = x[r : r + 1, start:end]
        with torch.no_grad():
            alone = net(doc)
        torch.testing.assert_close(packed[r : r + 1, start:end], alone, atol=2e-5, rtol=1e-5)
        if end - start > 1:
            doc_loss = F.cross_entropy(alone[0, :-1].double(), doc[0, 1:], reduction="sum").item()
            total, count = total + doc_loss, count + end - start - 1
            row_total[r] += doc_loss
            row_count[r] += end - start - 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    torch.testing.assert_close(per_row.double(), row_total / row_count, rtol=1e-5, atol=1e-6)


def test_packed_gradients_equal_the_documents_run_alone(seed):
    torch.manual_seed(seed)
    model = AutoregressiveWrapper(make_net("cosine", "rotary", attn_kv_heads=1))
    ids = random_packing(2, 30)
    x = torch.randint(0, NUM_TOKENS, ids.shape)
    model(x, segment_ids=ids).backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    docs = [(r, s, e) for r, s, e in documents(ids) if e - s > 1]
    count = sum(e - s - 1 for _, s, e in docs)
    reference = sum(model(x[r : r + 1, s:e]) * (e - s - 1) for r, s, e in docs) / count
    reference.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["cosine", "regular"])
def test_bidirectional_packing_sees_the_whole_document_and_nothing_else(attn, seed):
    net = make_net(attn, "absolute", stack=Encoder)
    ids = random_packing(2, 25)
    x = torch.randint(0, NUM_TOKENS, ids.shape)
    with torch.no_grad():
        packed = net(x, segment_ids=ids)
        for r, start, end in documents(ids):
            torch.testing.assert_close(packed[r : r + 1, start:end], net(x[r : r + 1, start:end]), atol=2e-5, rtol=1e-5)


def test_attention_maps_follow_the_documents(seed):
    """return_attn (the non-fused path the trainer's attention statistics use) masks across documents as well."""
    net = make_net("cosine", "alibi")
    ids = random_packing(1, 20)
    x = torch.randint(0, NUM_TOKENS, ids.shape)
    with torch.no_grad():
        logits, maps = net(x, segment_ids=ids, return_attn=True)
        torch.testing.assert_close(logits, net(x, segment_ids=ids), atol=2e-5, rtol=1e-5)
    across = ids[0][:, None] != ids[0][None, :]
    assert all(bool((m[..., across] == 0).all()) for m in maps)


def test_bad_segment_ids_and_combinations_are_refused():
    net = make_net("regular", "absolute")
    x = torch.randint(0, NUM_TOKENS, (2, 10))
    ids = torch.zeros(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"segment_ids must be \(b, n\) = \(2, 10\).*got \(2, 9\)"):
        net(x, segment_ids=ids[:, :9])
    with pytest.raises(TypeError, match="segment_ids must hold integers; got torch.float32"):
        net(x, segment_ids=ids.float())
    with pytest.raises(ValueError, match="KV cache"):
        net(x, segment_ids=ids, return_cache=True)
    with pytest.raises(ValueError, match="seq_start_pos"):
        net(x, segment_ids=ids, seq_start_pos=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="generate.*one document per row"):
        AutoregressiveWrapper(net).generate(x, 2, segment_ids=ids)
    with pytest.raises(TypeError, match="segment_ids must hold integers"):
        AutoregressiveWrapper(net)(x, segment_ids=ids.bool())
    memory = TransformerWrapper(NUM_TOKENS, 16, Decoder(32, 1, 2, attn_dim_head=16), num_memory_tokens=2)
    with pytest.raises(ValueError, match="num_memory_tokens"):
        memory(x, segment_ids=ids)
    mem_kv = TransformerWrapper(NUM_TOKENS, 16, Decoder(32, 1, 2, attn_dim_head=16, attn_num_mem_kv=2))
    with pytest.raises(ValueError, match="memory key/values"):
        mem_kv(x, segment_ids=ids)


def test_rotary_and_absolute_positions_restart_at_each_document(seed):
    """Rotary logits depend on position differences only, so a rotation that did not restart would show in the
    logits as rounding alone: the angles themselves are compared here (bitwise, as a document alone gets them)."""
    net = TransformerWrapper(NUM_TOKENS, 64, Decoder(32, 1, 2, attn_dim_head=16, rotary_pos_emb=True))
    net.pos_emb = make_net("regular", "absolute").pos_emb  # both kinds at once: use_abs_pos_emb=True
    seen = {}
    net.attn_layers.rotary.register_forward_hook(lambda m, args, out: seen.__setitem__("rotary", out))
    net.pos_emb.register_forward_hook(lambda m, args, out: seen.__setitem__("absolute", out))
    ids = random_packing(2, 40)
    with torch.no_grad():
        net(torch.randint(0, NUM_TOKENS, ids.shape), segment_ids=ids)
        packed = seen.copy()
        for r, start, end in documents(ids):
            net(torch.randint(0, NUM_TOKENS, (1, end - start)))
            assert torch.equal(packed["absolute"][r, start:end], seen["absolute"])
            for got, alone in zip(packed["rotary"], seen["rotary"]):  # cos, sin
                assert torch.equal(got[r, 0, start:end], alone)
