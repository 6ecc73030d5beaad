"""The stability map: final validation bits per run over learning rate × depth, one panel per mixed precision × norm
placement, one figure per attention kind, with diverged runs marked; and the same grid as markdown tables.

When a run counts as diverged (the rule, stated here only; `diverged_reason` applies it):
1. its training loss became non-finite: the trainer stopped it and logged {"diverged": true} (the line carries the
   step); or
2. it ended no better than predicting uniformly over the V output classes: its last logged training loss or its
   final validation loss is non-finite (logged as null) or at least ln V (V = 256 bytes for language modelling,
   `t2i.palette` colours for text-to-image).
Why the second clause: under fp16 the gradient scaler skips every step whose gradients overflow, so a run can sit
at its initial loss for good (about 6.0 nats for the stability sweep's models at initialisation, above ln 256 ≈ 5.55)
or blow up to large finite losses without a NaN ever reaching the loss. Any run that learned anything, even only
the byte frequencies, ends below ln V. A run without a final line (cut short, still running, crashed) is no result:
its cell reads "missing".

`write_stability_maps` is what `scripts/report.py` calls; it does nothing unless the runs vary both `train.lr`
and `model.depth`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cosformer.tools.report import RunLog

LR_KEY, DEPTH_KEY, PRECISION_KEY, NORM_KEY, ATTN_KEY = (
    "train.lr",
    "model.depth",
    "train.mixed_precision",
    "model.pre_norm",
    "model.attn",
)
# Diverged cells are drawn in this colour, which the value colour map (viridis) never reaches, and carry a ×.
DIVERGED_COLOUR = "#d62728"
MISSING_COLOUR = "#ffffff"
VALUE_CMAP = "viridis"


def uniform_loss(config: dict) -> float:
    """ln V, the loss of predicting every one of the V output classes equally, for a run's flattened config."""
    from cosformer.train.config import T2I_DATA
    from cosformer.train.tasks.lm import NUM_TOKENS

    if config.get("data.name") in T2I_DATA:
        palette = config.get("t2i.palette")
        if not isinstance(palette, int) or palette < 2:
            raise ValueError(
                f"a text-to-image run's config needs t2i.palette >= 2 for its uniform loss; got {palette!r}"
            )
        return math.log(palette)
    return math.log(NUM_TOKENS)


def _final(run: RunLog, key: str) -> float | None:
    """`key` from the final line if it has it, else from the last evaluation that logged it; a null (the tracker's
    non-finite value) reads as NaN, an absent key as None."""
    for record in [run.final, *reversed(run.evals)]:
        if key in record:
            value = record[key]
            return math.nan if value is None else float(value)
    return None


def diverged_reason(run: RunLog) -> str | None:
    """Why `run` counts as diverged under the module's rule, or None when it does not (or has no result yet)."""
    if run.diverged_at is not None:
        return f"non-finite loss at step {run.diverged_at}"
    if not run.final:
        return None
    threshold = uniform_loss(run.config)
    train_loss = None
    if run.train:
        raw = run.train[-1].get("loss")
        train_loss = math.nan if raw is None else float(raw)
    for name, value in (("train loss", train_loss), ("val loss", _final(run, "val_loss"))):
        if value is not None and not (math.isfinite(value) and value < threshold):
            return f"final {name} {value:.3g} ≥ ln {round(math.exp(threshold))}"
    return None


def value_key(runs: list[RunLog]) -> str:
    """The validation metric the map shows: bits per byte, or bits per pixel for text-to-image."""
    for key in ("val_bpc", "val_bits_per_pixel"):
        if any(_final(run, key) is not None for run in runs):
            return key
    raise ValueError("no run logged val_bpc or val_bits_per_pixel: nothing to put on a stability map")


@dataclass
class Panel:
    """One precision × norm placement: cells indexed [depth, lr] (rows and columns in `Grid` order)."""

    precision: str
    pre_norm: bool
    values: np.ndarray  # float, NaN where the cell has no finite result (diverged or missing)
    status: np.ndarray  # "ok" | "diverged" | "missing" | "non-finite" (a statistic that overflowed)
    notes: np.ndarray  # the divergence reason, "" otherwise

    @property
    def title(self) -> str:
        return f"{self.precision}, {'pre-LN' if self.pre_norm else 'post-LN'}"


