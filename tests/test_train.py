"""Trainer: schedule, a tiny run whose loss falls, exact resume, atomic checkpoints, stop on signals and on
non-finite loss, tracking files, sampling from a checkpoint, and a 2-process run on CPU (gloo)."""

import importlib.util
import json
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from cosformer.train import checkpoint as ckpt
from cosformer.train.config import ConfigError, load_config
from cosformer.train.tasks import build_task, task_class
from cosformer.train.tracking import MetricsLog, choose_wandb_mode
from cosformer.train.trainer import (
    NonFiniteLossError,
    Trainer,
    compile_for_training,
    get_lr,
    param_groups,
    resolve_compile,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPARED = ("loss", "lr", "grad_norm", "val_loss", "val_bpc")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus with structure to learn: sentences over a 12-word vocabulary."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and cat sat".split()
    text = "".join(" ".join(rng.choice(words) for _ in range(6)) + ".\n" for _ in range(2500))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture
def clean_accelerate(torch_attention_path, monkeypatch):
    """One Accelerator per test, on the CPU even where a GPU exists (these tests compare runs bit for bit): reset
    Accelerate's process-wide singletons before and after; one thread keeps tiny runs fast."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny(corpus, out_dir, *overrides):
    return load_config(
        [],
        [
            "data.name=text",
            f"data.path={corpus}",
            "data.seq_len=32",
            "model.dim=32",
            "model.depth=1",
            "model.heads=2",
            "model.dim_head=16",
            "train.batch_size=8",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.max_steps=20",
            "train.eval_every=5",
            "train.eval_batches=2",
            "train.log_every=1",
            "train.sample_length=12",
            "train.final_eval=false",
            "train.mixed_precision=no",
            f"train.out_dir={out_dir}",
            *overrides,
        ],
    )


def train(cfg, trainer_cls=Trainer):
    trainer = trainer_cls(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


def records(out_dir):
    return MetricsLog(pathlib.Path(out_dir) / "metrics.jsonl").records()


def curve(out_dir):
    """Per-step values that must be identical across a resumed run and an uninterrupted one."""
    out = []
    for r in records(out_dir):
        if not r.get("final"):
            out.append((r["step"], {k: r[k] for k in COMPARED if k in r}))
    return out


# ---------------------------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = [get_lr(s, **kw) for s in range(111)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert get_lr(500, **kw) == pytest.approx(0.1)
    assert get_lr(0, lr=2.0, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- runs


def test_tiny_run_learns_and_writes_its_files(corpus, tmp_path, clean_accelerate):
    out = tmp_path / "run"
    final = train(tiny(corpus, out, "train.max_steps=30", "train.final_eval=true"))
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5, losses
    # final full-split metrics, in bits per byte, next to the last validation sample's
    assert final["val_bpc"] == pytest.approx(final["val_loss"] / math.log(2))
    assert final["test_bpc"] < 6.0 and final["tokens_per_s"] > 0 and final["memory_mib"] > 0
    last = records(out)[-1]
    assert last["final"] is True and last["val_bpc"] == pytest.approx(final["val_bpc"])
    evals = [r for r in records(out) if "val_bpc" in r and not r.get("final")]
    assert [r["step"] for r in evals] == [5, 10, 15, 20, 25, 30]
    for r in evals:  # attention statistics (train.attn_stats, on by default): cosine logits lie within ±scale
        assert -10.0 < r["attn_max_logit"] <= 10.0 + 1e-4 and r["attn_max_logit/0"] == r["attn_max_logit"]
        assert 0.0 < r["attn_entropy"] < math.log(32)
    train_line = next(r for r in records(out) if "loss" in r)
    assert {"step", "loss", "lr", "tokens_per_s", "memory_mib"} <= set(train_line)
    assert load_config([out / "config.yaml"]).train.max_steps == 30
    assert (out / "samples" / "sample_step_000030.txt").read_text()
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out)) == 30


def test_attention_statistics_can_be_switched_off(corpus, tmp_path, clean_accelerate):
    out = tmp_path / "run"
    train(
        tiny(corpus, out, "train.max_steps=2", "train.eval_every=1", "train.sample_length=0", "train.attn_stats=false")
    )
    evals = [r for r in records(out) if "val_loss" in r]
    assert len(evals) == 3 and not any(k.startswith("attn_") for r in evals for k in r)


def test_full_split_loss_is_exact(corpus, tmp_path, clean_accelerate):
    """The final evaluation covers each split's bytes exactly once: compare with a direct computation."""
    cfg = tiny(corpus, tmp_path / "run", "train.max_steps=2", "train.batch_size=3")
    trainer = Trainer(cfg)
    got = trainer.task.split_loss(trainer.model, trainer.accelerator, "test")
    data = torch.from_numpy(trainer.task.splits["test"].astype("int64"))
    n = (len(data) - 1) // 32 * 32
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        logits = model.net(data[:n].view(-1, 32))
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[1 : n + 1]).item()
    trainer.close()
    assert got == pytest.approx(want, rel=1e-5)


