"""Seed statistics for a report: runs that differ only in `train.seed` are one variant, summarised as mean ± std.

For each variant (runs grouped by every config key that varies except the seed):
- best val: the trainer's `best_val_*` from the final line when the run has one, else the lowest logged evaluation;
- final val: the last evaluation's value (the trainer's fixed `train.eval_batches` validation batches), and the
  full-split val / test values from the final line where the run reached it;
- the train–val gap at every evaluation: val loss minus the mean training loss logged since the previous
  evaluation. Training losses are measured with dropout on and over moving batches, so the gap understates
  over-fitting when dropout is large; it is comparable across variants trained with the same recipe.
Differences between two variants come with Welch's t statistic, its degrees of freedom and a two-sided p-value:
with 2–3 seeds a p-value is a coarse guide, and the text says so.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from cosformer.tools.report import RunLog, _describe, _is_number, _test_or_val, variant_colour, varying_keys

SEED_KEY = "train.seed"
TABLE_NOTE = (
    "Mean ± standard deviation over seeds. Best val: the lowest evaluation of each run (the trainer's record when "
    "the run finished); final val: its last evaluation, on the same fixed validation batches; val − train: the "
    "last evaluation's val loss minus its loss on fixed training items in eval mode, or, for runs that did not log "
    "that, minus the mean training loss logged since the evaluation before it (training losses carry dropout, so "
    "that understates over-fitting; it still compares variants trained alike)."
)


def group_by_variant(runs: list[RunLog]) -> dict[str, list[RunLog]]:
    """Runs keyed by a label of the config values that vary across runs, the seed excepted (order of appearance)."""
    varying = varying_keys(runs, exclude=(SEED_KEY,))
    groups: dict[str, list[RunLog]] = {}
    for run in runs:
        label = " ".join(_describe(k, run.config.get(k)) for k in varying) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups


def metric_key(runs: list[RunLog]) -> str:
    for key in ("val_bpc", "val_bits_per_pixel", "val_loss"):
        if any(_is_number(r.get(key)) for run in runs for r in run.evals):
            return key
    raise ValueError("no validation metric (val_bpc, val_bits_per_pixel or val_loss) in these runs")


def eval_curve(run: RunLog, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], float(r[key])) for r in run.evals if _is_number(r.get(key)) and "step" in r]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps), np.asarray(values)


def best_value(run: RunLog, key: str) -> tuple[float | None, int | None]:
    """(value, step) of the run's best evaluation: the trainer's record when it finished, else the lowest logged."""
    best = run.final.get(f"best_{key}")
    if _is_number(best):
        return float(best), run.final.get("best_step")
    steps, values = eval_curve(run, key)
    finite = np.isfinite(values)
    if not finite.any():
        return None, None
    i = int(np.argmin(np.where(finite, values, np.inf)))
    return float(values[i]), int(steps[i])


def gap_curve(run: RunLog, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, val − train) in the units of `key`. The train loss is the evaluation's own (`train_loss`: fixed
    training items in eval mode) when the run logged it, else the training loss averaged over the steps since the
    evaluation before (dropout on, moving batches)."""
    to_units = float(run.evals[0][key]) / float(run.evals[0]["val_loss"]) if run.evals and key != "val_loss" else 1.0
    train = [(r["step"], float(r["loss"])) for r in run.train if _is_number(r.get("loss"))]
    out, previous = [], 0
    for record in run.evals:
        if not (_is_number(record.get("val_loss")) and "step" in record):
            continue
        window = [loss for step, loss in train if previous < step <= record["step"]]
        previous = record["step"]
        if _is_number(record.get("train_loss")):
            out.append((record["step"], (float(record["val_loss"]) - float(record["train_loss"])) * to_units))
        elif window:
            out.append((record["step"], (float(record["val_loss"]) - statistics.fmean(window)) * to_units))
    steps, values = zip(*out) if out else ((), ())
    return np.asarray(steps), np.asarray(values)


def mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan), len(values)


