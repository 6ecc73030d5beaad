"""Results report: training runs' local logs → curves, a markdown table and a side-by-side sample grid.

A run directory holds what the trainer writes: `metrics.jsonl` (train lines {step, loss, lr, tokens_per_s,
memory_mib}; eval lines {step, val_loss, val_bpc} or, for text-to-image, {step, val_loss, val_bits_per_pixel,
val_fid, val_fidelity}; a last {"final": true, ...} line; {"step", "diverged": true} if the loss went non-finite),
`config.yaml` (the resolved config, nested by section) and, for text-to-image, `samples_step_XXXXXX.png` image
grids (also found as `samples/<key>_step_XXXXXX.png`, where the tracker files its media).
Each run is labelled by how its config differs from the other runs' (e.g. "cosine post-LN scale=10"), so the
same code reports an attention × norm grid, a scale sweep or two hand-picked runs.

A run's status is finished (its final line exists; "stopped early" when `train.patience` ended it), diverged, or
unfinished (cut short, or still running). The table stars the best run by its validation metric (val bpc, or val
bits/pixel), lower being better; only a finished run with a finite value can be best, so a run that diverged or
was cut short after a low evaluation is listed with that value but never marked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from cosformer.attention import DEFAULT_SCALE
from cosformer.tools.stability import write_stability_maps
from cosformer.train.config import FORMER_DEFAULTS, Config, to_dict
from cosformer.train.tracking import read_metrics as load_metrics

# Keys that differ between runs by construction and say nothing about the variant.
IGNORED_KEY_PREFIXES = ("train.out_dir", "train.resume", "log.")
# Known keys get short labels; the rest read "leaf=value".
_FIRST_KEYS = ("model.attn", "model.pre_norm")
_SAMPLE_RE = re.compile(r"_step_(\d+)\.png$")
# The sample figure: images at their own pixel size, side by side up to MAX_WIDTH_PX (a page shows a figure about
# 900 px wide, so this keeps its text at 70% of its size or more) and stacked beyond.
SAMPLES_DPI = 100
MAX_WIDTH_PX = 1280
PANEL_GAP_PX = 32  # well above a grid's own gaps, so that one run's images are not read as the next's
PANEL_LABEL_PT = 13.0
TITLE_PT = 15.0
WHITE_BELOW = 0.97  # a pixel lighter than this in every channel counts as margin

# (column header, metrics key); a column whose every value is missing is left out. The best_* keys are the trainer's
# lowest validation loss over evaluations (on its final line), beside the final values.
_VAL_COLUMNS = (
    ("val bpc", "val_bpc"),
    ("test bpc", "test_bpc"),
    ("best val bpc", "best_val_bpc"),
    ("val bits/pixel", "val_bits_per_pixel"),
    ("test bits/pixel", "test_bits_per_pixel"),
    ("best val bits/pixel", "best_val_bits_per_pixel"),
)


@dataclass
class RunLog:
    path: Path
    config: dict  # flattened: {"model.attn": "cosine", ...}
    train: list[dict] = field(default_factory=list)  # lines with "loss"
    evals: list[dict] = field(default_factory=list)  # lines with a "val_*" key
    final: dict = field(default_factory=dict)
    diverged_at: int | None = None
    samples: list[Path] = field(default_factory=list)  # sorted by step
    label: str = ""

    @property
    def status(self) -> str:
        if self.diverged_at is not None:
            return f"diverged (step {self.diverged_at})"
        if not self.final:
            return "unfinished"
        return "finished (stopped early)" if self.final.get("stopped_early") else "finished"

    @property
    def steps(self) -> int:
        steps = [r["step"] for r in self.train + self.evals if isinstance(r.get("step"), int)]
        if isinstance(self.final.get("step"), int):
            steps.append(self.final["step"])
        if self.diverged_at is not None:
            steps.append(self.diverged_at)
        return max(steps, default=0)

    def last(self, key: str) -> float | None:
        """The run's result for `key`: from the final line when it has it, else the last eval that logged it."""
        if _is_number(self.final.get(key)):
            return float(self.final[key])
        for record in reversed(self.evals):
            if _is_number(record.get(key)):
                return float(record[key])
        return None

    def median_tokens_per_s(self) -> float | None:
        values = [float(r["tokens_per_s"]) for r in self.train if _is_number(r.get("tokens_per_s"))]
        return statistics.median(values) if values else None

    def peak_memory_mib(self) -> float | None:
        values = [float(r["memory_mib"]) for r in self.train if _is_number(r.get("memory_mib"))]
        if _is_number(self.final.get("memory_mib")):
            values.append(float(self.final["memory_mib"]))
        return max(values) if values else None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- reading


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_run(path: str | os.PathLike) -> RunLog:
    path = Path(path)
    config_file = path / "config.yaml"
    config = flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    if config:
        # a key added to the config after the run was recorded took its default then (today's, unless it changed
        # since: FORMER_DEFAULTS): runs of different ages compare
        config = flatten(to_dict(Config())) | FORMER_DEFAULTS | config
    run = RunLog(path=path, config=config, label=path.name)
    for record in load_metrics(path / "metrics.jsonl"):
        if record.get("final"):
            run.final = record
        elif record.get("diverged"):
            run.diverged_at = record.get("step")
        elif any(k.startswith("val_") for k in record):
            run.evals.append(record)
        elif "loss" in record:
            run.train.append(record)
    files = [*path.glob("samples_step_*.png"), *path.glob("samples/*_step_*.png")]
    steps = [(int(m.group(1)), p) for p in files if (m := _SAMPLE_RE.search(p.name))]
    run.samples = [p for _, p in sorted(steps)]
    return run


