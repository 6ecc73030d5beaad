"""Text-to-image: the shapes dataset (determinism, captions that agree with the pixels, splits disjoint by content,
held-out combinations), the Hugging Face path (on an in-memory dataset), the model (shapes, caption mask), the
metrics (FID and KID against direct formulas, KID's zero expectation, the nets' content-keyed cache, sanity on real
/ noise / mismatched / collapsed images) and a tiny run through the trainer that writes sample grids and finite
metrics. The task's evaluation plumbing is checked metric by metric in test_t2i_eval.py."""

import itertools
import json
import math
import re
import sys

import numpy as np
import pytest
import torch

from cosformer.t2i import grid, metrics, shapes
from cosformer.t2i.grid import grid_figure, save_grid
from cosformer.t2i.hf import load_hf_splits
from cosformer.t2i.model import TextToImage
from cosformer.t2i.shapes import COLOURS, SHAPES, ShapesDataset, decode_caption, object_sizes, shapes_palette

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# shapes dataset


def test_shapes_same_seed_same_bytes_and_prefix():
    a = ShapesDataset("train", 50, image_size=16, palette=6, seed=3)
    b = ShapesDataset("train", 50, image_size=16, palette=6, seed=3)
    assert torch.equal(a.indices, b.indices) and a.captions == b.captions
    assert all(torch.equal(a[i][k], b[i][k]) for i in (0, 17, 49) for k in a[0])
    # an item depends on (seed, split, draw index) only: a longer dataset starts with the same items
    longer = ShapesDataset("train", 80, image_size=16, palette=6, seed=3)
    assert torch.equal(longer.indices[:50], a.indices)
    other_seed = ShapesDataset("train", 50, image_size=16, palette=6, seed=4)
    assert sum(torch.equal(a.indices[i], other_seed.indices[i]) for i in range(50)) < 5


def _contents(ds) -> dict[bytes, set[str]]:
    """image bytes -> the captions it carries in ds."""
    out: dict[bytes, set[str]] = {}
    for image, caption in zip(ds.indices, ds.captions):
        out.setdefault(image.numpy().tobytes(), set()).add(caption)
    return out


