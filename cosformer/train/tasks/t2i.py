"""Text-to-image task (data.name "shapes" or "hf"): cosine vs regular attention judged on image quality, not loss.

Loss alone can hide a difference in sample quality, so every evaluation also generates images for a fixed set of
validation captions and measures
- val_fid: FID against the real validation images, in the feature space of a conv net trained in-project on the
  real training images, one per training set whatever the run's seed (`cosformer.t2i.metrics`);
- val_fidelity: how often a second, independent net, trained as an attribute classifier on real images, recovers
  the captioned attributes (shape, colour, size per object, and their relation) from the generated images;
- val_inception_fid: standard Inception FID, only where torchmetrics and its weights are available;
and saves a grid of the samples with their captions (`samples_step_XXXXXX.png` in the run directory).
Losses are reported in nats per pixel token and as bits per pixel (loss / ln 2).

The data (shapes drawing, hf shuffling) follows t2i.data_seed, not train.seed: runs with different seeds train on
the same data and are measured on the same images. Generation runs on the main process only, under its own seeded
RNG (seed + step), so evaluating never moves the training random stream and a resumed run stays identical.
"""

from __future__ import annotations

import pathlib

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader, Subset

from cosformer.t2i.grid import save_grid
from cosformer.t2i.hf import load_hf_splits
from cosformer.t2i.metrics import (
    caption_fidelity,
    extract_features,
    frechet_distance,
    inception_fid,
    load_or_train_net,
)
from cosformer.t2i.model import TextToImage
from cosformer.t2i.shapes import ImageCaptionDataset, ShapesDataset

from ..checkpoint import wait_for_everyone
from ..config import Config
from ..rng import fork_rng
from . import LN2, may_generate, mean_loss

GRID_IMAGES = 16
GENERATE_BATCH = 256


