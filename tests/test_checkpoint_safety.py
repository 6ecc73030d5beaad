"""Checkpoints from an untrusted or damaged source, and interrupted runs.

- Nothing in a checkpoint runs code on resume: planted pickles (custom_checkpoint_0.pkl, random_states_0.pkl,
  optimizer.bin, FSDP/DCP metadata and items) whose unpickling would create a marker file are refused, and the
  marker never appears; a checkpoint of the older layout (counters in a pickle) is refused with an explanation.
- A state that cannot be restored exactly is an error naming the file (RNG file missing, truncated, garbled).
- Config changes that reach parameter shapes, and weights that do not fit the config, are named, not raw tracebacks.
- A `latest` pointer leading out of the checkpoints folder is refused; a directory without COMPLETE is never used.
- Ctrl-C: once saves at a step boundary and resumes bit for bit; twice (or a KeyboardInterrupt that bypassed the
  handler) stops without saving, so no checkpoint ever holds weights of another step than it is labelled with.
"""

import json
import os
import pathlib
import pickle
import shutil
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file

from cosformer.train import checkpoint as ckpt
from cosformer.train.config import ConfigError, load_config, save_yaml
from cosformer.train.tasks import build_task
from cosformer.train.trainer import Trainer

from .test_train import clean_accelerate, corpus, curve, records, tiny, train  # noqa: F401  (fixtures)


