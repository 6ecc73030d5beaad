"""An embedded, procedurally generated text-to-image dataset: coloured shapes with compositional captions.

Every draw comes from its own generator seeded from (seed, split, draw index), so the same seed gives the same
dataset on every machine and a longer split starts with the items of a shorter one. Images are drawn directly in
palette indices (index 0 is the background), so quantisation to the palette is lossless and the model's
likelihood is an exact likelihood of the images.

Splits are disjoint by content. Independent streams are not enough: the space of images is small (a one-object
caption has about a thousand possible images at 32x32), so independent streams put about one val / test image in six
in training too.
Each image is therefore owned by one split, decided by a hash of its palette-index bytes alone (`split_of`: 1/8
test, 1/8 val, 3/4 train), and a split's stream skips every draw that another split owns. No image, and hence no
(image, caption) pair, occurs in two splits; an image drawn twice within one split stays (the data distribution
has repeats). Captions do repeat across splits (there are only 56 one-object captions): that is generalisation
over positions, not a leak. Since the hash ignores everything but the image, each split is a sample of the same
distribution conditioned on an event independent of what the image shows.

holdout="combinations" makes the split compositional. An object in a two-object item forms a (colour, shape,
relation) triple with the relation it stands in to the other object (in "a red circle above a blue cross" the red
circle is "above", the blue cross "below"; "a blue cross below a red circle" gives the same triples, as it draws the
same images). The triples with (colour + shape + relation) % 4 == 0 (indices into COLOURS, SHAPES, RELATIONS)
are held out: train keeps only items without one, val and test only items with one (on top of the hash rule above).
Every colour x shape pair then occurs in training in three of the four relations, every colour x relation pair with
three of the four shapes, and every shape x relation pair with most colours: a held-out item asks for a combination
whose parts were all seen, never the combination itself.

An item holds one object ("a small red circle") or two in a spatial relation ("a large blue square above a
small yellow cross"). Two objects sit in opposite halves of the image, so the captioned relation holds strictly
(the first object's box ends before the second's begins along the relation's axis), and their boxes overlap along
the other axis, so that the image shows one relation only.

Attribute labels for the caption-fidelity classifier are canonical, i.e. a function of the image alone: the
layout (one object, two stacked vertically, two side by side), then "first" = the top / left object and
"second" = the bottom / right one. "a above b" and "b below a" draw the same images and get the same labels.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "left of", "right of")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
LAYOUTS = ("single", "vertical", "horizontal")
# Colour names and their RGB; the background is palette index 0 and is never a captioned colour.
BACKGROUND_RGB = (16, 16, 16)
COLOURS = (
    ("red", (230, 40, 40)),
    ("green", (40, 200, 60)),
    ("blue", (50, 90, 240)),
    ("yellow", (245, 220, 40)),
    ("magenta", (220, 60, 220)),
    ("cyan", (40, 220, 230)),
    ("white", (245, 245, 245)),
    ("orange", (250, 140, 20)),
    ("purple", (130, 60, 200)),
    ("brown", (140, 90, 40)),
    ("pink", (250, 160, 200)),
    ("grey", (128, 128, 128)),
)
SPLITS = ("train", "val", "test")
# Share of the image space each split owns (see `split_of`); val and test are kept equal.
SPLIT_SHARES = {"test": 1 / 8, "val": 1 / 8, "train": 3 / 4}
HOLDOUTS = ("none", "combinations")
IGNORE = -1  # label of an attribute the caption does not name (the second object of a one-object item)


def encode_captions(captions: list[str], text_max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level tokens: ((n, L) long, (n, L) bool mask, True on real bytes). Longer captions are cut at L bytes."""
    text = torch.zeros(len(captions), text_max_len, dtype=torch.long)
    mask = torch.zeros(len(captions), text_max_len, dtype=torch.bool)
    for row, caption in enumerate(captions):
        data = caption.encode("utf-8")[:text_max_len]
        if data:
            text[row, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
            mask[row, : len(data)] = True
    return text, mask


def decode_caption(text: torch.Tensor, mask: torch.Tensor) -> str:
    return bytes(text[mask].tolist()).decode("utf-8", errors="replace")


def shapes_palette(palette: int) -> torch.Tensor:
    """(palette, 3) uint8 RGB: background first, then the first palette - 1 named colours."""
    if not 3 <= palette <= len(COLOURS) + 1:
        raise ValueError(f"palette must be in [3, {len(COLOURS) + 1}] for the shapes dataset; got {palette}")
    return torch.tensor([BACKGROUND_RGB] + [rgb for _, rgb in COLOURS[: palette - 1]], dtype=torch.uint8)


def object_sizes(image_size: int) -> tuple[int, int]:
    """Side in pixels of (small, large) objects; large fits in half the image with a margin."""
    large = image_size // 2 - image_size // 16
    small = max(2, (large * 9) // 16)
    return small, large


# Every shape either dataset draws (shapes: the first four; scenes: all six).
SHAPE_KINDS = ("circle", "square", "triangle", "cross", "diamond", "ring")


@functools.cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool: the shape drawn in its bounding box, sampled at pixel centres (cached: read only). Each
    shape reaches all four sides of its box, so the box of its pixels is the box it was drawn in."""
    c = (np.arange(side) + 0.5) / side
    v, u = np.meshgrid(c, c, indexing="ij")  # v: row (down), u: column (right), both in (0, 1)
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":  # apex up: the half-width grows linearly with the row
        mask = np.abs(u - 0.5) <= v / 2 + 0.5 / side
    elif shape == "cross":  # a plus sign with arms a third of the side thick
        mask = (np.abs(u - 0.5) <= 1 / 6 + 0.5 / side) | (np.abs(v - 0.5) <= 1 / 6 + 0.5 / side)
    elif shape == "diamond":  # the tolerance keeps the centre pixel(s) of the first and last rows and columns
        mask = np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + 1e-9
    elif shape == "ring":  # a circle with a hole of half its radius
        r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
        mask = (r2 <= 0.25) & (r2 > 0.0625)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_KINDS}")
    mask.setflags(write=False)
    return mask


def _describe(obj: dict) -> str:
    return f"a {SIZES[obj['size']]} {COLOURS[obj['colour']][0]} {SHAPES[obj['shape']]}"


def make_item(rng: np.random.Generator, image_size: int, num_colours: int) -> tuple[str, np.ndarray, dict]:
    """Draw one item: (caption, (S, S) uint8 palette indices, description with objects, boxes and relation)."""
    description = describe_item(rng, image_size, num_colours)
    return description["caption"], draw_item(description, image_size), description


def describe_item(rng: np.random.Generator, image_size: int, num_colours: int) -> dict:
    """All the random draws of one item: {"objects": [{shape, colour, size, box}], "relation", "caption"}."""
    sides = object_sizes(image_size)
    num_objects = int(rng.integers(1, 3))
    objects = [
        dict(shape=int(rng.integers(len(SHAPES))), colour=int(rng.integers(num_colours)), size=int(rng.integers(2)))
        for _ in range(num_objects)
    ]
    relation = None
    if num_objects == 1:
        side = sides[objects[0]["size"]]
        objects[0]["box"] = (int(rng.integers(image_size - side + 1)), int(rng.integers(image_size - side + 1)), side)
    else:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        # "a above b" puts a in the top half (the first cell), "a below b" in the bottom one; along the other axis
        # the second object overlaps the first, so the pair never also reads as "left of" / "right of".
        half = image_size // 2
        cells = (0, image_size - half) if relation in ("above", "left of") else (image_size - half, 0)
        side_a, side_b = (sides[o["size"]] for o in objects)
        along_a = cells[0] + int(rng.integers(half - side_a + 1))
        along_b = cells[1] + int(rng.integers(half - side_b + 1))
        across_a = int(rng.integers(image_size - side_a + 1))
        lo, hi = max(0, across_a - side_b + 1), min(image_size - side_b, across_a + side_a - 1)
        across_b = int(rng.integers(lo, hi + 1))
        vertical = relation in ("above", "below")
        objects[0]["box"] = (along_a, across_a, side_a) if vertical else (across_a, along_a, side_a)
        objects[1]["box"] = (along_b, across_b, side_b) if vertical else (across_b, along_b, side_b)
    caption = _describe(objects[0])
    if relation is not None:
        caption = f"{caption} {relation} {_describe(objects[1])}"
    return {"objects": objects, "relation": relation, "caption": caption}


def draw_item(description: dict, image_size: int) -> np.ndarray:
    """(S, S) uint8 palette indices of a described item (no randomness)."""
    image = np.zeros((image_size, image_size), dtype=np.uint8)
    for obj in description["objects"]:
        y, x, side = obj["box"]  # top row, left column, side
        image[y : y + side, x : x + side][shape_mask(SHAPES[obj["shape"]], side)] = obj["colour"] + 1
    return image


def canonical_labels(description: dict) -> list[int]:
    """Attribute labels in ATTRIBUTES order, independent of the caption's word order (see module docstring)."""
    objects, relation = description["objects"], description["relation"]
    if relation is None:
        layout, ordered = 0, objects + [None]
    else:
        layout = 1 if relation in ("above", "below") else 2
        ordered = objects if relation in ("above", "left of") else objects[::-1]
    labels = [layout]
    for obj in ordered:
        labels += [IGNORE] * 3 if obj is None else [obj["shape"], obj["colour"], obj["size"]]
    return labels


ATTRIBUTES = ("layout", "shape_1", "colour_1", "size_1", "shape_2", "colour_2", "size_2")


def attribute_classes(palette: int) -> dict[str, int]:
    """Number of classes per attribute, in label order."""
    per_object = {"shape": len(SHAPES), "colour": palette - 1, "size": len(SIZES)}
    return {"layout": len(LAYOUTS)} | {f"{a}_{n}": c for n in (1, 2) for a, c in per_object.items()}


def relation_triples(description: dict) -> list[tuple[int, int, int]]:
    """(colour, shape, relation) index triples of a two-object item: each object with the relation it stands in to
    the other (none for one object). Both phrasings of an image give the same triples."""
    relation = description["relation"]
    if relation is None:
        return []
    first, second = description["objects"]
    return [
        (first["colour"], first["shape"], RELATIONS.index(relation)),
        (second["colour"], second["shape"], RELATIONS.index(INVERSE[relation])),
    ]


def is_held_out(triple: tuple[int, int, int]) -> bool:
    """The held-out (colour, shape, relation) triples of holdout="combinations" (see module docstring)."""
    return sum(triple) % len(RELATIONS) == 0


def has_held_out_triple(description: dict) -> bool:
    return any(is_held_out(t) for t in relation_triples(description))


def split_of(image: np.ndarray, held_out: bool = False, holdout: str = "none") -> str | None:
    """The split that owns an item: by a hash of the image bytes; with holdout="combinations", None for an item that
    belongs to no split (`held_out`, i.e. holding a held-out combination, hashed to train, or not held out and hashed
    to val / test)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64  # uniform in [0, 1)
    split = "test" if u < SPLIT_SHARES["test"] else "val" if u < SPLIT_SHARES["test"] + SPLIT_SHARES["val"] else "train"
    if holdout == "combinations" and held_out != (split != "train"):
        return None
    return split


def _item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def collect_items(
    split: str, num_items: int, image_size: int, seed: int, holdout: str, describe, draw, held_out, label
) -> tuple[np.ndarray, list[str], list[list[int]], int]:
    """The first `num_items` items that split `split` owns (see the module docstring), for any procedural dataset:
    describe(rng) -> description with a "caption", draw(description) -> (S, S) uint8 image, held_out(description) ->
    bool, label(description) -> attribute labels. Returns (images (n, S, S), captions, labels, draws used)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be one of {HOLDOUTS}; got {holdout!r}")
    if num_items < 1:
        raise ValueError(f"num_items must be positive; got {num_items}")
    captions, labels = [], []
    indices = np.empty((num_items, image_size, image_size), dtype=np.uint8)
    draw_index, max_draws = 0, 1000 * num_items + 10_000  # the rarest split owns a few percent of all draws
    while len(captions) < num_items:
        if draw_index == max_draws:
            raise RuntimeError(f"{split} owned {len(captions)} of {draw_index} draws; cannot reach {num_items} items")
        description = describe(_item_rng(seed, split, draw_index))
        draw_index += 1
        is_held_out = holdout == "combinations" and held_out(description)
        # the holdout rule needs no pixels: skip the drawing where it already says no
        if holdout == "combinations" and is_held_out == (split == "train"):
            continue
        image = draw(description)
        if split_of(image, is_held_out, holdout) != split:
            continue
        indices[len(captions)] = image
        captions.append(description["caption"])
        labels.append(label(description))
    return indices, captions, labels, draw_index


class ImageCaptionDataset(Dataset):
    """Palette images with byte-level captions. Items: {text (L,) long, text_mask (L,) bool, image_tokens (S*S+1,)}.

    image_tokens is a BOS token (= number of palette colours) followed by the image's palette indices in raster
    order. The attribute labels for the fidelity classifier stay out of the items (the trainer calls
    model(**batch)) and are exposed through `labels()`, the captions through `captions`, RGB images through
    `images()`. balanced_fidelity: score the fidelity classifier with per-class balanced accuracy (the default: classes
    are uneven, one object vs two for shapes, binary word attributes for captioned photos; see
    `metrics.caption_fidelity`).
    """

    def __init__(
        self,
        indices: torch.Tensor,
        palette: torch.Tensor,
        captions: list[str],
        labels: torch.Tensor,
        classes: dict[str, int],
        text_max_len: int,
        balanced_fidelity: bool = True,
    ):
        if indices.dim() != 3 or indices.shape[1] != indices.shape[2] or indices.dtype != torch.uint8:
            raise ValueError(f"indices must be (n, S, S) uint8; got {tuple(indices.shape)} {indices.dtype}")
        if palette.dim() != 2 or palette.shape[1] != 3 or palette.dtype != torch.uint8:
            raise ValueError(f"palette must be (P, 3) uint8; got {tuple(palette.shape)} {palette.dtype}")
        if len(captions) != len(indices) or tuple(labels.shape) != (len(indices), len(classes)):
            raise ValueError(
                f"need one caption and one label row per image: {len(indices)} images, {len(captions)} captions, "
                f"labels {tuple(labels.shape)} for {len(classes)} attributes"
            )
        if len(indices) and int(indices.max()) >= len(palette):
            raise ValueError(f"indices reach {int(indices.max())} but the palette has {len(palette)} colours")
        self.indices, self.palette, self.captions = indices, palette, list(captions)
        self._labels, self.classes, self.balanced_fidelity = labels, dict(classes), balanced_fidelity
        self.image_size, self.text_max_len, self.bos = indices.shape[-1], text_max_len, len(palette)
        self.text, self.text_mask = encode_captions(self.captions, text_max_len)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        pixels = self.indices[idx].flatten().long()
        return {
            "text": self.text[idx],
            "text_mask": self.text_mask[idx],
            "image_tokens": torch.cat([pixels.new_full((1,), self.bos), pixels]),
        }

    def images(self, idx: slice | torch.Tensor | None = None) -> torch.Tensor:
        """(n, 3, S, S) uint8 RGB of the items idx (all by default)."""
        indices = self.indices if idx is None else self.indices[idx]
        return self.palette[indices.long()].permute(0, 3, 1, 2).contiguous()

    def labels(self, idx: slice | torch.Tensor | None = None) -> torch.Tensor:
        """(n, number of attributes) long labels, IGNORE where the caption names none."""
        return self._labels if idx is None else self._labels[idx]

    def attribute_classes(self) -> dict[str, int]:
        return dict(self.classes)


class ShapesDataset(ImageCaptionDataset):
    """The procedural shapes split `split` (see the module docstring): the first `num_items` items its stream owns
    for `seed`, without (holdout="none") or with ("combinations") held-out relation triples."""

    def __init__(
        self,
        split: str,
        num_items: int,
        image_size: int = 32,
        palette: int = 8,
        text_max_len: int = 64,
        seed: int = 0,
        holdout: str = "none",
    ):
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 for two objects to fit; got {image_size}")
        colours = shapes_palette(palette)
        longest = max(len(n) for n, _ in COLOURS[: palette - 1])
        longest_caption = 2 * len(f"a small {'x' * longest} triangle") + len(" right of ")
        if text_max_len < longest_caption:
            raise ValueError(f"text_max_len must be >= {longest_caption} to hold every caption; got {text_max_len}")
        indices, captions, labels, draws = collect_items(
            split,
            num_items,
            image_size,
            seed,
            holdout,
            describe=lambda rng: describe_item(rng, image_size, palette - 1),
            draw=lambda description: draw_item(description, image_size),
            held_out=has_held_out_triple,
            label=canonical_labels,
        )
        super().__init__(
            torch.from_numpy(indices),
            colours,
            captions,
            torch.tensor(labels, dtype=torch.long),
            attribute_classes(palette),
            text_max_len,
        )
        self.split, self.seed, self.holdout, self.draws = split, seed, holdout, draws
