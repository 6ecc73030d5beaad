"""Procedural scenes: two groups of identical objects, counted and in a spatial relation, for text-to-image.

"two small red circles above a large blue square": 2-4 objects in two groups (1-3 each), every object of a group of
one count, size, colour and shape, the groups differing in colour or shape (or both), twelve colours, six shapes
(`SCENE_SHAPES`), two sizes, and a relation between the groups ("above", "below", "left of", "right of"). The pairs
dataset of `shapes.py` (one object, or two in a relation) did not separate the attention kinds in the runs so far;
this task asks for counting, binding attributes to the right group and placing groups, at once.

What a caption says is true of its image by construction, and nothing else is:
- every object is a separate connected component of one colour (8-connectivity): boxes never overlap and keep at
  least GAP background pixels between them, so no object hides or touches another;
- counts are exact: a group of k is k components of its (colour, shape, size), and no other component has that
  triple, because the two groups differ in (colour, shape);
- the relation holds strictly between the groups (every object of the first ends before any of the second begins
  along the relation's axis: a random dividing line separates them), and only that relation: along the other axis
  the two groups' extents overlap, so neither "left of" nor "right of" holds for a vertical pair, and the reverse.
Each shape reaches all four sides of its box (`shapes.shape_mask`), so an object's pixels give back its box and size.

Determinism and splits follow `shapes.py`: each draw has its own generator seeded from (seed, split, draw index),
each image is owned by one split by a hash of its palette-index bytes (`shapes.split_of`), so the splits are disjoint
by content. The space of scenes is far larger than that of pairs, so an image rarely occurs twice even in one split.

Attribute labels for the fidelity classifier are canonical (a function of the image alone, not of which group the
caption names first): the layout (vertical, horizontal), then shape / colour / size / count of the first group (top
or left) and of the second (bottom or right). "A above B" and "B below A" draw the same images and get the same
labels. Together they check every claim of a caption: the two groups' attributes and counts, and the relation
through which group is first along which axis.

holdout="combinations": a group forms a (colour, shape, relation) triple with the relation it stands in to the other
group (in "two red circles above a blue square" the red circles are "above", the blue square "below"). The triples
with (colour + shape + relation) % 4 == 0 (indices into COLOURS, SCENE_SHAPES, RELATIONS) are held out, the rule of
`shapes.is_held_out`: train keeps only scenes without one, val and test only scenes with one. Every pair of a held-out
triple's parts occurs in training in a kept triple.

Sequence length: the decoder reads one token per pixel (`model.py`), so 64x64 scenes are 4096 pixel tokens (+ BOS).
Kept per pixel on purpose: the likelihood stays exact (no lossy tokeniser in between), and the attention op is O(n) in
memory and tuned for such lengths (its benchmark grid starts at N = 1024 and includes 4096); patches of 2x2 pixels
over 13 colours would need a vocabulary of 13^4 = 28561 tokens, most of them never seen. 32x32 scenes (1024 tokens)
are for fast tests and smaller runs: their small objects are 7 pixels across, the least at which the six shapes'
masks all differ.
"""

from __future__ import annotations

import numpy as np
import torch

from .shapes import (
    COLOURS,
    INVERSE,
    RELATIONS,
    SHAPE_KINDS,
    ImageCaptionDataset,
    collect_items,
    is_held_out,
    shape_mask,
    shapes_palette,
)

SCENE_SHAPES = SHAPE_KINDS  # all six
PLURALS = {"cross": "crosses"}
SIZES = ("small", "large")
COUNT_WORDS = ("a", "two", "three")  # counts 1, 2, 3
MAX_OBJECTS = 4
# (count of the top / left group, count of the other); drawn uniformly
COUNT_PAIRS = tuple((a, b) for a in range(1, 4) for b in range(1, 4) if a + b <= MAX_OBJECTS)
LAYOUTS = ("vertical", "horizontal")
GAP = 1  # background pixels kept between any two boxes
MIN_IMAGE_SIZE = 32
ATTRIBUTES = ("layout",) + tuple(f"{a}_{g}" for g in (1, 2) for a in ("shape", "colour", "size", "count"))
PLACEMENT_TRIES = 200  # dividing lines tried per scene; each places all its objects or starts over
OBJECT_TRIES = 30  # positions tried per object