def find_runs(paths: list[str | os.PathLike]) -> list[RunLog]:
    """Every run under the given directories (a run directory, or any folder above some: a sweep root)."""
    dirs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"run directory not found: {path}")
        found = sorted(p.parent for p in path.rglob("metrics.jsonl"))
        if not found:
            raise FileNotFoundError(f"no metrics.jsonl under {path}")
        dirs += [d for d in found if d not in dirs]
    runs = [load_run(d) for d in dirs]
    label_runs(runs)
    return runs


# ----------------------------------------------------------------------------- labels


def _describe(key: str, value) -> str:
    if key == "model.attn":
        return str(value)
    if key == "model.pre_norm":
        return "pre-LN" if value else "post-LN"
    if key == "model.scale" and value is None:
        return f"scale={DEFAULT_SCALE:g}"  # not set: the zoo's default
    return f"{key.rsplit('.', 1)[-1]}={value}"


def varying_keys(runs: list[RunLog], exclude: tuple[str, ...] = ()) -> list[str]:
    """The config keys whose values differ across runs (ignored prefixes and `exclude` left out): the attention type
    and norm placement first, any other key after them in name order."""
    keys = sorted({k for r in runs for k in r.config if not k.startswith(IGNORED_KEY_PREFIXES) and k not in exclude})
    varying = [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]
    return [k for k in _FIRST_KEYS if k in varying] + [k for k in varying if k not in _FIRST_KEYS]


def label_runs(runs: list[RunLog]) -> None:
    """Label each run by the config keys whose values differ across runs; fall back on directory names."""
    varying = varying_keys(runs)
    # A cosine-only knob (scale, groups) shown on a regular-attention run would suggest it had an effect.
    cosine_only = {"model.scale", "model.groups"}
    for run in runs:
        parts = []
        for key in varying:
            if key in cosine_only and run.config.get("model.attn") == "regular" and "model.attn" in varying:
                continue
            parts.append(_describe(key, run.config.get(key)))
        run.label = " ".join(parts) or run.path.name
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:  # configs equal up to ignored keys: tell them apart by directory
            run.label = f"{run.label} ({run.path.name})"


