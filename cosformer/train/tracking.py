"""Experiment tracking: a local JSONL log every run writes, plus wandb when `log.tracker=wandb`.

`out_dir/metrics.jsonl` holds one JSON object per line: train lines {step, loss, lr, tokens_per_s, memory_mib},
eval lines {step, val_loss, val_bpc, ...task metrics, attn_max_logit, attn_entropy, attn_max_logit/<n>}, a last
{"final": true, ...} line, or {"step", "diverged": true} when the loss went non-finite. The final line holds the
final values and, beside them, the best evaluation's {best_val_loss, best_step, best_val_bpc (or the task's other
derived best)}; `"stopped_early": true` when `train.patience` ended the run, whose step is then the line's `step`.
On resume the file is cut back to the resumed step, so it always shows one clean curve. Only the main process writes.

wandb goes online when credentials exist (WANDB_API_KEY, or a netrc entry for api.wandb.ai) and offline otherwise;
the choice is made before `wandb.init` and said once. A WANDB_MODE set in the environment always wins.
"""

from __future__ import annotations

import html
import json
import math
import netrc
import os
import pathlib
import secrets
from typing import Any

WANDB_HOST = "api.wandb.ai"


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_wandb_mode() -> tuple[str, str]:
    """(mode, why): the environment's WANDB_MODE, else online with credentials, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set in the environment"
    if wandb_logged_in():
        return "online", f"credentials for {WANDB_HOST} found"
    return "offline", f"no WANDB_API_KEY and no netrc entry for {WANDB_HOST}; sync later with `wandb sync`"


def configure_wandb() -> str:
    """Fix the wandb mode through the environment (read by wandb.init on every process) and return it."""
    mode, _ = choose_wandb_mode()
    os.environ["WANDB_MODE"] = mode
    return mode


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, the one reader of the format: a torn last line (a run killed mid-write) is
    dropped; any other line that is not a JSON object is an error naming the file and line."""
    records = []
    lines = pathlib.Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


class MetricsLog:
    """Append-only JSONL file of metric records; numbers only (media go to the tracker and to files)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return read_metrics(self.path)

    def truncate(self, step: int) -> None:
        """Keep only records of steps <= `step` that are not end-of-run lines (rewritten atomically)."""
        if not self.path.exists():
            return
        kept = [
            r
            for r in self.records()
            if isinstance(r.get("step"), int) and r["step"] <= step and not r.get("final") and not r.get("diverged")
        ]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)


def split_media(metrics: dict[str, Any]) -> tuple[dict[str, float | int | bool], dict[str, Any]]:
    """(numbers, media): str values are text samples, pathlib.Path values images; non-finite floats -> None."""
    numbers, media = {}, {}
    for key, value in metrics.items():
        if isinstance(value, (str, pathlib.Path)):
            media[key] = value
        elif isinstance(value, float) and not math.isfinite(value):
            numbers[key] = None
        else:
            numbers[key] = value
    return numbers, media


class Tracker:
    """Routes metrics to metrics.jsonl and, through Accelerate, to wandb; writes samples under out_dir/samples."""

    def __init__(self, accelerator, out_dir: str | os.PathLike, log_cfg, config_dict: dict, use_wandb: bool):
        self.accelerator = accelerator
        self.out_dir = pathlib.Path(out_dir)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.use_wandb = use_wandb
        if use_wandb:
            import wandb

            self._wandb = wandb
            id_file = self.out_dir / "wandb_id.txt"
            run_id = None
            if accelerator.is_main_process:
                # one wandb run per out_dir, so that a resumed run continues the same curve online
                run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
                self.out_dir.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id)
            kwargs = {"dir": str(self.out_dir), "id": run_id, "resume": "allow"}
            if log_cfg.group:
                kwargs["group"] = log_cfg.group
            if log_cfg.name:
                kwargs["name"] = log_cfg.name
            accelerator.init_trackers(log_cfg.project, config=config_dict, init_kwargs={"wandb": kwargs})

    def truncate(self, step: int) -> None:
        if self.accelerator.is_main_process:
            self.metrics.truncate(step)

    def log(self, metrics: dict[str, Any], step: int, **flags: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        numbers, media = split_media(metrics)
        self.metrics.append({"step": step, **numbers, **flags})
        for key, value in media.items():
            if isinstance(value, str):
                path = self.out_dir / "samples" / f"{key}_step_{step:06d}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(value)
        if self.use_wandb:
            payload = {k: v for k, v in numbers.items() if v is not None}
            for key, value in media.items():
                if isinstance(value, pathlib.Path):
                    payload[key] = self._wandb.Image(str(value))
                else:
                    payload[key] = self._wandb.Html(f"<pre>{html.escape(value)}</pre>")
            if flags.get("final"):
                for tracker in self.accelerator.trackers:
                    if tracker.name == "wandb":
                        tracker.tracker.summary.update({k: v for k, v in numbers.items() if v is not None})
            self.accelerator.log(payload, step=step)

    def finish(self) -> None:
        if self.use_wandb:
            self.accelerator.end_training()
