"""Text-to-image task (data.name "scenes", "shapes" or "hf"): cosine vs regular attention judged on image quality, not
loss. "scenes" (`cosformer.t2i.scenes`: counted groups of objects in a relation) is the task the configs run; "shapes"
(`cosformer.t2i.shapes`: one object or a pair) is the easier one, which the models compared learn to the floor.

Loss alone can hide a difference in sample quality, so every evaluation also generates images and measures them
with the nets of `cosformer.t2i.metrics` (one feature net and one fidelity judge per training set, trained on the
real training images from fixed seeds and cached by content, so every run on the same data is measured alike):
- {split}_fid: FID of n = t2i.fid_samples generated images against the split's real reference images;
- {split}_fid_floor_mean / _std: the FID that n *real* images of the split get against the same reference, over
  FLOOR_SUBSETS disjoint subsets: what a perfect generator would score at this n. FID is biased upwards at small n,
  so only the distance to the floor means something, and only with the floor's std beside it;
- {split}_kid, {split}_kid_std: KID (unbiased; 0 in expectation for a perfect generator) and its std over subsets,
  in the same feature space; {split}_kid_floor_mean / _std as for FID;
- {split}_fidelity: balanced accuracy with which the fidelity judge recovers the captioned attributes (for scenes:
  shape, colour, size and count of each group, and the relation as the layout plus which group comes first; for
  shapes: shape, colour, size per object and the layout) from the generated images; {split}_fidelity_ceiling: the
  same on the real images of the same captions;
- {split}_diversity: the mean feature distance between images generated for one caption, relative to the same for
  real images of one caption (DIVERSITY_CAPTIONS captions, the most frequent of the split, DIVERSITY_SAMPLES images
  each): about 1 for a generator that varies what the caption leaves open (where the objects go), 0 for one that
  draws one image per caption; only where the split repeats captions. {split}_distinct: the fraction of distinct
  images among those generated for one caption;
- {split}_inception_fid: standard Inception FID, with t2i.inception_fid=true (torchmetrics and its weights needed:
  fetched when the task is built, an error then if they cannot be had).
val_* at every evaluation (with a grid of the samples and their captions, `samples_step_XXXXXX.png` in the run
directory), test_* at the end. Losses are reported in nats per pixel token and as bits per pixel (loss / ln 2).

Which real images play which part (`EvalLayout`): the last FLOOR_SUBSETS * n images of a split's evaluation pool are
the floor subsets, the rest is the reference. The first floor subset's captions are the ones generated for, so the
generated images and each floor subset are n images of captions drawn alike, none of them in the reference. For
scenes and shapes the pool is the split followed by FLOOR_SUBSETS * n more items of its stream (the reference is the
split itself); for hf it is the split, and fewer floor subsets are used where it is too small for FLOOR_SUBSETS.

The data (scenes and shapes drawing, hf shuffling) follows t2i.data_seed, not train.seed: runs with different seeds
train on the same data and are measured on the same images. Generation runs on the main process only, under its own
seeded RNG (seed + step), so evaluating never moves the training random stream and a resumed run stays identical;
the metric nets run on the CPU.
"""

from __future__ import annotations

import collections
import logging
import pathlib
from dataclasses import dataclass

import torch
from accelerate import PartialState
from torch.utils.data import Subset

from cosformer.t2i.grid import save_grid
from cosformer.t2i.hf import load_hf_splits
from cosformer.t2i.metrics import (
    caption_fidelity,
    distinct_fraction,
    extract_features,
    frechet_distance,
    inception_fid,
    inception_fid_metric,
    kernel_inception_distance,
    load_or_train_net,
    mean_pairwise_distance,
)
from cosformer.t2i.model import TextToImage
from cosformer.t2i.scenes import SceneDataset
from cosformer.t2i.shapes import ImageCaptionDataset, ShapesDataset

from ..checkpoint import wait_for_everyone
from ..config import PROCEDURAL_T2I_DATA, T2I_DATA, Config
from ..rng import fork_rng
from . import LN2, full_split_loss, may_generate

log = logging.getLogger(__name__)

GRID_IMAGES = 16
GENERATE_BATCH = 256
FLOOR_SUBSETS = 10  # disjoint sets of n real images for the FID / KID floor
DIVERSITY_CAPTIONS = 8
DIVERSITY_SAMPLES = 8  # images generated per diversity caption


@dataclass(frozen=True)
class EvalLayout:
    """Rows of a split's evaluation pool: `reference` (real images every FID / KID compares against) and the
    disjoint `floor` subsets of n rows each; generation uses the captions of floor[0]."""

    n: int
    reference: slice
    floor: tuple[slice, ...]

    @property
    def captions(self) -> slice:
        return self.floor[0]


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std().item()