class Plant:
    """Unpickling this creates `marker`: a stand-in for what a hostile file would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a file of the checkpoint was unpickled: it ran code"


def run_with_checkpoint(corpus, out, *overrides):  # noqa: F811
    """A short run with a checkpoint at step 5; returns that checkpoint."""
    train(tiny(corpus, out, "train.max_steps=5", "train.checkpoint_every=5", "train.sample_length=0", *overrides))
    return ckpt.checkpoint_dir(out, 5)


def resume(corpus, out, path, *overrides):  # noqa: F811
    """Build a trainer resuming from `path` (all the loading happens in the constructor)."""
    trainer = Trainer(tiny(corpus, out, "train.max_steps=10", "train.sample_length=0", f"train.resume={path}",
                           *overrides))  # fmt: skip
    trainer.close()
    return trainer


# ---------------------------------------------------------------------------------------------- 1: no code runs


def test_counters_are_json_and_no_pickle_of_ours_is_written(corpus, tmp_path, clean_accelerate):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    state = json.loads((path / ckpt.TRAINER_STATE).read_text())
    val_loss = state.pop("best_val_loss")
    assert state == {"step": 5, "micro_batches": 5, "tokens": 5 * 8 * 32, "best_step": 5, "evals_since_best": 0}
    assert val_loss == next(r["val_loss"] for r in records(tmp_path / "run") if "val_loss" in r)
    assert not list(path.glob("custom_checkpoint_*"))
    resumed = resume(corpus, tmp_path / "again", path)
    assert (resumed.state.step, resumed.state.best_step, resumed.state.best_val_loss) == (5, 5, val_loss)


def test_state_from_before_best_tracking_resumes_with_a_warning(corpus, tmp_path, clean_accelerate, capsys):  # noqa: F811
    """trainer_state.json without the best keys (written before they existed): the counters restore exactly, and the
    run says aloud that the best validation loss starts again from its next evaluation."""
    path = run_with_checkpoint(corpus, tmp_path / "run")
    state = json.loads((path / ckpt.TRAINER_STATE).read_text())
    (path / ckpt.TRAINER_STATE).write_text(json.dumps({k: state[k] for k in ckpt.COUNTERS}))
    capsys.readouterr()
    resumed = resume(corpus, tmp_path / "again", path)
    assert (resumed.state.step, resumed.state.best_step, resumed.state.best_val_loss) == (5, None, None)
    out = capsys.readouterr().out
    assert "warning:" in out and "predates best-checkpoint tracking" in out


def test_planted_custom_checkpoint_is_refused_unread(corpus, tmp_path, clean_accelerate, marker):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    torch.save(Plant(marker), path / "custom_checkpoint_0.pkl")
    with pytest.raises(ckpt.CheckpointError, match=r"custom_checkpoint_0\.pkl.*weights_only=False.*refusing"):
        resume(corpus, tmp_path / "again", path)


def test_old_layout_is_refused_with_an_explanation(corpus, tmp_path, clean_accelerate, marker):  # noqa: F811
    """Written before trainer_state.json: the counters are in a pickle that Accelerate loads with weights_only=False.
    It is never unpickled (here it is hostile, to prove it); the weights stay usable."""
    path = run_with_checkpoint(corpus, tmp_path / "run")
    (path / ckpt.TRAINER_STATE).unlink()
    torch.save(Plant(marker), path / "custom_checkpoint_0.pkl")
    with pytest.raises(ckpt.CheckpointError, match="older version of the trainer.*cannot be resumed safely"):
        resume(corpus, tmp_path / "again", path)
    ckpt.load_model_weights(build_task(ckpt.load_checkpoint_config(path)).build_model(), path)


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_planted_state_pickle_is_refused(corpus, tmp_path, clean_accelerate, marker, name):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    torch.save({"step": 0, "random_state": Plant(marker), "state": Plant(marker)}, path / name)
    with pytest.raises(ckpt.CheckpointError, match=rf"{name}|weights_only=True"):
        resume(corpus, tmp_path / "again", path)


COUNTED = {"step": 5, "micro_batches": 5, "tokens": 1280}
BEST = {"best_val_loss": 1.5, "best_step": 5, "evals_since_best": 0}


@pytest.mark.parametrize(
    "state, problem",
    [
        ({"step": 5, "micro_batches": -1, "tokens": 0}, "'micro_batches' must be a non-negative int"),
        ({"step": 5, "micro_batches": 5, "tokens": 1.5}, "'tokens' must be a non-negative int"),
        ({"step": True, "micro_batches": 5, "tokens": 0}, "'step' must be a non-negative int"),
        ({"step": 5, "micro_batches": 5}, "expected exactly the keys"),
        ([5, 5, 0], "expected exactly the keys"),
        ({**COUNTED, "best_step": 5}, "expected exactly the keys"),  # the best keys come together or not at all
        ({**COUNTED, **BEST, "best_val_loss": float("nan")}, "'best_val_loss' must be a finite float or null"),
        ({**COUNTED, **BEST, "best_val_loss": "1.5"}, "'best_val_loss' must be a finite float or null"),
        ({**COUNTED, **BEST, "best_step": 6}, r"'best_step' must be an int in \[0, step\] or null"),
        ({**COUNTED, **BEST, "best_step": None}, "'best_val_loss' and 'best_step' must both be set or both null"),
        ({**COUNTED, **BEST, "evals_since_best": -1}, "'evals_since_best' must be a non-negative int"),
        ({**COUNTED, **BEST, "best": 1}, "expected exactly the keys"),
        ({"step": 4, "micro_batches": 4, "tokens": 0}, "says step 4 but .*COMPLETE says 5"),
        ("{not json", "trainer_state.json: not valid JSON"),
    ],
)
def test_trainer_state_is_checked(corpus, tmp_path, clean_accelerate, state, problem):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    (path / ckpt.TRAINER_STATE).write_text(state if isinstance(state, str) else json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match=problem):
        resume(corpus, tmp_path / "again", path)


def _dcp_save(state_dict, directory):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": intended here
        dcp.save(state_dict, checkpoint_id=str(directory))


def test_fsdp_sharded_states_are_checked_before_dcp_reads_them(tmp_path, marker):
    """torch.distributed.checkpoint unpickles .metadata with plain pickle and non-tensor items with
    weights_only=False: a real one passes the check, a planted object in either place is refused unread."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    good = tmp_path / "optimizer_0"
    _dcp_save({"optimizer": opt.state_dict(), "model": model.state_dict()}, good)
    ckpt.check_dcp_dir(good)

    item = tmp_path / "item"
    _dcp_save({"w": torch.zeros(2), "evil": Plant(marker)}, item)
    with pytest.raises(ckpt.CheckpointError, match="item 'evil'.*refused"):
        ckpt.check_dcp_dir(item)

    meta = tmp_path / "meta"
    shutil.copytree(good, meta)
    (meta / ".metadata").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refused.*global _?io\.open is not part"):
        ckpt.check_dcp_dir(meta)


