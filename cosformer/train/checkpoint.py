"""Atomic training checkpoints on top of `accelerator.save_state`, loaded without running code from the files.

Layout under `out_dir/checkpoints/`:

    step_000500/               one complete checkpoint
        model.safetensors      the weights (safetensors: raw tensors and a JSON header; under FSDP the consolidated
                               copy, written for sampling and for the shape check below)
        optimizer.bin          AdamW state (torch.save format)
        random_states_<r>.pkl  process r's Python, NumPy, torch (and CUDA) RNG states and Accelerate's micro-step
                               counter (torch.save format)
        scaler.pt              fp16 mixed precision only: the loss scaler (torch.save format)
        pytorch_model_fsdp_0/, optimizer_0/   FSDP sharded states (torch.distributed.checkpoint format)
        trainer_state.json     the trainer's counters {"step", "micro_batches", "tokens"} and its best so far
                               {"best_val_loss", "best_step", "evals_since_best"}
        config.yaml            the resolved config
        COMPLETE               {"step": N}, written last
    latest                     text file naming the newest complete checkpoint directory (step_NNNNNN)
    best                       text file naming the checkpoint of the lowest validation loss so far (step_NNNNNN)

Saving: everything goes to `.tmp_step_NNNNNN` and is renamed into place only after every process has finished
writing and the COMPLETE marker exists; `latest` (and `best`, for a save of a new best) is then replaced atomically.
A crash (kill -9 included) at any point leaves the previous checkpoint and pointers untouched, and a directory
without COMPLETE is never used. Rotation keeps the `keep` newest checkpoints plus the one `best` names.

Loading (`check_compatible`, then `load_checkpoint`) runs no code from the checkpoint, whoever wrote it:
- weights come from safetensors; config.yaml through `yaml.safe_load` and the config checks; trainer_state.json and
  COMPLETE through `json` and explicit checks (non-negative ints, a finite best loss);
- optimizer.bin, scaler.pt and random_states_<r>.pkl through `torch.load(weights_only=True)` (Accelerate's loader
  for the first two; ours, with NumPy's array types allowed, for the RNG file), which refuses any object other than
  tensors, plain containers and numbers;
- the FSDP directories are read by torch.distributed.checkpoint, which unpickles `.metadata` with plain `pickle`
  and non-tensor items with `weights_only=False`: before it runs, `.metadata` must pass an unpickler that admits
  only DCP's metadata classes, and every non-tensor item must load with `weights_only=True`;
- `custom_checkpoint_<i>.pkl` is never read: Accelerate would unpickle it with `weights_only=False`. Checkpoints
  written before trainer_state.json existed hold the counters in such a file and are refused with an error.
Anything that cannot be restored exactly (a missing or damaged RNG file, counters that disagree with COMPLETE, weights
whose shapes do not match the model the config builds) raises `CheckpointError` (or `ConfigError` for a config
difference) naming the file, before any state has been changed. The `latest` and `best` pointers may only name a
step_NNNNNN directory of their own checkpoints folder.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import pickle
import random
import re
import shutil

import numpy as np
import torch
import yaml
from accelerate.utils import DistributedType, save

from .config import Config, ConfigError, load_yaml, save_yaml, to_dict

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
COUNTERS = ("step", "micro_batches", "tokens")
# written since best-checkpoint tracking; a trainer_state.json has all of them or (older) none
BEST_KEYS = ("best_val_loss", "best_step", "evals_since_best")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CUSTOM_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely or restored exactly (damaged, tampered with, or of an old layout)."""


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
    marker = path / COMPLETE
    try:
        step = json.loads(marker.read_text())["step"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{marker}: expected JSON {{'step': N}}, could not read it ({e!r})") from None
    if type(step) is not int or step < 0:
        raise CheckpointError(f"{marker}: 'step' must be a non-negative int, got {step!r}")
    return step


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _inside(root: pathlib.Path, path: pathlib.Path) -> bool:
    """Whether `path` is a directory directly under `root` once links are resolved (a step_* symlink may not lead
    elsewhere)."""
    return path.is_dir() and path.resolve().parent == root.resolve()


def list_checkpoints(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoints under out_dir, oldest first."""
    root = pathlib.Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and _inside(root, p) and is_complete(p)
    ]
    return [p for _, p in sorted(found)]


def _follow(out_dir: str | os.PathLike, pointer_name: str) -> pathlib.Path | None:
    """The complete checkpoint a pointer file names, or None (no pointer, or its checkpoint is gone or incomplete).
    A pointer naming anything but a step_NNNNNN directory of this checkpoints folder is refused: the trainer never
    writes one, so it is damage or tampering, and following it could load a checkpoint from anywhere on the disk."""
    root = pathlib.Path(out_dir) / CHECKPOINTS
    pointer = root / pointer_name
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not _STEP_DIR.match(name):
        fallback = "the newest complete checkpoint" if pointer_name == LATEST else "no best checkpoint"
        raise CheckpointError(
            f"{pointer} names {name[:100]!r}, not a step_NNNNNN directory of {root}: refusing to follow it "
            f"(delete the file to fall back to {fallback})"
        )
    named = root / name
    return named if _inside(root, named) and is_complete(named) else None


def latest_checkpoint(out_dir: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint `latest` names, or, if that pointer is missing or stale, the newest complete one."""
    named = _follow(out_dir, LATEST)
    if named is not None:
        return named
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def best_checkpoint(out_dir: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint `best` names: the lowest validation loss of the run so far. None when there is no pointer or its
    checkpoint is gone: unlike `latest`, there is nothing to fall back on (the newest is not the best)."""
    return _follow(out_dir, BEST)


def resolve_checkpoint(path: str | os.PathLike, *, best: bool = False) -> pathlib.Path:
    """A checkpoint from what a user names: a checkpoint directory; a `latest` or `best` pointer file
    (runs/x/checkpoints/best); or a run directory, meaning its latest checkpoint, or its best with `best=True`."""
    path = pathlib.Path(os.path.expanduser(path))
    if path.name in (LATEST, BEST) and path.parent.name == CHECKPOINTS and path.is_file():
        if best:
            raise ValueError(f"{path} is a pointer file, not a run directory: best=True picks a run's best")
        path, best = path.parent.parent, path.name == BEST
    elif is_complete(path):
        if best:
            raise ValueError(f"{path} is a checkpoint, not a run directory: best=True picks a run's best")
        return path
    found = best_checkpoint(path) if best else latest_checkpoint(path)
    if found is None:
        what = f"no best checkpoint (no valid {CHECKPOINTS}/{BEST} pointer)" if best else "no complete checkpoint"
        raise FileNotFoundError(f"{path}: {what} there (looked for {COMPLETE})")
    return found


def resolve_resume(resume: bool | str, out_dir: str | os.PathLike) -> pathlib.Path | None:
    """`train.resume`: False -> None; True -> latest in out_dir (None when there is none yet, so the same
    command starts and restarts a job); a path -> `resolve_checkpoint(path)`."""
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(out_dir)
    try:
        return resolve_checkpoint(resume)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"train.resume: {e}") from None


def point_best(out_dir: str | os.PathLike, step: int | None) -> None:
    """Make `best` name checkpoint `step` of out_dir, or remove it when that checkpoint is not there (the best so far
    was saved in the run directory resumed from, or not at all). Main process only."""
    root = pathlib.Path(out_dir) / CHECKPOINTS
    target = checkpoint_dir(out_dir, step) if step is not None else None
    if target is not None and is_complete(target):
        _write_text_atomic(root / BEST, target.name + "\n")
    else:
        (root / BEST).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    accelerator,
    out_dir: str | os.PathLike,
    state: dict,
    cfg: Config,
    keep: int = 2,
    model=None,
    best: bool = False,
) -> pathlib.Path:
    """Save the full training state atomically; every process must call this, at a step boundary (weights and the
    trainer's `state` = {"step", "micro_batches", "tokens", (BEST_KEYS)} describing the same moment). Returns the
    path. `best`: this is the new best checkpoint; `best` is pointed at it. Under FSDP, `model` (the prepared model)
    is also consolidated into model.safetensors for sampling."""
    state = _checked_state(dict(state), "state")
    step = state["step"]
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
            save(full, tmp / WEIGHTS, safe_serialization=True)
    wait_for_everyone(accelerator)
    if accelerator.is_main_process:
        save_yaml(cfg, tmp / "config.yaml")
        _write_text_atomic(tmp / TRAINER_STATE, json.dumps(state))
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
        if best:
            _write_text_atomic(root / BEST, final.name + "\n")
        try:
            kept_best = best_checkpoint(out_dir)
        except CheckpointError:
            kept_best = None
            keep = len(list_checkpoints(out_dir))  # a damaged pointer: keep everything rather than guess the best
        for stale in list_checkpoints(out_dir)[:-keep]:
            if stale not in (final, kept_best):
                shutil.rmtree(stale, ignore_errors=True)
    wait_for_everyone(accelerator)
    return final


# ---------------------------------------------------------------------------------------------- config and weights


def load_checkpoint_config(path: str | os.PathLike) -> Config:
    """The resolved config a checkpoint was written with (checked like any config)."""
    file = pathlib.Path(path) / "config.yaml"
    if not file.is_file():
        raise CheckpointError(f"{file} not found (is {path} a checkpoint written by the trainer?)")
    try:
        return load_yaml(file)
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise ConfigError(f"{file}: not a valid config ({e})") from None


# where a mismatching parameter's shape most likely comes from: (pattern on its name, config keys)
_WEIGHT_HINTS = (
    (re.compile(r"^net\.pos_emb\."), "data.seq_len"),
    (re.compile(r"^encoder\.pos_emb\."), "t2i.text_max_len"),
    (re.compile(r"^decoder\.net\.pos_emb\."), "t2i.image_size"),
    (re.compile(r"^palette$|^decoder\.net\.(token_emb|to_logits)\."), "t2i.palette"),
    (re.compile(r"^encoder\.attn_layers\.layers\.\d+\."), "t2i.enc_depth"),
    (re.compile(r"attn_layers\.layers\.\d+\."), "model.depth, model.dim, model.heads, model.dim_head, ..."),
)


def _flat(cfg: Config) -> dict[str, object]:
    return {f"{section}.{k}": v for section, values in to_dict(cfg).items() for k, v in values.items()}


def _task_keys(cfg: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The task's SHAPE_KEYS (config keys outside `model.*` that reach parameter shapes: they name the cause in the
    error; the weights' shapes are compared as well, whatever the cause) and DATA_KEYS (keys that decide which data
    each step sees: resuming with other values would train the rest of the run on other data)."""
    from .tasks import task_class  # the tasks import this module

    task = task_class(cfg.data.name)
    return task.SHAPE_KEYS, task.DATA_KEYS


def weight_mismatches(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Every way the checkpoint's model.safetensors differs from `model`'s state dict in names and shapes, read from
    the safetensors header only (nothing is loaded). Names that alias one tensor (tied embeddings) are stored once,
    so any one of them stands for all."""
    from safetensors import safe_open

    file = pathlib.Path(path) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file} not found (is {path} a checkpoint written by the trainer?)")
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    expected = model.state_dict()
    aliases: dict[tuple, list[str]] = {}
    for name, t in expected.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        aliases.setdefault(key, []).append(name)
    alias_of = {name: names for names in aliases.values() for name in names}

    def hint(name: str) -> str:
        keys = next((keys for pattern, keys in _WEIGHT_HINTS if pattern.search(name)), "model.*")
        return f" [{keys}]"

    problems = []
    for name, t in expected.items():
        shape = tuple(t.shape)
        if name in saved:
            if saved[name] != shape:
                problems.append(f"{name}: checkpoint {list(saved[name])}, model {list(shape)}{hint(name)}")
        elif not any(saved.get(other) == shape for other in alias_of[name]):
            problems.append(f"{name}: missing from the checkpoint{hint(name)}")
    problems += [f"{name}: in the checkpoint, not in the model{hint(name)}" for name in sorted(saved.keys() - expected)]
    return problems


def check_compatible(cfg: Config, path: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
    """Resuming with a different model would fail deep inside load_state; say which config keys differ instead, and
    when `model` (built from `cfg`) is given, which parameters of the saved weights do not fit it."""
    saved_cfg = load_checkpoint_config(path)
    saved, now = _flat(saved_cfg), _flat(cfg)
    keys = [k for k in now if k.startswith("model.")]
    (shape_keys, data_keys), (saved_shape_keys, _) = _task_keys(cfg), _task_keys(saved_cfg)
    keys += sorted(set(shape_keys) | set(saved_shape_keys))
    if shape_keys != saved_shape_keys:
        keys.append("data.name")  # a language model resumed as text-to-image, or the reverse
    diff = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in keys if saved[k] != now[k]]
    data_diff = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in data_keys if saved[k] != now[k]]
    if data_diff and not diff:
        raise ConfigError(
            f"cannot resume from {path}: the training data would differ ({'; '.join(data_diff)}); resume with the "
            "checkpoint's values, or start a new run in another train.out_dir"
        )
    problems = weight_mismatches(model, path) if model is not None else []
    if diff:
        detail = f"; parameters that differ: {'; '.join(problems)}" if problems else ""
        raise ConfigError(f"cannot resume from {path}: the model config differs ({'; '.join(diff)}){detail}")
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: its {WEIGHTS} does not fit the model its config.yaml describes (the two "
            f"disagree: the checkpoint was edited or damaged): {'; '.join(problems)}"
        )


def load_model_weights(model, path: str | os.PathLike) -> None:
    """Weights only, from a checkpoint's safetensors file (for sampling and evaluation)."""
    from safetensors.torch import load_model

    problems = weight_mismatches(model, path)
    if problems:
        raise CheckpointError(
            f"{pathlib.Path(path) / WEIGHTS} does not fit the model built from {pathlib.Path(path) / 'config.yaml'} "
            f"(the two disagree: the checkpoint was edited or damaged): {'; '.join(problems)}"
        )
    # safetensors' loader knows which names alias one tensor (tied embeddings), so strict loading is exact
    load_model(model, pathlib.Path(path) / WEIGHTS, strict=True)


# ---------------------------------------------------------------------------------------------- training state


def _checked_state(data: object, source: str) -> dict:
    """The trainer's state, checked: the counters are non-negative ints; the best keys (all or none: a state written
    before best tracking has none) are a finite float and a step no later than `step`, or both null, and a count."""
    keys = set(data) if isinstance(data, dict) else None
    if keys not in (set(COUNTERS), set(COUNTERS) | set(BEST_KEYS)):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{source}: expected exactly the keys {list(COUNTERS)}, with or without {list(BEST_KEYS)}, got {got}"
        )
    for key in COUNTERS + BEST_KEYS[2:]:
        value = data.get(key, 0)
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{source}: '{key}' must be a non-negative int, got {value!r}")
    if BEST_KEYS[0] in keys:
        loss, step = data["best_val_loss"], data["best_step"]
        if loss is not None and not (type(loss) is float and math.isfinite(loss)):
            raise CheckpointError(f"{source}: 'best_val_loss' must be a finite float or null, got {loss!r}")
        if step is not None and not (type(step) is int and 0 <= step <= data["step"]):
            raise CheckpointError(f"{source}: 'best_step' must be an int in [0, step] or null, got {step!r}")
        if (loss is None) != (step is None):
            raise CheckpointError(f"{source}: 'best_val_loss' and 'best_step' must both be set or both null")
    return {key: data[key] for key in COUNTERS + BEST_KEYS if key in keys}


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer's state from trainer_state.json, checked (`_checked_state`), and the step COMPLETE names."""
    path = pathlib.Path(path)
    file = path / TRAINER_STATE
    if not file.is_file():
        if any(_CUSTOM_PICKLE.match(p.name) for p in path.iterdir()):
            raise CheckpointError(
                f"{path} has the checkpoint layout of an older version of the trainer: its counters are in "
                f"custom_checkpoint_0.pkl, a pickle that can run arbitrary code when loaded, and it has no "
                f"{TRAINER_STATE}. It cannot be resumed safely. Its weights ({WEIGHTS}) still load safely, e.g. "
                f"for scripts/sample.py"
            )
        raise CheckpointError(f"{file} not found: {path} is not a checkpoint of this trainer, or it is damaged")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    counters = _checked_state(data, str(file))
    if counters["step"] != checkpoint_step(path):
        raise CheckpointError(
            f"{file} says step {counters['step']} but {path / COMPLETE} says {checkpoint_step(path)}: the checkpoint "
            f"is inconsistent"
        )
    return counters


def _rng_safe_globals() -> list:
    """What `torch.save(np.random.get_state())` needs beyond weights_only's defaults: NumPy's array rebuild and
    dtypes. Arrays are numbers, never objects, so admitting them runs no code."""
    core = np._core if hasattr(np, "_core") else np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def read_rng_state(path: str | os.PathLike, process_index: int) -> dict:
    """Process `process_index`'s RNG states, loaded with weights_only=True and checked by setting them on throwaway
    generators, so that a damaged file is an error before anything has been restored (Accelerate's own loader logs
    a failure at INFO and carries on with unrestored streams)."""
    file = pathlib.Path(path) / f"random_states_{process_index}.pkl"
    lost = "the resumed run would not continue the same random streams (dropout masks, sampling)"
    if not file.is_file():
        raise CheckpointError(
            f"{file} not found: {lost}. A checkpoint holds one file per process; was it written by fewer processes?"
        )
    try:
        with torch.serialization.safe_globals(_rng_safe_globals()):
            states = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated file, a foreign pickle or a refused global
        raise CheckpointError(f"{file} cannot be loaded safely ({type(e).__name__}: {str(e)[:200]}): {lost}") from None
    try:
        if not isinstance(states, dict):
            raise TypeError(f"a dict of states, got {type(states).__name__}")
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
        if torch.cuda.is_available():
            cuda = states["torch_cuda_manual_seed"]
            if not (isinstance(cuda, list) and all(isinstance(s, torch.Tensor) for s in cuda)):
                raise TypeError("torch_cuda_manual_seed must be a list of tensors")
        step = states.get("step", 0)
        if type(step) is not int or step < 0:
            raise TypeError(f"step must be a non-negative int, got {step!r}")
    except Exception as e:
        raise CheckpointError(f"{file} holds no valid RNG state ({type(e).__name__}: {e}): {lost}") from None
    return states


def apply_rng_state(states: dict) -> None:
    """Restore the states `read_rng_state` returned (they were checked there)."""
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


# torch.distributed.checkpoint's .metadata: the classes a real one holds (torch 2.x), and nothing else
_DCP_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata dataclasses, torch dtypes/sizes/layouts and paths: a pickle that names any other
    global (os.system, builtins.eval, ...) is refused before anything is called."""

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _DCP_GLOBALS
        allowed |= module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        allowed |= module.split(".")[0] == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath")
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def check_dcp_dir(directory: str | os.PathLike) -> None:
    """Refuse a torch.distributed.checkpoint directory whose loading could run code: DCP reads `.metadata` with
    plain pickle and non-tensor items with torch.load(weights_only=False); check both the safe way first."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    directory = pathlib.Path(directory)
    for meta_file in sorted(p for p in directory.iterdir() if p.name.endswith(".metadata")):
        try:
            with open(meta_file, "rb") as f:
                meta = _DCPMetadataUnpickler(f).load()
            if not isinstance(meta, Metadata):
                raise TypeError(f"expected a Metadata object, got {type(meta).__name__}")
        except Exception as e:
            raise CheckpointError(f"{meta_file}: refused, loading it could run code or it is damaged ({e})") from None
        for fqn, item in meta.state_dict_metadata.items():
            if not isinstance(item, BytesStorageMetadata):
                continue  # tensors: DCP reads them with weights_only=True
            info = (meta.storage_data or {}).get(MetadataIndex(fqn))
            where = f"{meta_file}: item {fqn!r}"
            if info is None:
                raise CheckpointError(f"{where} has no storage entry: the checkpoint is damaged")
            data_file = directory / info.relative_path
            if data_file.resolve().parent != directory.resolve() or not data_file.is_file():
                raise CheckpointError(f"{where} points to {info.relative_path!r}, not a file of {directory}")
            if info.transform_descriptors:
                raise CheckpointError(f"{where} is stored transformed ({info.transform_descriptors}); cannot check it")
            with open(data_file, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            try:
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{where} ({data_file.name}): refused, loading it could run code ({e})") from None


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restore the prepared objects and this process's RNG streams from `path`; return the trainer's state.
    Everything is checked before any state changes (see the module docstring); call `check_compatible` first."""
    path = pathlib.Path(path)
    stray = sorted(p.name for p in path.iterdir() if _CUSTOM_PICKLE.match(p.name))
    counters = read_trainer_state(path)  # refuses the old layout before the stray pickle is mentioned
    if stray:
        raise CheckpointError(
            f"{path} holds {', '.join(stray)}, which this trainer never writes and Accelerate would unpickle with "
            f"weights_only=False (running any code it names): refusing to load. Remove the file to resume"
        )
    for meta_file in sorted(path.rglob("*.metadata")):
        check_dcp_dir(meta_file.parent)
    states = read_rng_state(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: a state file holds objects other than tensors and plain values, which torch.load("
            f"weights_only=True) refuses ({first[:200]}); the checkpoint is damaged or was not written by this "
            f"trainer. Do not load it with weights_only=False unless you trust its origin"
        ) from None
    # Accelerate restores the RNG too, but on failure only logs at INFO: set the checked states ourselves
    apply_rng_state(states)
    accelerator.step = states.get("step", accelerator.step)  # its micro-step counter, kept in the RNG file
    return counters