class TextToImageTask:
    """Batches are {"text": (b, L) bytes, "text_mask": (b, L) bool, "image_tokens": (b, S*S + 1)}."""

    SHAPE_KEYS = ("t2i.image_size", "t2i.text_max_len", "t2i.palette", "t2i.enc_depth")  # beyond model.*
    DATA_KEYS = ("train.seed", "t2i.data_seed", "t2i.holdout")  # which data each step sees

    def __init__(self, cfg: Config):
        if cfg.data.name not in T2I_DATA:
            raise ValueError(f"TextToImageTask serves data.name {' | '.join(T2I_DATA)}; got {cfg.data.name!r}")
        if cfg.data.name == "hf" and not cfg.t2i.hf_dataset:
            raise ValueError("data.name=hf needs t2i.hf_dataset (a Hugging Face dataset name)")
        if cfg.data.name == "hf" and cfg.t2i.holdout != "none":
            raise ValueError(f"t2i.holdout={cfg.t2i.holdout} is defined for data.name scenes and shapes only")
        if cfg.t2i.fid_samples < 2:
            raise ValueError(f"t2i.fid_samples must be >= 2 (FID needs a covariance); got {cfg.t2i.fid_samples}")
        self.cfg = cfg
        self._splits: dict[str, ImageCaptionDataset] | None = None
        self._pools: dict[str, ImageCaptionDataset] = {}
        self._nets: dict[str, torch.nn.Module] = {}
        self._real: dict[str, dict] = {}  # split -> what the real images give (features, floor, ceiling)
        self._warned_fsdp = False
        self._inception = None
        if cfg.t2i.inception_fid:
            try:
                self._inception = inception_fid_metric()
            except RuntimeError as err:
                raise ValueError(f"t2i.inception_fid=true: {err}") from err

    # ------------------------------------------------------------------------------------------ data

    @property
    def splits(self) -> dict[str, ImageCaptionDataset]:
        if self._splits is None:
            t = self.cfg.t2i
            if self.cfg.data.name in PROCEDURAL_T2I_DATA:
                sizes = {"train": t.num_train, "val": t.num_val, "test": t.num_test}
                self._splits = {split: self._procedural(split, n) for split, n in sizes.items()}
            else:
                # one process decodes and quantises into the cache, the others then read it
                state = PartialState()
                if not state.is_main_process:
                    wait_for_everyone(state)
                self._splits = self.load_hf()
                if state.is_main_process:
                    wait_for_everyone(state)
        return self._splits

    def _procedural(self, split: str, num_items: int) -> ImageCaptionDataset:
        t = self.cfg.t2i
        dataset = SceneDataset if self.cfg.data.name == "scenes" else ShapesDataset
        return dataset(split, num_items, t.image_size, t.palette, t.text_max_len, t.data_seed, t.holdout)

    def load_hf(self, source=None) -> dict[str, ImageCaptionDataset]:
        """The hf splits from t2i.hf_dataset, or from `source` (a `datasets.Dataset`) when given."""
        t = self.cfg.t2i
        return load_hf_splits(
            t.hf_dataset if source is None else source,
            image_column=t.hf_image_column,
            caption_column=t.hf_caption_column,
            split=t.hf_split,
            image_size=t.image_size,
            palette=t.palette,
            text_max_len=t.text_max_len,
            num_train=t.num_train,
            num_val=t.num_val,
            num_test=t.num_test,
            seed=t.data_seed,
            cache_dir=self.cache_dir,
        )

    @property
    def cache_dir(self) -> pathlib.Path:
        return pathlib.Path(self.cfg.data.cache_dir).expanduser()

    def build_model(self) -> TextToImage:
        m, t = self.cfg.model, self.cfg.t2i
        return TextToImage(
            self.splits["train"].palette,
            image_size=t.image_size,
            text_max_len=t.text_max_len,
            dim=m.dim,
            depth=m.depth,
            heads=m.heads,
            enc_depth=t.enc_depth,
            **m.layer_kwargs(),
            tie_embedding=m.tie_embedding,
            use_abs_pos_emb=m.use_abs_pos_emb,
        )

    def datasets(self) -> dict[str, torch.utils.data.Dataset]:
        """The validation loss uses a fixed prefix of `train.eval_batches` batches; FID and test use whole splits."""
        t = self.cfg.train
        val = self.splits["val"]
        for split in ("val", "test"):
            self.layout(split)  # a split too small for FID and its floor fails now, not at the first evaluation
        return {
            "train": self.splits["train"],
            "val": Subset(val, range(min(len(val), t.eval_batches * t.batch_size))),
            "test": self.splits["test"],
        }

    def tokens_per_item(self) -> int:
        return self.cfg.t2i.image_size**2  # predicted pixel tokens

    def loss_metrics(self, loss: float, split: str) -> dict[str, float]:
        return {f"{split}_loss": loss, f"{split}_bits_per_pixel": loss / LN2}

    # ------------------------------------------------------------------------------------------ evaluation data

    def layout(self, split: str) -> EvalLayout:
        """Which rows of `eval_pool(split)` are reference and floor subsets (see module docstring)."""
        n = self.cfg.t2i.fid_samples
        if self.cfg.data.name in PROCEDURAL_T2I_DATA:
            pool_size, subsets = len(self.splits[split]) + FLOOR_SUBSETS * n, FLOOR_SUBSETS
        else:
            pool_size = len(self.splits[split])
            subsets = min(FLOOR_SUBSETS, pool_size // n - 1)  # the reference keeps at least n images
            if subsets < 2:
                raise ValueError(
                    f"the {split} split holds {pool_size} images; FID at t2i.fid_samples={n} with a floor needs at "
                    f"least {3 * n} (two floor subsets and a reference of n): lower t2i.fid_samples or raise "
                    f"t2i.num_{split}"
                )
        first = pool_size - subsets * n
        floor = tuple(slice(first + i * n, first + (i + 1) * n) for i in range(subsets))
        return EvalLayout(n, slice(0, first), floor)

    def eval_pool(self, split: str) -> ImageCaptionDataset:
        """The real images of `split` that evaluation uses (see module docstring)."""
        if split not in self._pools:
            if self.cfg.data.name in PROCEDURAL_T2I_DATA:
                self._pools[split] = self._procedural(
                    split, len(self.splits[split]) + FLOOR_SUBSETS * self.layout(split).n
                )
            else:
                self._pools[split] = self.splits[split]
        return self._pools[split]

    def diversity_rows(self, split: str) -> list[list[int]]:
        """Rows of the pool for the diversity measure: per caption (the DIVERSITY_CAPTIONS most frequent, ties to the
        first seen), its first DIVERSITY_SAMPLES rows; the real images of one caption are what the generated are
        measured against, the first row's caption is what is generated for."""
        rows_of: dict[str, list[int]] = collections.defaultdict(list)
        for row, caption in enumerate(self.eval_pool(split).captions):
            rows_of[caption].append(row)
        chosen = sorted(rows_of, key=lambda c: (-len(rows_of[c]), rows_of[c][0]))[:DIVERSITY_CAPTIONS]
        return [rows_of[c][:DIVERSITY_SAMPLES] for c in chosen]

    # ------------------------------------------------------------------------------------------ image metrics

    def net(self, kind: str) -> torch.nn.Module:
        """The "feature" (FID / KID) or "fidelity" net of this training set, on the CPU (see t2i.metrics)."""
        if kind not in self._nets:
            train = self.splits["train"]
            args = (train.images(), train.labels(), train.attribute_classes())
            self._nets[kind] = load_or_train_net(kind, self.cache_dir, *args)
        return self._nets[kind]

    def real_metrics(self, split: str) -> dict:
        """What the real images of `split` give, computed once: reference features, the floor, the fidelity ceiling
        and the within-caption spread of real images."""
        if split not in self._real:
            pool, lay, net = self.eval_pool(split), self.layout(split), self.net("feature")
            reference = extract_features(net, pool.images(lay.reference))
            subsets = [extract_features(net, pool.images(rows)) for rows in lay.floor]
            fids = [frechet_distance(f, reference) for f in subsets]
            kids = [kernel_inception_distance(f, reference)[0] for f in subsets]
            rows = lay.captions
            judge = self.net("fidelity")
            real = {"reference": reference, "fid_floor": mean_std(fids), "kid_floor": mean_std(kids)}
            real["fidelity_ceiling"] = caption_fidelity(
                judge, pool.images(rows), pool.labels(rows), balanced=pool.balanced_fidelity
            )
            # the spread compares captions that have at least two real images, generated and real alike
            real["repeated"] = [i for i, r in enumerate(self.diversity_rows(split)) if len(r) >= 2]
            groups = [pool.images(torch.tensor(self.diversity_rows(split)[i])) for i in real["repeated"]]
            real["spread"] = mean_pairwise_distance([extract_features(net, g) for g in groups]) if groups else None
            if not groups:
                log.warning("no caption of the %s split repeats: %s_diversity is not reported", split, split)
            self._real[split] = real
        return self._real[split]

    def generate(self, model, accelerator, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images for the captions of layout(split).captions, then DIVERSITY_SAMPLES images for each diversity
        caption ((m, DIVERSITY_SAMPLES, 3, S, S)), sampled at t2i.sample_temperature under a forked, seeded RNG
        (compiled steps with t2i.sample_compile)."""
        t, pool = self.cfg.t2i, self.eval_pool(split)
        rows = list(range(len(pool)))[self.layout(split).captions]
        groups = self.diversity_rows(split)
        rows += [g[0] for g in groups for _ in range(DIVERSITY_SAMPLES)]
        net = accelerator.unwrap_model(model)
        device = accelerator.device
        text, mask = pool.text[rows].to(device), pool.text_mask[rows].to(device)
        images = []
        with fork_rng(device), accelerator.autocast():
            torch.manual_seed(seed)
            for s in range(0, text.shape[0], GENERATE_BATCH):
                batch = slice(s, s + GENERATE_BATCH)
                images.append(
                    net.generate(
                        text[batch], mask[batch], temperature=t.sample_temperature, compile=t.sample_compile
                    ).cpu()
                )
        images = torch.cat(images)
        n = self.layout(split).n
        return images[:n], images[n:].reshape(len(groups), DIVERSITY_SAMPLES, *images.shape[1:])

    def image_metrics(
        self, images: torch.Tensor, diversity: torch.Tensor, split: str, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """Every image metric of `split` for generated `images` (n, 3, S, S) of the layout's captions and `diversity`
        images (m, k, 3, S, S) of the diversity captions (see module docstring). `device` runs Inception only."""
        pool, lay, real = self.eval_pool(split), self.layout(split), self.real_metrics(split)
        net = self.net("feature")
        features = extract_features(net, images)
        kid, kid_std = kernel_inception_distance(features, real["reference"])
        out = {
            f"{split}_fid": frechet_distance(features, real["reference"]),
            f"{split}_fid_floor_mean": real["fid_floor"][0],
            f"{split}_fid_floor_std": real["fid_floor"][1],
            f"{split}_kid": kid,
            f"{split}_kid_std": kid_std,
            f"{split}_kid_floor_mean": real["kid_floor"][0],
            f"{split}_kid_floor_std": real["kid_floor"][1],
            f"{split}_fidelity": caption_fidelity(
                self.net("fidelity"), images, pool.labels(lay.captions), balanced=pool.balanced_fidelity
            ),
            f"{split}_fidelity_ceiling": real["fidelity_ceiling"],
            f"{split}_distinct": distinct_fraction(list(diversity)),
        }
        if real["spread"] is not None:
            spread = mean_pairwise_distance([extract_features(net, diversity[i]) for i in real["repeated"]])
            out[f"{split}_diversity"] = spread / real["spread"]
        if self._inception is not None:
            reference = pool.images(lay.reference).to(device)
            out[f"{split}_inception_fid"] = inception_fid(self._inception, reference, images.to(device))
        return out

    def evaluate(self, model, accelerator, step: int, out_dir: pathlib.Path) -> dict:
        """The val_* image metrics and the sample grid, on the main process."""
        if not may_generate(self, accelerator, "image samples and FID"):
            return {}
        images, diversity = self.generate(model, accelerator, "val", seed=self.cfg.train.seed + step)
        metrics: dict = self.image_metrics(images, diversity, "val", accelerator.device)
        shown = min(GRID_IMAGES, len(images))
        captions = self.eval_pool("val").captions[self.layout("val").captions][:shown]
        path = pathlib.Path(out_dir) / f"samples_step_{step:06d}.png"
        metrics["samples"] = save_grid(images[:shown], captions, path, title=f"step {step}")
        return metrics

    def split_loss(self, model, accelerator, split: str) -> float:
        """Exact mean loss over a whole split, sharded over processes."""
        t = self.cfg.train
        return full_split_loss(model, accelerator, self.splits[split], 2 * t.batch_size, t.num_workers)

    def final_evaluate(self, model, accelerator, out_dir: pathlib.Path) -> dict[str, float]:
        """test loss / bits per pixel over the whole test split, and the test_* image metrics."""
        out = self.loss_metrics(self.split_loss(model, accelerator, "test"), "test")
        if not may_generate(self, accelerator, "image samples and FID"):
            return out
        seed = self.cfg.train.seed + self.cfg.train.max_steps + 1  # one no evaluation step uses
        images, diversity = self.generate(model, accelerator, "test", seed=seed)
        out.update(self.image_metrics(images, diversity, "test", accelerator.device))
        return out
