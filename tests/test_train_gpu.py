"""The trainer end to end on a CUDA device: every task, to its final full-split evaluation.

The CPU suite cannot see a tensor left on the wrong device (there is only one); these runs can. Skipped without a GPU.
"""

import json
import pathlib

import pytest
import torch

from cosformer.train.config import load_config
from cosformer.train.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


COMMON = ["model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=16", "train.batch_size=8",
          "train.max_steps=6", "train.warmup_steps=1", "train.eval_every=3", "train.eval_batches=2",
          "train.log_every=1", "train.final_eval=true", "train.mixed_precision=bf16"]  # fmt: skip

TASKS = {
    "lm": ["data.name=pystdlib", "data.max_bytes=200000", "data.seq_len=64", "train.sample_length=16"],
    "t2i": [
        "data.name=shapes",
        "t2i.image_size=8",
        "t2i.palette=5",
        "t2i.num_train=96",
        "t2i.num_val=16",
        "t2i.num_test=12",
        "t2i.fid_samples=8",
        "t2i.enc_depth=1",
    ],  # fmt: skip
}


@pytest.mark.parametrize("attn", ["cosine", "regular"])
@pytest.mark.parametrize("task", list(TASKS))
def test_train_to_final_evaluation_on_gpu(tmp_path, task, attn):
    overrides = [*COMMON, *TASKS[task], f"model.attn={attn}", f"train.out_dir={tmp_path / 'run'}"]
    overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
    trainer = Trainer(load_config([], overrides))
    try:
        assert trainer.accelerator.device.type == "cuda"
        final = trainer.train()
    finally:
        trainer.close()
    lines = [json.loads(line) for line in pathlib.Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1].get("final"), "the run must end with its final line"
    test_key = "test_bpc" if task == "lm" else "test_loss"
    assert test_key in final and torch.isfinite(torch.tensor(final[test_key]))