def test_evaluation_logs_the_loss_on_fixed_training_items(corpus, tmp_path, clean_accelerate):
    """train_loss at an evaluation: the eval-mode loss on the first len(val) training crops, computed directly."""
    out = tmp_path / "run"
    cfg = tiny(corpus, out, "train.max_steps=6", "train.eval_every=3", "model.dropout=0.3")
    trainer = Trainer(cfg)
    try:
        trainer.train()
        n = len(trainer.datasets["val"])
        crops = torch.stack([trainer.datasets["train"][i]["x"] for i in range(n)])
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        with torch.no_grad():
            logits = model.net(crops[:, :-1])
            want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), crops[:, 1:].flatten()).item()
    finally:
        trainer.close()
    evals = [r for r in records(out) if "train_loss" in r and not r.get("final")]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["train_loss"] == pytest.approx(want, rel=1e-5)
    assert evals[-1]["train_bpc"] == pytest.approx(want / math.log(2))


class StopAtStep(Trainer):
    """Delivers SIGTERM to this process right after a given step, as a scheduler or Ctrl-C would."""

    stop_at = 10

    def train_step(self, batches):
        out = super().train_step(batches)
        if self.state.step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


def test_signal_saves_and_resume_continues_the_identical_run(corpus, tmp_path, clean_accelerate):
    """With dropout, so that the restored RNG streams matter too."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(tiny(corpus, full, "train.checkpoint_every=10", "model.dropout=0.1"))

    assert train(tiny(corpus, parts, "model.dropout=0.1"), StopAtStep) == {}  # stopped: no final line
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(parts)) == 10
    assert max(r["step"] for r in records(parts)) == 10
    # a torn line past the checkpoint, as a killed run leaves it, must not survive the resume
    with open(parts / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 9.9}\n{"step": 12, "lo')
    train(tiny(corpus, parts, "train.resume=true", "train.checkpoint_every=10", "model.dropout=0.1"))

    want, got = curve(full), curve(parts)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert got == want  # bit-identical in fp32 on CPU
    assert sum(1 for r in records(parts) if r.get("final")) == 1


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    """Documents to pack: paragraphs of 1 to 4 sentences, each opened by a capitalised word, between blank lines."""
    rng = random.Random(1)
    words = "the quick brown fox jumps over a lazy dog and cat sat".split()
    paras = []
    for _ in range(700):
        sentences = [" ".join(rng.choice(words) for _ in range(6)) + "." for _ in range(rng.randint(1, 4))]
        paras.append("Once " + "\n".join(sentences) + "\n")
    path = tmp_path_factory.mktemp("paragraphs") / "paragraphs.txt"
    path.write_text("\n\n".join(paras))
    return path


def test_packed_run_learns_and_resumes_identically(paragraphs, tmp_path, clean_accelerate):
    """data.pack=true: items carry segment ids that cross paragraphs, the loss falls, a resumed run repeats the
    curve, and the ids reach the model (the loss of a batch differs from the unpacked loss)."""
    pack = ("data.pack=true", "train.checkpoint_every=10", "train.max_steps=24")
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(tiny(paragraphs, full, *pack))
    losses = [r["loss"] for r in records(full) if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5, losses

    assert train(tiny(paragraphs, parts, *pack), StopAtStep) == {}
    train(tiny(paragraphs, parts, *pack, "train.resume=true"))
    assert curve(parts) == curve(full)

    trainer = Trainer(tiny(paragraphs, tmp_path / "probe", *pack))
    try:
        for split in ("train", "val"):
            ids = torch.stack([trainer.datasets[split][i]["segment_ids"] for i in range(8)])
            assert int(ids[:, -1].max()) >= 1, split  # some items cross a paragraph boundary
        batch = torch.utils.data.default_collate([trainer.datasets["val"][i] for i in range(8)])
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        with torch.no_grad():
            assert model(**batch).item() != pytest.approx(model(batch["x"]).item(), rel=1e-4)
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match="cannot resume.*data.pack: checkpoint True, now False"):
        Trainer(tiny(paragraphs, full, "train.resume=true"))


class BumpedVal(Trainer):
    """The measured validation loss, raised by 5 nats after step 10: the best evaluation is step 10's, not the last
    one, whatever the run learns after it (a pure function of the step, so resumed runs see the same values)."""

    def evaluate_loss(self):
        return super().evaluate_loss() + (5.0 if self.state.step > 10 else 0.0)


class BumpedStop(BumpedVal, StopAtStep):
    stop_at = 12


BEST = ("best_val_loss", "best_val_bpc", "best_step")


def val_losses(out_dir):
    return {r["step"]: r["val_loss"] for r in records(out_dir) if "val_loss" in r and not r.get("final")}


def test_best_checkpoint_is_kept_and_a_resumed_run_picks_the_same_best(corpus, tmp_path, clean_accelerate, capsys):
    full, parts = tmp_path / "full", tmp_path / "parts"
    args = ("train.checkpoint_every=5", "train.keep_checkpoints=1", "model.dropout=0.1")
    final = train(tiny(corpus, full, *args), BumpedVal)
    evals = val_losses(full)
    assert min(evals, key=evals.get) == 10 == final["best_step"]
    assert final["best_val_loss"] == evals[10] and final["best_val_bpc"] == pytest.approx(evals[10] / math.log(2))
    assert final["val_loss"] == evals[20]  # the final values stay the last evaluation's, reported beside the best
    last = records(full)[-1]
    assert last["final"] and {k: last[k] for k in BEST} == {k: final[k] for k in BEST}
    out = capsys.readouterr().out
    assert "best_val_loss=" in out.splitlines()[-1] and "best_step=10" in out.splitlines()[-1]
    # kept beside the latest although keep_checkpoints=1, and named by checkpoints/best
    assert ckpt.list_checkpoints(full) == [ckpt.checkpoint_dir(full, 10), ckpt.checkpoint_dir(full, 20)]
    assert (full / "checkpoints" / "best").read_text() == "step_000010\n"
    assert ckpt.best_checkpoint(full) == ckpt.checkpoint_dir(full, 10)
    state = json.loads((ckpt.checkpoint_dir(full, 20) / ckpt.TRAINER_STATE).read_text())
    assert (state["best_val_loss"], state["best_step"], state["evals_since_best"]) == (evals[10], 10, 2)

    # interrupted after the best (step 12) and resumed: the resumed run compares against the restored best
    assert train(tiny(corpus, parts, *args), BumpedStop) == {}
    assert ckpt.best_checkpoint(parts) == ckpt.checkpoint_dir(parts, 10)
    # as a crash between the two pointer writes could leave it: the restored state, not the pointer, decides
    (parts / "checkpoints" / "best").write_text("step_000012\n")
    resumed = train(tiny(corpus, parts, *args, "train.resume=true"), BumpedVal)
    assert curve(parts) == curve(full)
    assert {k: resumed[k] for k in BEST} == {k: final[k] for k in BEST}
    assert ckpt.list_checkpoints(parts) == [ckpt.checkpoint_dir(parts, 10), ckpt.checkpoint_dir(parts, 20)]
    assert ckpt.best_checkpoint(parts) == ckpt.checkpoint_dir(parts, 10)


def test_best_is_saved_at_its_evaluation_step_with_that_steps_weights(corpus, tmp_path, clean_accelerate):
    """The best checkpoint is written at the step boundary of its evaluation, through the trainer's save(): the same
    weights a periodic checkpoint of that step holds."""
    from safetensors.torch import load_file

    reference, run = tmp_path / "reference", tmp_path / "run"
    train(tiny(corpus, reference, "train.checkpoint_every=1", "train.keep_checkpoints=30"), BumpedVal)
    train(tiny(corpus, run, "train.keep_checkpoints=1"), BumpedVal)
    assert ckpt.list_checkpoints(run) == [ckpt.checkpoint_dir(run, 10), ckpt.checkpoint_dir(run, 20)]
    got, want = (load_file(ckpt.checkpoint_dir(d, 10) / ckpt.WEIGHTS) for d in (run, reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_patience_stops_early_and_ends_like_a_finished_run(corpus, tmp_path, clean_accelerate, capsys):
    """Evaluations every 5 steps; the best is step 10's; patience 2: no improvement at 15 and 20, so the run stops
    at 20 of 40, saves there, final-evaluates the last weights and reports the best beside them."""
    out = tmp_path / "run"
    args = ("train.max_steps=40", "train.patience=2", "train.final_eval=true")
    final = train(tiny(corpus, out, *args), BumpedVal)
    evals = val_losses(out)
    assert sorted(evals) == [5, 10, 15, 20] and max(r["step"] for r in records(out)) == 20
    assert final["stopped_early"] is True and final["best_step"] == 10 and final["best_val_loss"] == evals[10]
    last = records(out)[-1]
    assert last["final"] and last["stopped_early"] is True and last["step"] == 20 and "test_bpc" in last
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out)) == 20
    assert ckpt.best_checkpoint(out) == ckpt.checkpoint_dir(out, 10)
    assert "stopped early at step 20" in capsys.readouterr().out

    # the sweep runner reruns with train.resume=true: a run that stopped early stays stopped, its result unchanged
    again = train(tiny(corpus, out, *args, "train.resume=true"), BumpedVal)
    assert max(r["step"] for r in records(out)) == 20 and sum(1 for r in records(out) if r.get("final")) == 1
    assert {k: again[k] for k in (*BEST, "stopped_early", "test_bpc")} == {
        k: final[k] for k in (*BEST, "stopped_early", "test_bpc")
    }


def test_patience_counts_evaluations_across_a_resume(corpus, tmp_path, clean_accelerate):
    """Stopped by a signal at 17 (one evaluation without improvement so far), then resumed: it stops at 20, as the
    uninterrupted run does, not at 25."""

    class StopAt17(BumpedVal, StopAtStep):
        stop_at = 17

    full, parts = tmp_path / "full", tmp_path / "parts"
    args = ("train.max_steps=40", "train.patience=2")
    want = train(tiny(corpus, full, *args), BumpedVal)
    assert train(tiny(corpus, parts, *args), StopAt17) == {}
    got = train(tiny(corpus, parts, *args, "train.resume=true"), BumpedVal)
    assert curve(parts) == curve(full) and max(s for s, _ in curve(full)) == 20
    assert {k: got[k] for k in (*BEST, "stopped_early")} == {k: want[k] for k in (*BEST, "stopped_early")}


def test_best_tracking_ignores_a_non_finite_validation_loss(corpus, tmp_path, clean_accelerate):
    class NanAt10(Trainer):
        def evaluate_loss(self):
            return math.nan if self.state.step == 10 else super().evaluate_loss() + self.state.step

    final = train(tiny(corpus, tmp_path / "run", "train.max_steps=15", "train.patience=5"), NanAt10)
    assert final["best_step"] == 5 and "stopped_early" not in final


def test_resume_from_an_explicit_checkpoint_path(corpus, tmp_path, clean_accelerate):
    first = tmp_path / "first"
    train(tiny(corpus, first, "train.checkpoint_every=10", "train.keep_checkpoints=5"))
    ten = ckpt.checkpoint_dir(first, 10)
    second = tmp_path / "second"
    train(tiny(corpus, second, f"train.resume={ten}"))
    after = [c for c in curve(first) if c[0] > 10]
    assert [c for c in curve(second) if c[0] > 10] == after
    with pytest.raises(ConfigError, match="model.dim: checkpoint 32, now 48"):
        Trainer(tiny(corpus, tmp_path / "third", f"train.resume={ten}", "model.dim=48"))


def test_interrupted_save_keeps_the_last_good_checkpoint(corpus, tmp_path, clean_accelerate):
    out = tmp_path / "run"
    trainer = Trainer(tiny(corpus, out, "train.checkpoint_every=5", "train.max_steps=10"))
    real_save = trainer.accelerator.save_state

    def crashing_save(output_dir, **kwargs):
        if "000010" not in output_dir:
            return real_save(output_dir, **kwargs)
        real_save(output_dir, **kwargs)
        (pathlib.Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 10)  # torn write
        raise OSError("disk full")

    trainer.accelerator.save_state = crashing_save
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    trainer.close()

    good = ckpt.latest_checkpoint(out)
    assert good == ckpt.checkpoint_dir(out, 5) and (out / "checkpoints" / ".tmp_step_000010").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000005"
    model = build_task(load_config([good / "config.yaml"])).build_model()
    ckpt.load_model_weights(model, good)  # loadable, and the weights are the ones saved at step 5

    final = train(tiny(corpus, out, "train.checkpoint_every=5", "train.max_steps=10", "train.resume=true"))
    assert final and ckpt.checkpoint_step(ckpt.latest_checkpoint(out)) == 10
    assert not (out / "checkpoints" / ".tmp_step_000010").exists()


class PoisonAtStep(Trainer):
    """Makes the weights NaN before a given step, the way a diverging run ends."""

    poison_at = 4

    def train_step(self, batches):
        if self.state.step == self.poison_at:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))
        return super().train_step(batches)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, tmp_path, clean_accelerate):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* at step 5.*step_000003"):
        train(tiny(corpus, out, "train.checkpoint_every=3"), PoisonAtStep)
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out)) == 3
    assert records(out)[-1] == {"step": 5, "diverged": True}
    assert not any(r.get("final") for r in records(out))


def test_gradient_accumulation_matches_a_larger_batch(corpus, tmp_path, clean_accelerate):
    """2 micro-batches of 4 accumulate to the step 1 batch of 8 takes (same items, same order)."""
    a = tiny(corpus, tmp_path / "a", "train.max_steps=3", "train.eval_every=0", "train.sample_length=0")
    b = tiny(corpus, tmp_path / "b", "train.max_steps=3", "train.eval_every=0", "train.sample_length=0")
    b.train.batch_size, b.train.grad_accum = 4, 2
    train(a)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train(b)
    la = [r["loss"] for r in records(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in records(tmp_path / "b") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_gradient_clipping_matches_a_manual_step(corpus, tmp_path, clean_accelerate, grad_accum):
    """One trainer step with train.grad_clip against a hand-written step on the same micro-batches: backward,
    torch.nn.utils.clip_grad_norm_ over the accumulated gradients, AdamW. The gradients the optimiser receives are
    compared, not only the weights: AdamW's first step is about lr * sign(g) wherever |g| >> eps, so the weights alone
    show a skipped clip only where gradients are tiny."""
    clip = 0.05
    cfg = tiny(corpus, tmp_path / "run", f"train.grad_clip={clip}", f"train.grad_accum={grad_accum}",
               f"train.batch_size={8 // grad_accum}", "train.eval_every=0", "train.sample_length=0")  # fmt: skip
    trainer = Trainer(cfg)
    net = trainer.accelerator.unwrap_model(trainer.model)
    reference = build_task(cfg).build_model()
    reference.load_state_dict(net.state_dict())
    received = {}
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate's wrapper holds the torch one
    inner.register_step_pre_hook(lambda *_: received.update({n: p.grad.clone() for n, p in net.named_parameters()}))
    drawn = []

    def recorded(batches):
        for batch in batches:
            drawn.append({k: v.clone() for k, v in batch.items()})
            yield batch

    _, grad_norm = trainer.train_step(recorded(trainer._batches()))
    trainer.close()

    t = cfg.train
    optimizer = torch.optim.AdamW(
        param_groups(reference, t.weight_decay), lr=trainer.lr_at(0), betas=(t.beta1, t.beta2), fused=False
    )
    assert len(drawn) == grad_accum
    for batch in drawn:
        (reference(**batch) / grad_accum).backward()
    unclipped = {n: p.grad.clone() for n, p in reference.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    assert norm > 10 * clip  # clipping is in effect: the gradients shrink by more than 10x
    assert grad_norm == pytest.approx(norm.item(), rel=1e-5)  # the logged norm is the one before clipping
    optimizer.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(received[name], p.grad, msg=lambda m, name=name: f"gradient of {name}: {m}")
        assert not torch.allclose(received[name], unclipped[name]) or not unclipped[name].any()
    for (name, got), want in zip(net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name} after the step: {m}")


def test_sample_script_rebuilds_the_model_from_the_checkpoint(corpus, tmp_path, clean_accelerate, capsys):
    out = tmp_path / "run"
    train(tiny(corpus, out, "train.max_steps=5", "train.sample_length=0"))
    capsys.readouterr()  # the training run's output
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "scripts" / "sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(out), "--prompt", "the quick", "--length", "20", "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the quick") and len(first) > len("the quick") + 5
    assert script.main([str(ckpt.latest_checkpoint(out)), "--prompt", "the quick", "--length", "20",
                        "--temperature", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out == first  # greedy: deterministic


def test_sample_script_takes_the_best_checkpoint(corpus, tmp_path, clean_accelerate, capsys):
    out = tmp_path / "run"
    train(tiny(corpus, out, "train.sample_length=0", "train.keep_checkpoints=1"), BumpedVal)
    capsys.readouterr()
    best = ckpt.checkpoint_dir(out, 10)
    assert ckpt.resolve_checkpoint(out, best=True) == best
    assert ckpt.resolve_checkpoint(out / "checkpoints" / "best") == best
    assert ckpt.resolve_checkpoint(out / "checkpoints" / "latest") == ckpt.resolve_checkpoint(out)
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "scripts" / "sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--prompt", "the quick", "--length", "20", "--temperature", "0"]
    outputs = []
    for where in ([str(best)], [str(out / "checkpoints" / "best")], [str(out), "--best"]):
        assert script.main(where + args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    with pytest.raises(SystemExit):
        script.main([str(best), "--best", *args])  # --best names a run directory's best, not a checkpoint's
    assert "--best" in capsys.readouterr().err
    (out / "checkpoints" / "best").unlink()
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        ckpt.resolve_checkpoint(out, best=True)


# ---------------------------------------------------------------------------------------------- pieces


def test_wandb_mode_choice(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert choose_wandb_mode()[0] == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert choose_wandb_mode()[0] == "online"
    (tmp_path / "netrc").write_text("machine example.com\n  login user\n  password secret\n")
    assert choose_wandb_mode()[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert choose_wandb_mode()[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_wandb_mode() == ("disabled", "WANDB_MODE is set in the environment")


def test_metrics_log_truncates_to_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step})
    log.append({"step": 5, "val_loss": 0.5, "final": True})
    log.truncate(3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]


def test_checkpoint_discovery_ignores_incomplete_directories(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        d = root / f"step_{step:06d}"
        d.mkdir(parents=True)
        if complete:
            (d / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    (root / ".tmp_step_000020").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_000010"  # no pointer: newest complete
    (root / "latest").write_text("step_000005\n")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_000005"  # the pointer wins
    (root / "latest").write_text("step_000015\n")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_000010"  # a stale pointer does not
    assert ckpt.resolve_resume(False, tmp_path) is None
    assert ckpt.resolve_resume(True, tmp_path / "elsewhere") is None
    assert ckpt.resolve_resume(str(root / "step_000005"), tmp_path) == root / "step_000005"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(root / "step_000015"), tmp_path)


def test_task_registry(monkeypatch):
    from cosformer.train import tasks
    from cosformer.train.tasks.lm import LMTask

    assert all(task_class(name) is LMTask for name in ("enwik8", "text", "pystdlib"))
    with pytest.raises(ValueError, match="data.name='mnist' has no task"):
        task_class("mnist")
    monkeypatch.setitem(tasks._REGISTRY, "shapes", ("cosformer.train.tasks.not_written_yet", None))
    with pytest.raises(ImportError, match="needs the task module cosformer.train.tasks.not_written_yet"):
        task_class("shapes")


def test_train_script_rejects_a_bad_key_before_building(capsys):
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["train.lrr=1e-3"]) == 2
    assert "unknown config key 'train.lrr' (did you mean 'train.lr'?)" in capsys.readouterr().err
    assert script.parse_args(["--config", "a.yaml", "--train.lr=1", "model.dim=8"]) == (
        ["a.yaml"],
        ["model.dim=8", "--train.lr=1"],
    )


def test_wandb_offline_without_credentials(corpus, tmp_path):
    """No WANDB_API_KEY and no netrc: the run goes offline, says so once, and still writes metrics.jsonl."""
    out = tmp_path / "wb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    args = [
        "data.name=text",
        f"data.path={corpus}",
        *[f"model.{k}={v}" for k, v in dict(dim=32, depth=1, heads=2, dim_head=16).items()],
        "data.seq_len=32",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.eval_batches=1",
        "train.sample_length=8",
        "train.final_eval=false",
        f"train.out_dir={out}",
        "log.tracker=wandb",
        "log.project=cosformer-test",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), *args], env=env, capture_output=True, text=True, timeout=180
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("wandb: offline") == 1
    assert list((out / "wandb").glob("offline-run-*"))
    assert records(out)[-1]["final"] is True


# ---------------------------------------------------------------------------------------------- processes


def test_cpu_process_barrier_names_no_device(monkeypatch):
    """CPU processes on a GPU machine: the barrier must not name a device (accelerate's would be cuda:<rank>,
    missing on a machine with fewer GPUs than processes); other kinds keep accelerate's own barrier."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    calls = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **kw: calls.append(("torch", a, kw)))
    own = lambda: calls.append(("accelerate",))  # noqa: E731
    ckpt.wait_for_everyone(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, wait_for_everyone=own))
    ckpt.wait_for_everyone(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, wait_for_everyone=own))
    assert calls == [("torch", (), {}), ("accelerate",)]