@pytest.mark.parametrize("size, palette", [(8, 3), (16, 4)])
def test_shapes_splits_are_disjoint_by_content(size, palette):
    """No image (with any caption) in two splits, compared as sets: at these sizes the image space is small enough
    that independent streams would share most of their images."""
    splits = {s: ShapesDataset(s, 300, image_size=size, palette=palette, seed=3) for s in ("train", "val", "test")}
    contents = {s: _contents(ds) for s, ds in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = contents[a].keys() & contents[b].keys()
        assert len(shared) == 0, f"{len(shared)} images of {a} also in {b}"
    # each split keeps its repeats: the data distribution has them, and dropping them would bias it
    assert len(contents["train"]) < 300
    # a split owns its share of the image space: the held-out splits are a fixed function of the image
    for split, ds in splits.items():
        assert all(shapes.split_of(image.numpy()) == split for image in ds.indices[:50])


_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def _caption_triples(caption: str, colour_names: list[str]) -> list[tuple[int, int, int]]:
    """(colour, shape, relation) of each object of a two-object caption, the relation being the one the object
    stands in to the other: parsed from the words, independently of the dataset's own description."""
    m = _CAPTION.match(caption)
    assert m, caption
    if m[4] is None:
        return []
    relations = ["above", "below", "left of", "right of"]
    first = (colour_names.index(m[2]), SHAPES.index(m[3]), relations.index(m[4]))
    second = (colour_names.index(m[6]), SHAPES.index(m[7]), relations.index(_INVERSE[m[4]]))
    return [first, second]


def test_shapes_held_out_combinations():
    """holdout="combinations": no training caption holds a held-out (colour, shape, relation) triple, every val / test
    caption holds one, each part of every held-out triple is seen in training in other triples, and the splits stay
    disjoint by content."""
    names = [n for n, _ in COLOURS[:7]]
    held_out = {t for t in itertools.product(range(7), range(4), range(4)) if sum(t) % 4 == 0}
    kept = set(itertools.product(range(7), range(4), range(4))) - held_out
    for c, s, r in held_out:  # the rule: every pair of a held-out triple occurs in a kept one
        assert any(k[:2] == (c, s) for k in kept) and any((k[0], k[2]) == (c, r) for k in kept)
        assert any(k[1:] == (s, r) for k in kept)
    splits = {
        s: ShapesDataset(s, 300, image_size=16, palette=8, seed=5, holdout="combinations")
        for s in ("train", "val", "test")
    }
    train_triples = {t for c in splits["train"].captions for t in _caption_triples(c, names)}
    assert train_triples and not train_triples & held_out
    assert any(_CAPTION.match(c)[4] is None for c in splits["train"].captions)  # one-object items train only
    for split in ("val", "test"):
        for caption in splits[split].captions:
            assert set(_caption_triples(caption, names)) & held_out, (split, caption)
    contents = {s: _contents(ds).keys() for s, ds in splits.items()}
    assert not contents["train"] & contents["val"] and not contents["train"] & contents["test"]
    assert not contents["val"] & contents["test"]
    with pytest.raises(ValueError, match="holdout"):
        ShapesDataset("val", 4, holdout="pairs")


def test_shapes_items_layout():
    ds = ShapesDataset("val", 20, image_size=8, palette=4, text_max_len=64, seed=0)
    item = ds[5]
    assert set(item) == {"text", "text_mask", "image_tokens"}
    assert item["image_tokens"].shape == (65,) and item["image_tokens"][0] == 4  # BOS = number of colours
    assert int(item["image_tokens"][1:].max()) < 4
    assert item["text"].shape == item["text_mask"].shape == (64,)
    assert decode_caption(item["text"], item["text_mask"]) == ds.captions[5]
    assert not item["text_mask"][len(ds.captions[5]) :].any()
    assert ds.images().shape == (20, 3, 8, 8) and ds.images().dtype == torch.uint8
    with pytest.raises(ValueError, match="text_max_len"):
        ShapesDataset("val", 4, image_size=8, palette=4, text_max_len=20)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("dev", 4)
    with pytest.raises(ValueError, match="palette"):
        ShapesDataset("val", 4, palette=2)


_OBJECT = r"a (small|large) (\w+) (" + "|".join(SHAPES) + ")"
_CAPTION = re.compile(rf"^{_OBJECT}(?: (above|below|left of|right of) {_OBJECT})?$")


def _classify(mask: np.ndarray) -> str:
    """Shape of a (side, side) object mask, by properties that tell the four apart (not by redrawing them)."""
    side = mask.shape[0]
    if mask.all():
        return "square"
    if mask[-1].all() and mask[0].sum() <= 2 and (mask == mask[:, ::-1]).all():
        return "triangle"
    assert not mask[0, 0] and mask[side // 2].all() and mask[:, side // 2].all()
    q = int(side * 0.25)
    return "circle" if mask[q, q] else "cross"


def _objects_in(indices: np.ndarray, rows: slice, cols: slice):
    """(colour index, size name, shape name, bounding box) of the single object in a region of the image."""
    region = np.zeros_like(indices)
    region[rows, cols] = indices[rows, cols]
    ys, xs = np.nonzero(region)
    assert len(ys), "no object where the caption puts one"
    colours = np.unique(region[ys, xs])
    assert len(colours) == 1, f"one object expected, found colours {colours}"
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    assert y1 - y0 == x1 - x0, "objects are drawn in square boxes"
    small, large = object_sizes(indices.shape[0])
    size = {small: "small", large: "large"}[y1 - y0]
    return int(colours[0]), size, _classify(region[y0:y1, x0:x1] > 0), (y0, y1, x0, x1)


def test_captions_agree_with_pixels():
    size = 32
    ds = ShapesDataset("test", 120, image_size=size, palette=8, seed=11)
    names = [n for n, _ in COLOURS[:7]]
    seen = set()
    half = size // 2
    for idx, caption in enumerate(ds.captions):
        m = _CAPTION.match(caption)
        assert m, caption
        indices = ds.indices[idx].numpy()
        first = (m[1], m[2], m[3])
        relation = m[4]
        seen.add(relation)
        if relation is None:
            regions = [(slice(None), slice(None))]
        else:
            top, bottom = (slice(0, half), slice(None)), (slice(half, None), slice(None))
            left, right = (slice(None), slice(0, half)), (slice(None), slice(half, None))
            regions = {"above": [top, bottom], "below": [bottom, top], "left of": [left, right]}.get(
                relation, [right, left]
            )
        described = [first] if relation is None else [first, (m[5], m[6], m[7])]
        found = [_objects_in(indices, *region) for region in regions]
        for (size_name, colour, shape), (colour_idx, size_found, shape_found, _) in zip(described, found):
            assert names[colour_idx - 1] == colour, caption
            assert (size_found, shape_found) == (size_name, shape), caption
        # the image holds exactly the described objects: nothing outside the regions checked above
        assert (indices > 0).sum() == sum((indices[r] > 0).sum() for r in regions), (
            f"stray pixels in item {idx}: {caption}"
        )
        labels = ds.labels()[idx].tolist()

        def named(label_row):  # (size, colour, shape) words of one object's labels (shape, colour, size)
            shape, colour, size_label = label_row
            return (("small", "large")[size_label], names[colour], SHAPES[shape])

        if relation is None:
            assert labels[0] == 0 and named(labels[1:4]) == first and labels[4:] == [-1, -1, -1], caption
        else:
            (y0a, y1a, x0a, x1a), (y0b, y1b, x0b, x1b) = found[0][3], found[1][3]
            holds = {"above": y1a <= y0b, "below": y1b <= y0a, "left of": x1a <= x0b, "right of": x1b <= x0a}
            assert holds[relation], caption
            # they overlap along the other axis, so the image shows one relation only
            vertical = relation in ("above", "below")
            assert (min(x1a, x1b) > max(x0a, x0b)) if vertical else (min(y1a, y1b) > max(y0a, y0b)), caption
            # canonical labels: layout, then the top / left object first
            top_left_first = described if relation in ("above", "left of") else described[::-1]
            assert labels[0] == (1 if vertical else 2), caption
            assert [named(labels[1:4]), named(labels[4:7])] == top_left_first, caption
    assert seen == {None, "above", "below", "left of", "right of"}


def test_task_data_follows_data_seed_not_train_seed(tmp_path):
    """Runs with different train.seed train and are measured on the same images; t2i.holdout reaches the data."""
    from cosformer.train.config import load_config
    from cosformer.train.tasks import task_class

    def splits(*extra):
        return task_class("shapes")(load_config(overrides=[*_tiny_overrides(tmp_path), *extra])).splits

    a, b, c = splits("train.seed=1"), splits("train.seed=2"), splits("train.seed=1", "t2i.data_seed=5")
    for split in ("train", "val", "test"):
        assert torch.equal(a[split].indices, b[split].indices) and a[split].captions == b[split].captions
        assert not torch.equal(a[split].indices, c[split].indices)
    assert splits("t2i.holdout=combinations")["test"].holdout == "combinations"


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face path, on an in-memory dataset


def _hf_dataset(n=30, size=8, seed=0):
    """Images made of 2x2 blocks of three exact colours (lossless after a 2x box downscale), captioned by colour."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[0, 0, 0], [250, 30, 30], [30, 30, 250]], dtype=np.uint8)
    images, captions = [], []
    for i in range(n):
        main = 1 + i % 2
        blocks = np.where(rng.random((size, size)) < 0.5, main, 0)
        blocks[0, 0] = 0  # every image shows the background colour too
        pixels = colours[blocks].repeat(2, axis=0).repeat(2, axis=1)
        images.append(Image.fromarray(pixels))
        captions.append(f"a {'red' if main == 1 else 'blue'} pattern, number {i}")
    return datasets.Dataset.from_dict({"picture": images, "caption": captions}), colours


def test_hf_splits_quantise_cache_and_labels(tmp_path, monkeypatch):
    ds, colours = _hf_dataset()
    kwargs = dict(image_column="picture", caption_column="caption", image_size=8, palette=3, text_max_len=32)
    kwargs |= dict(num_train=100, num_val=4, num_test=5, seed=1, cache_dir=tmp_path)
    splits = load_hf_splits(ds, **kwargs)
    assert {k: len(v) for k, v in splits.items()} == {"train": 21, "val": 4, "test": 5}
    assert sorted(map(tuple, splits["train"].palette.tolist())) == sorted(map(tuple, colours.tolist()))
    # quantisation is lossless on images drawn from three colours: each image equals its source downscaled 2x
    by_caption = {c: np.asarray(img)[::2, ::2] for img, c in zip(ds["picture"], ds["caption"])}
    for split in splits.values():
        for k, caption in enumerate(split.captions):
            assert np.array_equal(split.images(slice(k, k + 1))[0].permute(1, 2, 0).numpy(), by_caption[caption])
    assert set(splits["train"].captions).isdisjoint(splits["test"].captions + splits["val"].captions)
    train = splits["train"]
    assert train.balanced_fidelity and "word_red" in train.classes and "word_blue" in train.classes
    red = list(train.classes).index("word_red")
    assert train.labels()[:, red].tolist() == [int("red" in c) for c in train.captions]
    assert len(list(tmp_path.glob("t2i_hf_*.safetensors"))) == 1

    with pytest.raises(ValueError, match="num_test"):
        load_hf_splits(ds, **(kwargs | {"num_val": 20, "num_test": 20}))
    with pytest.raises(ValueError, match="column"):
        load_hf_splits(ds, **(kwargs | {"image_column": "image"}))

    # a second load reads the cache, never the dataset
    import cosformer.t2i.hf as hf

    monkeypatch.setattr(hf, "_build", lambda *a, **k: pytest.fail("cache not used"))
    again = load_hf_splits(ds, **kwargs)
    assert torch.equal(again["val"].indices, splits["val"].indices) and again["val"].captions == splits["val"].captions


def test_hf_splits_are_disjoint_by_content(tmp_path):
    """Each picture in three rows under three captions: no quantised image may reach two splits."""
    datasets = pytest.importorskip("datasets")
    ds, _ = _hf_dataset(n=20, seed=3)
    rows = [(image, f"{caption}, take {k}") for k in range(3) for image, caption in zip(ds["picture"], ds["caption"])]
    tripled = datasets.Dataset.from_dict({"picture": [r[0] for r in rows], "caption": [r[1] for r in rows]})
    kwargs = dict(image_column="picture", caption_column="caption", image_size=8, palette=3, text_max_len=40)
    splits = load_hf_splits(tripled, **kwargs, num_train=100, num_val=6, num_test=6, seed=2, cache_dir=tmp_path)
    contents = {name: _contents(split) for name, split in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert len(contents[a].keys() & contents[b].keys()) == 0, (a, b)
    assert len(splits["test"]) == 6  # the first split keeps its size; the others lose the rows it owns
    assert len(splits["test"]) + len(splits["val"]) + len(splits["train"]) < 60
    assert len(contents["test"]) + len(contents["val"]) + len(contents["train"]) == 20


def _image_folder(tmp_path, monkeypatch, n=24):
    """An image folder with metadata.csv that `datasets.load_dataset(<dir>)` reads offline, caching under tmp_path."""
    datasets = pytest.importorskip("datasets")
    ds, _ = _hf_dataset(n=n, seed=2)
    folder = tmp_path / "images"
    folder.mkdir()
    lines = ["file_name,text"]
    for k, (image, caption) in enumerate(zip(ds["picture"], ds["caption"])):
        image.save(folder / f"{k}.png")
        lines.append(f'{k}.png,"{caption}"')
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return ds, folder


def test_hf_task_from_a_local_dataset_directory(tmp_path, torch_attention_path, monkeypatch):
    """data.name=hf through `datasets.load_dataset(<dir>)`: splits, model, forward and generation."""
    from cosformer.train.config import load_config
    from cosformer.train.tasks import task_class

    ds, folder = _image_folder(tmp_path, monkeypatch)
    overrides = [*_tiny_overrides(tmp_path), "data.name=hf", f"t2i.hf_dataset={folder}", "t2i.palette=3"]
    cfg = load_config(overrides=[*overrides, "t2i.num_val=6", "t2i.num_test=6", "t2i.fid_samples=2"])
    task = task_class("hf")(cfg)
    splits = task.datasets()
    assert [len(splits[k]) for k in ("train", "test")] == [12, 6]
    assert set(task.splits["val"].captions) <= set(ds["caption"])
    model = task.build_model()
    batch = torch.utils.data.default_collate([splits["train"][i] for i in range(3)])
    assert torch.isfinite(model(**batch))
    assert model.generate(batch["text"], batch["text_mask"]).shape == (3, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# model


def _tiny_model(attn="cosine", image_size=8, palette=5, pre_norm=False):
    return TextToImage(
        shapes_palette(palette),
        image_size=image_size,
        text_max_len=64,
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
        enc_depth=1,
        attn=attn,
        pre_norm=pre_norm,
    )


@pytest.mark.parametrize("attn", ["cosine", "regular"])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_model_loss_shapes_and_caption_mask(seed, torch_attention_path, attn, pre_norm):
    ds = ShapesDataset("train", 6, image_size=8, palette=5, seed=seed)
    model = _tiny_model(attn, pre_norm=pre_norm).eval()
    batch = torch.utils.data.default_collate([ds[i] for i in range(6)])
    loss = model(**batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # garbage in the padded caption positions changes nothing: the encoder and the cross-attention mask them out
    noisy = dict(batch, text=torch.where(batch["text_mask"], batch["text"], torch.randint_like(batch["text"], 256)))
    assert not torch.equal(noisy["text"], batch["text"])
    torch.testing.assert_close(model(**noisy), loss, rtol=1e-5, atol=1e-6)
    # a real caption byte does matter
    changed = dict(batch, text=batch["text"].clone())
    changed["text"][:, 2] = (changed["text"][:, 2] + 1) % 256
    assert not torch.allclose(model(**changed), loss)
    # the loss is the mean next-pixel cross-entropy: check it against the decoder's logits
    context = model.encode(batch["text"], batch["text_mask"])
    logits = model.decoder.net(batch["image_tokens"][:, :-1], context=context, context_mask=batch["text_mask"])
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["image_tokens"][:, 1:])
    torch.testing.assert_close(loss, expected)
    model.train()
    model(**batch).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_generate_and_errors(seed, torch_attention_path):
    model = _tiny_model(image_size=8, palette=5)
    ds = ShapesDataset("val", 3, image_size=8, palette=5, seed=seed)
    images = model.generate(ds.text, ds.text_mask, temperature=1.0)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    colours = {tuple(c) for c in model.palette.tolist()}
    assert {tuple(p) for p in images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()} <= colours
    tokens = model.generate(ds.text, ds.text_mask, temperature=0.0, return_tokens=True)
    assert tokens.shape == (3, 64) and model.training  # generate restores the mode
    # greedy decoding with the KV cache picks the argmax of a full forward pass at every position
    seq = torch.cat([torch.full((3, 1), model.bos), tokens], dim=1)
    context = model.encode(ds.text, ds.text_mask)
    model.eval()
    logits = model.decoder.net(seq[:, :-1], context=context, context_mask=ds.text_mask)
    assert torch.equal(logits.argmax(-1), tokens)
    with pytest.raises(ValueError, match="image_tokens"):
        model(ds.text, ds.text_mask, torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="text_mask"):
        model(ds.text, ds.text_mask.long(), torch.zeros(3, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="palette"):
        TextToImage(torch.zeros(4, 3), image_size=8, text_max_len=8, dim=32, depth=1, heads=2)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def _with_moments(mean: torch.Tensor, cov: torch.Tensor, n: int) -> torch.Tensor:
    """n samples whose sample mean and covariance are exactly `mean` and `cov`."""
    z = torch.randn(n, len(mean), dtype=torch.float64)
    z = z - z.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(z.T))
    white = z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    evals, evecs = torch.linalg.eigh(cov)
    return white @ (evecs * evals.sqrt()) @ evecs.T + mean


def test_frechet_distance_matches_independent_formula(seed):
    d = 7
    a, b = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(d), b @ b.T + 0.1 * torch.eye(d)  # not commuting
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    f1, f2 = _with_moments(mu1, s1, 301), _with_moments(mu2, s2, 157)
    # Tr((S1 S2)^1/2) through the eigenvalues of the (non-symmetric) product, which are real and >= 0
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = ((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt
    assert math.isclose(metrics.frechet_distance(f1, f2), expected.item(), rel_tol=1e-8)
    assert abs(metrics.frechet_distance(f1, f1)) < 1e-8
    # same covariance, shifted mean: FID is the squared shift
    assert math.isclose(metrics.frechet_distance(f1, f1 + 3.0), 9.0 * d, rel_tol=1e-9)
    assert metrics.frechet_distance(f1.float(), f2.float()) == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(ValueError, match="feature dims"):
        metrics.frechet_distance(f1, f2[:, :3])
    with pytest.raises(ValueError, match="features_2"):
        metrics.frechet_distance(f1, f2[:1])


def test_nets_fid_and_fidelity_sanity(tmp_path, seed):
    size, palette = 16, 5
    train = ShapesDataset("train", 3000, image_size=size, palette=palette, seed=0)
    val = ShapesDataset("val", 400, image_size=size, palette=palette, seed=0)
    test = ShapesDataset("test", 400, image_size=size, palette=palette, seed=0)
    args = (tmp_path, train.images(), train.labels(), train.attribute_classes())
    net = metrics.load_or_train_net("feature", *args, steps=200, batch_size=64)
    judge = metrics.load_or_train_net("fidelity", *args, steps=200, batch_size=64)
    assert type(judge) is not type(net)  # fidelity is judged by another architecture (and seed)
    ref = metrics.extract_features(net, val.images())
    real = metrics.frechet_distance(metrics.extract_features(net, test.images()), ref)
    noise = torch.randint(0, 256, test.images().shape, dtype=torch.uint8)
    palette_noise = train.palette[torch.randint(0, palette, test.indices.shape)].permute(0, 3, 1, 2)
    blank = torch.zeros_like(test.images()) + train.palette[0][None, :, None, None]
    for fake in (noise, palette_noise, blank):
        fake_fid = metrics.frechet_distance(metrics.extract_features(net, fake.contiguous()), ref)
        assert fake_fid > 10 * real, (fake_fid, real)
    # small objects are 3 pixels at 16x16, where a circle and a square coincide: the ceiling is below 1
    assert metrics.caption_fidelity(judge, test.images(), test.labels()) > 0.75
    shuffled = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    assert metrics.caption_fidelity(judge, test.images()[shuffled], test.labels()) < 0.6
    # one image for every caption: balanced fidelity falls to about chance
    collapsed = test.images()[:1].expand(len(test), -1, -1, -1)
    assert metrics.caption_fidelity(judge, collapsed, test.labels()) < 0.45
    # the cache returns the same nets
    cached = metrics.load_or_train_net("feature", *args, steps=200, batch_size=64)
    torch.testing.assert_close(metrics.extract_features(cached, val.images()), ref)
    assert len(list(tmp_path.glob("t2i_featurenet_*.safetensors"))) == 1
    assert len(list(tmp_path.glob("t2i_fidelitynet_*.safetensors"))) == 1
    with pytest.raises(ValueError, match="labels"):
        metrics.caption_fidelity(judge, test.images(), test.labels()[:, :3])


def test_net_cache_is_keyed_by_content_and_independent_of_the_run_seed(tmp_path, monkeypatch):
    """One net per training set and hyper-parameters: the same inputs reuse it whatever the caller's seed, a change to
    one training image or one hyper-parameter trains another, and the file is not trusted for anything else."""
    train = ShapesDataset("train", 64, image_size=8, palette=4, seed=0)
    images, labels, classes = train.images(), train.labels(), train.attribute_classes()
    trained = []
    real_train = metrics.train_net
    monkeypatch.setattr(metrics, "train_net", lambda *a, **k: trained.append(a[0]) or real_train(*a, **k))
    torch.manual_seed(1)
    first = metrics.load_or_train_net("feature", tmp_path, images, labels, classes, steps=3)
    torch.manual_seed(2)  # a run with another train.seed
    fresh = real_train("feature", images, labels, classes, steps=3)
    again = metrics.load_or_train_net("feature", tmp_path, images, labels, classes, steps=3)
    assert trained == ["feature"]
    for other in (fresh, again):
        torch.testing.assert_close(metrics.extract_features(other, images), metrics.extract_features(first, images))
    changed = images.clone()
    changed[0, :, 0, 0] += 1
    metrics.load_or_train_net("feature", tmp_path, changed, labels, classes, steps=3)
    metrics.load_or_train_net("feature", tmp_path, images, labels, classes, steps=4)
    metrics.load_or_train_net("fidelity", tmp_path, images, labels, classes, steps=3)
    assert trained == ["feature"] * 3 + ["fidelity"]
    assert len(list(tmp_path.glob("t2i_*net_*.safetensors"))) == 4
    assert metrics.NETS["feature"][2]["seed"] != metrics.NETS["fidelity"][2]["seed"]
    with pytest.raises(TypeError, match="unknown options"):
        metrics.load_or_train_net("feature", tmp_path, images, labels, classes, stepz=3)


def _kid_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3, term by term."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_computation(seed):
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64) * 1.3 + 0.4
    assert metrics.polynomial_mmd2(x, y) == pytest.approx(_kid_direct(x.numpy(), y.numpy()), rel=1e-10)
    # subsets: half the smaller set from each, drawn as documented, mean and (n - 1) std over them
    mean, std = metrics.kernel_inception_distance(x, y, subsets=6, seed=3)
    gen, values = torch.Generator().manual_seed(3), []
    for _ in range(6):
        rows_x, rows_y = torch.randperm(9, generator=gen)[:4], torch.randperm(12, generator=gen)[:4]
        values.append(_kid_direct(x[rows_x].numpy(), y[rows_y].numpy()))
    assert mean == pytest.approx(np.mean(values), rel=1e-10) and std == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    with pytest.raises(ValueError, match="feature dims"):
        metrics.polynomial_mmd2(x, y[:, :3])


def test_kid_is_zero_in_expectation_for_one_distribution(seed):
    """Two samples of one distribution: KID averages to 0 (FID does not: it is biased upwards at small n)."""
    same, fids, shifted = [], [], []
    for _ in range(300):
        x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
        same.append(metrics.polynomial_mmd2(x, y))
        fids.append(metrics.frechet_distance(x, y))
        shifted.append(metrics.polynomial_mmd2(x, y + 0.5))
    same, shifted = np.array(same), np.array(shifted)
    stderr = same.std(ddof=1) / np.sqrt(len(same))
    assert abs(same.mean()) < 3 * stderr
    assert (same < 0).any()  # unbiased, hence negative at times
    assert np.mean(fids) > 0.5  # FID's bias at n = 16, four dims
    assert shifted.mean() > 10 * stderr


def test_diversity_measures():
    groups = [torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64), torch.randn(1, 3)]
    direct = np.mean(
        [
            np.mean([torch.dist(g[i], g[j]).item() for i in range(len(g)) for j in range(i + 1, len(g))])
            for g in groups[:2]
        ]
    )
    assert metrics.mean_pairwise_distance(groups) == pytest.approx(direct, rel=1e-10)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    repeated = torch.stack([images[0], images[1], images[0], images[0]])
    assert metrics.distinct_fraction([images, repeated]) == pytest.approx((4 / 4 + 2 / 4) / 2)
    assert metrics.mean_pairwise_distance([images[:1].expand(4, -1, -1, -1).flatten(1).double()]) == 0


def test_balanced_fidelity_does_not_reward_the_majority_class():
    class Constant(metrics.FeatureNet):  # predicts class 0 everywhere
        def forward(self, images):
            return [torch.tensor([[1.0, 0.0]]).expand(len(images), 2)]

    net = Constant({"word_dog": 2})
    labels = torch.tensor([[0]] * 9 + [[1]])
    images = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    assert metrics.caption_fidelity(net, images, labels, balanced=False) == pytest.approx(0.9)
    assert metrics.caption_fidelity(net, images, labels, balanced=True) == pytest.approx(0.5)


def test_inception_fid_metric_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # as on a machine without torchmetrics
    with pytest.raises(RuntimeError, match="torchmetrics and its Inception weights: ModuleNotFoundError"):
        metrics.inception_fid_metric()


class RecordingMetric:
    """A stand-in for torchmetrics' FID: records what it is given; compute() is the mean pixel gap real - fake."""

    def __init__(self):
        self.sums, self.resets, self.device = {True: [], False: []}, 0, None

    def reset(self):
        self.sums, self.resets = {True: [], False: []}, self.resets + 1

    def to(self, device):
        self.device = device
        return self

    def update(self, images, real):
        assert images.dtype == torch.uint8 and images.shape[-2:] == (299, 299), (images.dtype, images.shape)
        self.sums[real].append(images.double().mean(dim=(1, 2, 3)))

    def compute(self):
        return torch.cat(self.sums[True]).mean() - torch.cat(self.sums[False]).mean()


def test_inception_fid_resets_and_upsamples_its_inputs():
    metric = RecordingMetric()
    real = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    fake = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    for _ in range(2):  # a second evaluation starts from nothing
        value = metrics.inception_fid(metric, real, fake)
        assert [len(torch.cat(metric.sums[r])) for r in (True, False)] == [5, 3]
    up = [torch.nn.functional.interpolate(x.double(), size=299, mode="nearest").mean() for x in (real, fake)]
    assert metric.resets == 2 and metric.device == real.device
    assert value == pytest.approx((up[0] - up[1]).item(), rel=1e-12)  # real images passed as real, fake as fake


def test_save_grid(tmp_path):
    from PIL import Image

    ds = ShapesDataset("val", 5, image_size=8, palette=4)
    path = save_grid(ds.images(), ds.captions, tmp_path / "grid.png", ncols=3)
    assert path.exists() and Image.open(path).format == "PNG"
    with pytest.raises(ValueError, match="caption"):
        save_grid(ds.images(), ds.captions[:2], tmp_path / "bad.png")


def _white_margins(path) -> list[int]:
    """Widths of the all-white bands at the top, bottom, left and right of a PNG."""
    from PIL import Image

    ink = (np.asarray(Image.open(path).convert("RGB")) < 250).any(axis=-1)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return [rows[0], ink.shape[0] - 1 - rows[-1], cols[0], ink.shape[1] - 1 - cols[-1]]


@pytest.mark.parametrize("n, ncols", [(1, 4), (3, 4), (16, 4), (16, 8)])
def test_grid_size_follows_the_content(tmp_path, n, ncols):
    ds = ShapesDataset("val", n, image_size=16, palette=6)
    fig = grid_figure(ds.images(), ds.captions, ncols=ncols, title="step 7")
    width, height = fig.get_size_inches() * fig.dpi
    side = 16 * round(grid.IMAGE_PX / 16)
    cols, rows = min(n, ncols), -(-n // ncols)
    assert width == pytest.approx(cols * side + (cols + 1) * grid.GAP_PX)
    line = grid.CAPTION_PT * grid.DPI / 72 * 1.5
    assert rows * side < height < rows * (side + grid.GAP_PX + grid.MAX_CAPTION_LINES * line) + 3 * grid.GAP_PX
    # no empty margin: the title, images and captions reach to within a gap (and a text descent) of the edges
    path = save_grid(ds.images(), ds.captions, tmp_path / "grid.png", ncols=ncols, title="step 7")
    assert max(_white_margins(path)) <= grid.GAP_PX + line / 3


def test_grid_captions_are_legible_and_apart():
    ds = ShapesDataset("val", 12, image_size=32, palette=8)
    captions = ds.captions[:11] + ["a caption far too long to fit " * 6]
    fig = grid_figure(ds.images(), captions, ncols=4)
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.texts if t.get_text()]
    assert len(texts) == len(captions)
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert all(t.get_fontsize() * fig.dpi / 72 >= 14 for t in texts)  # pixels of the saved PNG
    for text, caption in zip(texts, captions[:11]):
        assert text.get_text().replace("\n", " ") == caption  # wrapped, never cut
    assert texts[-1].get_text().endswith("…") and texts[-1].get_text().count("\n") == grid.MAX_CAPTION_LINES - 1
    # inside the figure, clear of each other and of every image
    assert all(0 <= b.x0 and b.x1 <= fig.bbox.width and 0 <= b.y0 and b.y1 <= fig.bbox.height for b in boxes)
    images = [ax.get_window_extent(renderer) for ax in fig.axes]
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :] + images)