# ----------------------------------------------------------------------------- table


# How each column prints: losses to 4 decimals, scores to fewer, rates and memory as whole numbers.
_FORMATS = {
    "FID": "{:.2f}",
    "fidelity": "{:.3f}",
    "fidelity ceiling": "{:.3f}",
    "distinct": "{:.3f}",
    "diversity": "{:.3f}",
    "params": "{:,.0f}",
    "tokens/s (median)": "{:,.0f}",
    "peak memory (MiB)": "{:,.0f}",
}


def _fmt(value, column: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) or column in _FORMATS:
        return _FORMATS.get(column, "{:.4f}").format(value)
    return str(value)


def _test_or_val(run: RunLog, name: str) -> float | None:
    """A text-to-image score: the final test-set value when the run reached it, else the last validation one."""
    test = run.final.get(f"test_{name}")
    return float(test) if _is_number(test) else run.last(f"val_{name}")


def _with_spread(run: RunLog, mean: str, spread: str, digits: str) -> str | None:
    """A text-to-image score logged with its spread, as "value ± spread" (test when the run reached it, else val)."""
    m, sd = _test_or_val(run, mean), _test_or_val(run, spread)
    if m is None:
        return None
    return f"{m:{digits}}" if sd is None else f"{m:{digits}} ± {sd:{digits}}"


# Text-to-image scores, each beside what bounds it: the real-vs-real floors of FID and KID (mean ± std over disjoint
# real subsets), the fidelity classifier's ceiling on real images, and two diversity measures (cosformer.t2i.metrics).
IMAGE_COLUMNS = (
    ("FID", lambda r: _test_or_val(r, "fid")),
    ("FID floor", lambda r: _with_spread(r, "fid_floor_mean", "fid_floor_std", ".2f")),
    ("KID", lambda r: _with_spread(r, "kid", "kid_std", ".3g")),
    ("KID floor", lambda r: _with_spread(r, "kid_floor_mean", "kid_floor_std", ".3g")),
    ("fidelity", lambda r: _test_or_val(r, "fidelity")),
    ("fidelity ceiling", lambda r: _test_or_val(r, "fidelity_ceiling")),
    ("distinct", lambda r: _test_or_val(r, "distinct")),
    ("diversity", lambda r: _test_or_val(r, "diversity")),
)


def _final_value(key: str):
    """A column getter: the final line's value of `key` as written (counts stay ints)."""
    return lambda run: run.final.get(key) if _is_number(run.final.get(key)) else None


def rank_column(header: list[str]) -> str | None:
    """The column that decides the best run: the first validation metric the table shows (lower is better)."""
    return next((name for name, key in _VAL_COLUMNS if name in header and key.startswith("val_")), None)


def best_run(runs: list[RunLog]) -> RunLog | None:
    """The finished run with the lowest finite value in `rank_column`, or None: a diverged or unfinished run, or a
    non-finite value (NaN compares false both ways, so it would otherwise win by coming first), is never best."""
    header, rows = result_rows(runs)
    column = rank_column(header)
    if column is None:
        return None
    index = header.index(column)
    scored = [(row[index], run) for run, row in zip(runs, rows) if run.status.startswith("finished")]
    scored = [(value, run) for value, run in scored if value is not None and math.isfinite(value)]
    return min(scored, key=lambda pair: pair[0])[1] if scored else None


def result_rows(runs: list[RunLog]) -> tuple[list[str], list[list]]:
    """Header and rows of the results table (raw values; `markdown_table` formats them)."""
    columns = [(name, (lambda r, k=key: r.last(k))) for name, key in _VAL_COLUMNS]
    columns += list(IMAGE_COLUMNS)
    columns += [("best step", _final_value("best_step")), ("params", _final_value("num_params"))]
    present = [(name, get) for name, get in columns if any(get(r) is not None for r in runs)]
    header = ["variant", "steps", *(name for name, _ in present), "tokens/s (median)", "peak memory (MiB)", "status"]
    rows = []
    for run in runs:
        rows.append(
            [
                run.label,
                run.steps,
                *(get(run) for _, get in present),
                run.median_tokens_per_s(),
                run.peak_memory_mib(),
                run.status,
            ]
        )
    return header, rows


