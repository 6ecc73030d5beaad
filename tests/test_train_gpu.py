"""The trainer end to end on a CUDA device: every task, to its final full-split evaluation.

The CPU suite cannot see a tensor left on the wrong device (there is only one); these runs can. Skipped without a GPU.
"""

import json
import pathlib

import pytest
import torch

from cosformer.train.config import load_config
from cosformer.train.trainer import Trainer

from .test_t2i import _tiny_overrides

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate):
    yield


COMMON = ["model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=16", "train.batch_size=8",
          "train.max_steps=6", "train.warmup_steps=1", "train.eval_every=3", "train.eval_batches=2",
          "train.log_every=1", "train.final_eval=true", "train.mixed_precision=bf16"]  # fmt: skip

TASKS = {
    "lm": ["data.name=pystdlib", "data.max_bytes=200000", "data.seq_len=64", "train.sample_length=16"],
    # the text-to-image suite's tiny shapes run, less what COMMON and the test set
    "t2i": [o for o in _tiny_overrides(pathlib.Path("unused")) if o.startswith(("data.name", "t2i."))],
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