def test_planted_dcp_directory_is_refused_on_resume(corpus, tmp_path, clean_accelerate, marker):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    (path / "optimizer_0").mkdir()
    (path / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer_0/\.metadata: refused"):
        resume(corpus, tmp_path / "again", path)


# ---------------------------------------------------------------------------------------------- 3: exact or error


@pytest.mark.parametrize("damage", ["truncated", "garbled", "missing", "wrong content"])
def test_damaged_rng_state_is_an_error_naming_the_file(corpus, tmp_path, clean_accelerate, damage):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    rng = path / "random_states_0.pkl"
    if damage == "truncated":
        rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    elif damage == "garbled":
        rng.write_bytes(b"\x80\x04garbage" * 50)
    elif damage == "missing":
        rng.unlink()
    else:
        torch.save({"step": 5, "random_state": (3, (1, 2), None), "torch_manual_seed": torch.zeros(3)}, rng)
    with pytest.raises(ckpt.CheckpointError, match=r"random_states_0\.pkl.*would not continue the same random"):
        resume(corpus, tmp_path / "again", path)


# ---------------------------------------------------------------------------------------------- 4, 5b: shapes


def test_seq_len_change_names_the_key_and_the_parameter(corpus, tmp_path, clean_accelerate):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data\.seq_len: checkpoint 32, now 64.*net\.pos_emb\.emb\.weight: "
                                          r"checkpoint \[32, 32\], model \[64, 32\] \[data\.seq_len\]"):  # fmt: skip
        resume(corpus, tmp_path / "again", path, "data.seq_len=64")
    # keys that shape nothing of a language model stay free
    resume(corpus, tmp_path / "again", path, "t2i.image_size=8", "train.lr=1e-3")


def test_weight_shapes_are_read_from_the_header(corpus, tmp_path, clean_accelerate):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run", "model.tie_embedding=true")
    cfg = tiny(corpus, tmp_path / "x", "model.tie_embedding=true")
    assert ckpt.weight_mismatches(build_task(cfg).build_model(), path) == []  # tied names stored once: fine
    cfg = tiny(corpus, tmp_path / "x", "model.tie_embedding=true", "model.depth=2", "model.dim=48")
    problems = ckpt.weight_mismatches(build_task(cfg).build_model(), path)
    assert "net.token_emb.weight: checkpoint [256, 32], model [256, 48] [model.*]" in problems
    assert any(p.startswith("net.attn_layers.layers.1.") and "missing from the checkpoint [model.depth" in p
               for p in problems)  # fmt: skip


def test_t2i_keys_that_shape_parameters_are_compared(tmp_path):
    saved = load_config([], ["data.name=shapes", "t2i.image_size=16"])
    save_yaml(saved, tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"t2i\.image_size: checkpoint 16, now 32"):
        ckpt.check_compatible(load_config([], ["data.name=shapes", "t2i.image_size=32"]), tmp_path)
    with pytest.raises(ConfigError, match=r"data\.name: checkpoint 'shapes', now 'pystdlib'"):
        ckpt.check_compatible(load_config([], []), tmp_path)
    ckpt.check_compatible(
        load_config([], ["data.name=hf", "t2i.hf_dataset=x", "t2i.image_size=16", "t2i.num_train=5"]), tmp_path
    )