def scene_sides(image_size: int) -> tuple[int, int]:
    """Side in pixels of (small, large) objects: (7, 9) at 32x32, (10, 16) at 64x64. Below 7 pixels a cross and a
    circle draw the same mask."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be at least {MIN_IMAGE_SIZE} for scenes (room for four objects of 7 pixels or more); "
            f"got {image_size}"
        )
    small = max(7, image_size * 5 // 32)
    return small, max(small + 2, image_size // 4)


def longest_caption(num_colours: int) -> int:
    """Bytes of the longest caption over the first `num_colours` colours."""
    colour = max(len(n) for n, _ in COLOURS[:num_colours])
    shape = max(len(PLURALS.get(s, s + "s")) for s in SCENE_SHAPES)
    group = len("three") + len(" small ") + colour + 1 + shape
    return 2 * group + len(" right of ")


def _phrase(group: dict) -> str:
    shape = SCENE_SHAPES[group["shape"]]
    noun = shape if group["count"] == 1 else PLURALS.get(shape, shape + "s")
    return f"{COUNT_WORDS[group['count'] - 1]} {SIZES[group['size']]} {COLOURS[group['colour']][0]} {noun}"


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Boxes (top, left, side) with at least GAP background pixels between them along one axis."""
    (ya, xa, sa), (yb, xb, sb) = a, b
    return ya + sa + GAP <= yb or yb + sb + GAP <= ya or xa + sa + GAP <= xb or xb + sb + GAP <= xa


def _place(rng: np.random.Generator, groups: list[dict], vertical: bool, image_size: int, sides) -> bool:
    """Boxes for both groups (first group before the dividing line, second after), or False when none were found."""
    side_1, side_2 = (sides[g["size"]] for g in groups)
    line = int(rng.integers(side_1, image_size - side_2 + 1))  # first group ends at or before it, second starts after
    bands = ((0, line), (line, image_size))
    boxes: list[tuple[int, int, int]] = []
    for group, (lo, hi), side in zip(groups, bands, (side_1, side_2)):
        group["boxes"] = []
        for _ in range(group["count"]):
            for _ in range(OBJECT_TRIES):
                along = int(rng.integers(lo, hi - side + 1))
                across = int(rng.integers(image_size - side + 1))
                box = (along, across, side) if vertical else (across, along, side)
                if all(_apart(box, other) for other in boxes):
                    break
            else:
                return False
            boxes.append(box)
            group["boxes"].append(box)
    # the groups' extents must overlap across the axis, or the image would also show the perpendicular relation
    axis = 1 if vertical else 0
    extents = [(min(b[axis] for b in g["boxes"]), max(b[axis] + b[2] for b in g["boxes"])) for g in groups]
    return max(extents[0][0], extents[1][0]) < min(extents[0][1], extents[1][1])


