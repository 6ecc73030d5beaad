"""Text-to-image scenes (`cosformer.t2i.scenes`): determinism, captions that say exactly what an independent reading of
the pixels finds (objects as connected components of one colour, shapes by their geometry, counts, the one relation
between the groups), splits owned by content, held-out combinations absent from training, and a fidelity judge that
reads real scenes well. The task's evaluation of scenes is checked in test_t2i_eval.py."""

import itertools
import re

import numpy as np
import pytest
import torch

from cosformer.t2i import metrics, scenes, shapes
from cosformer.t2i.scenes import SceneDataset

pytestmark = pytest.mark.usefixtures("one_thread")

COLOUR_NAMES = [name for name, _ in shapes.COLOURS]
SHAPE_NAMES = ["circle", "square", "triangle", "cross", "diamond", "ring"]
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross", "diamonds": "diamond"}
PLURAL["rings"] = "ring"
COUNT = {"a": 1, "two": 2, "three": 3}
_GROUP = r"(a|two|three) (small|large) ([a-z]+) ([a-z]+)"
_CAPTION = re.compile(rf"^{_GROUP} (above|below|left of|right of) {_GROUP}$")


def _parse_caption(caption: str) -> tuple[tuple, str, tuple]:
    """((count, (colour index, size, shape)), relation, (...)) from the words alone, singular / plural checked."""
    m = _CAPTION.match(caption)
    assert m, caption

    def group(count, size, colour, noun):
        n = COUNT[count]
        shape = noun if n == 1 else PLURAL[noun]  # a KeyError or a mismatch below means a wrong noun form
        assert shape in SHAPE_NAMES and (n == 1) == (noun == shape), caption
        return n, (COLOUR_NAMES.index(colour), size, shape)

    return group(*m.group(1, 2, 3, 4)), m[5], group(*m.group(6, 7, 8, 9))