def test_config_yaml_that_disagrees_with_the_weights(corpus, tmp_path, clean_accelerate, capsys):  # noqa: F811
    """config.yaml edited to depth 2 over depth-1 weights: resuming with the config it claims, and sampling (which
    rebuilds the model from it), both say the two disagree."""
    import importlib.util

    path = run_with_checkpoint(corpus, tmp_path / "run")
    cfg = ckpt.load_checkpoint_config(path)
    cfg.model.depth = 2
    save_yaml(cfg, path / "config.yaml")
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit the model its config.yaml describes.*"
                                                   r"net\.attn_layers\.layers\.1\..*missing"):  # fmt: skip
        resume(corpus, tmp_path / "again", path, "model.depth=2")
    with pytest.raises(ConfigError, match=r"model\.depth: checkpoint 2, now 1"):
        resume(corpus, tmp_path / "again", path)

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("sample_script", root / "scripts" / "sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors does not fit the model built from .*config"):
        script.main([str(path), "--prompt", "the", "--length", "4"])


@pytest.mark.parametrize("text, problem", [("model: [1, 2\n", "not a valid config"), ("model: {dimm: 3}\n", "dimm")])
def test_unreadable_config_yaml_names_the_file(corpus, tmp_path, clean_accelerate, text, problem):  # noqa: F811
    path = run_with_checkpoint(corpus, tmp_path / "run")
    (path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"step_000005/config\.yaml: .*{problem}"):
        resume(corpus, tmp_path / "again", path)


# ---------------------------------------------------------------------------------------------- 5a, 5c: discovery


def test_latest_pointer_cannot_leave_the_checkpoints_folder(corpus, tmp_path, clean_accelerate):  # noqa: F811
    run = tmp_path / "run"
    run_with_checkpoint(corpus, run)
    elsewhere = run_with_checkpoint(corpus, tmp_path / "elsewhere")  # complete, but not this run's
    pointer = run / "checkpoints" / "latest"
    for target in ("../../elsewhere/checkpoints/step_000005", str(elsewhere), "../../../../etc", "step_5/../x"):
        pointer.write_text(target + "\n")
        with pytest.raises(ckpt.CheckpointError, match="not a step_NNNNNN directory.*refusing to follow it"):
            ckpt.latest_checkpoint(run)
        with pytest.raises(ckpt.CheckpointError, match="refusing to follow it"):
            resume(corpus, run, True)
    # the best pointer follows the same rules, wherever it is read: discovery, resume, sampling
    pointer.write_text("step_000005\n")
    best = run / "checkpoints" / "best"
    assert ckpt.best_checkpoint(run) == ckpt.checkpoint_dir(run, 5)
    for target in ("../../elsewhere/checkpoints/step_000005", str(elsewhere), "step_5/../x"):
        best.write_text(target + "\n")
        with pytest.raises(ckpt.CheckpointError, match="best names .*not a step_NNNNNN directory.*refusing"):
            ckpt.best_checkpoint(run)
        with pytest.raises(ckpt.CheckpointError, match="refusing to follow it"):
            ckpt.resolve_checkpoint(run, best=True)
        with pytest.raises(ckpt.CheckpointError, match="refusing to follow it"):
            resume(corpus, tmp_path / "again", best)
    best.write_text("step_000005\n")
    # a step_* name that is a link out of the folder is not a checkpoint of this run either
    pointer.write_text("step_000009\n")
    (run / "checkpoints" / "step_000009").symlink_to(elsewhere, target_is_directory=True)
    assert ckpt.list_checkpoints(run) == [ckpt.checkpoint_dir(run, 5)]
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 5)
    best.write_text("step_000009\n")
    assert ckpt.best_checkpoint(run) is None  # no fallback: the newest is not the best