def test_two_process_cpu_run(corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo): trains, evaluates, checkpoints, resumes; the trainer itself checks
    that the ranks drew different batches (it raises otherwise)."""
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "scripts/train.py")]
    args = [
        "data.name=text",
        f"data.path={corpus}",
        "data.seq_len=32",
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "model.dim_head=16",
        "train.batch_size=4",
        "train.eval_every=3",
        "train.eval_batches=3",  # 12 windows over 2 ranks: exercises the padded last batch
        "train.log_every=1",
        "train.sample_length=8",
        "train.checkpoint_every=3",
        f"train.out_dir={out}",
    ]
    for extra in (["train.max_steps=3"], ["train.max_steps=5", "train.resume=true"]):
        proc = subprocess.run(base + args + extra, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    recs = records(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5]
    assert recs[-1]["final"] and math.isfinite(recs[-1]["test_bpc"])
    state = ckpt.latest_checkpoint(out)
    assert ckpt.checkpoint_step(state) == 5
    assert {p.name for p in state.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


class _ShardSpy(torch.nn.Module):
    """Records which windows reach it and on which device; its per-item loss is the window's first byte."""

    def __init__(self):
        super().__init__()
        self.seen, self.devices = [], set()

    def forward(self, x, reduction="mean"):
        self.seen += x[:, 0].tolist()
        self.devices.add(x.device)
        return x[:, 0].float()


