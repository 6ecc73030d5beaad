"""Byte-level language modelling (enwik8, any text file, the embedded Python-stdlib corpus).

Tokens are bytes (256). The loss is the mean next-byte cross-entropy in nats; bits per character (bpc) is that
loss / ln 2, with one character = one byte as in the enwik8 literature. During training the trainer reports the
loss over a fixed sample of validation windows; at the end `final_evaluate` tiles the whole validation and test
splits (every byte after the first predicted exactly once, contexts restarting every `data.seq_len` bytes).
With data.pack the items carry the documents' segment ids: contexts and positions also restart at every document,
and the first byte of a document is not predicted (so packed bpc leaves those bytes out of the mean).
"""

from __future__ import annotations

import pathlib

import torch

from cosformer.transformer import Decoder
from cosformer.wrappers import AutoregressiveWrapper, TransformerWrapper

from ..config import Config
from ..data import RandomCropDataset, WindowDataset, decode, document_starts, load_corpus
from ..rng import fork_rng
from . import LN2, full_split_loss, may_generate

NUM_TOKENS = 256


def build_language_model(cfg: Config) -> AutoregressiveWrapper:
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
        use_abs_pos_emb=m.use_abs_pos_emb,
    )
    return AutoregressiveWrapper(net)


class LMTask:
    """Task for data.name in {enwik8, text, pystdlib}: batches are {"x": (b, seq_len + 1) byte ids}, with
    data.pack also "segment_ids" (b, seq_len + 1): the documents the items cross (see data.py)."""

    SHAPE_KEYS = ("data.seq_len",)  # config keys beyond model.* that shape parameters: the positions' max_seq_len
    # config keys that decide which data each step sees (the crops' seed; the segment ids packing adds)
    DATA_KEYS = ("train.seed", "data.pack", "data.separator")

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._splits = None
        self._doc_starts = {}

    @property
    def splits(self):
        if self._splits is None:
            d = self.cfg.data
            self._splits = load_corpus(d.name, path=d.path, cache_dir=d.cache_dir, max_bytes=d.max_bytes)
        return self._splits

    def doc_starts(self, split: str):
        """Where documents begin in `split` (data.document_starts), or None without data.pack."""
        d = self.cfg.data
        if not d.pack:
            return None
        if split not in self._doc_starts:
            self._doc_starts[split] = document_starts(self.splits[split], d.name, d.separator)
        return self._doc_starts[split]

    def build_model(self) -> AutoregressiveWrapper:
        return build_language_model(self.cfg)

    def datasets(self) -> dict[str, torch.utils.data.Dataset]:
        seq_len, t = self.cfg.data.seq_len, self.cfg.train
        num_val = t.eval_batches * t.batch_size
        return {
            "train": RandomCropDataset(self.splits["train"], seq_len, seed=t.seed, doc_starts=self.doc_starts("train")),
            "val": WindowDataset(self.splits["val"], seq_len, num_windows=num_val, doc_starts=self.doc_starts("val")),
            "test": WindowDataset(
                self.splits["test"], seq_len, num_windows=num_val, doc_starts=self.doc_starts("test")
            ),
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
        if not may_generate(self, accelerator, "text samples"):
            return {}
        net = accelerator.unwrap_model(model)
        prompt = self._prompt().to(accelerator.device)
        with fork_rng(accelerator.device), accelerator.autocast():
            torch.manual_seed(self.cfg.train.seed + step)
            tokens = net.generate(prompt[None], self.cfg.train.sample_length, temperature=1.0, filter_logits_fn="top_k")
        return {"sample": decode(prompt.tolist()) + " ⟶ " + decode(tokens[0].tolist())}

    def split_loss(self, model, accelerator, split: str) -> float:
        """Exact mean loss over a whole split, tiled into non-overlapping windows and sharded over processes."""
        t = self.cfg.train
        windows = WindowDataset(self.splits[split], self.cfg.data.seq_len, doc_starts=self.doc_starts(split))
        return full_split_loss(model, accelerator, windows, 2 * t.batch_size, t.num_workers)

    def final_evaluate(self, model, accelerator, out_dir: pathlib.Path) -> dict[str, float]:
        out = {}
        for split in ("val", "test"):
            out.update(self.loss_metrics(self.split_loss(model, accelerator, split), split))
        return out