def test_directory_without_complete_is_never_used(corpus, tmp_path, clean_accelerate):  # noqa: F811
    run = tmp_path / "run"
    train(tiny(corpus, run, "train.max_steps=10", "train.checkpoint_every=5", "train.keep_checkpoints=5"))
    ten = ckpt.checkpoint_dir(run, 10)
    (ten / ckpt.COMPLETE).unlink()  # as if the save had died before its last write
    shutil.copytree(ckpt.checkpoint_dir(run, 5), run / "checkpoints" / ".tmp_step_000015")  # has COMPLETE
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000010"
    assert resume(corpus, run, True).resumed_from == ckpt.checkpoint_dir(run, 5)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume(corpus, tmp_path / "again", ten)
    (ten / ckpt.COMPLETE).write_text("{garbage")  # a marker that is there but unreadable: named, not a traceback
    with pytest.raises(ckpt.CheckpointError, match=r"step_000010/COMPLETE: expected JSON"):
        resume(corpus, tmp_path / "again", ten)


# ---------------------------------------------------------------------------------------------- 2: interrupts


class Interrupt(Trainer):
    """Calls `act(self)` from an optimizer step post-hook during optimiser step `at` (1-based): after the weights
    have moved, before the step counter has: the moment a save would be torn."""

    at = 7
    act = None

    def __init__(self, cfg):
        super().__init__(cfg)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's wrapper holds the torch one
        inner.register_step_post_hook(lambda *_: type(self).act(self) if self.state.step + 1 == self.at else None)


def twice(trainer):
    signal.raise_signal(signal.SIGINT)  # runs the handler now: sets the stop flag
    signal.raise_signal(signal.SIGINT)  # the second: KeyboardInterrupt from inside the step


def once(trainer):
    signal.raise_signal(signal.SIGINT)


def raw(trainer):
    raise KeyboardInterrupt  # as if another library's handler had replaced the trainer's


def weights(path):
    return load_file(path / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def per_step_weights(corpus, tmp_path, clean_accelerate):  # noqa: F811
    """The uninterrupted run's weights after each of its first 8 steps."""

    class StopAfter8(Trainer):
        def train_step(self, batches):
            out = super().train_step(batches)
            if self.state.step == 8:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

    out = tmp_path / "reference"
    train(tiny(corpus, out, "train.checkpoint_every=1", "train.keep_checkpoints=20"), StopAfter8)
    return {ckpt.checkpoint_step(p): weights(p) for p in ckpt.list_checkpoints(out)}


def assert_consistent(out, reference):
    """Every checkpoint holds the weights of the step it is labelled with."""
    for path in ckpt.list_checkpoints(out):
        step = ckpt.checkpoint_step(path)
        assert json.loads((path / ckpt.TRAINER_STATE).read_text())["step"] == step
        assert same(weights(path), reference[step]), f"{path.name} holds the weights of another step"


@pytest.mark.parametrize("act", [twice, raw], ids=["second-sigint", "raw-keyboardinterrupt"])
def test_interrupt_mid_step_stops_without_saving(corpus, tmp_path, clean_accelerate, per_step_weights, act, capsys):  # noqa: F811
    out = tmp_path / "run"
    Interrupt.act = act
    interrupted = False
    try:
        train(tiny(corpus, out, "train.checkpoint_every=5"), Interrupt)
    except KeyboardInterrupt:
        interrupted = True
    assert_consistent(out, per_step_weights)
    assert interrupted, "train() must re-raise, not return as if it had saved"
    assert ckpt.list_checkpoints(out) == [ckpt.checkpoint_dir(out, 5)]  # the periodic one, untouched
    assert not list((out / "checkpoints").glob(".tmp_*"))
    assert "in the middle of step 7: stopped without saving; resume from" in capsys.readouterr().out
    final = train(tiny(corpus, out, "train.checkpoint_every=5", "train.resume=true"))
    assert final and max(r["step"] for r in records(out)) == 20


def test_raw_keyboardinterrupt_between_steps_does_not_save(corpus, tmp_path, clean_accelerate, per_step_weights):  # noqa: F811
    """Weights and counters agree between steps, but a KeyboardInterrupt there may have cut an evaluation short (which
    draws from the global RNG), so the RNG streams need not be the boundary's: no save, the last checkpoint stays."""

    class BoundaryInterrupt(Trainer):
        def train_step(self, batches):
            if self.state.step == 6:
                raise KeyboardInterrupt
            return super().train_step(batches)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(corpus, out, "train.checkpoint_every=5"), BoundaryInterrupt)
    assert ckpt.list_checkpoints(out) == [ckpt.checkpoint_dir(out, 5)]
    assert_consistent(out, per_step_weights)