class _FakeAccelerator:
    """Process `index` of `count`, as far as the evaluation helpers look: gather is the identity."""

    def __init__(self, index, count):
        self.device, self.process_index, self.num_processes = torch.device("cpu"), index, count

    def gather_for_metrics(self, x):
        return x


def test_full_split_loss_is_sharded_over_processes():
    # the final evaluation once iterated a plain DataLoader: every process evaluated the whole split, on the CPU
    from cosformer.train.tasks import full_split_loss

    firsts = torch.randperm(1000)[:37]  # 37 distinct windows: the last batch is ragged
    windows = [{"x": torch.stack([f, f, f])} for f in firsts]
    seen = []
    for index in range(2):
        spy = _ShardSpy()
        full_split_loss(spy, _FakeAccelerator(index, 2), windows, batch_size=4)
        assert spy.devices == {torch.device("cpu")}
        seen.append(spy.seen)
    first = set(firsts.tolist())
    assert set(seen[0]) | set(seen[1]) == first, "together the processes must cover the split"
    assert len(seen[0]) < len(first) and len(seen[1]) < len(first), "each process must see only its shard"


# ---------------------------------------------------------------------------------------------- compilation

HAS_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


@pytest.mark.slow  # two processes, each with a cold Inductor compile on CPU
@pytest.mark.skipif(not HAS_CXX, reason="Inductor on CPU needs a C++ compiler (g++ or $CXX); none is installed")
def test_two_process_cpu_run_compiled_matches_eager(corpus, tmp_path):
    """train.compile=true under DDP (torchrun, 2 CPU processes, gloo): the whole model compiled inside DDP's forward,
    the same losses as the eager DDP run of the same config (to rounding), and a final evaluation."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "scripts/train.py")]
    args = ["data.name=text", f"data.path={corpus}", "data.seq_len=32", "model.dim=32", "model.depth=1",
            "model.heads=2", "model.dim_head=16", "train.batch_size=4", "train.max_steps=4", "train.eval_every=2",
            "train.eval_batches=2", "train.log_every=1", "train.sample_length=4"]  # fmt: skip
    logs, generated = {}, {}
    for kind in ("false", "true"):
        out = tmp_path / f"compile_{kind}"
        cache = tmp_path / f"inductor_{kind}"  # what Inductor generates for this run: nothing when eager
        run_env = dict(env, TORCHINDUCTOR_CACHE_DIR=str(cache))
        proc = subprocess.run(base + args + [f"train.out_dir={out}", f"train.compile={kind}"], env=run_env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        logs[kind] = proc.stdout + proc.stderr
        generated[kind] = [f for f in cache.rglob("*.py")] if cache.exists() else []
    assert "compile: off" in logs["false"] and "compile: on (inductor)" in logs["true"]
    assert not generated["false"] and generated["true"], generated  # the compiled run's graphs went through Inductor
    eager, compiled = dict(curve(tmp_path / "compile_false")), dict(curve(tmp_path / "compile_true"))
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    for step, want in eager.items():
        got = compiled[step]
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6) for k in want)
    assert math.isfinite(records(tmp_path / "compile_true")[-1]["test_bpc"])


def test_resolve_compile():
    """auto: on CUDA where the launch config allows it, else off with the reason (never an error); true/false as
    given (true under an FSDP config it cannot compile is compile_for_training's error, below). The default is auto."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_compile("auto", cuda) == (True, "") and resolve_compile("auto", cpu) == (
        False,
        "auto: cpu, not CUDA",
    )
    assert resolve_compile(True, cpu) == (True, "") and resolve_compile(False, cuda) == (False, "")
    assert resolve_compile("auto", cuda, _fsdp_accelerator(2, ["Block"])) == (True, "")
    for version, names, why in ((1, ["Block"], "fsdp_version: 2; this config has 1"), (2, None, "names no fsdp_")):
        on, reason = resolve_compile("auto", cuda, _fsdp_accelerator(version, names))
        assert not on and why in reason, reason
        assert resolve_compile(True, cuda, _fsdp_accelerator(version, names)) == (True, "")
    assert load_config([], []).train.compile == "auto"
    assert load_config([], ["train.compile=true"]).train.compile is True
    assert load_config([], ["train.compile=auto"]).train.compile == "auto"
    with pytest.raises(ConfigError, match="train.compile"):
        load_config([], ["train.compile=sometimes"])