def fmt(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _t_sf_two_sided(t: float, df: float) -> float:
    """P(|T| > |t|) for Student's t with `df` degrees of freedom (Simpson's rule on the density; ample here)."""
    t = abs(t)
    if not math.isfinite(t):
        return 0.0
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = np.linspace(0.0, t, 4001)
    pdf = np.exp(c - (df + 1) / 2 * np.log1p(x * x / df))
    h = t / 4000
    area = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return float(max(0.0, 1.0 - 2.0 * area))


def welch(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """(mean(a) − mean(b), its standard error, Welch's t, two-sided p); NaNs where either side has < 2 values."""
    (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
    if na < 2 or nb < 2:
        return ma - mb, math.nan, math.nan, math.nan
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, 0.0, math.inf, 0.0
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    t = (ma - mb) / se
    return ma - mb, se, t, _t_sf_two_sided(t, df)


# text-to-image scores averaged over seeds (the test value when a run reached it, else its last validation one), with
# what bounds each: the real-vs-real floors and the fidelity classifier's ceiling on real images
IMAGE_SCORES = (
    ("FID", "fid"),
    ("FID floor", "fid_floor_mean"),
    ("KID", "kid"),
    ("KID floor", "kid_floor_mean"),
    ("fidelity", "fidelity"),
    ("fidelity ceiling", "fidelity_ceiling"),
    ("diversity", "diversity"),
)
IMAGE_DIGITS = {"fid": 2, "fid_floor_mean": 2, "kid": 4, "kid_floor_mean": 4}


def summary_rows(groups: dict[str, list[RunLog]], key: str) -> tuple[list[str], list[list[str]], dict]:
    """The seed table: one row per variant. Also returns the raw per-seed values behind it (for JSON and tests)."""
    unit = key.removeprefix("val_")
    header = ["variant", "seeds", f"best val {unit}", "best step", f"final val {unit}", "val − train at the end"]
    full = any(_is_number(r.final.get(f"test_{unit}")) for runs in groups.values() for r in runs)
    if full:
        header += [f"full-split val {unit}", f"test {unit}"]
    every_run = [r for runs in groups.values() for r in runs]
    image = [(name, key) for name, key in IMAGE_SCORES if any(_test_or_val(r, key) is not None for r in every_run)]
    header += [name for name, _ in image]
    header.append("status")
    rows, raw = [], {}
    for name, runs in groups.items():
        best = [best_value(r, key) for r in runs]
        finals = [eval_curve(r, key)[1] for r in runs]
        gaps = [gap_curve(r, key)[1] for r in runs]
        values = {
            "seeds": [r.config.get(SEED_KEY) for r in runs],
            "best": [b for b, _ in best],
            "best_step": [s for _, s in best],
            "final": [float(v[-1]) if len(v) else None for v in finals],
            "gap": [float(v[-1]) if len(v) else None for v in gaps],
            "full_val": [r.final.get(key) if r.final else None for r in runs],
            "test": [r.final.get(f"test_{unit}") for r in runs],
            "status": [r.status for r in runs],
            **{key: [_test_or_val(r, key) for r in runs] for _, key in image},
        }
        raw[name] = values
        steps = [s for s in values["best_step"] if s is not None]
        statuses = sorted(set(values["status"]))
        row = [
            name,
            str(len(runs)),
            fmt(*mean_std(values["best"])[:2]),
            f"{statistics.fmean(steps):.0f}" if steps else "–",
            fmt(*mean_std(values["final"])[:2]),
            fmt(*mean_std(values["gap"])[:2], digits=3),
        ]
        if full:
            row += [fmt(*mean_std(values["full_val"])[:2]), fmt(*mean_std(values["test"])[:2])]
        row += [fmt(*mean_std(values[key])[:2], digits=IMAGE_DIGITS.get(key, 3)) for _, key in image]
        row.append(", ".join(f"{values['status'].count(s)} {s}" for s in statuses))
        rows.append(row)
    return header, rows, raw


def comparison_rows(raw: dict, reference: str, what: str = "best") -> list[list[str]]:
    """Each variant against `reference`: difference of means, its standard error, Welch's t and p."""
    rows = []
    for name, values in raw.items():
        if name == reference:
            continue
        diff, se, t, p = welch(values[what], raw[reference][what])
        rows.append([name, reference, f"{diff:+.4f}", f"{se:.4f}" if math.isfinite(se) else "–",
                     f"{t:+.2f}" if math.isfinite(t) else "–", f"{p:.3f}" if math.isfinite(p) else "–"])  # fmt: skip
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_seed_bands(groups: dict[str, list[RunLog]], key: str, path: str | Path, title: str = "") -> Path:
    """Validation curve and train–val gap per variant: the mean over seeds, and a band from the lowest to the highest
    seed at each evaluation (evaluations every run logged)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax_val, ax_zoom, ax_gap = fig.subplots(1, 3)
    lows = []
    for i, (name, runs) in enumerate(groups.items()):
        color = variant_colour(i, len(groups))
        for ax, curve in ((ax_val, eval_curve), (ax_zoom, eval_curve), (ax_gap, gap_curve)):
            curves = [dict(zip(*(a.tolist() for a in curve(r, key)))) for r in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            values = np.array([[c[s] for s in steps] for c in curves])
            mean = values.mean(axis=0)
            ax.plot(steps, mean, color=color, label=f"{name} (n={len(runs)})")
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, lw=0)
            if ax is ax_zoom:
                lows.append((values.min(), mean.min()))
    unit = key.removeprefix("val_")
    ax_val.set_ylabel(f"val {unit}")
    ax_zoom.set_ylabel(f"val {unit} (near the minimum)")
    if lows:
        # from the lowest seed to every variant's best mean (at least 8% above the lowest), with a margin
        low = min(lo for lo, _ in lows)
        high = max(max(best for _, best in lows), low + 0.08 * abs(low))
        pad = 0.05 * (high - low)
        ax_zoom.set_ylim(low - pad, high + pad)
    ax_gap.set_ylabel(f"val − train ({unit})")
    ax_gap.axhline(0, color="0.5", lw=0.8)
    for ax in (ax_val, ax_zoom, ax_gap):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    if title:
        fig.suptitle(f"{title}: mean over seeds, band = lowest to highest seed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def has_seeds(runs: list[RunLog]) -> bool:
    """True when some variant has more than one seed: then a seed summary says more than the per-run table."""
    return any(len(v) > 1 for v in group_by_variant(runs).values()) and any(SEED_KEY in r.config for r in runs)