def test_grid_pixels_are_whole_squares(tmp_path, seed):
    from PIL import Image

    images = torch.randint(0, 256, (2, 3, 6, 10), dtype=torch.uint8)
    path = save_grid(images, ["a", "b"], tmp_path / "grid.png")
    saved = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    scale = round(grid.IMAGE_PX / 10)
    colours, counts = np.unique(images.permute(0, 2, 3, 1).reshape(-1, 3).numpy(), axis=0, return_counts=True)
    for colour, count in zip(colours, counts):  # nearest upscaling by a whole factor: each pixel is scale² copies
        assert (saved == colour).all(axis=1).sum() == count * scale**2, colour


# ---------------------------------------------------------------------------------------------------------------
# through the trainer


def _tiny_overrides(tmp_path):
    return [
        "data.name=shapes",
        f"data.cache_dir={tmp_path / 'cache'}",
        "t2i.image_size=8",
        "t2i.palette=5",
        "t2i.num_train=96",
        "t2i.num_val=16",
        "t2i.num_test=12",
        "t2i.fid_samples=8",
        "t2i.enc_depth=1",
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "model.dim_head=16",
        "train.batch_size=8",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.log_every=1",
        f"train.out_dir={tmp_path / 'run'}",
    ]


@pytest.mark.parametrize("data", ["shapes", "hf"])
def test_tiny_training_run_writes_grids_and_metrics(tmp_path, torch_attention_path, monkeypatch, data):
    from cosformer.train.config import load_config
    from cosformer.train.trainer import run

    for kind, (cls, arch, train) in list(metrics.NETS.items()):  # the nets' quality is not the subject here
        monkeypatch.setitem(metrics.NETS, kind, (cls, arch, train | {"steps": 50, "batch_size": 64}))
    overrides = _tiny_overrides(tmp_path)
    if data == "hf":
        _, folder = _image_folder(tmp_path, monkeypatch, n=40)
        overrides += ["data.name=hf", f"t2i.hf_dataset={folder}", "t2i.palette=3", "t2i.num_val=8", "t2i.num_test=8"]
        overrides += ["t2i.fid_samples=2"]  # 3 floor subsets of 2 beside a reference of 2
    final = run(load_config(overrides=overrides))
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("samples_step_*.png")) == [
        "samples_step_000002.png",
        "samples_step_000004.png",
    ]
    image_metrics = ["fid", "fid_floor_mean", "fid_floor_std", "kid", "kid_std", "kid_floor_mean", "kid_floor_std"]
    image_metrics += ["fidelity", "fidelity_ceiling", "distinct"] + (["diversity"] if data == "shapes" else [])
    for split in ("val", "test"):
        for key in [*image_metrics, "bits_per_pixel"]:
            assert math.isfinite(final[f"{split}_{key}"]), f"{split}_{key}"
        assert 0.0 <= final[f"{split}_fidelity"] <= 1.0 and final[f"{split}_fid"] >= 0
        assert final[f"{split}_fid_floor_std"] > 0
    assert final["test_bits_per_pixel"] == pytest.approx(final["test_loss"] / math.log(2))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_fid" in r and not r.get("final")]
    assert [r["step"] for r in evals] == [2, 4]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    for kind in ("feature", "fidelity"):
        assert len(list((tmp_path / "cache").glob(f"t2i_{kind}net_*.safetensors"))) == 1