@dataclass
class Grid:
    attn: str
    lrs: list[float]
    depths: list[int]
    panels: list[Panel]  # precision-major, post-LN before pre-LN
    key: str  # the metric in `values`


def stability_grids(runs: list[RunLog], key: str | None = None) -> list[Grid]:
    """One grid per attention kind over every learning rate, depth, precision and norm placement the runs hold, the
    cells holding each run's final `key` (default: the validation metric, `value_key`). Two runs in one cell (they
    differ in a key the map does not show, e.g. the seed) are an error, not a pick."""
    for run in runs:
        missing = [k for k in (LR_KEY, DEPTH_KEY, PRECISION_KEY, NORM_KEY, ATTN_KEY) if k not in run.config]
        if missing:
            raise ValueError(f"run {run.path} has no {missing} in its config.yaml: cannot place it on the map")
    key = key or value_key(runs)
    lrs = sorted({float(r.config[LR_KEY]) for r in runs})
    depths = sorted({int(r.config[DEPTH_KEY]) for r in runs})
    precisions = sorted({str(r.config[PRECISION_KEY]) for r in runs})
    grids = []
    for attn in sorted({str(r.config[ATTN_KEY]) for r in runs}):
        panels = []
        for precision in precisions:
            for pre_norm in (False, True):
                shape = (len(depths), len(lrs))
                status, notes = np.full(shape, "missing", dtype=object), np.full(shape, "", dtype=object)
                panel = Panel(precision, pre_norm, np.full(shape, np.nan), status, notes)
                seen = {}
                for run in runs:
                    c = run.config
                    if (str(c[ATTN_KEY]), str(c[PRECISION_KEY]), bool(c[NORM_KEY])) != (attn, precision, pre_norm):
                        continue
                    cell = (depths.index(int(c[DEPTH_KEY])), lrs.index(float(c[LR_KEY])))
                    if cell in seen:
                        raise ValueError(
                            f"runs {seen[cell]} and {run.path} fall in one cell of the stability map ({attn}, "
                            f"{panel.title}, depth {c[DEPTH_KEY]}, lr {c[LR_KEY]}): they differ in a key the map "
                            "does not show; report them separately"
                        )
                    seen[cell] = run.path
                    reason = diverged_reason(run)
                    if reason is not None:
                        panel.status[cell], panel.notes[cell] = "diverged", reason
                    elif run.final and _final(run, key) is not None:
                        value = _final(run, key)  # non-finite only for a statistic: a NaN val loss is divergence
                        if math.isfinite(value):
                            panel.status[cell], panel.values[cell] = "ok", value
                        else:
                            panel.status[cell] = "non-finite"
                panels.append(panel)
        panels = [p for p in panels if (p.status != "missing").any()]  # e.g. a sweep with pre-LN only
        grids.append(Grid(attn, lrs, depths, panels, key))
    return grids


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def draw_stability_map(grid: Grid, vmin: float, vmax: float, title: str = ""):
    """The figure of one grid (a matplotlib Figure with an Agg canvas): colour = the metric on a scale shared by
    every panel, value printed in the cell; diverged cells in DIVERGED_COLOUR with a ×; missing cells blank."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    precisions = sorted({p.precision for p in grid.panels})
    norms = sorted({p.pre_norm for p in grid.panels})
    rows, cols = len(precisions), len(norms)
    fig = Figure(figsize=(1.5 + 0.75 * len(grid.lrs) * cols, 1.0 + 0.5 * len(grid.depths) * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    values_cmap = colormaps[VALUE_CMAP].with_extremes(bad=MISSING_COLOUR)
    flags = ListedColormap([DIVERGED_COLOUR])
    for panel in grid.panels:
        ax = axes[precisions.index(panel.precision), norms.index(panel.pre_norm)]
        shown = np.ma.masked_invalid(panel.values)
        image = ax.imshow(shown, cmap=values_cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        diverged = np.ma.masked_where(panel.status != "diverged", np.zeros(panel.values.shape))
        ax.imshow(diverged, cmap=flags, vmin=0, vmax=1, origin="lower", aspect="auto")
        mid = (vmin + vmax) / 2
        for (r, c), status in np.ndenumerate(panel.status):
            if status == "ok":
                value = panel.values[r, c]
                ink = "black" if value > mid else "white"  # viridis is dark at the low end
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8, color=ink)
            elif status == "diverged":
                ax.text(c, r, "×", ha="center", va="center", fontsize=14, color="white", weight="bold")
            else:
                ax.text(c, r, "–", ha="center", va="center", fontsize=8, color="0.5")
        ax.set_xticks(range(len(grid.lrs)), [_lr_label(lr) for lr in grid.lrs], fontsize=8)
        ax.set_yticks(range(len(grid.depths)), [str(d) for d in grid.depths], fontsize=8)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("depth")
        ax.set_title(panel.title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, label=grid.key.replace("_", " ") + " (final)", shrink=0.8)
    fig.suptitle(f"{title + ': ' if title else ''}{grid.attn} attention (× = diverged, – = missing)")
    return fig


def stability_table(grid: Grid, fmt: str = ".3f") -> str:
    """A markdown table of one grid: a row per precision × norm × depth, a column per learning rate."""
    header = ["precision", "norm", "depth", *(f"lr {_lr_label(lr)}" for lr in grid.lrs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for panel in grid.panels:
        for r, depth in enumerate(grid.depths):
            cells = []
            for c in range(len(grid.lrs)):
                status = panel.status[r, c]
                if status == "ok":
                    cells.append(format(panel.values[r, c], fmt))
                elif status == "diverged":
                    cells.append(f"diverged ({panel.notes[r, c]})")
                else:
                    cells.append("non-finite" if status == "non-finite" else "–")
            norm = "pre-LN" if panel.pre_norm else "post-LN"
            lines.append("| " + " | ".join([panel.precision, norm, str(depth), *cells]) + " |")
    return "\n".join(lines)


def write_stability_maps(runs: list[RunLog], out: str | os.PathLike, title: str = "") -> tuple[list[str], list[Path]]:
    """For runs that vary both learning rate and depth: `<out>/stability_<attn>.png` per attention kind and the
    markdown lines that show them with their tables. Returns (lines, figure paths); ([], []) for other runs."""
    if not all(len({repr(r.config.get(k)) for r in runs}) > 1 for k in (LR_KEY, DEPTH_KEY)):
        return [], []
    grids = stability_grids(runs)
    finite = np.concatenate([p.values[np.isfinite(p.values)] for g in grids for p in g.panels])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines, paths = ["## Stability map", ""], []
    lines += [
        f"Final {grids[0].key.replace('_', ' ')} per learning rate × depth; × marks a diverged run: a non-finite "
        "loss, or a final train or validation loss no better than uniform prediction (ln V; the rule: "
        "cosformer/tools/stability.py). – marks a run without a result.",
        "",
    ]
    for grid in grids:
        path = out / f"stability_{grid.attn}.png"
        draw_stability_map(grid, vmin, vmax, title).savefig(path, dpi=120)
        paths.append(path)
        lines += [f"### {grid.attn} attention", "", f"![stability map, {grid.attn}]({path.name})", ""]
        lines += [stability_table(grid), ""]
    lines += _statistic_tables(runs)
    return lines, paths


# the attention statistics the trainer logs at every evaluation (train.attn_stats), when the runs have them
STATISTICS = {
    "attn_max_logit": "Largest attention logit over all layers and heads (after the scale: cosine logits are bounded "
    "by scale · groups, regular ones are not)",
    "attn_entropy": "Mean attention entropy (nats) over layers, heads and queries",
}


def _statistic_tables(runs: list[RunLog]) -> list[str]:
    """A table per logged attention statistic and attention kind: its value at each run's last evaluation; diverged
    and missing runs read as on the map."""
    lines = []
    for key, what in STATISTICS.items():
        if not any(_final(run, key) is not None for run in runs):
            continue
        lines += [f"### {key.replace('_', ' ')}", "", f"{what}, at each run's last evaluation.", ""]
        for grid in stability_grids(runs, key):
            lines += [f"{grid.attn} attention:", "", stability_table(grid, fmt=".3g"), ""]
    return lines


__all__ = ["diverged_reason", "draw_stability_map", "stability_grids", "stability_table", "uniform_loss"]