class TextToImageTask:
    """Batches are {"text": (b, L) bytes, "text_mask": (b, L) bool, "image_tokens": (b, S*S + 1)}."""

    def __init__(self, cfg: Config):
        if cfg.data.name not in ("shapes", "hf"):
            raise ValueError(f"TextToImageTask serves data.name 'shapes' or 'hf'; got {cfg.data.name!r}")
        if cfg.data.name == "hf" and not cfg.t2i.hf_dataset:
            raise ValueError("data.name=hf needs t2i.hf_dataset (a Hugging Face dataset name)")
        if cfg.data.name == "hf" and cfg.t2i.holdout != "none":
            raise ValueError(f"t2i.holdout={cfg.t2i.holdout} is defined for data.name=shapes only")
        if cfg.t2i.fid_samples < 2:
            raise ValueError(f"t2i.fid_samples must be >= 2 (FID needs a covariance); got {cfg.t2i.fid_samples}")
        self.cfg = cfg
        self._splits: dict[str, ImageCaptionDataset] | None = None
        self._nets: dict[str, torch.nn.Module] = {}
        self._reference: dict[str, torch.Tensor] = {}  # split -> real features
        self._warned_fsdp = False

    # ------------------------------------------------------------------------------------------ data

    @property
    def splits(self) -> dict[str, ImageCaptionDataset]:
        if self._splits is None:
            t = self.cfg.t2i
            if self.cfg.data.name == "shapes":
                sizes = {"train": t.num_train, "val": t.num_val, "test": t.num_test}
                self._splits = {
                    split: ShapesDataset(split, n, t.image_size, t.palette, t.text_max_len, t.data_seed, t.holdout)
                    for split, n in sizes.items()
                }
            else:
                # one process decodes and quantises into the cache, the others then read it
                state = PartialState()
                if not state.is_main_process:
                    wait_for_everyone(state)
                self._splits = self.load_hf()
                if state.is_main_process:
                    wait_for_everyone(state)
        return self._splits

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
        return {
            "train": self.splits["train"],
            "val": Subset(val, range(min(len(val), t.eval_batches * t.batch_size))),
            "test": self.splits["test"],
        }

    def tokens_per_item(self) -> int:
        return self.cfg.t2i.image_size**2  # predicted pixel tokens

    def loss_metrics(self, loss: float, split: str) -> dict[str, float]:
        return {f"{split}_loss": loss, f"{split}_bits_per_pixel": loss / LN2}

    # ------------------------------------------------------------------------------------------ image metrics

    def net(self, kind: str) -> torch.nn.Module:
        """The "feature" (FID) or "fidelity" net of this training set, on the CPU (see t2i.metrics)."""
        if kind not in self._nets:
            train = self.splits["train"]
            args = (train.images(), train.labels(), train.attribute_classes())
            self._nets[kind] = load_or_train_net(kind, self.cache_dir, *args)
        return self._nets[kind]

    def reference_features(self, split: str) -> torch.Tensor:
        if split not in self._reference:
            self._reference[split] = extract_features(self.net("feature"), self.splits[split].images())
        return self._reference[split]

    def generate(self, model, accelerator, split: str, seed: int) -> tuple[torch.Tensor, slice]:
        """Images for the first t2i.fid_samples captions of `split`, sampled under a forked, seeded RNG."""
        t, ds = self.cfg.t2i, self.splits[split]
        rows = slice(0, min(t.fid_samples, len(ds)))
        net = accelerator.unwrap_model(model)
        device = accelerator.device
        text, mask = ds.text[rows].to(device), ds.text_mask[rows].to(device)
        images = []
        with fork_rng(device), accelerator.autocast():
            torch.manual_seed(seed)
            for s in range(0, text.shape[0], GENERATE_BATCH):
                batch = slice(s, s + GENERATE_BATCH)
                images.append(net.generate(text[batch], mask[batch], temperature=t.sample_temperature).cpu())
        return torch.cat(images), rows

    def image_metrics(self, images: torch.Tensor, rows: slice, split: str, device) -> dict[str, float]:
        ds = self.splits[split]
        fid = frechet_distance(extract_features(self.net("feature"), images), self.reference_features(split))
        fidelity = caption_fidelity(self.net("fidelity"), images, ds.labels(rows), balanced=ds.balanced_fidelity)
        out = {f"{split}_fid": fid, f"{split}_fidelity": fidelity}
        inception = inception_fid(ds.images(rows).to(device), images.to(device))
        if inception is not None:
            out[f"{split}_inception_fid"] = inception
        return out

    def evaluate(self, model, accelerator, step: int, out_dir: pathlib.Path) -> dict:
        """val_fid, val_fidelity (val_inception_fid when available) and the sample grid, on the main process."""
        if not may_generate(self, accelerator, "image samples and FID"):
            return {}
        images, rows = self.generate(model, accelerator, "val", seed=self.cfg.train.seed + step)
        metrics: dict = self.image_metrics(images, rows, "val", accelerator.device)
        shown = min(GRID_IMAGES, len(images))
        captions = self.splits["val"].captions[:shown]
        path = pathlib.Path(out_dir) / f"samples_step_{step:06d}.png"
        metrics["samples"] = save_grid(images[:shown], captions, path, title=f"step {step}")
        return metrics

    def split_loss(self, model, accelerator, split: str) -> float:
        """Exact mean loss over a whole split, sharded over processes."""
        t = self.cfg.train
        return mean_loss(
            model, accelerator, DataLoader(self.splits[split], batch_size=2 * t.batch_size, num_workers=t.num_workers)
        )

    def final_evaluate(self, model, accelerator, out_dir: pathlib.Path) -> dict[str, float]:
        """test loss / bits per pixel over the whole test split; test_fid and test_fidelity; and test_fid_real, the
        FID of the real test images against the real validation images: the floor test_fid can reach."""
        out = self.loss_metrics(self.split_loss(model, accelerator, "test"), "test")
        if not may_generate(self, accelerator, "image samples and FID"):
            return out
        seed = self.cfg.train.seed + self.cfg.train.max_steps + 1  # one no evaluation step uses
        images, rows = self.generate(model, accelerator, "test", seed=seed)
        out.update(self.image_metrics(images, rows, "test", accelerator.device))
        real = extract_features(self.net("feature"), self.splits["test"].images(rows))
        out["test_fid_real"] = frechet_distance(real, self.reference_features("val"))
        return out
