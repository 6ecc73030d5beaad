"""Results report on generated run directories: labels from config differences, the table's values against
values computed here from the same generated logs, the curves PNG, and the text-to-image sample grid."""

import json
import random
import runpy
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread, imsave

from cosformer.tools.report import (
    MAX_WIDTH_PX,
    PANEL_GAP_PX,
    find_runs,
    label_runs,
    load_metrics,
    load_run,
    markdown_table,
    result_rows,
    sample_grid,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def base_config(**changes):
    config = {
        "model": {"dim": 64, "depth": 2, "heads": 2, "attn": "cosine", "pre_norm": False, "scale": 10.0, "groups": 1},
        "data": {"name": "pystdlib", "seq_len": 64},
        "train": {"max_steps": 40, "out_dir": "x", "seed": 0},
        "log": {"tracker": "none", "group": "g", "name": "n"},
    }
    for key, value in changes.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


def fake_run(path, config, steps=40, rng=None, t2i=False, diverge_at=None, final=True, samples=(), prefix="samples"):
    """A run directory as the trainer leaves it; returns the logged values the report should summarise."""
    rng = rng or random.Random(0)
    path.mkdir(parents=True)
    config = json.loads(json.dumps(config))
    config["train"]["out_dir"] = str(path)
    config["log"]["name"] = path.name
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines, logged = [], {"tokens_per_s": [], "memory_mib": [], "val": []}
    val_key = "val_bits_per_pixel" if t2i else "val_bpc"
    for step in range(5, steps + 1, 5):
        if diverge_at is not None and step >= diverge_at:
            lines.append({"step": step, "diverged": True})
            break
        tps, mem = rng.uniform(1e3, 5e4), rng.uniform(100, 900)
        logged["tokens_per_s"].append(tps)
        logged["memory_mib"].append(mem)
        lines.append({"step": step, "loss": 4.0 - step / 20 + rng.random() * 0.1, "lr": 1e-3, "tokens_per_s": tps,
                      "memory_mib": mem})  # fmt: skip
        if step % 10 == 0:
            val = rng.uniform(1.0, 3.0)
            logged["val"].append(val)
            record = {"step": step, "val_loss": val * 0.69, val_key: val}
            if t2i:
                record.update(val_fid=rng.uniform(10, 100), val_fidelity=rng.uniform(0, 1))
                logged["fid"], logged["fidelity"] = record["val_fid"], record["val_fidelity"]
            lines.append(record)
    if final and diverge_at is None:
        end = {"step": steps, "final": True, "num_params": rng.randint(1000, 10**7)}
        if t2i:
            end.update({f"test_{k}": rng.uniform(10, 100) for k in ("fid", "fid_floor_mean", "fid_floor_std")})
            end.update({f"test_{k}": rng.uniform(0, 1) for k in ("kid", "kid_std", "fidelity_ceiling", "diversity")})
        else:
            end["test_bpc"] = rng.uniform(1.0, 3.0)
        logged["final"] = end
        lines.append(end)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for step, color in samples:
        image = np.zeros((12, 20, 3), dtype=np.float32)
        image[..., color] = 1.0
        (path / prefix).parent.mkdir(parents=True, exist_ok=True)
        imsave(path / f"{prefix}_step_{step:06d}.png", image)
    return logged


def num(cell):
    """A table cell as a number (the best run's value carries a star)."""
    return float(cell.removesuffix(" *").replace(",", ""))


def table_rows(table):
    """Markdown table → list of {header: cell}."""
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_attention_norm_grid_report(tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "sweep"
    variants = {
        "a": ({"model.attn": "cosine", "model.pre_norm": False}, None),
        "b": ({"model.attn": "cosine", "model.pre_norm": True}, None),
        "c": ({"model.attn": "regular", "model.pre_norm": False}, 25),
        "d": ({"model.attn": "regular", "model.pre_norm": True}, None),
    }
    logged = {}
    for name, (changes, diverge) in variants.items():
        # nesting one level deeper checks the recursive search of a sweep root
        logged[name] = fake_run(root / "group" / name, base_config(**changes), rng=rng, diverge_at=diverge)
    report = write_report([root], tmp_path / "out", title="attention × norm")

    assert [r.label for r in report["runs"]] == ["cosine post-LN", "cosine pre-LN", "regular post-LN", "regular pre-LN"]
    rows = {row["variant"]: row for row in table_rows(report["table"])}
    assert list(rows) == [r.label for r in report["runs"]]
    for name, label in zip(variants, rows):
        row, values = rows[label], logged[name]
        assert num(row["val bpc"]) == pytest.approx(values["val"][-1], rel=1e-3)
        assert float(row["tokens/s (median)"].replace(",", "")) == pytest.approx(
            statistics.median(values["tokens_per_s"]), abs=0.51
        )
        assert float(row["peak memory (MiB)"]) == pytest.approx(max(values["memory_mib"]), rel=1e-3)
    assert rows["regular post-LN"]["status"] == "diverged (step 25)" and rows["regular post-LN"]["steps"] == "25"
    assert rows["regular post-LN"]["test bpc"] == rows["regular post-LN"]["params"] == "–"
    assert rows["cosine post-LN"]["params"] == f"{logged['a']['final']['num_params']:,}"
    assert float(rows["cosine pre-LN"]["test bpc"]) == pytest.approx(logged["b"]["final"]["test_bpc"], rel=1e-3)
    assert {rows[k]["status"] for k in rows if k != "regular post-LN"} == {"finished"}
    assert "FID" not in rows["cosine pre-LN"] and "val bits/pixel" not in rows["cosine pre-LN"]

    assert report["curves"].read_bytes()[:8] == PNG_MAGIC
    height, width = imread(report["curves"]).shape[:2]
    assert width > height > 200
    assert report["samples"] is None and not (tmp_path / "out" / "samples.png").exists()
    markdown = report["markdown"].read_text()
    assert markdown.startswith("# attention × norm") and "(curves.png)" in markdown and report["table"] in markdown
    assert "`data.seq_len`: `64`" in markdown and "train.out_dir" not in markdown
    records = json.loads(report["json"].read_text())
    assert [r["variant"] for r in records] == list(rows) and records[2]["status"] == "diverged (step 25)"
    # the best finished run is marked in the table and in the JSON, a diverged one never
    finished = {label: logged[name]["val"][-1] for name, label in zip(variants, rows) if label != "regular post-LN"}
    best = min(finished, key=finished.get)
    assert [label for label, row in rows.items() if row["val bpc"].endswith(" *")] == [best]
    assert [r["variant"] for r in records if r["best"]] == [best]
    assert "\\* best finished run by val bpc" in markdown


def test_labels_follow_config_differences(tmp_path):
    runs = []
    for i, changes in enumerate(
        [{"model.scale": 5.0}, {"model.scale": 20.0}, {"model.attn": "regular", "model.scale": 5.0}]
    ):
        fake_run(tmp_path / f"r{i}", base_config(**changes))
        runs.append(load_run(tmp_path / f"r{i}"))
    label_runs(runs)
    # scale means nothing to regular attention, so its label leaves it out
    assert [r.label for r in runs] == ["cosine scale=5.0", "cosine scale=20.0", "regular"]

    label_runs(runs[:2])
    assert [r.label for r in runs[:2]] == ["scale=5.0", "scale=20.0"]

    # a run recorded before a key existed ran with its default then: no difference (here data.pack, and
    # train.compile, whose default has changed since), and an unset scale is the zoo's default 10
    old, new = base_config(), base_config(**{"model.scale": 16.0})
    new["data"] |= {"pack": False}
    new["train"] |= {"compile": False}
    old["model"]["scale"] = None
    fake_run(tmp_path / "old", old)
    fake_run(tmp_path / "new", new)
    ages = [load_run(tmp_path / "old"), load_run(tmp_path / "new")]
    label_runs(ages)
    assert [r.label for r in ages] == ["scale=10", "scale=16.0"]

    # equal configs (out_dir and log.* differ by construction) fall back on directory names
    for name in ("x1", "x2"):
        fake_run(tmp_path / "same" / name, base_config())
    assert [r.label for r in find_runs([tmp_path / "same"])] == ["x1", "x2"]
    assert [r.label for r in find_runs([tmp_path / "same" / "x1"])] == ["x1"]


def test_text_to_image_report_with_sample_grid(tmp_path, seed):
    rng = random.Random(seed)
    logged = {}
    # the second run keeps its images where the tracker files media: samples/<key>_step_XXXXXX.png
    for name, attn, samples, prefix in (
        ("cos", "cosine", [(10, 0), (200, 1), (30, 2)], "samples"),
        ("reg", "regular", [(40, 2)], "samples/image"),
    ):
        config = base_config(**{"model.attn": attn, "data.name": "shapes"})
        logged[name] = fake_run(tmp_path / name, config, rng=rng, t2i=True, samples=samples, prefix=prefix)
    config = base_config(**{"model.attn": "cosine", "model.groups": 4, "data.name": "shapes"})
    fake_run(tmp_path / "nosamples", config, rng=rng, t2i=True)

    runs = find_runs([tmp_path / "cos", tmp_path / "reg", tmp_path / "nosamples"])
    assert [p.name for p in runs[0].samples] == [f"samples_step_{s:06d}.png" for s in (10, 30, 200)]
    report = write_report([tmp_path / "cos", tmp_path / "reg", tmp_path / "nosamples"], tmp_path / "out")
    rows = table_rows(report["table"])
    assert [r["variant"] for r in rows] == ["cosine groups=1", "regular", "cosine groups=4"]
    assert "val bpc" not in rows[0]
    for row, name in zip(rows, ("cos", "reg")):
        assert num(row["val bits/pixel"]) == pytest.approx(logged[name]["val"][-1], rel=1e-3)
        assert float(row["FID"]) == pytest.approx(logged[name]["final"]["test_fid"], rel=1e-3)  # test beats val
        assert float(row["fidelity"]) == pytest.approx(logged[name]["fidelity"], abs=5e-4)
        end = logged[name]["final"]
        # each score beside its bound, from the final test values; a spread prints as "value ± spread"
        assert row["FID floor"] == f"{end['test_fid_floor_mean']:.2f} ± {end['test_fid_floor_std']:.2f}"
        assert row["KID"] == f"{end['test_kid']:.3g} ± {end['test_kid_std']:.3g}"
        assert float(row["fidelity ceiling"]) == pytest.approx(end["test_fidelity_ceiling"], abs=5e-4)
        assert float(row["diversity"]) == pytest.approx(end["test_diversity"], abs=5e-4)
        assert "KID floor" not in row and "distinct" not in row  # columns no run logged are left out

    grid = imread(report["samples"])
    assert report["samples"].name == "samples.png" and grid.shape[1] > grid.shape[0]
    # both runs' last samples are in the grid: pure green (cos, step 200) and pure blue (reg, step 40)
    pixels = grid[..., :3].reshape(-1, 3)
    assert (np.all(pixels == [0, 1, 0], axis=1)).sum() > 50
    assert (np.all(pixels == [0, 0, 1], axis=1)).sum() > 50
    assert (np.all(pixels == [1, 0, 0], axis=1)).sum() == 0  # an earlier sample (step 10) is not shown
    assert "(samples.png)" in report["markdown"].read_text()


def test_best_is_never_a_diverged_unfinished_or_non_finite_run(tmp_path):
    """Lower val bpc is better, but only a finished run with a finite value can be marked best: not one that diverged
    or never wrote its final line (however low its last evaluation), nor a NaN listed first."""
    for name, val, end in (
        ("a-nan", float("nan"), "final"),  # a non-finite result that json round-trips as NaN, first in the table
        ("b-diverged", 0.1, "diverged"),
        ("c-unfinished", 0.2, None),
        ("d", 1.5, "final"),
        ("e", 1.2, "final"),
        ("f-stopped-early", 1.3, "stopped_early"),
    ):
        fake_run(tmp_path / name, base_config(**{"model.groups": len(name)}), final=False)
        lines = [{"step": 45, "val_loss": val, "val_bpc": val}]
        if end == "diverged":
            lines.append({"step": 50, "diverged": True})
        elif end:
            flag = {"stopped_early": True} if end == "stopped_early" else {}
            lines.append({"step": 50, "final": True, "val_bpc": val, **flag})
        with open(tmp_path / name / "metrics.jsonl", "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
    runs = find_runs([tmp_path])
    for run in runs:
        run.label = run.path.name
    rows = {row["variant"]: row for row in table_rows(markdown_table(runs))}
    assert [name for name, row in rows.items() if row["val bpc"].endswith(" *")] == ["e"]
    assert {name: row["status"] for name, row in rows.items()} == {
        "a-nan": "finished", "b-diverged": "diverged (step 50)", "c-unfinished": "unfinished", "d": "finished",
        "e": "finished", "f-stopped-early": "finished (stopped early)",
    }  # fmt: skip
    assert rows["a-nan"]["val bpc"] == "nan" and rows["b-diverged"]["val bpc"] == "0.1000"
    assert "best val bpc" not in rows["d"]  # no run's final line reports a best: no column for it
    only_failed = [r for r in runs if r.path.name in ("a-nan", "b-diverged", "c-unfinished")]
    assert "*" not in markdown_table(only_failed)


def test_best_values_beside_the_final_ones(tmp_path):
    """A final line with the trainer's best_val_bpc and best_step: both get a column; a run without them shows –."""
    best = {"best_val_loss": 0.7, "best_val_bpc": 1.01, "best_step": 30}
    for name, val, extra in (("with", 1.2, best), ("without", 1.3, {})):
        fake_run(tmp_path / name, base_config(**{"model.groups": len(name)}), final=False)
        with open(tmp_path / name / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 40, "final": True, "val_bpc": val, **extra}) + "\n")
    rows = table_rows(markdown_table(find_runs([tmp_path / "with", tmp_path / "without"])))
    assert [(r["val bpc"], r["best val bpc"], r["best step"]) for r in rows] == [
        ("1.2000 *", "1.0100", "30"),
        ("1.3000", "–", "–"),
    ]


def _sample_runs(tmp_path, shapes, margin=60):
    """Runs whose last sample is a block of (h, w) pure-colour pixels inside `margin` white pixels on every side."""
    runs = []
    for i, (h, w) in enumerate(shapes):
        fake_run(tmp_path / f"r{i}", base_config(**{"model.attn": "cosine", "model.scale": float(i + 1)}), t2i=True)
        image = np.ones((h + 2 * margin, w + 2 * margin, 3), dtype=np.float32)
        image[margin : margin + h, margin : margin + w] = 0.0
        image[margin : margin + h, margin : margin + w, i % 3] = 1.0
        imsave(tmp_path / f"r{i}" / "samples_step_000040.png", image)
        runs.append(load_run(tmp_path / f"r{i}"))
    label_runs(runs)
    return runs


def _longest_white_band(grid: np.ndarray, axis: int) -> int:
    white = (grid[..., :3] > 0.98).all(axis=-1).all(axis=axis)
    longest = run = 0
    for w in white:
        run = run + 1 if w else 0
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("width, stacked", [(300, False), (900, True)])
def test_sample_grid_is_tight_and_stacks_wide_grids(tmp_path, width, stacked):
    runs = _sample_runs(tmp_path, [(300, width)] * 3)
    grid = imread(sample_grid(runs, tmp_path / "samples.png", title="t"))
    height, fig_width = grid.shape[:2]
    # side by side while they fit in a page's width, else one above the other
    assert (height > fig_width) == stacked and fig_width <= max(MAX_WIDTH_PX, width + 2 * PANEL_GAP_PX)
    # each image is shown whole at its own size, its margins cropped: no white band is much wider than a gap
    pixels = grid[..., :3].reshape(-1, 3)
    for i in range(3):
        assert (pixels == np.eye(3)[i]).all(axis=1).sum() == 300 * width
    assert max(_longest_white_band(grid, 0), _longest_white_band(grid, 1)) <= 1.5 * PANEL_GAP_PX


def test_unfinished_run_and_torn_log(tmp_path):
    logged = fake_run(tmp_path / "r", base_config(), final=False)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 45, "lo')  # killed mid-write
    run = load_run(tmp_path / "r")
    assert run.final == {} and run.steps == 40
    header, rows = result_rows([run])
    assert rows[0][header.index("val bpc")] == pytest.approx(logged["val"][-1])

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        load_metrics(tmp_path / "bad" / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        find_runs([_empty_dir(tmp_path)])
    with pytest.raises(FileNotFoundError, match="not found"):
        find_runs([tmp_path / "missing"])
    assert "| r | 40 |" in markdown_table([run]) and "| unfinished |" in markdown_table([run])


def _empty_dir(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_report_script(tmp_path, capsys):
    for name, attn in (("one", "cosine"), ("two", "regular")):
        fake_run(tmp_path / "runs" / name, base_config(**{"model.attn": attn}))
    main = runpy.run_path(str(ROOT / "scripts" / "report.py"), run_name="report_script")["main"]
    out = tmp_path / "docs" / "results" / "cmp"
    assert main([str(tmp_path / "runs" / "one"), str(tmp_path / "runs" / "two"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cosine |" in printed and "| regular |" in printed and "2 run(s)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "results.json", "results.md"]
    assert (out / "results.md").read_text().startswith("# cmp\n")


@pytest.mark.parametrize("n", [1, 7, 10, 11, 15, 20, 21, 144])
def test_variant_colours_are_distinct(n):
    """Every variant of a figure gets its own colour, however many there are (a 10-colour cycle repeats at 11)."""
    from matplotlib.colors import to_rgba

    from cosformer.tools.report import variant_colour

    colours = {to_rgba(variant_colour(i, n)) for i in range(n)}
    assert len(colours) == n
