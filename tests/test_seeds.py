"""Seed statistics of the report: grouping, mean ± std, best-of-run, the train–val gap and Welch's test, each
against a direct computation on synthetic run folders with random values."""

import json
import math
import random
import statistics

import pytest
import yaml

from cosformer.tools import seeds
from cosformer.tools.report import find_runs, write_report


def write_run(folder, attn, seed, val, train, final=None):
    """A run folder: config.yaml and metrics.jsonl with train lines every 10 steps and val every 50."""
    folder.mkdir(parents=True)
    config = {"model": {"attn": attn, "dim": 32}, "train": {"seed": seed, "out_dir": str(folder)}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for i, v in enumerate(val):
        step = 50 * (i + 1)
        lines += [{"step": s, "loss": train[i], "lr": 1e-3} for s in range(step - 40, step + 1, 10)]
        lines.append({"step": step, "val_loss": v, "val_bpc": v / math.log(2)})
    if final is not None:
        lines.append({"final": True, **final})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def sweep(tmp_path):
    rng = random.Random()
    truth = {}
    for attn in ("cosine", "regular"):
        for seed in range(3):
            val = [rng.uniform(1.0, 2.0) for _ in range(6)]
            train = [rng.uniform(0.5, 1.0) for _ in range(6)]
            write_run(tmp_path / f"{attn}-{seed}", attn, seed, val, train)
            truth[(attn, seed)] = (val, train)
    return tmp_path, truth


def test_seed_table_matches_direct_computation(sweep):
    root, truth = sweep
    runs = find_runs([root])
    groups = seeds.group_by_variant(runs)
    assert sorted(groups) == ["cosine", "regular"], "runs differing only in the seed are one variant"
    header, rows, raw = seeds.summary_rows(groups, "val_bpc")
    for attn in ("cosine", "regular"):
        values = raw[attn]
        by_seed = {s: truth[(attn, s)] for s in range(3)}
        expected_best = [min(by_seed[s][0]) / math.log(2) for s in values["seeds"]]
        expected_final = [by_seed[s][0][-1] / math.log(2) for s in values["seeds"]]
        # the last eval's val minus the mean train loss logged since the eval before (steps 260..300)
        expected_gap = [(by_seed[s][0][-1] - by_seed[s][1][-1]) / math.log(2) for s in values["seeds"]]
        assert values["best"] == pytest.approx(expected_best)
        assert values["final"] == pytest.approx(expected_final)
        assert values["gap"] == pytest.approx(expected_gap)
        row = next(r for r in rows if r[0] == attn)
        mean, std = statistics.fmean(expected_best), statistics.stdev(expected_best)
        assert row[header.index("best val bpc")] == f"{mean:.4f} ± {std:.4f}"


def test_best_is_the_trainers_record_when_finished_and_never_nan(tmp_path):
    write_run(tmp_path / "a", "cosine", 0, [1.5, 1.2, 1.4], [1.0] * 3, final={"best_val_bpc": 9.0, "best_step": 7})
    write_run(tmp_path / "b", "cosine", 1, [1.5, float("nan"), 1.4], [1.0] * 3)
    runs = {r.path.name: r for r in find_runs([tmp_path])}
    assert seeds.best_value(runs["a"], "val_bpc") == (9.0, 7)
    assert seeds.best_value(runs["b"], "val_bpc") == (pytest.approx(1.4 / math.log(2)), 150)


def test_welch_against_direct_formula():
    rng = random.Random()
    a = [rng.gauss(1.0, 0.1) for _ in range(3)]
    b = [rng.gauss(1.2, 0.2) for _ in range(4)]
    diff, se, t, p = seeds.welch(a, b)
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4
    assert diff == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert se == pytest.approx(math.sqrt(va + vb))
    assert t == pytest.approx(diff / math.sqrt(va + vb))
    # two-sided tail of Student's t at known points: df=2, t=4.303 -> 0.05; df=10, t=2.228 -> 0.05
    assert seeds._t_sf_two_sided(4.303, 2) == pytest.approx(0.05, abs=2e-4)
    assert seeds._t_sf_two_sided(2.228, 10) == pytest.approx(0.05, abs=2e-4)
    assert 0.0 <= p <= 1.0


def test_report_writes_the_seed_section(sweep):
    root, _ = sweep
    out = root / "report"
    write_report([root], out)
    text = (out / "results.md").read_text()
    assert "## Over seeds" in text and (out / "seeds.png").exists()
    assert set(json.loads((out / "results.json").read_text())["seeds"]) == {"cosine", "regular"}


def test_gap_prefers_the_evaluations_own_train_loss(tmp_path):
    write_run(tmp_path / "a", "cosine", 0, [1.5, 1.2], [1.0, 0.9])
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        if "val_loss" in r:
            r["train_loss"] = r["val_loss"] - 0.25
    (tmp_path / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = find_runs([tmp_path])[0]
    _, gaps = seeds.gap_curve(run, "val_loss")
    assert gaps.tolist() == pytest.approx([0.25, 0.25])


def test_image_scores_over_seeds_and_their_comparison(tmp_path):
    """Text-to-image runs: each score's mean ± std over seeds (the test value where a run has one, else its last
    validation value), the floors and ceiling beside them, and Welch's test on FID and fidelity."""
    rng = random.Random()
    truth = {}
    for attn in ("cosine", "regular"):
        for seed in range(2):
            scores = {k: rng.uniform(1.0, 90.0) for k in ("fid", "fid_floor_mean", "kid", "kid_floor_mean")}
            scores.update({k: rng.uniform(0.0, 1.0) for k in ("fidelity", "fidelity_ceiling", "diversity")})
            # the last evaluation logs other (val) values: the table must take the final test ones
            val = {f"val_{k}": v + 100.0 for k, v in scores.items()}
            write_run(tmp_path / f"{attn}-{seed}", attn, seed, [1.5, 1.4], [1.0, 0.9],
                      final={**{f"test_{k}": v for k, v in scores.items()}, "val_bpc": 1.4})  # fmt: skip
            lines = (tmp_path / f"{attn}-{seed}" / "metrics.jsonl").read_text().splitlines()
            last_eval = json.loads(lines[-2])
            lines[-2] = json.dumps({**last_eval, **val})
            (tmp_path / f"{attn}-{seed}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            truth[(attn, seed)] = scores
    groups = seeds.group_by_variant(find_runs([tmp_path]))
    header, rows, raw = seeds.summary_rows(groups, "val_bpc")
    digits = {"fid": 2, "fid_floor_mean": 2, "kid": 4, "kid_floor_mean": 4}
    for row in rows:
        attn = row[0].split("=")[-1]
        cells = dict(zip(header, row))
        for name, key in seeds.IMAGE_SCORES:
            values = [truth[(attn, s)][key] for s in range(2)]
            d = digits.get(key, 3)
            assert cells[name] == f"{statistics.fmean(values):.{d}f} ± {statistics.stdev(values):.{d}f}", (attn, key)
    diff = statistics.fmean(truth[("regular", s)]["fid"] for s in range(2)) - statistics.fmean(
        truth[("cosine", s)]["fid"] for s in range(2)
    )
    compare = seeds.comparison_rows(raw, next(iter(groups)), what="fid")
    assert float(compare[0][2]) == pytest.approx(diff, abs=1e-4)
    report = write_report([tmp_path], tmp_path / "out")
    text = report["markdown"].read_text()
    assert "FID (lower is better) against" in text and "Caption fidelity (higher is better) against" in text
