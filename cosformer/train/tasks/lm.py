"""Byte-level language modelling (enwik8, any text file, the embedded Python-stdlib corpus).

Tokens are bytes (256). The loss is the mean next-byte cross-entropy in nats; bits per character (bpc) is that
loss / ln 2, with one character = one byte as in the enwik8 literature. During training the trainer reports the
loss over a fixed sample of validation windows; at the end `final_evaluate` tiles the whole validation and test
splits (every byte after the first predicted exactly once, contexts restarting every `data.seq_len` bytes).
"""

from __future__ import annotations

import math
import pathlib

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from cosformer.transformer import Decoder
from cosformer.wrappers import AutoregressiveWrapper, TransformerWrapper

from ..config import Config
from ..data import RandomCropDataset, WindowDataset, decode, load_corpus

NUM_TOKENS = 256
LN2 = math.log(2.0)


class LanguageModel(AutoregressiveWrapper):
    """`AutoregressiveWrapper` whose loss can also be kept per sequence, for exact full-split evaluation."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean", **kwargs):
        """x (b, n) -> mean loss, or (b,) per-sequence mean losses with reduction="none"."""
        if reduction == "mean":
            return super().forward(x, mask=mask, **kwargs)
        if reduction != "none" or mask is not None:
            raise ValueError(f"reduction must be 'mean' or 'none' (without mask); got reduction={reduction!r}")
        logits = self.net(x[:, :-1], **kwargs)  # (b, n - 1, num_tokens)
        losses = F.cross_entropy(logits.transpose(1, 2).float(), x[:, 1:], reduction="none")  # (b, n - 1)
        return losses.mean(dim=1)


def build_language_model(cfg: Config) -> LanguageModel:
    m = cfg.model
    layers = Decoder(
        m.dim,
        m.depth,
        m.heads,
        **m.layer_kwargs(),
    )
    net = TransformerWrapper(
        NUM_TOKENS,
        cfg.data.seq_len,
        layers,
        tie_embedding=m.tie_embedding,
        use_abs_pos_emb=None if m.abs_pos_emb == "auto" else m.abs_pos_emb,
    )
    return LanguageModel(net)


class LMTask:
    """Task for data.name in {enwik8, text, pystdlib}: batches are {"x": (b, seq_len + 1) byte ids}."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._splits = None
        self._warned_fsdp = False

    @property
    def splits(self):
        if self._splits is None:
            d = self.cfg.data
            self._splits = load_corpus(d.name, path=d.path, cache_dir=d.cache_dir, max_bytes=d.max_bytes)
        return self._splits

    def build_model(self) -> LanguageModel:
        return build_language_model(self.cfg)

    def datasets(self) -> dict[str, torch.utils.data.Dataset]:
        seq_len, t = self.cfg.data.seq_len, self.cfg.train
        num_val = t.eval_batches * t.batch_size
        return {
            "train": RandomCropDataset(self.splits["train"], seq_len, seed=t.seed),
            "val": WindowDataset(self.splits["val"], seq_len, num_windows=num_val),
            "test": WindowDataset(self.splits["test"], seq_len, num_windows=num_val),
        }

    def tokens_per_item(self) -> int:
        return self.cfg.data.seq_len

    def loss_metrics(self, loss: float, split: str) -> dict[str, float]:
        return {f"{split}_loss": loss, f"{split}_bpc": loss / LN2}

    def _prompt(self) -> torch.Tensor:
        """A fixed prompt: the start of the first full line of the validation split."""
        val = self.splits["val"]
        head = bytes(val[: 4 * self.cfg.data.seq_len])
        start = head.find(b"\n") + 1 if b"\n" in head[:-1] else 0
        length = max(1, min(64, self.cfg.data.seq_len // 4))
        return torch.as_tensor(val[start : start + length].astype("int64"))

    def evaluate(self, model, accelerator, step: int, out_dir: pathlib.Path) -> dict:
        """A text sample from a fixed prompt, generated on the main process with its own seed so that sampling
        never shifts the training random stream (resumed runs stay identical)."""
        if self.cfg.train.sample_length == 0:
            return {}
        if accelerator.distributed_type == DistributedType.FSDP:
            # the sharded parameters are only whole inside the FSDP root's forward, not in .generate
            if not self._warned_fsdp:
                accelerator.print("text samples are skipped under FSDP")
                self._warned_fsdp = True
            return {}
        if not accelerator.is_main_process:
            return {}
        net = accelerator.unwrap_model(model)
        prompt = self._prompt().to(accelerator.device)
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), accelerator.autocast():
            torch.manual_seed(self.cfg.train.seed + step)
            tokens = net.generate(prompt[None], self.cfg.train.sample_length, temperature=1.0, filter="top_k")
        return {"sample": decode(prompt.tolist()) + " ⟶ " + decode(tokens[0].tolist())}

    @torch.no_grad()
    def split_loss(self, model, accelerator, split: str) -> float:
        """Exact mean loss over a whole split, tiled into non-overlapping windows and sharded over processes."""
        dataset = WindowDataset(self.splits[split], self.cfg.data.seq_len)
        loader = accelerator.prepare_data_loader(
            DataLoader(dataset, batch_size=2 * self.cfg.train.batch_size, num_workers=self.cfg.train.num_workers)
        )
        was_training = model.training
        model.eval()
        losses = []
        for batch in loader:
            # per-sequence losses, so the padding Accelerate adds to even out the last batch can be dropped
            losses.append(accelerator.gather_for_metrics(model(**batch, reduction="none").float()))
        model.train(was_training)
        return torch.cat(losses).mean().item()

    def final_evaluate(self, model, accelerator, out_dir: pathlib.Path) -> dict[str, float]:
        out = {}
        for split in ("val", "test"):
            out.update(self.loss_metrics(self.split_loss(model, accelerator, split), split))
        return out