def markdown_table(runs: list[RunLog]) -> str:
    """The results table; the best run's value in `rank_column` carries a star."""
    header, rows = result_rows(runs)
    best, column = best_run(runs), rank_column(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for run, row in zip(runs, rows):
        cells = [_fmt(v, c) + (" *" if run is best and c == column else "") for v, c in zip(row, header)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _val_key(runs: list[RunLog]) -> str | None:
    for key in ("val_bpc", "val_bits_per_pixel", "val_loss"):
        if any(_is_number(r.get(key)) for run in runs for r in run.evals):
            return key
    return None


def variant_colour(i: int, n: int):
    """The i-th of n distinct line colours: matplotlib's ten-colour cycle up to 10 variants, tab20 up to 20, beyond
    that n evenly spaced colours of a continuous map (a cycle would give two variants one colour)."""
    if n <= 10:
        return f"C{i}"
    from matplotlib import colormaps

    return colormaps["tab20"](i) if n <= 20 else colormaps["turbo"](i / (n - 1))


def plot_curves(runs: list[RunLog], path: str | os.PathLike, title: str = "") -> Path:
    """Train loss and the validation curve vs step, one colour per variant; × marks where a run diverged."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    val_key = _val_key(runs)
    fig = Figure(figsize=(12 if val_key else 6.5, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if val_key else 1, squeeze=False)[0]
    panels = [("loss", "train loss")] + ([(val_key, val_key.replace("_", " "))] if val_key else [])
    for ax, (key, name) in zip(axes, panels):
        records_of = (lambda r: r.train) if key == "loss" else (lambda r: r.evals)
        for i, run in enumerate(runs):
            points = [(r["step"], r[key]) for r in records_of(run) if _is_number(r.get(key)) and "step" in r]
            if not points:
                continue
            steps, values = zip(*points)
            color = variant_colour(i, len(runs))
            ax.plot(steps, values, color=color, label=run.label, marker="o" if len(points) < 20 else None, ms=3)
            if run.diverged_at is not None:
                ax.plot([steps[-1]], [values[-1]], "x", color=color, ms=9, mew=2)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _trim(image: np.ndarray) -> np.ndarray:
    """An imread PNG as float RGB on white, cropped to its content: the white margins it was saved with go."""
    if image.dtype.kind in "ui":
        image = image.astype(np.float32) / np.iinfo(image.dtype).max
    if image.ndim == 2:  # greyscale
        image = np.repeat(image[..., None], 3, axis=-1)
    rgb = image[..., :3]
    if image.shape[-1] == 4:  # onto white, as a page shows it
        rgb = rgb * image[..., 3:] + (1 - image[..., 3:])
    ink = (rgb < WHITE_BELOW).any(axis=-1)
    if not ink.any():
        return rgb
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def sample_grid(
    runs: list[RunLog], path: str | os.PathLike, title: str = "", columns: int | None = None
) -> Path | None:
    """Each run's last sample image, labelled with its variant; None when no run has samples. (The step is the
    grid's own title, as `cosformer.t2i.grid.save_grid` writes it.)

    The images are cropped to their content and placed at their own pixel size (never resampled, so the captions
    drawn in them stay as legible as they were), `columns` to a row: by default as many as fit in MAX_WIDTH_PX,
    the width a page shows without shrinking it, so that wide grids are stacked and small ones sit side by side.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.image import imread

    shown = [r for r in runs if r.samples]
    if not shown:
        return None
    panels = [_trim(imread(run.samples[-1])) for run in shown]
    labels = [run.label for run in shown]
    fig = Figure(dpi=SAMPLES_DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()
    font = FontProperties(size=PANEL_LABEL_PT, weight="bold")
    label_w = [renderer.get_text_width_height_descent(s, font, ismath=False)[0] for s in labels]
    col_w = math.ceil(max(*(p.shape[1] for p in panels), *label_w))
    if columns is None:
        columns = max(1, (MAX_WIDTH_PX - PANEL_GAP_PX) // (col_w + PANEL_GAP_PX))
    columns = min(columns, len(shown))
    rows = -(-len(shown) // columns)
    label_h = math.ceil(1.6 * PANEL_LABEL_PT * SAMPLES_DPI / 72)
    row_h = [label_h + max(p.shape[0] for p in panels[r * columns : (r + 1) * columns]) for r in range(rows)]
    title_h = math.ceil(1.6 * TITLE_PT * SAMPLES_DPI / 72) if title else 0
    fig_w = columns * col_w + (columns + 1) * PANEL_GAP_PX
    fig_h = title_h + sum(row_h) + (rows + 1) * PANEL_GAP_PX
    fig.set_size_inches(fig_w / SAMPLES_DPI, fig_h / SAMPLES_DPI)
    for k, (panel, label) in enumerate(zip(panels, labels)):
        r, c = divmod(k, columns)
        top = fig_h - title_h - (r + 1) * PANEL_GAP_PX - sum(row_h[:r])  # pixels from the bottom edge
        h, w = panel.shape[:2]
        left = PANEL_GAP_PX + c * (col_w + PANEL_GAP_PX) + (col_w - w) // 2
        ax = fig.add_axes((left / fig_w, (top - label_h - h) / fig_h, w / fig_w, h / fig_h))
        ax.imshow(panel, interpolation="nearest")
        ax.set_axis_off()
        x, y = (left + w / 2) / fig_w, (top - label_h / 2) / fig_h
        fig.text(x, y, label, fontproperties=font, ha="center", va="center")
    if title:
        y = 1 - (PANEL_GAP_PX / 2 + title_h / 2) / fig_h
        fig.text(0.5, y, title, fontsize=TITLE_PT, ha="center", va="center")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=SAMPLES_DPI)
    return path


# ----------------------------------------------------------------------------- the report


def shared_settings(runs: list[RunLog]) -> dict:
    """Config values every run has in common (the controlled variables of the comparison)."""
    if not runs:
        return {}
    common = dict(runs[0].config)
    for run in runs[1:]:
        common = {k: v for k, v in common.items() if k in run.config and run.config[k] == v}
    return {k: v for k, v in sorted(common.items()) if not k.startswith(IGNORED_KEY_PREFIXES)}


def write_seed_summary(runs: list[RunLog], out: Path, title: str) -> dict:
    """When variants have several seeds: `<out>/seeds.png` and a mean ± std table (cosformer.tools.seeds)."""
    from cosformer.tools import seeds

    if not seeds.has_seeds(runs):
        return {"lines": [], "raw": {}}
    groups = seeds.group_by_variant(runs)
    key = seeds.metric_key(runs)
    figure = seeds.plot_seed_bands(groups, key, out / "seeds.png", title=title)
    header, rows, raw = seeds.summary_rows(groups, key)
    reference = next(iter(groups))
    compare = seeds.comparison_rows(raw, reference)
    lines = ["## Over seeds", "", f"![mean over seeds]({figure.name})", "", seeds.markdown(header, rows), ""]
    lines += [seeds.TABLE_NOTE, ""]
    columns = ["variant", "against", "difference", "std. error", "t", "p"]
    if compare:
        lines += [f"Best val against {reference} (Welch's t; with 2–3 seeds a p-value is a coarse guide):", ""]
        lines += [seeds.markdown(columns, compare), ""]
    for key, what in (("fid", "FID (lower is better)"), ("fidelity", "Caption fidelity (higher is better)")):
        rows = seeds.comparison_rows(raw, reference, what=key) if key in raw[reference] else []
        if rows:
            lines += [f"{what} against {reference} (Welch's t):", "", seeds.markdown(columns, rows), ""]
    return {"lines": lines, "raw": raw}


def write_report(
    paths: list[str | os.PathLike], out: str | os.PathLike, title: str | None = None, notes: str | None = None
) -> dict:
    """Write `<out>/curves.png`, `<out>/results.md`, `<out>/results.json` and, when runs saved image
    samples, `<out>/samples.png`; for a learning rate × depth grid, `<out>/stability_<attn>.png` (see
    `cosformer.tools.stability`). Returns {"runs", "curves", "table", "markdown", "json", "samples"}."""
    out = Path(out)
    runs = find_runs(paths)
    title = title or out.name
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(runs, out / "curves.png", title=title)
    samples = sample_grid(runs, out / "samples.png", title=title)
    table = markdown_table(runs)
    shared = shared_settings(runs)
    header, rows = result_rows(runs)
    best, column = best_run(runs), rank_column(header)
    lines = [f"# {title}", ""] + ([notes.strip(), ""] if notes else [])
    seed_summary = write_seed_summary(runs, out, title)
    lines += seed_summary["lines"]
    lines += ["## Runs", "", f"![training curves]({curves.name})", "", table, ""]
    if best is not None:
        lines += [f"\\* best finished run by {column} (a diverged or unfinished run is never marked).", ""]
    if samples is not None:
        lines += ["Last samples of each run:", "", f"![samples]({samples.name})", ""]
    lines += write_stability_maps(runs, out, title)[0]  # nothing unless the runs vary learning rate and depth
    lines += [
        "Steps are the last step each run logged; tokens/s is the median over logged intervals; "
        "results come from a run's final line when it has one, else its last evaluation.",
        "",
        "<details><summary>Settings shared by all runs</summary>",
        "",
        *(f"- `{k}`: `{v}`" for k, v in shared.items()),
        "",
        "</details>",
        "",
    ]
    markdown = out / "results.md"
    markdown.write_text("\n".join(lines))
    records = [dict(zip(header, row), best=run is best, run_dir=str(run.path)) for run, row in zip(runs, rows)]
    if seed_summary["raw"]:
        records = {"runs": records, "seeds": seed_summary["raw"]}
    json_path = out / "results.json"
    json_path.write_text(json.dumps(records, indent=2) + "\n")
    return {"runs": runs, "curves": curves, "table": table, "markdown": markdown, "json": json_path, "samples": samples}


# ---------------------------------------------------------------------------------------------------------------
# command line (scripts/report.py)

_USAGE = """Turn runs' local logs into a results page: curves per variant, a markdown table, a sample grid (images).

    python scripts/report.py runs/sweeps/lm_main --out docs/results/lm_main
    python scripts/report.py runs/a runs/b --out docs/results/a_vs_b --title "cosine vs regular"

Each OUT_DIR is a run directory (metrics.jsonl + config.yaml) or any folder above some, such as a sweep root.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="run directories or sweep roots")
    parser.add_argument("--out", default=None, help="report folder (default docs/results/<name of the first OUT_DIR>)")
    parser.add_argument("--title", default=None, help="title of the page and figures (default: the folder's name)")
    parser.add_argument("--notes", default=None, help="a markdown file placed under the title (the conclusions)")
    args = parser.parse_args(argv)

    out = Path(args.out) if args.out else Path("docs/results") / Path(args.out_dirs[0]).resolve().name
    try:
        notes = Path(args.notes).read_text() if args.notes else None
        report = write_report(args.out_dirs, out, title=args.title, notes=notes)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(report["table"])
    written = [report[k] for k in ("markdown", "curves", "json", "samples") if report[k] is not None]
    print(f"\n{len(report['runs'])} run(s); wrote " + ", ".join(str(p) for p in written))
    return 0
