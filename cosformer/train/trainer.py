"""The training loop: one Accelerate loop, generic over tasks (see `cosformer.train.tasks`).

    cfg -> Trainer(cfg): task, model, AdamW, data loaders, one accelerator.prepare(...), tracker, resume
        -> train(): steps of `grad_accum` micro-batches under accelerator.accumulate, clip, step;
                    log / evaluate / sample / checkpoint on their intervals; final full-split evaluation
        -> close()

Exact resume: the training data is a pure function of (seed, item index), the learning rate a pure function of the
step (`get_lr`), and a checkpoint (`cosformer.train.checkpoint`: what it holds, how each file is loaded without running
code from it) restores model, optimiser, gradient-accumulation counter, every process's RNG state and the trainer's
counters (trainer_state.json); a resumed run skips the batches already consumed, so its loss curve equals the
uninterrupted one (fp32; tests check it bit for bit on CPU). Text samples draw from their own seeded stream and cannot
perturb it. A checkpoint that cannot be restored exactly is an error, before any state changes.

Checkpoints are written only at a step boundary: the weights, optimiser and RNG states, and the counters all describe
the moment after `state.step` optimiser steps. `train_step` marks the span in which they disagree (`_mid_step`);
nothing saves inside it.

Best and final (nanoGPT's best_val_loss): every evaluation's validation loss (`val_loss`, the mean over the fixed
`train.eval_batches`, for every task) is compared with the lowest so far; a strictly lower, finite one is a new best,
and the run saves a checkpoint right there, at that evaluation's step boundary, through `save(best=True)`:
`checkpoints/best` names it and `keep_checkpoints` rotation never deletes it. The best value, its step and the count
of evaluations since it are part of the trainer's state (trainer_state.json), so a resumed run compares against the
same best and counts on from the same number. The final line (stdout and metrics.jsonl) reports the final values
beside `best_val_loss`, `best_step` and the task's derived best (`best_val_bpc`, `best_val_bits_per_pixel`).
Early stopping: with `train.patience` = P > 0 the run stops after P evaluations in a row without a new best, at that
evaluation's step; it saves and ends like a finished run, its final record marked `stopped_early`. The final
full-split evaluation (`train.final_eval`) always runs on the last weights, as for a run that reached max_steps, so
"final" means one thing; the best weights are reported by their validation loss and are one `scripts/sample.py
--best` (or `train.resume=runs/x/checkpoints/best`) away. Evaluating the best weights in-process would mean loading
a checkpoint into prepared (possibly sharded) models and a second full-split pass: neither cheap nor simple to keep
exact under every launch config.

Stopping:
- first SIGINT / SIGTERM: a flag that all processes agree on at the next step (it travels in the per-step
  all-reduce, so no rank enters the checkpoint collective alone); the step in flight finishes, the run saves at that
  boundary and returns {}.
- a second SIGINT / SIGTERM: KeyboardInterrupt is raised at once and re-raised by `train()` after cleanup, without
  saving; the last checkpoint already on disk (periodic, or none) stays the one to resume from. A save interrupted
  this way leaves only a .tmp_ directory, never a damaged checkpoint.
- a KeyboardInterrupt that bypassed the handler (another library replaced it): treated like a second signal. It may
  land mid-step, or mid-evaluation, which draws from the global RNG: counters and weights could agree while the RNG
  streams are not those of the step boundary, and a resume from there would not continue the run exactly.
- kill -9: nothing runs; the newest complete checkpoint and `latest` stay valid (saves are atomic).
A non-finite loss stops the run with `NonFiniteLossError` before the optimiser applies the step, leaving the last
good checkpoint as is.

Compilation (`train.compile`, `resolve_compile`): the model is compiled in place (`cosformer.compile_in_place`:
fullgraph, the zoo's Inductor options) before `accelerator.prepare`, so its state_dict keys, and with them the
checkpoints, are those of the uncompiled model: a run may resume with compilation switched on or off. What is
compiled is the module the loop calls for the loss, `model(**batch)`:
- one process, or DDP: the whole task model (`model.__call__`: forward and loss). DDP calls it inside its own
  forward, where dynamo sees the active DDP module and splits the graph at gradient-bucket boundaries
  (DDPOptimizer), so gradient all-reduces still overlap the backward.
- FSDP2: each shard unit (the classes `fsdp_transformer_layer_cls_to_wrap` names: `Block`), in place. The root
  cannot be compiled whole: its FSDP hooks are excluded from tracing, which fullgraph turns into an error. The
  embedding, output layer and loss run eagerly. FSDP1 (and FSDP without a transformer wrap class) is refused under
  train.compile=true; the default, auto, leaves such a run eager and says why in the log.
Evaluation calls the same compiled module (eval mode, no grad and `reduction="none"` compile once more, a smaller
last batch switches to dynamic shapes once). Generation does not: `generate` calls the wrapped network directly,
never the compiled `__call__`, so a growing KV cache and each new length run eagerly instead of recompiling.

References: nanoGPT's train.py (warmup + cosine schedule, estimate_loss over fixed batches); Accelerate's
examples/by_feature (checkpointing, gradient accumulation, tracking).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
import resource
import signal
import threading
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader, Subset

from cosformer.compiling import compile_in_place

from . import checkpoint as ckpt
from .attn_stats import ATTN_STATS_ITEMS, attention_stats
from .config import Config, dump_yaml, save_yaml, to_dict
from .rng import fork_rng
from .tasks import Task, build_task, evaluation_loader, mean_loss
from .tracking import Tracker, configure_wandb


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving."""