def _components(image: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(colour index, (k, 2) pixel coordinates) of each 8-connected component of one non-background colour."""
    seen = np.zeros(image.shape, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(image)):
        if seen[y0, x0]:
            continue
        colour, stack, pixels = image[y0, x0], [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                v, u = y + dy, x + dx
                if 0 <= v < image.shape[0] and 0 <= u < image.shape[1] and not seen[v, u] and image[v, u] == colour:
                    seen[v, u] = True
                    stack.append((v, u))
        out.append((int(colour), np.array(pixels)))
    return out


def _has_hole(mask: np.ndarray) -> bool:
    """Background inside the box that a 4-connected flood from the box's border does not reach."""
    outside = np.zeros_like(mask)
    stack = [(y, x) for y in range(mask.shape[0]) for x in range(mask.shape[1])]
    stack = [
        (y, x) for y, x in stack if (y in (0, mask.shape[0] - 1) or x in (0, mask.shape[1] - 1)) and not mask[y, x]
    ]
    for y, x in stack:
        outside[y, x] = True
    while stack:
        y, x = stack.pop()
        for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and not mask[v, u] and not outside[v, u]:
                outside[v, u] = True
                stack.append((v, u))
    return bool((~mask & ~outside).any())


def _shape_of(mask: np.ndarray) -> str:
    """Name a filled (side, side) mask by geometric properties, not by redrawing it: full; with a hole; pointed at the
    top (triangle: wide base; diamond: pointed base too); else rows of two widths only (arms and bar) or more."""
    widths = mask.sum(axis=1)
    if mask.all():
        return "square"
    if _has_hole(mask):
        return "ring"
    if widths[0] <= 2:
        return "triangle" if widths[-1] == mask.shape[1] else "diamond"
    return "cross" if len(set(widths.tolist())) == 2 else "circle"


def _read_image(image: np.ndarray, sides: tuple[int, int]) -> dict[tuple, list[tuple[int, int, int, int]]]:
    """(colour index, size name, shape) -> boxes (y0, y1, x0, x1) of the objects the pixels show."""
    objects: dict[tuple, list] = {}
    for colour, pixels in _components(image):
        (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0) + 1
        assert y1 - y0 == x1 - x0 and y1 - y0 in sides, f"object box {(y0, y1, x0, x1)} is not a scene object"
        mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        mask[pixels[:, 0] - y0, pixels[:, 1] - x0] = True
        size = "small" if y1 - y0 == sides[0] else "large"
        objects.setdefault((colour - 1, size, _shape_of(mask)), []).append((y0, y1, x0, x1))
    return objects


def _relations(a: list, b: list) -> set[str]:
    """Every relation that holds strictly between groups of boxes a and b (all of a before all of b)."""
    holds = {
        "above": max(y1 for _, y1, _, _ in a) <= min(y0 for y0, _, _, _ in b),
        "below": max(y1 for _, y1, _, _ in b) <= min(y0 for y0, _, _, _ in a),
        "left of": max(x1 for _, _, _, x1 in a) <= min(x0 for _, _, x0, _ in b),
        "right of": max(x1 for _, _, _, x1 in b) <= min(x0 for _, _, x0, _ in a),
    }
    return {name for name, ok in holds.items() if ok}


def _check_consistent(ds: SceneDataset) -> set[str]:
    """Each caption against the pixels and the labels; returns the relations seen."""
    sides = scenes.scene_sides(ds.image_size)
    seen = set()
    for image, caption, labels in zip(ds.indices.numpy(), ds.captions, ds.labels().tolist()):
        first, relation, second = _parse_caption(caption)
        seen.add(relation)
        found = _read_image(image, sides)
        # exactly the captioned objects: two groups, counts exact, nothing else in the image
        assert sorted(found) == sorted([first[1], second[1]]), (caption, sorted(found))
        a, b = found[first[1]], found[second[1]]
        assert (len(a), len(b)) == (first[0], second[0]), caption
        assert _relations(a, b) == {relation}, (caption, _relations(a, b))
        # canonical labels: layout, then the top / left group's shape, colour, size, count, then the other's
        vertical = relation in ("above", "below")
        ordered = [first, second] if relation in ("above", "left of") else [second, first]
        expected = [0 if vertical else 1]
        for count, (colour, size, shape) in ordered:
            expected += [SHAPE_NAMES.index(shape), colour, ("small", "large").index(size), count - 1]
        assert labels == expected, caption
    return seen


@pytest.mark.parametrize("image_size, num_items", [(32, 300), (64, 40)])
def test_captions_say_exactly_what_the_pixels_show(image_size, num_items):
    ds = SceneDataset("test", num_items, image_size=image_size, palette=13, seed=7)
    seen = _check_consistent(ds)
    if image_size == 32:
        assert seen == {"above", "below", "left of", "right of"}
        counts = [sum(ds.labels()[:, k].tolist().count(c) for k in (4, 8)) for c in range(3)]
        assert all(counts), counts  # one, two and three of a kind all occur
        assert set(ds.labels()[:, 1].tolist()) == set(range(6))  # every shape
        assert len(set(ds.labels()[:, 2].tolist())) == 12  # every colour


def test_scenes_are_deterministic_and_follow_the_seed():
    a = SceneDataset("train", 40, image_size=32, palette=9, seed=3)
    b = SceneDataset("train", 40, image_size=32, palette=9, seed=3)
    assert torch.equal(a.indices, b.indices) and a.captions == b.captions and torch.equal(a.labels(), b.labels())
    longer = SceneDataset("train", 60, image_size=32, palette=9, seed=3)
    assert torch.equal(longer.indices[:40], a.indices) and longer.captions[:40] == a.captions
    other = SceneDataset("train", 40, image_size=32, palette=9, seed=4)
    assert sum(torch.equal(a.indices[i], other.indices[i]) for i in range(40)) == 0


def test_scene_splits_are_owned_by_content():
    """Each image sits in the split its bytes hash to, so no image is in two splits; two colours keep the image space
    as small as scenes allow."""
    splits = {s: SceneDataset(s, 150, image_size=32, palette=3, seed=2) for s in shapes.SPLITS}
    for split, ds in splits.items():
        assert all(shapes.split_of(image.numpy()) == split for image in ds.indices)
    contents = {s: {image.numpy().tobytes() for image in ds.indices} for s, ds in splits.items()}
    for a, b in itertools.combinations(shapes.SPLITS, 2):
        assert not contents[a] & contents[b], (a, b)


def _caption_triples(caption: str) -> set[tuple[int, int, int]]:
    """(colour, shape, relation) of both groups, each with the relation it stands in to the other, from the words."""
    relations = ["above", "below", "left of", "right of"]
    inverse = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    first, relation, second = _parse_caption(caption)
    return {
        (first[1][0], SHAPE_NAMES.index(first[1][2]), relations.index(relation)),
        (second[1][0], SHAPE_NAMES.index(second[1][2]), relations.index(inverse[relation])),
    }


def test_held_out_combinations_never_reach_training():
    palette = 13
    triples = set(itertools.product(range(palette - 1), range(6), range(4)))
    held_out = {t for t in triples if sum(t) % 4 == 0}
    kept = triples - held_out
    for c, s, r in held_out:  # every pair of a held-out triple's parts is trained on in a kept triple
        assert any(k[:2] == (c, s) for k in kept) and any((k[0], k[2]) == (c, r) for k in kept)
        assert any(k[1:] == (s, r) for k in kept)
    splits = {
        s: SceneDataset(s, 120, image_size=32, palette=palette, seed=5, holdout="combinations") for s in shapes.SPLITS
    }
    train = set().union(*(_caption_triples(c) for c in splits["train"].captions))
    assert train and not train & held_out
    for split in ("val", "test"):
        assert all(_caption_triples(c) & held_out for c in splits[split].captions), split
    contents = {s: {image.numpy().tobytes() for image in ds.indices} for s, ds in splits.items()}
    for a, b in itertools.combinations(shapes.SPLITS, 2):
        assert not contents[a] & contents[b], (a, b)


def test_scene_arguments_are_checked():
    with pytest.raises(ValueError, match="image_size"):
        SceneDataset("val", 2, image_size=16)
    with pytest.raises(ValueError, match="text_max_len"):
        SceneDataset("val", 2, image_size=32, text_max_len=64)
    with pytest.raises(ValueError, match="palette"):
        SceneDataset("val", 2, image_size=32, palette=14)
    with pytest.raises(ValueError, match="split"):
        SceneDataset("dev", 2, image_size=32)
    with pytest.raises(ValueError, match="holdout"):
        SceneDataset("val", 2, image_size=32, holdout="pairs")


def test_fidelity_judge_reads_real_scenes(seed):
    """The judge, trained briefly on a few real training scenes, recovers the captioned attributes of unseen real scenes
    well above chance (about 0.31 here), and not those of images shuffled against their captions or of one image for
    every caption. A modest bar: runs train it for longer on 50k scenes (the ceiling they report)."""
    train = SceneDataset("train", 1500, image_size=32, palette=7, seed=1)
    test = SceneDataset("test", 300, image_size=32, palette=7, seed=1)
    args = (train.images(), train.labels(), train.attribute_classes())
    judge = metrics.train_net("fidelity", *args, steps=150, batch_size=32)
    ceiling = metrics.caption_fidelity(judge, test.images(), test.labels())
    assert ceiling > 0.55, ceiling
    shuffled = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    assert metrics.caption_fidelity(judge, test.images()[shuffled], test.labels()) < 0.42
    collapsed = test.images()[:1].expand(len(test), -1, -1, -1)
    assert metrics.caption_fidelity(judge, collapsed, test.labels()) < 0.42


def test_scenes_task_builds_data_and_model(tmp_path, torch_attention_path):
    """data.name=scenes through the config: scenes of t2i.data_seed in every split, a model whose sequence is the
    image's pixels plus BOS, and a finite loss that depends on the caption."""
    from cosformer.train.config import load_config
    from cosformer.train.tasks import task_class

    overrides = ["data.name=scenes", f"data.cache_dir={tmp_path}", "t2i.image_size=32", "t2i.palette=6"]
    overrides += ["t2i.text_max_len=72", "t2i.num_train=8", "t2i.num_val=4", "t2i.num_test=4", "t2i.data_seed=9"]
    overrides += ["t2i.fid_samples=2", "t2i.enc_depth=1", "model.dim=32", "model.depth=1", "model.heads=2"]
    task = task_class("scenes")(load_config(overrides=[*overrides, "model.dim_head=16"]))
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        drawn = SceneDataset(split, n, image_size=32, palette=6, text_max_len=72, seed=9)
        assert torch.equal(task.splits[split].indices, drawn.indices), split
    batch = torch.utils.data.default_collate([task.datasets()["train"][i] for i in range(3)])
    assert batch["image_tokens"].shape == (3, 32 * 32 + 1)
    model = task.build_model().eval()
    loss = model(**batch)
    assert torch.isfinite(loss)
    swapped = dict(batch, text=batch["text"].roll(1, 0), text_mask=batch["text_mask"].roll(1, 0))
    assert not torch.allclose(model(**swapped), loss)
