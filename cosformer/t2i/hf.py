"""Text-to-image data from any Hugging Face dataset with an image column and a caption column.

Each image is centre-cropped to a square, resized to image_size and quantised to a palette of `palette` colours:
the k-means centres (k-means++ seeding, a fixed seed) of pixels sampled from the training images only, so that
the model's vocabulary of image tokens is fixed and validation / test never leak into it. The rows of `split` are
shuffled once with the seed and divided into test, val and train (in that order, so that growing num_train keeps
the evaluation sets unchanged). The splits are then made disjoint by content: a row whose quantised image already
occurs in an earlier split (test, then val) is dropped, so val and train can come out a few rows short (datasets
with several rows per image, or the same picture under several captions, would otherwise put test images into
training). Everything (palette indices, palette, captions) is cached under cache_dir as one
safetensors file, keyed by the dataset's identity (its name, or a `datasets.Dataset`'s fingerprint) and every
argument that changes the result.

Caption fidelity needs attributes; for free-form captions they are the presence of the K most frequent content
words of the training captions (binary, scored with balanced accuracy, see `metrics.caption_fidelity`).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pathlib
import re

import numpy as np
import torch

from .shapes import ImageCaptionDataset

STOPWORDS = frozenset(
    "the and with for are its his her their this that there from into onto over under has have having been being "
    "was were who which while some any one two three very near next out off top front back side each other".split()
)
NUM_WORD_ATTRIBUTES = 32
CACHE_FORMAT = 2  # 2: splits disjoint by content


def _to_rgb_array(image, image_size: int) -> np.ndarray:
    """A dataset cell (PIL image, array, or {"bytes": ...}) -> (S, S, 3) uint8, centre-cropped and resized."""
    from PIL import Image

    if isinstance(image, dict) and image.get("bytes") is not None:
        image = Image.open(io.BytesIO(image["bytes"]))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        kind = type(image).__name__
        raise TypeError(f"image column cells must be PIL images, arrays or {{'bytes': ...}}; got {kind}")
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def _caption(cell) -> str:
    """Datasets with several captions per image keep a list: the first one is used."""
    if isinstance(cell, (list, tuple)):
        cell = cell[0] if cell else ""
    if not isinstance(cell, str):
        raise TypeError(f"caption column cells must be strings (or lists of strings); got {type(cell).__name__}")
    return cell


def kmeans_palette(pixels: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """(k, 3) uint8 colours: k-means on (n, 3) uint8 pixels, k-means++ seeding from a fixed generator."""
    if pixels.dim() != 2 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (n, 3); got shape {tuple(pixels.shape)}")
    if k < 2:
        raise ValueError(f"palette must have at least 2 colours; got {k}")
    x = pixels.double()
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(dim=1).values.square()
        if d2.sum() == 0:  # fewer distinct colours than k: repeat one, it stays unused
            centres = torch.cat([centres, centres[:1]])
            continue
        centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).double()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres.round().clamp(0, 255).to(torch.uint8)


def quantize(images: torch.Tensor, palette: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """(n, S, S, 3) uint8 RGB -> (n, S, S) uint8 indices of the nearest palette colour."""
    flat = images.reshape(-1, 3).float()
    centres = palette.float()
    out = torch.cat([torch.cdist(flat[s : s + chunk], centres).argmin(dim=1) for s in range(0, len(flat), chunk)])
    return out.to(torch.uint8).reshape(images.shape[:-1])


def _words(caption: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", caption.lower()) if len(w) >= 3 and w not in STOPWORDS}


def word_attributes(train_captions: list[str], k: int = NUM_WORD_ATTRIBUTES) -> list[str]:
    """The k content words found in the most training captions (ties broken alphabetically)."""
    counts = collections.Counter(w for c in train_captions for w in _words(c))
    words = sorted(counts, key=lambda w: (-counts[w], w))[:k]
    if not words:
        raise ValueError("the training captions hold no content words: caption fidelity has no attributes")
    return words


def word_labels(captions: list[str], words: list[str]) -> torch.Tensor:
    """(n, len(words)) long: 1 where the caption contains the word."""
    present = [_words(c) for c in captions]
    return torch.tensor([[int(w in p) for w in words] for p in present], dtype=torch.long).reshape(len(captions), -1)


def _source_id(source) -> str:
    if isinstance(source, str):
        return source
    fingerprint = getattr(source, "_fingerprint", None)
    if fingerprint is None:
        raise TypeError(f"source must be a dataset name or a datasets.Dataset; got {type(source).__name__}")
    return f"dataset-fingerprint:{fingerprint}"


def _build(source, split, image_column, caption_column, image_size, palette, seed, counts) -> dict[str, torch.Tensor]:
    """Decode, split, fit the palette and quantise; returns the tensors the cache stores."""
    import datasets

    ds = datasets.load_dataset(source, split=split) if isinstance(source, str) else source
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise ValueError(f"column {column!r} not in the dataset; it has {ds.column_names}")
    num_test, num_val, num_train = counts
    if len(ds) < num_test + num_val + 1:
        raise ValueError(
            f"the dataset has {len(ds)} rows; num_test={num_test} + num_val={num_val} leave none for training"
        )
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    order = order[: num_test + num_val + num_train].tolist()
    rows = ds.select(order)
    images, captions = [], []
    for start in range(0, len(rows), 256):  # in chunks: full-size decoded images of a whole split need not fit
        chunk = rows[start : start + 256]
        images += [_to_rgb_array(img, image_size) for img in chunk[image_column]]
        captions += [_caption(c) for c in chunk[caption_column]]
    images = torch.from_numpy(np.stack(images))
    n_eval = num_test + num_val
    train_pixels = images[n_eval:].reshape(-1, 3)
    sample = torch.randperm(len(train_pixels), generator=torch.Generator().manual_seed(seed))[:200_000]
    colours = kmeans_palette(train_pixels[sample], palette, seed=seed)
    indices = quantize(images, colours)
    keep, seen, sizes = [], set(), []
    for part in (range(num_test), range(num_test, n_eval), range(n_eval, len(captions))):
        owned = [row for row in part if indices[row].numpy().tobytes() not in seen]
        seen |= {indices[row].numpy().tobytes() for row in owned}
        keep += owned
        sizes.append(len(owned))
    captions = [captions[row] for row in keep]
    data = b"\n".join(c.replace("\n", " ").encode("utf-8") for c in captions)
    return {
        "indices": indices[keep],
        "palette": colours,
        "captions": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8),
        "split_sizes": torch.tensor(sizes),
    }


def load_hf_splits(
    source,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    image_size: int = 32,
    palette: int = 8,
    text_max_len: int = 64,
    num_train: int = 20000,
    num_val: int = 1000,
    num_test: int = 1000,
    seed: int = 0,
    cache_dir: str | os.PathLike = "~/.cache/cosformer",
) -> dict[str, ImageCaptionDataset]:
    """{'train', 'val', 'test'} datasets from `source`: a Hugging Face dataset name (loaded with
    `datasets.load_dataset(source, split=split)`) or a `datasets.Dataset` already in memory. Cached (see module
    docstring); captions longer than text_max_len bytes are cut."""
    from safetensors.torch import load_file, save_file

    if image_size < 1 or palette < 2 or min(num_train, num_val, num_test) < 1:
        raise ValueError(
            f"need image_size >= 1, palette >= 2 and positive split sizes; got image_size={image_size}, "
            f"palette={palette}, num_train={num_train}, num_val={num_val}, num_test={num_test}"
        )
    counts = (num_test, num_val, num_train)
    identity = [CACHE_FORMAT, _source_id(source), split, image_column, caption_column, image_size, palette, seed]
    key = json.dumps([*identity, *counts])
    path = pathlib.Path(cache_dir).expanduser() / f"t2i_hf_{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"
    if path.exists():
        stored = load_file(str(path))
    else:
        stored = _build(source, split, image_column, caption_column, image_size, palette, seed, counts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(stored, str(tmp), metadata={"key": key})
        os.replace(tmp, path)  # atomic: another process never reads half a file
    captions = bytes(stored["captions"].tolist()).decode("utf-8").split("\n")
    sizes = stored["split_sizes"].tolist()
    bounds = np.cumsum([0] + sizes).tolist()
    parts = {name: slice(bounds[i], bounds[i + 1]) for i, name in enumerate(("test", "val", "train"))}
    words = word_attributes(captions[parts["train"]])
    classes = {f"word_{w}": 2 for w in words}
    return {
        name: ImageCaptionDataset(
            stored["indices"][part],
            stored["palette"],
            captions[part],
            word_labels(captions[part], words),
            classes,
            text_max_len,
            balanced_fidelity=True,
        )
        for name, part in parts.items()
    }