def get_lr(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup to `lr`, then cosine decay to
    `lr * min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    min_lr = lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def resolve_mixed_precision(value: str) -> str:
    """auto: bf16 when the run will be on a bf16-capable GPU, none on CPU (also when ACCELERATE_USE_CPU forces a
    CPU run on a machine that has a GPU)."""
    if value != "auto":
        return value
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return "no"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def resolve_compile(
    value: bool | str, device: torch.device, accelerator: Accelerator | None = None
) -> tuple[bool, str]:
    """`train.compile` -> (compile?, why not, when auto declined). auto = on when training on a CUDA device (where
    Inductor generates Triton kernels; compiling pays back within a run) and the launch config allows it (FSDP: see
    `fsdp_compile_problem`); off on CPU, where compilation takes longer than a short run saves. true compiles on any
    device (on CPU Inductor needs a C++ compiler), and an FSDP config that cannot be compiled is then an error."""
    if value != "auto":
        return bool(value), ""
    if device.type != "cuda":
        return False, f"auto: {device.type}, not CUDA"
    problem = fsdp_compile_problem(accelerator) if accelerator is not None else None
    return (False, f"auto: {problem}") if problem else (True, "")


def fsdp_compile_problem(accelerator: Accelerator) -> str | None:
    """Why this launch config's model cannot be compiled before `prepare`, or None. Only FSDP restricts it: the shard
    units are compiled one by one, which needs FSDP2 with a transformer wrap class."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        version = plugin.fsdp_version
        return f"FSDP compiles each shard unit before sharding, which needs fsdp_version: 2; this config has {version}"
    if not plugin.transformer_cls_names_to_wrap:
        return "FSDP compiles each shard unit, and this config names no fsdp_transformer_layer_cls_to_wrap"
    return None


def compile_for_training(model: torch.nn.Module, accelerator: Accelerator) -> str:
    """Compile, in place, what `accelerator.prepare` will leave callable compiled under this launch config (see the
    module docstring); call it before `prepare`. Returns "" when the whole model was compiled, else what was."""
    if accelerator.distributed_type != DistributedType.FSDP:
        compile_in_place(model)
        return ""
    problem = fsdp_compile_problem(accelerator)
    if problem:
        raise ValueError(
            f"train.compile under FSDP: {problem} (configs/accelerate/fsdp.yaml has both: fsdp_version: 2, "
            f"fsdp_transformer_layer_cls_to_wrap: Block). Use that config, or train.compile=false"
        )
    names = set(accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap)
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(
            f"train.compile under FSDP: the model has no module of the wrap class(es) {sorted(names)} to compile "
            f"(fsdp_transformer_layer_cls_to_wrap); use train.compile=false or name the model's block class"
        )
    for unit in units:
        compile_in_place(unit)
    return f"each {'/'.join(sorted(names))}, the FSDP shard units"


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory allocated by tensors on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings only; biases and norm gains keep their scale (nanoGPT's split)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainState:
    """Counters and the best evaluation so far, saved with every checkpoint as trainer_state.json (plain JSON, checked
    on load: never registered with Accelerate, whose custom-object files are unpickled with weights_only=False)."""

    step: int = 0  # optimiser steps done
    micro_batches: int = 0  # training batches consumed by this process: the sampler position
    tokens: int = 0  # tokens seen, all processes
    best_val_loss: float | None = None  # the lowest validation loss over evaluations so far
    best_step: int | None = None  # the step it was measured at (its checkpoint: checkpoints/best)
    evals_since_best: int = 0  # evaluations since then without a lower loss (train.patience)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """`state` as `checkpoint.read_trainer_state` checked it; one written before best tracking lacks the best
        keys, which then start afresh."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, f.default))

    def update_best(self, val_loss: float, step: int) -> bool:
        """Count an evaluation; True when `val_loss` is a new best (finite and strictly lower than the best so far)."""
        if math.isfinite(val_loss) and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss, self.best_step, self.evals_since_best = val_loss, step, 0
            return True
        self.evals_since_best += 1
        return False


class Trainer:
    def __init__(self, cfg: Config, task: Task | None = None):
        self.cfg = cfg
        t = cfg.train
        self.out_dir = pathlib.Path(t.out_dir)
        use_wandb = cfg.log.tracker == "wandb"
        wandb_mode = configure_wandb() if use_wandb else None
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(t.mixed_precision),
            gradient_accumulation_steps=t.grad_accum,
            log_with="wandb" if use_wandb else None,
        )
        acc = self.accelerator
        if wandb_mode is not None:
            acc.print(f"wandb: {wandb_mode}")

        set_seed(t.seed)  # identical initial weights on every process
        self.task = task if task is not None else build_task(cfg)
        model = self.task.build_model()
        self.num_params = sum(p.numel() for p in model.parameters())
        self.resumed_from = ckpt.resolve_resume(t.resume, self.out_dir)
        if self.resumed_from is not None:
            # config keys and weight shapes, against the model as built (before prepare wraps or shards it)
            ckpt.check_compatible(cfg, self.resumed_from, model)
        # in place and before prepare: the keys stay unprefixed, DDP and FSDP wrap the compiled modules (module
        # docstring); `generate` never runs compiled code (under FSDP, whose blocks are compiled, it is skipped)
        self.compiled, why_not = resolve_compile(t.compile, acc.device, acc)
        if self.compiled:
            what = compile_for_training(model, acc)
            acc.print(f"compile: on (inductor{', ' + what if what else ''})")
        else:
            acc.print(f"compile: off{f' ({why_not})' if why_not else ''}")
        datasets = self.task.datasets()
        self.datasets = datasets
        # the same validation items at every evaluation and on every process, so the statistics form one curve
        self.attn_stats_batch = None
        if t.attn_stats:
            items = [datasets["val"][n] for n in range(min(ATTN_STATS_ITEMS, len(datasets["val"])))]
            self.attn_stats_batch = torch.utils.data.default_collate(items)
        optimizer = torch.optim.AdamW(
            param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=False
        )
        pin = acc.device.type == "cuda"
        train_loader = DataLoader(
            datasets["train"], batch_size=t.batch_size, drop_last=True, num_workers=t.num_workers, pin_memory=pin
        )
        val_loader = DataLoader(datasets["val"], batch_size=t.batch_size, num_workers=t.num_workers, pin_memory=pin)
        self.model, self.optimizer, self.train_loader, self.val_loader = acc.prepare(
            model, optimizer, train_loader, val_loader
        )
        # fixed training items (the first ones a train set yields: crops that are a pure function of the seed and
        # their index, or the first examples), as many as the validation batches: their loss in eval mode, beside
        # val's, is the generalisation gap without dropout.
        self.train_probe_loader = None
        if t.eval_train:
            probe = Subset(datasets["train"], range(min(len(datasets["val"]), len(datasets["train"]))))
            self.train_probe_loader = evaluation_loader(acc, probe, t.batch_size, t.num_workers)
        self.state = TrainState()
        if self.resumed_from is not None:
            saved = ckpt.load_checkpoint(acc, self.resumed_from)
            self.state.load_state_dict(saved)
            acc.print(f"resumed from {self.resumed_from} at step {self.state.step}")
            if not set(ckpt.BEST_KEYS) <= set(saved):
                acc.print(
                    f"warning: {self.resumed_from / ckpt.TRAINER_STATE} predates best-checkpoint tracking: the best "
                    f"validation loss (and train.patience's count) starts again from the next evaluation"
                )
            if acc.is_main_process:
                # `best` may lag or lead the state after a crash between the two pointer writes, or name a checkpoint
                # of a future this resume abandons: the restored state says which checkpoint is the best
                ckpt.point_best(self.out_dir, self.state.best_step)
        elif t.resume is True:
            acc.print(f"train.resume=true but no checkpoint in {self.out_dir / ckpt.CHECKPOINTS}: starting fresh")
        # per-process randomness (dropout) differs across ranks; a resumed run got its streams from the checkpoint
        if self.resumed_from is None:
            set_seed(t.seed, device_specific=True)

        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.out_dir / "config.yaml")
        self.tracker = Tracker(acc, self.out_dir, cfg.log, to_dict(cfg), use_wandb)
        self.tracker.truncate(self.state.step)
        self.last_eval: dict[str, float] = {}
        self.last_saved_step = self.state.step if self.resumed_from is not None else -1
        self._stop_signal: str | None = None  # set by this process's signal handler
        self._abort_signal: str | None = None  # a second signal: stop at once, without saving
        self._mid_step = False  # True while weights and counters disagree (inside train_step)
        self._stop_agreed = False  # set when any process had a signal at the last all-reduce
        self._fingerprint_checked = False

    # ------------------------------------------------------------------------------------------ pieces

    @property
    def global_batch_items(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.accelerator.num_processes

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        return get_lr(step, lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio)

    def _batches(self):
        """Training batches from where the run stands: the first `micro_batches` are skipped without loading."""
        loader = self.train_loader
        if self.state.micro_batches:
            loader = self.accelerator.skip_first_batches(loader, self.state.micro_batches)
        device = self.accelerator.device
        while True:
            it = iter(loader)
            # a new DataLoader iterator draws its base seed from the global RNG: keep that draw out of the
            # training stream, or a resumed run (one more iterator) would see different dropout masks
            with fork_rng(device):
                first = next(it)
            yield first
            yield from it
            loader = self.train_loader  # the nominal length is far beyond any run; wrap if it is not

    def _check_sharding(self, batch: dict[str, torch.Tensor]) -> None:
        """Once, on multi-process runs: ranks must draw different training batches."""
        self._fingerprint_checked = True
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        first = next(iter(batch.values()))
        digest = hashlib.sha256(first.detach().cpu().numpy().tobytes()).digest()[:8]
        code = torch.tensor([int.from_bytes(digest, "little") & (2**62 - 1)], device=acc.device)
        codes = acc.gather(code).tolist()
        if len(set(codes)) != len(codes):
            raise RuntimeError(f"processes received identical training batches (fingerprints {codes}): sharding broke")

    def train_step(self, batches) -> tuple[float, float]:
        """One optimiser step over `grad_accum` micro-batches. Returns (mean loss over all processes, grad norm)."""
        acc, t = self.accelerator, self.cfg.train
        # from here until the counters are updated the weights and `state` may disagree: no checkpoint in between
        self._mid_step = True
        lr = self.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=acc.device)
        mean_loss = math.nan
        grad_norm = torch.zeros((), device=acc.device)
        for _ in range(t.grad_accum):
            batch = next(batches)
            if not self._fingerprint_checked:
                self._check_sharding(batch)
            with acc.accumulate(self.model):
                loss = self.model(**batch)
                acc.backward(loss)
                loss_sum += loss.detach().float()
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
                    grad_norm = norm.detach().float() if norm is not None else grad_norm
                    # one all-reduce carries the loss, the non-finite flag and a pending stop request, so every
                    # process takes the same decision at the same step
                    stats = torch.stack(
                        [
                            loss_sum / t.grad_accum,
                            (~torch.isfinite(loss_sum)).float(),
                            torch.tensor(float(self._stop_signal is not None), device=acc.device),
                        ]
                    )
                    stats = acc.reduce(stats, reduction="sum")
                    mean_loss, bad, stop = stats.tolist()
                    if bad:
                        self._diverged(mean_loss)
                    self._stop_agreed = bool(stop)
                    if stop and self._stop_signal is None:
                        self._stop_signal = "another process's signal"
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.state.micro_batches += 1
        self.state.step += 1
        self.state.tokens += self.global_batch_items * self.task.tokens_per_item()
        self._mid_step = False
        return mean_loss / acc.num_processes, float(grad_norm)

    def _diverged(self, loss: float) -> None:
        step = self.state.step + 1
        self.tracker.log({}, step=step, diverged=True)
        self.tracker.finish()
        last = ckpt.latest_checkpoint(self.out_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise NonFiniteLossError(f"non-finite training loss ({loss}) at step {step}; stopping, {kept}")

    def evaluate_loss(self) -> float:
        """Mean loss over the fixed validation batches (`train.eval_batches` of them, spread over processes)."""
        return mean_loss(self.model, self.accelerator, self.val_loader)

    def evaluate(self, step: int, with_loss: bool) -> dict:
        metrics = {}
        if with_loss:
            metrics.update(self.task.loss_metrics(self.evaluate_loss(), "val"))
            if self.train_probe_loader is not None:
                train_loss = mean_loss(self.model, self.accelerator, self.train_probe_loader)
                metrics.update(self.task.loss_metrics(train_loss, "train"))
            if self.attn_stats_batch is not None:
                metrics.update(self.attention_stats())
        self.model.eval()
        metrics.update(self.task.evaluate(self.model, self.accelerator, step, self.out_dir))
        self.model.train()
        self.last_eval.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return metrics

    def attention_stats(self) -> dict[str, float]:
        """`cosformer.train.attn_stats` on the fixed validation items, outside the training RNG stream."""
        device = self.accelerator.device
        batch = {k: v.to(device) for k, v in self.attn_stats_batch.items()}
        with fork_rng(device):
            return attention_stats(self.model, batch)

    def save(self, best: bool = False) -> pathlib.Path:
        """A checkpoint of this step boundary; `best`: it is the new best (checkpoints/best names it)."""
        if self._mid_step:
            raise RuntimeError(f"refusing to save in the middle of optimiser step {self.state.step + 1}")
        t = self.cfg.train
        state = self.state.state_dict()
        path = ckpt.save_checkpoint(
            self.accelerator, self.out_dir, state, self.cfg, keep=t.keep_checkpoints, model=self.model, best=best
        )
        self.last_saved_step = self.state.step
        return path

    @property
    def patience_exhausted(self) -> bool:
        """`train.patience` evaluations in a row without a new best (every process holds the same gathered losses,
        so all agree)."""
        patience = self.cfg.train.patience
        return bool(patience) and self.state.evals_since_best >= patience

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal is not None:
                # a second signal: stop now, wherever this lands; train() re-raises without saving
                self._abort_signal = name
                raise KeyboardInterrupt(f"second stop signal ({name})")
            self._stop_signal = name
            self.accelerator.print(
                f"\n{name}: saving a checkpoint and stopping after this step (a second signal stops at once, unsaved)"
            )

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    # ------------------------------------------------------------------------------------------ loop

    def train(self) -> dict:
        """Run to `train.max_steps` (or a stop signal). Returns the final metrics ({} when stopped early)."""
        from tqdm.auto import tqdm

        acc, t = self.accelerator, self.cfg.train
        if self.state.step == 0:
            acc.print(dump_yaml(self.cfg))
        acc.print(
            f"{self.num_params / 1e6:.2f}M parameters | {acc.num_processes} process(es) on {acc.device} | "
            f"mixed precision {acc.mixed_precision} | {self.global_batch_items} sequences per step"
        )
        previous = self._install_signal_handlers()
        batches = self._batches()
        bar = tqdm(
            total=t.max_steps, initial=self.state.step, disable=not acc.is_local_main_process, dynamic_ncols=True
        )
        self.model.train()
        start_tokens, train_seconds = self.state.tokens, 0.0
        compiled_step_done = False
        log_tokens, log_time = self.state.tokens, time.perf_counter()
        try:
            # a run that stopped early and is resumed (a sweep rerun) stays stopped: it only reports again
            while self.state.step < t.max_steps and not self.patience_exhausted:
                step_start = time.perf_counter()
                loss, grad_norm = self.train_step(batches)  # returns host floats: the step has finished
                train_seconds += time.perf_counter() - step_start
                if self.compiled and not compiled_step_done and self.state.step < t.max_steps:
                    # the first step compiles (a minute on a GPU, longer for some models than others): the
                    # throughput compared across runs starts after it, unless it was the only step
                    compiled_step_done = True
                    start_tokens, train_seconds = self.state.tokens, 0.0
                step = self.state.step
                bar.update(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    now = time.perf_counter()
                    tps = (self.state.tokens - log_tokens) / max(now - log_time, 1e-9)
                    log_tokens, log_time = self.state.tokens, now
                    record = {
                        "loss": loss,
                        "lr": self.lr_at(step - 1),
                        "grad_norm": grad_norm,
                        "tokens_per_s": tps,
                        "memory_mib": peak_memory_mib(acc.device),
                    }
                    self.tracker.log(record, step=step)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                eval_now = (t.eval_every and step % t.eval_every == 0) or step == t.max_steps
                sample_now = bool(t.sample_every) and step % t.sample_every == 0
                if eval_now or sample_now:
                    metrics = self.evaluate(step, with_loss=eval_now)
                    self.tracker.log(metrics, step=step)
                    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
                    if shown and acc.is_local_main_process:
                        bar.write(f"step {step}: {shown}")
                    # every task's loss_metrics names its validation loss val_loss: the metric the best is chosen by
                    if eval_now and self.state.update_best(metrics["val_loss"], step):
                        self.save(best=True)
                # alone, a process may stop as soon as it sees its own signal; together, only on the reduced flag,
                # which every process reads at the same step
                if self._stop_agreed or (acc.num_processes == 1 and self._stop_signal is not None):
                    break
                if t.checkpoint_every and step % t.checkpoint_every == 0 and self.last_saved_step < step:
                    self.save()
        except KeyboardInterrupt:
            # never saved (see the module docstring): only the first signal's path reaches the save point intact
            why = f"second {self._abort_signal}" if self._abort_signal else "KeyboardInterrupt"
            where = "in the middle of" if self._mid_step else "after"
            try:
                last = ckpt.latest_checkpoint(self.out_dir)
            except ckpt.CheckpointError:
                last = None
            acc.print(
                f"\n{why} {where} step {self.state.step + self._mid_step}: stopped without saving; "
                + (f"resume from {last} (train.resume=true)" if last else "no checkpoint was saved yet")
            )
            raise
        finally:
            bar.close()
            for sig, old in previous.items():
                signal.signal(sig, old)

        if self.state.step > self.last_saved_step:
            self.save()
        stopped_early = self.state.step < t.max_steps and self.patience_exhausted
        if self._stop_signal is not None and self.state.step < t.max_steps and not stopped_early:
            acc.print(f"stopped by {self._stop_signal} at step {self.state.step}; resume with train.resume=true")
            return {}
        if stopped_early:
            acc.print(
                f"stopped early at step {self.state.step}: no lower validation loss in {t.patience} evaluations since "
                f"step {self.state.best_step} (train.patience={t.patience})"
            )

        final = dict(self.last_eval)
        if t.final_eval:
            final.update(self.task.final_evaluate(self.model, acc, self.out_dir))  # the last weights: see the top
        if self.state.best_step is not None:
            final.update(self.task.loss_metrics(self.state.best_val_loss, "best_val"), best_step=self.state.best_step)
        final.update(
            # training steps only (with train.compile, those after this process's first)
            tokens_per_s=(self.state.tokens - start_tokens) / max(train_seconds, 1e-9),
            memory_mib=peak_memory_mib(acc.device),
            num_params=self.num_params,
        )
        final = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        flags = {"stopped_early": True} if stopped_early else {}
        self.tracker.log(final, step=self.state.step, final=True, **flags)
        acc.print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
        return {**final, **flags}

    def close(self) -> None:
        self.tracker.finish()
        ckpt.wait_for_everyone(self.accelerator)
        if self.accelerator.distributed_type != DistributedType.NO and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(cfg: Config) -> dict:
    """Build, train, close: the whole of scripts/train.py's work, for tests and notebooks."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = ["NonFiniteLossError", "TrainState", "Trainer", "get_lr", "run"]