def test_one_sigint_mid_step_saves_at_the_boundary_and_resumes_exactly(corpus, tmp_path, clean_accelerate):  # noqa: F811
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(tiny(corpus, full, "train.checkpoint_every=10", "model.dropout=0.1"))
    Interrupt.act = once
    assert train(tiny(corpus, parts, "model.dropout=0.1"), Interrupt) == {}
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(parts)) == 7  # the step in flight finished first
    train(tiny(corpus, parts, "train.resume=true", "train.checkpoint_every=10", "model.dropout=0.1"))
    assert curve(parts) == curve(full)  # bit-identical in fp32 on CPU


def test_second_signal_during_a_save_keeps_the_last_checkpoint(corpus, tmp_path, clean_accelerate):  # noqa: F811
    out = tmp_path / "run"
    trainer = Trainer(tiny(corpus, out, "train.checkpoint_every=5", "train.max_steps=10"))
    real_save, delivered = trainer.accelerator.save_state, []

    def interrupted_save(output_dir, **kwargs):
        real_save(output_dir, **kwargs)
        if "000010" in output_dir and not delivered:  # once: a retried save must not signal the default handler
            delivered.append(True)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    trainer.accelerator.save_state = interrupted_save
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_dir(out, 5)
    assert (out / "checkpoints" / ".tmp_step_000010").is_dir()  # debris, never mistaken for a checkpoint


def test_train_script_refuses_a_planted_checkpoint_with_exit_2(corpus, tmp_path, clean_accelerate, marker, capsys):  # noqa: F811
    """The command line turns a refused checkpoint into a one-line error and exit status 2, not a traceback."""
    import importlib.util

    path = run_with_checkpoint(corpus, tmp_path / "run")
    torch.save(Plant(marker), path / "custom_checkpoint_0.pkl")
    spec = importlib.util.spec_from_file_location(
        "train_script", pathlib.Path(__file__).parents[1] / "scripts/train.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = [f"data.path={corpus}", "data.name=text", "data.seq_len=32", "model.dim=32", "model.depth=1",
            "model.heads=2", "model.dim_head=16", "train.batch_size=8", "train.max_steps=10", "train.sample_length=0",
            f"train.out_dir={tmp_path / 'again'}", f"train.resume={path}", "log.tracker=none"]  # fmt: skip
    assert script.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("checkpoint error:") and "custom_checkpoint_0.pkl" in line for line in err), err
    assert not any("Traceback" in line for line in err)


def test_resume_refuses_keys_that_change_the_data(corpus, tmp_path, clean_accelerate):  # noqa: F811
    """train.seed draws the training crops: a resumed run with another seed would not continue the same run."""
    path = run_with_checkpoint(corpus, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"training data would differ \(train\.seed: checkpoint 0, now 1\)"):
        resume(corpus, tmp_path / "again", path, "train.seed=1")
    saved = ckpt.load_checkpoint_config(path)
    for key, value in (("t2i.data_seed", 3), ("t2i.holdout", "combinations")):
        changed = load_config([], ["data.name=shapes", f"{key}={value}"])
        base = load_config([], ["data.name=shapes"])
        base_dir = tmp_path / f"t2i_{key}"
        base_dir.mkdir()
        save_yaml(base, base_dir / "config.yaml")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            ckpt.check_compatible(changed, base_dir)
    assert saved.train.seed == 0