def _fsdp_accelerator(version, names):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(fsdp_version=version, transformer_cls_names_to_wrap=names)
    return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))


def test_fsdp_compiles_each_block_in_place_and_refuses_what_it_cannot(corpus, tmp_path):
    """Under FSDP2 the shard units are compiled, not the root (whose FSDP hooks dynamo may not trace with fullgraph);
    FSDP1, or no wrap class, is refused naming train.compile. Nothing runs, so nothing is compiled here."""
    from cosformer.transformer import Block

    model = build_task(tiny(corpus, tmp_path)).build_model()
    keys = list(model.state_dict())
    compile_for_training(model, _fsdp_accelerator(2, ["Block"]))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert model._compiled_call_impl is None and list(model.state_dict()) == keys
    for version, names in ((1, ["Block"]), (2, None), (2, ["NoSuchBlock"])):
        with pytest.raises(ValueError, match="train.compile"):
            compile_for_training(build_task(tiny(corpus, tmp_path)).build_model(), _fsdp_accelerator(version, names))


def test_text_to_image_model_traces_whole(torch_attention_path, one_thread):
    """What train.compile compiles for the text-to-image task must trace as one graph (dynamo only, backend "eager":
    no code generation, so it runs anywhere; the language model is compiled for real below)."""
    cfg = load_config([], ["data.name=shapes", "t2i.image_size=8", "t2i.num_train=8", "t2i.num_val=8",
                           "t2i.num_test=8", "t2i.enc_depth=1", "model.dim=32", "model.depth=1", "model.heads=2",
                           "model.dim_head=16", "train.batch_size=2"])  # fmt: skip
    task = build_task(cfg)
    model = task.build_model()
    batch = next(iter(torch.utils.data.DataLoader(task.datasets()["train"], batch_size=2)))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**batch), model(**batch))