def describe_scene(rng: np.random.Generator, image_size: int, num_colours: int) -> dict:
    """All the random draws of one scene: {"layout", "groups": [first (top / left), second], "named_first",
    "relation" (as captioned), "caption"}; each group {count, shape, colour, size, boxes [(top, left, side)]}."""
    sides = scene_sides(image_size)
    counts = COUNT_PAIRS[int(rng.integers(len(COUNT_PAIRS)))]
    while True:
        groups = [
            dict(
                count=count,
                shape=int(rng.integers(len(SCENE_SHAPES))),
                colour=int(rng.integers(num_colours)),
                size=int(rng.integers(len(SIZES))),
            )
            for count in counts
        ]
        if (groups[0]["colour"], groups[0]["shape"]) != (groups[1]["colour"], groups[1]["shape"]):
            break
    layout = int(rng.integers(len(LAYOUTS)))
    for _ in range(PLACEMENT_TRIES):
        if _place(rng, groups, layout == 0, image_size, sides):
            break
    else:  # not reached in thousands of draws at 32, 48 and 64 pixels; said loudly if it ever is
        raise RuntimeError(f"no placement for {groups} at image_size={image_size} after {PLACEMENT_TRIES} tries")
    named_first = int(rng.integers(2))  # 0: the caption names the first (top / left) group first
    relation = RELATIONS[2 * layout] if named_first == 0 else RELATIONS[2 * layout + 1]
    named, other = (groups[0], groups[1]) if named_first == 0 else (groups[1], groups[0])
    caption = f"{_phrase(named)} {relation} {_phrase(other)}"
    return {"layout": layout, "groups": groups, "named_first": named_first, "relation": relation, "caption": caption}


def draw_scene(description: dict, image_size: int) -> np.ndarray:
    """(S, S) uint8 palette indices of a described scene (no randomness)."""
    image = np.zeros((image_size, image_size), dtype=np.uint8)
    for group in description["groups"]:
        mask = shape_mask(SCENE_SHAPES[group["shape"]], group["boxes"][0][2])
        for y, x, side in group["boxes"]:
            image[y : y + side, x : x + side][mask] = group["colour"] + 1
    return image


def scene_labels(description: dict) -> list[int]:
    """Attribute labels in ATTRIBUTES order (canonical: see the module docstring)."""
    labels = [description["layout"]]
    for g in description["groups"]:
        labels += [g["shape"], g["colour"], g["size"], g["count"] - 1]
    return labels


def scene_classes(palette: int) -> dict[str, int]:
    """Number of classes per attribute, in label order."""
    per_group = {"shape": len(SCENE_SHAPES), "colour": palette - 1, "size": len(SIZES), "count": len(COUNT_WORDS)}
    return {"layout": len(LAYOUTS)} | {f"{a}_{g}": c for g in (1, 2) for a, c in per_group.items()}


def scene_triples(description: dict) -> list[tuple[int, int, int]]:
    """(colour, shape, relation) index triples: each group with the relation it stands in to the other."""
    first_role = RELATIONS[2 * description["layout"]]  # "above" or "left of"
    roles = (RELATIONS.index(first_role), RELATIONS.index(INVERSE[first_role]))
    return [(g["colour"], g["shape"], role) for g, role in zip(description["groups"], roles)]


def has_held_out_scene_triple(description: dict) -> bool:
    return any(is_held_out(t) for t in scene_triples(description))


class SceneDataset(ImageCaptionDataset):
    """The procedural scenes split `split` (see the module docstring): the first `num_items` scenes its stream owns for
    `seed`, without (holdout="none") or with ("combinations") held-out relation triples. Items, images and labels as
    `ImageCaptionDataset`."""

    def __init__(
        self,
        split: str,
        num_items: int,
        image_size: int = 64,
        palette: int = 13,
        text_max_len: int = 96,
        seed: int = 0,
        holdout: str = "none",
    ):
        scene_sides(image_size)  # checks image_size
        colours = shapes_palette(palette)
        needed = longest_caption(palette - 1)
        if text_max_len < needed:
            raise ValueError(f"text_max_len must be >= {needed} to hold every caption; got {text_max_len}")
        indices, captions, labels, draws = collect_items(
            split,
            num_items,
            image_size,
            seed,
            holdout,
            describe=lambda rng: describe_scene(rng, image_size, palette - 1),
            draw=lambda description: draw_scene(description, image_size),
            held_out=has_held_out_scene_triple,
            label=scene_labels,
        )
        super().__init__(
            torch.from_numpy(indices),
            colours,
            captions,
            torch.tensor(labels, dtype=torch.long),
            scene_classes(palette),
            text_max_len,
        )
        self.split, self.seed, self.holdout, self.draws = split, seed, holdout, draws
