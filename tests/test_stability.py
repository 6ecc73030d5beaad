"""The stability map (cosformer.tools.stability) on generated run folders: the divergence rule, the grid, the
markdown table, and the colour of every drawn cell against the colour map applied here to the logged value."""

import json
import math
import random

import numpy as np
import pytest
import yaml
from matplotlib import colormaps
from matplotlib.colors import to_rgb

from cosformer.tools.report import find_runs, write_report
from cosformer.tools.stability import (
    DIVERGED_COLOUR,
    MISSING_COLOUR,
    VALUE_CMAP,
    diverged_reason,
    draw_stability_map,
    stability_grids,
    stability_table,
)

LN256 = math.log(256)
LRS, DEPTHS, PRECISIONS, NORMS, ATTNS = (
    (1e-3, 1e-2, 3e-2),
    (2, 4),
    ("bf16", "fp16"),
    (False, True),
    ("cosine", "regular"),
)


def write_run(path, *, attn, precision, pre_norm, depth, lr, train_loss=2.0, val_loss=1.5, diverge_at=None, final=True,
              data="pystdlib", max_logit=5.0):  # fmt: skip
    """A run folder as the trainer leaves it (config.yaml + metrics.jsonl), steps 10..40."""
    path.mkdir(parents=True)
    config = {
        "model": {"attn": attn, "pre_norm": pre_norm, "depth": depth, "dim": 32},
        "data": {"name": data},
        "train": {"lr": lr, "mixed_precision": precision, "max_steps": 40, "out_dir": str(path), "seed": 0},
        "t2i": {"palette": 8},
        "log": {"tracker": "none", "name": path.name},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step in (10, 20, 30, 40):
        if diverge_at is not None and step >= diverge_at:
            lines.append({"step": step, "diverged": True})
            break
        loss = train_loss if step == 40 else 3.0
        lines.append({"step": step, "loss": loss, "lr": lr, "tokens_per_s": 1e4, "memory_mib": 100.0})
        bpc = None if val_loss is None else val_loss / math.log(2)
        stats = {"attn_max_logit": max_logit if step == 40 else 1.0, "attn_entropy": 1.0}
        lines.append({"step": step, "val_loss": val_loss, "val_bpc": bpc, **stats})
    if final and diverge_at is None:
        lines.append({"step": 40, "final": True, "val_loss": val_loss, "val_bpc": bpc, "num_params": 1000})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


# cell -> (what the run logs, expected status); every other cell: a normal run with a fresh value
SPECIAL = {
    ("cosine", "fp16", False, 4, 3e-2): ({"diverge_at": 20}, "diverged"),  # non-finite loss: the trainer's line
    ("regular", "bf16", True, 2, 3e-2): ({"val_loss": None}, "diverged"),  # a NaN final validation loss
    ("regular", "fp16", False, 4, 1e-2): ({"train_loss": 6.0, "val_loss": 6.0}, "diverged"),  # stuck above ln 256
    ("cosine", "bf16", False, 2, 3e-2): ({"train_loss": LN256 + 0.01}, "diverged"),  # just above: train loss alone
    ("regular", "bf16", False, 4, 3e-2): ({"train_loss": LN256 - 0.01, "val_loss": LN256 - 0.01}, "ok"),  # below
    ("cosine", "bf16", True, 2, 1e-3): ({"final": False}, "missing"),  # cut short: no result yet
}


@pytest.fixture
def sweep(tmp_path, seed):
    """A full grid of run folders; returns (root, {cell: (status, value in bits or None)})."""
    rng = random.Random(seed)
    root, expected = tmp_path / "stability", {}
    for attn in ATTNS:
        for precision in PRECISIONS:
            for pre_norm in NORMS:
                for depth in DEPTHS:
                    for lr in LRS:
                        cell = (attn, precision, pre_norm, depth, lr)
                        logged, status = SPECIAL.get(cell, ({"val_loss": rng.uniform(1.0, 3.0)}, "ok"))
                        name = f"attn={attn},mixed_precision={precision},pre_norm={pre_norm},depth={depth},lr={lr:g}"
                        write_run(root / name, attn=attn, precision=precision, pre_norm=pre_norm, depth=depth, lr=lr,
                                  **logged)  # fmt: skip
                        value = logged.get("val_loss", 1.5) / math.log(2) if status == "ok" else None
                        expected[cell] = (status, value)
    return root, expected


def test_divergence_rule(tmp_path):
    base = dict(attn="cosine", precision="fp16", pre_norm=False, depth=2, lr=1e-3)
    cases = {
        "fine": ({}, None),
        "nonfinite": ({"diverge_at": 30}, "non-finite loss at step 30"),
        "stuck": ({"train_loss": 6.0}, "final train loss 6 ≥ ln 256"),
        "val_nan": ({"val_loss": None}, "final val loss nan ≥ ln 256"),
        "val_high": ({"val_loss": 5.6}, "final val loss 5.6 ≥ ln 256"),
        "unfinished": ({"final": False, "train_loss": 9.0}, None),  # no result yet, whatever it logged
        "t2i_fine": ({"data": "shapes", "train_loss": 2.0, "val_loss": 2.0}, None),  # ln 8 ≈ 2.08
        "t2i_high": ({"data": "shapes", "train_loss": 2.1, "val_loss": 2.0}, "final train loss 2.1 ≥ ln 8"),
        "scenes_high": ({"data": "scenes", "train_loss": 2.1, "val_loss": 2.0}, "final train loss 2.1 ≥ ln 8"),
    }
    for name, (logged, _) in cases.items():
        write_run(tmp_path / name, **base, **logged)
    runs = {r.path.name: r for r in find_runs([tmp_path])}
    assert {name: diverged_reason(runs[name]) for name in cases} == {name: why for name, (_, why) in cases.items()}


def cell_colour(fig, ax, row, col):
    """The RGB drawn near the lower-left corner of cell (row, col): inside the cell, away from its text."""
    x, y = ax.transData.transform((col - 0.35, row - 0.35))
    image = np.asarray(fig.canvas.buffer_rgba())
    return image[image.shape[0] - 1 - int(round(y)), int(round(x)), :3] / 255.0


def test_grid_table_and_cell_colours(sweep):
    root, expected = sweep
    runs = find_runs([root])
    grids = stability_grids(runs)
    assert [g.attn for g in grids] == list(ATTNS)
    values = [v for status, v in expected.values() if status == "ok"]
    vmin, vmax = min(values), max(values)
    cmap = colormaps[VALUE_CMAP]
    for grid in grids:
        assert grid.lrs == list(LRS) and grid.depths == list(DEPTHS) and grid.key == "val_bpc"
        assert [(p.precision, p.pre_norm) for p in grid.panels] == [(p, n) for p in PRECISIONS for n in NORMS]
        fig = draw_stability_map(grid, vmin, vmax)
        fig.canvas.draw()
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        rows = stability_table(grid).splitlines()[2:]
        for p, (panel, ax) in enumerate(zip(grid.panels, axes)):
            assert ax.get_title() == f"{panel.precision}, {'pre-LN' if panel.pre_norm else 'post-LN'}"
            for r, depth in enumerate(grid.depths):
                cells = [c.strip() for c in rows[p * len(DEPTHS) + r].strip("|").split("|")]
                assert cells[:3] == [panel.precision, "pre-LN" if panel.pre_norm else "post-LN", str(depth)]
                for c, lr in enumerate(grid.lrs):
                    status, value = expected[(grid.attn, panel.precision, panel.pre_norm, depth, lr)]
                    assert panel.status[r, c] == status, (grid.attn, panel.title, depth, lr)
                    drawn = cell_colour(fig, ax, r, c)
                    if status == "ok":
                        assert panel.values[r, c] == pytest.approx(value)
                        assert cells[3 + c] == f"{value:.3f}"
                        want = cmap((value - vmin) / (vmax - vmin))[:3]
                    elif status == "diverged":
                        assert math.isnan(panel.values[r, c]) and cells[3 + c].startswith("diverged (")
                        want = to_rgb(DIVERGED_COLOUR)
                    else:
                        assert cells[3 + c] == "–"
                        want = to_rgb(MISSING_COLOUR)
                    assert drawn == pytest.approx(want, abs=0.02), (grid.attn, panel.title, depth, lr, status)


def test_report_writes_a_map_per_attention_kind(sweep, tmp_path):
    root, _ = sweep
    write_report([root], tmp_path / "out", title="stability")
    markdown = (tmp_path / "out" / "results.md").read_text()
    for attn in ATTNS:
        assert (tmp_path / "out" / f"stability_{attn}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"![stability map, {attn}](stability_{attn}.png)" in markdown
    assert "diverged (non-finite loss at step 20)" in markdown and "diverged (final train loss 6 ≥ ln 256)" in markdown


def test_other_sweeps_get_no_map_and_a_shared_cell_is_an_error(tmp_path):
    for lr in (1e-3, 1e-2):  # learning rate varies, depth does not: not a stability grid
        write_run(tmp_path / "lr" / f"{lr:g}", attn="cosine", precision="bf16", pre_norm=False, depth=2, lr=lr)
    write_report([tmp_path / "lr"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("stability_*.png"))
    assert "Stability map" not in (tmp_path / "out" / "results.md").read_text()
    for name, depth in (("a", 2), ("b", 2), ("c", 4)):  # a and b differ only in something the map does not show
        write_run(tmp_path / "dup" / name, attn="cosine", precision="bf16", pre_norm=False, depth=depth, lr=1e-3)
    write_run(tmp_path / "dup" / "d", attn="cosine", precision="bf16", pre_norm=False, depth=2, lr=1e-2)
    with pytest.raises(ValueError, match="fall in one cell.*depth 2, lr 0.001"):
        stability_grids(find_runs([tmp_path / "dup"]))


def test_statistic_tables_show_each_runs_last_evaluation(tmp_path):
    """The max-logit table holds every run's value at its last evaluation (not an earlier one, not another run's),
    placed in its own cell; a diverged run reads as on the map."""
    rng = random.Random(0)
    expected = {}
    for attn in ATTNS:
        for depth in DEPTHS:
            for lr in LRS:
                diverged = (attn, depth, lr) == ("regular", 4, 3e-2)
                value = round(rng.uniform(2.0, 90.0), 1)
                if (attn, depth, lr) == ("regular", 2, 1e-2):
                    value = None  # overflowed (the tracker logs a non-finite value as null)
                name = f"attn={attn},depth={depth},lr={lr:g}"
                write_run(tmp_path / "s" / name, attn=attn, precision="bf16", pre_norm=False, depth=depth, lr=lr,
                          max_logit=value, diverge_at=30 if diverged else None)  # fmt: skip
                expected[(attn, depth, lr)] = "diverged" if diverged else value
    write_report([tmp_path / "s"], tmp_path / "out", title="stability")
    markdown = (tmp_path / "out" / "results.md").read_text()
    section = markdown[markdown.index("### attn max logit") :]
    for attn in ATTNS:
        table = section[section.index(f"{attn} attention:") :].split("\n\n")[1].splitlines()[2:]
        for r, depth in enumerate(DEPTHS):
            cells = [c.strip() for c in table[r].strip("|").split("|")]
            assert cells[:3] == ["bf16", "post-LN", str(depth)]
            for c, lr in enumerate(LRS):
                want = expected[(attn, depth, lr)]
                if want == "diverged":
                    assert cells[3 + c].startswith("diverged (")
                elif want is None:
                    assert cells[3 + c] == "non-finite"
                else:
                    assert cells[3 + c] == format(want, ".3g"), (attn, depth, lr)
