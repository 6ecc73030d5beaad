"""Atomic training checkpoints on top of `accelerator.save_state`.

Layout under `out_dir/checkpoints/`:

    step_000500/      a complete checkpoint: Accelerate's state (model.safetensors, optimizer.bin, per-rank RNG
                      states, custom_checkpoint_0.pkl = the trainer's step counters), config.yaml, COMPLETE
    latest            text file naming the newest complete checkpoint directory

A save goes to `.tmp_step_XXXXXX` and is renamed into place only after every process has finished writing and
the COMPLETE marker exists; `latest` is then replaced atomically. A crash at any point leaves the previous
checkpoint and pointer untouched, and a leftover tmp directory is never mistaken for a checkpoint.

Loading is safe: weights come from safetensors, everything else through `torch.load(weights_only=True)`
(Accelerate's loader), and the config from YAML with `yaml.safe_load`; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import torch
from accelerate.utils import DistributedType, save

from .config import Config, ConfigError, load_yaml, save_yaml, to_dict

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def wait_for_everyone(state) -> None:
    """`state.wait_for_everyone()` (an Accelerator or PartialState), except for processes on the CPU: accelerate
    passes `device_ids=[local rank]` to the barrier, which PyTorch turns into cuda:<rank> whenever the machine has
    a GPU, so CPU processes (ACCELERATE_USE_CPU) beyond the GPU count would fail in gloo."""
    if state.distributed_type == DistributedType.MULTI_CPU:
        torch.distributed.barrier()
    else:
        state.wait_for_everyone()


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> pathlib.Path:
    return pathlib.Path(out_dir) / CHECKPOINTS / f"step_{step:06d}"


def is_complete(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / COMPLETE).is_file()


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint was written at, from its COMPLETE marker."""
    path = pathlib.Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    return int(json.loads((path / COMPLETE).read_text())["step"])


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoints under out_dir, oldest first."""
    root = pathlib.Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint `latest` names, or, if that pointer is missing or stale, the newest complete one."""
    root = pathlib.Path(out_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_resume(resume: bool | str, out_dir: str | os.PathLike) -> pathlib.Path | None:
    """`train.resume`: False -> None; True -> latest in out_dir (None when there is none yet, so the same
    command starts and restarts a job); a path -> that checkpoint, or the latest under it if it is a run dir."""
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(out_dir)
    path = pathlib.Path(os.path.expanduser(resume))
    if is_complete(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"train.resume={resume}: no complete checkpoint there (looked for {COMPLETE})")
    return found


def save_checkpoint(
    accelerator, out_dir: str | os.PathLike, step: int, cfg: Config, keep: int = 2, model=None
) -> pathlib.Path:
    """Save the full training state at `step` atomically; every process must call this. Returns the path.
    Under FSDP, `model` (the prepared model) is also consolidated into model.safetensors for sampling."""
    final = checkpoint_dir(out_dir, step)
    root = final.parent
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
    wait_for_everyone(accelerator)
    accelerator.save_state(str(tmp), safe_serialization=True)
    if model is not None and accelerator.distributed_type == DistributedType.FSDP:
        full = accelerator.get_state_dict(model)  # a collective: every process takes part
        if accelerator.is_main_process:
            save(full, tmp / "model.safetensors", safe_serialization=True)
    wait_for_everyone(accelerator)
    if accelerator.is_main_process:
        save_yaml(cfg, tmp / "config.yaml")
        _write_text_atomic(tmp / COMPLETE, json.dumps({"step": step}))
        if final.exists():
            # re-saving a step (e.g. stopped right after a periodic save): swap, never leave a gap
            old = root / f".old_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name + "\n")
        for stale in list_checkpoints(out_dir)[:-keep]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    wait_for_everyone(accelerator)
    return final


def load_checkpoint_config(path: str | os.PathLike) -> Config:
    """The resolved config a checkpoint was written with (checked like any config)."""
    return load_yaml(pathlib.Path(path) / "config.yaml")


def check_compatible(cfg: Config, path: str | os.PathLike) -> None:
    """Resuming with a different model would fail deep inside load_state; say which keys differ instead."""
    saved = to_dict(load_checkpoint_config(path))["model"]
    now = to_dict(cfg)["model"]
    diff = [f"model.{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if diff:
        raise ConfigError(f"cannot resume from {path}: the model config differs ({'; '.join(diff)})")


def load_model_weights(model, path: str | os.PathLike) -> None:
    """Weights only, from a checkpoint's safetensors file (for sampling and evaluation)."""
    from safetensors.torch import load_model

    weights = pathlib.Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (is {path} a checkpoint written by the trainer?)")
    # safetensors' loader knows which names alias one tensor (tied embeddings), so strict loading is exact
    load_model(model, weights, strict=True)