def _weight_names(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint / ckpt.WEIGHTS), framework="pt") as f:
        return sorted(f.keys())


@pytest.mark.slow  # one cold Inductor compile on CPU (training and evaluation graphs): 20 s warm, 60-120 s cold here
@pytest.mark.skipif(not HAS_CXX, reason="Inductor on CPU needs a C++ compiler (g++ or $CXX); none is installed")
def test_compiled_run_matches_eager_and_resumes_either_way(corpus, tmp_path, clean_accelerate, capsys):
    """train.compile=true on CPU: the same losses as eager (to rounding), the same checkpoint keys, and a checkpoint
    of either kind resumes under the other. Generation (text samples, KV cache) must not reach the compiled code:
    only the training and the evaluation graphs are compiled. One cold compile dominates the run time."""
    from torch._dynamo.utils import counters

    base = ("train.max_steps=5", "train.checkpoint_every=3", "train.eval_every=0", "train.sample_length=4")
    torch._dynamo.reset()
    counters.clear()
    train(tiny(corpus, tmp_path / "eager", *base, "train.compile=false"))
    assert "compile: off" in capsys.readouterr().out
    train(tiny(corpus, tmp_path / "compiled", *base, "train.compile=true"))
    out = capsys.readouterr().out
    assert "compile: on (inductor)" in out and "compile: off" not in out
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # training step + evaluation
    assert (tmp_path / "compiled" / "samples" / "sample_step_000005.txt").read_text()

    def close(got, want, steps):
        got, want = dict(curve(got)), dict(curve(want))
        assert sorted(got) == steps
        for step in steps:
            g, w = got[step], want[step]
            assert g.keys() == w.keys() and all(g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6) for k in w), (g, w)

    close(tmp_path / "compiled", tmp_path / "eager", [1, 2, 3, 4, 5])
    names = _weight_names(ckpt.latest_checkpoint(tmp_path / "eager"))
    assert not any("_orig_mod" in n for n in names)
    for kind in ("eager", "compiled"):
        assert _weight_names(ckpt.checkpoint_dir(tmp_path / kind, 3)) == names
        assert _weight_names(ckpt.checkpoint_dir(tmp_path / kind, 5)) == names

    # each kind's step-3 checkpoint resumes under the other and continues the eager run's steps 4 and 5
    for kind, other in (("eager", "true"), ("compiled", "false")):
        resumed = tmp_path / f"from_{kind}"
        source = ckpt.checkpoint_dir(tmp_path / kind, 3)
        train(tiny(corpus, resumed, *base, f"train.resume={source}", f"train.compile={other}"))
        assert "resumed from" in capsys.readouterr().out
        close(resumed, tmp_path / "eager", [4, 5])
        assert _weight_names(ckpt.latest_checkpoint(resumed)) == names
