"""Tasks: what the generic trainer trains. A task owns the model, the datasets and the task-specific evaluation;
the trainer owns the loop (Accelerate, optimiser, schedule, checkpoints, tracking).

Registry, keyed by `data.name`: "enwik8", "text", "pystdlib" -> `LMTask` (byte-level language modelling);
"shapes", "scenes", "hf" -> the text-to-image task in `cosformer.train.tasks.t2i`, imported only when asked for.
"""

from __future__ import annotations

import importlib
import math
import pathlib
from typing import Any, Protocol, runtime_checkable

import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader, Dataset

from ..config import Config

LN2 = math.log(2.0)  # nats per bit: losses are in nats, bits per byte / pixel = loss / LN2


@runtime_checkable
class Task(Protocol):
    """The contract between a task and the trainer."""

    SHAPE_KEYS: tuple[str, ...]  # config keys beyond model.* that shape parameters (resume compares them)
    DATA_KEYS: tuple[str, ...]  # config keys that decide which data each step sees (resume refuses a change)

    def __init__(self, cfg: Config): ...

    def build_model(self) -> torch.nn.Module:
        """A fresh model; `model(**batch)` returns the scalar training loss."""
        ...

    def datasets(self) -> dict[str, torch.utils.data.Dataset]:
        """'train', 'val' (and 'test'); items are dict[str, Tensor] whose keys are the model's arguments."""
        ...

    def tokens_per_item(self) -> int:
        """Tokens one training item contributes (for tokens/s)."""
        ...

    def loss_metrics(self, loss: float, split: str) -> dict[str, float]:
        """Named metrics of a mean loss on `split` (LM: {f"{split}_loss", f"{split}_bpc"})."""
        ...

    def evaluate(self, model, accelerator, step: int, out_dir: pathlib.Path) -> dict[str, Any]:
        """Called at every evaluation on all processes (generation on the main process only). Returns float
        metrics and media: str values are text samples, pathlib.Path values PNG images."""
        ...

    def final_evaluate(self, model, accelerator, out_dir: pathlib.Path) -> dict[str, float]:
        """End of run: full-split metrics (LM: val and test bpc; text-to-image: test FID)."""
        ...


_METHODS = ("build_model", "datasets", "tokens_per_item", "loss_metrics", "evaluate", "final_evaluate")

# data.name -> (module, class); class None = the one class that module defines with every Task method
_REGISTRY: dict[str, tuple[str, str | None]] = {
    "enwik8": ("cosformer.train.tasks.lm", "LMTask"),
    "text": ("cosformer.train.tasks.lm", "LMTask"),
    "pystdlib": ("cosformer.train.tasks.lm", "LMTask"),
    "shapes": ("cosformer.train.tasks.t2i", None),
    "scenes": ("cosformer.train.tasks.t2i", None),
    "hf": ("cosformer.train.tasks.t2i", None),
}


def evaluation_loader(accelerator, dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A loader for evaluation only: sharded over processes and its batches put on the model's device, as
    `accelerator.prepare` would, but not registered with the accelerator (a registered loader would join the
    checkpointed state, and this one has nothing to resume)."""
    pin = accelerator.device.type == "cuda"
    return prepare_data_loader(
        DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin),
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
    )


def full_split_loss(model, accelerator, dataset: Dataset, batch_size: int, num_workers: int = 0) -> float:
    """Exact mean loss over a whole split (the final evaluation), through an `evaluation_loader`."""
    return mean_loss(model, accelerator, evaluation_loader(accelerator, dataset, batch_size, num_workers))


@torch.no_grad()
def mean_loss(model, accelerator, loader) -> float:
    """Exact mean of the per-item losses (`model(**batch, reduction="none")`, shape (b,)) over a loader prepared by
    Accelerate (sharded over processes); the items it repeats to even out the last batch are dropped by
    `gather_for_metrics`, which is why the losses must be per item. The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    losses = []
    for batch in loader:
        losses.append(accelerator.gather_for_metrics(model(**batch, reduction="none").float()))
    model.train(was_training)
    return torch.cat(losses).mean().item()


def may_generate(task, accelerator, what: str) -> bool:
    """Generation (text samples, images, FID) runs on the main process only, and not under FSDP: sharded
    parameters are whole only inside the FSDP root's forward, not in `.generate`. Said once per task."""
    if accelerator.distributed_type == DistributedType.FSDP:
        if not getattr(task, "_warned_fsdp", False):
            accelerator.print(f"{what} are skipped under FSDP")
            task._warned_fsdp = True
        return False
    return accelerator.is_main_process


def _implements(cls: type) -> bool:
    return all(callable(getattr(cls, m, None)) for m in _METHODS)


def task_class(name: str) -> type:
    """The Task class for `data.name`, importing its module only now (the t2i stack loads only for t2i runs)."""
    if name not in _REGISTRY:
        raise ValueError(f"data.name={name!r} has no task; known: {sorted(_REGISTRY)}")
    module_name, attr = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ImportError(f"data.name={name!r} needs the task module {module_name}, which does not exist yet") from e
    if attr is not None:
        return getattr(module, attr)
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == module_name and _implements(obj)
    ]
    if len(found) != 1:
        names = [c.__name__ for c in found]
        raise ImportError(f"{module_name} must define exactly one Task class for data.name={name!r}; found {names}")
    return found[0]


def build_task(cfg: Config) -> Task:
    return task_class(cfg.data.name)(cfg)


__all__ = ["Task", "build_task", "task_class"]
