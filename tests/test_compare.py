"""``mtlbench compare``: one leaderboard across runs of one split, built here from results written as runs write them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtlbench.cli import app
from mtlbench.errors import ConfigError
from mtlbench.report.compare import compare_runs, config_differences
from mtlbench.report.leaderboard import build_leaderboard, load_results
from mtlbench.report.stats import corrected_paired_t, holm, paired_test

runner = CliRunner()
ORGANS = ["kidney_right", "kidney_left"]
FOLDS = {0: ["p0", "p1", "p2", "p3"], 1: ["p4", "p5", "p6", "p7"], 2: ["p8", "p9", "p10", "p11"]}
PATIENTS = [p for ps in FOLDS.values() for p in ps]
BASE = {p: 0.6 + 0.2 * v for p, v in zip(PATIENTS + ["p12"], np.random.default_rng(0).random(len(PATIENTS) + 1))}


def make_run(root: Path, name: str, rows: dict[str, tuple[str, dict, float]], seeds=(0, 1), folds=FOLDS,
             epochs: int = 10, noise_seed: int = 1, splits: bool = True) -> Path:
    """A run folder: results.json with one completed trial per row x fold x seed, and splits.json."""
    rng = np.random.default_rng(noise_seed)
    run = root / name
    run.mkdir(parents=True)
    trials = []
    for row, (strategy, params, shift) in rows.items():
        for fold, test in folds.items():
            train = [p for f, ps in folds.items() if f != fold for p in ps]
            for seed in seeds:
                per_patient = []
                for p in test:
                    pp = {"patient": p}
                    for o in ORGANS:
                        pp[f"segmentation/iou_{o}"] = BASE[p] + shift + 0.02 * rng.standard_normal()
                    pp["segmentation/iou_mean"] = float(np.mean([pp[f"segmentation/iou_{o}"] for o in ORGANS]))
                    per_patient.append(pp)
                metrics = {k: float(np.mean([pp[k] for pp in per_patient])) for k in per_patient[0] if k != "patient"}
                trials.append({
                    "id": f"{row}-f{fold}-s{seed}", "dir": f"trials/{row}-f{fold}-s{seed}", "fold": fold,
                    "strategy": strategy, "use": strategy, "params": params, "seed": seed, "status": "completed",
                    "error": None, "compare_to": None, "metrics": metrics, "per_patient": per_patient, "history": [],
                    "test_patients": list(test), "train_patients": train,
                })
    meta = {
        "experiment": "unit", "main_metric": "segmentation/iou_mean", "baseline": "single",
        "directions": {"segmentation/iou_mean": True, "segmentation/iou_kidney_right": True,
                       "segmentation/iou_kidney_left": True},
        "bounds": {"segmentation/iou_mean": [0.0, 1.0]},
        "organs": ORGANS, "landmarks": [], "aux_metrics": [], "folds": len(folds), "seeds": list(seeds),
        "config": {"experiment": {"name": "unit"}, "train": {"epochs": epochs}, "run": {"out_dir": str(root)}},
        "created": "2026-01-01T00:00:00",
    }
    (run / "results.json").write_text(json.dumps({"meta": meta, "trials": trials}))
    if splits:
        folds_json = [{"fold": f, "train": [p for g, ps in folds.items() if g != f for p in ps], "test": list(ps)}
                      for f, ps in folds.items()]
        (run / "splits.json").write_text(json.dumps({"version": 1, "folds": folds_json}))
    return run


RUN_A = {"single": ("single", {}, 0.0), "joint1": ("joint", {"weights": {"landmarks": 1.0}}, 0.04)}
RUN_B = {"single": ("single", {}, 0.0), "joint3": ("joint", {"weights": {"landmarks": 3.0}}, -0.05)}


@pytest.fixture()
def runs(tmp_path):
    return make_run(tmp_path, "runA", RUN_A), make_run(tmp_path, "runB", RUN_B, epochs=20, noise_seed=2)


def _row(board, label):
    return next(r for r in board["rows"] if r["label"] == label)


def _units(run: Path, strategy: str, key="segmentation/iou_mean"):
    return {(t["fold"], t["seed"]): t["metrics"][key] for t in load_results(run)["trials"] if t["strategy"] == strategy}


def _patients(run: Path, strategy: str, key="segmentation/iou_mean"):
    acc: dict[str, list[float]] = {}
    for t in load_results(run)["trials"]:
        if t["strategy"] == strategy:
            for pp in t["per_patient"]:
                acc.setdefault(pp["patient"], []).append(pp[key])
    return {p: float(np.mean(v)) for p, v in acc.items()}


def test_rows_are_labelled_by_run_and_strategy(runs):
    board = compare_runs(list(runs))
    assert sorted(r["label"] for r in board["rows"]) == ["runA:joint", "runA:single", "runB:joint", "runB:single"]
    assert board["baseline"] == "runA:single" and _row(board, "runA:single")["is_baseline"]
    assert {r["label"]: r["run"] for r in board["rows"]}["runB:joint"] == "runB"
    assert [r["name"] for r in board["runs"]] == ["runA", "runB"] and board["runs"][0]["trials"] == 12
    assert board["config_differences"] == ["train.epochs"]  # [run] is left out
    assert [r["rank"] for r in board["rows"]] == [1, 2, 3, 4]
    assert board["rows"][0]["label"] == "runA:joint" and board["rows"][-1]["label"] == "runB:joint"
    # each row's own statistics are those of its run's leaderboard
    own = {r["label"]: r for r in build_leaderboard(load_results(runs[1]))["rows"]}
    row = _row(board, "runB:joint")
    assert row["mean"] == pytest.approx(own["joint"]["mean"]) and row["std"] == pytest.approx(own["joint"]["std"])
    assert row["ci_low"] == pytest.approx(own["joint"]["ci_low"])


def test_paired_tests_across_runs_use_shared_units_and_patients(runs):
    a, b = runs
    board = compare_runs([a, b])
    base_units, base_patients = _units(a, "single"), _patients(a, "single")
    ratio = 4 / 8  # 4 test, 8 train patients per fold
    raw = {}
    for label, (run, strategy) in {"runA:joint": (a, "joint"), "runB:single": (b, "single"), "runB:joint": (b, "joint")}.items():
        units = _units(run, strategy)
        expect = corrected_paired_t([units[u] - base_units[u] for u in sorted(units)], ratio)
        vs = _row(board, label)["vs_baseline"]
        assert vs["unit"] == "fold x seed" and vs["n"] == 6
        assert vs["mean_diff"] == pytest.approx(expect["mean_diff"]) and vs["p"] == pytest.approx(expect["p"])
        pats = _patients(run, strategy)
        pt = paired_test([pats[p] for p in sorted(pats)], [base_patients[p] for p in sorted(pats)])
        assert vs["patient_level"]["n"] == 12 and vs["patient_level"]["p_wilcoxon"] == pytest.approx(pt["p_wilcoxon"])
        raw[label] = expect["p"]
    labels = sorted(raw)
    for label, p in zip(labels, holm([raw[k] for k in labels])):
        assert _row(board, label)["vs_baseline"]["p_holm"] == pytest.approx(p)
    assert _row(board, "runA:joint")["better"] is True  # +0.04 on every patient
    assert _row(board, "runB:single")["better"] is False  # the same model, other noise


def test_runs_with_other_seeds_pair_fold_means(tmp_path):
    a = make_run(tmp_path, "a", RUN_A, seeds=(0, 1))
    b = make_run(tmp_path, "b", RUN_B, seeds=(5,), noise_seed=3)
    vs = _row(compare_runs([a, b]), "b:joint")["vs_baseline"]
    assert vs["unit"] == "fold" and vs["n"] == 3


def test_baseline_option_and_unknown_baseline(runs):
    board = compare_runs(list(runs), baseline="runB:single")
    assert board["baseline"] == "runB:single" and _row(board, "runB:single")["vs_baseline"] is None
    assert compare_runs(list(runs), baseline="single")["baseline"] == "runA:single"
    with pytest.raises(ConfigError, match=r"--baseline 'runC:single': no such row; choose one of: runA:single"):
        compare_runs(list(runs), baseline="runC:single")


def test_other_metric(runs):
    board = compare_runs(list(runs), metric="iou_kidney_left")
    assert board["metric"] == "segmentation/iou_kidney_left"


def test_runs_of_different_splits_are_refused(tmp_path):
    a = make_run(tmp_path, "a", RUN_A)
    other = {0: ["p0", "p1", "p2", "p4"], 1: ["p3", "p5", "p6", "p7"], 2: FOLDS[2]}
    b = make_run(tmp_path, "b", RUN_B, folds=other)
    with pytest.raises(ConfigError) as exc:
        compare_runs([a, b])
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("runs a and b do not share a split (fold 0 tests different patients")
    c = make_run(tmp_path, "c", RUN_B, folds={0: FOLDS[0] + FOLDS[1], 1: FOLDS[2]})
    with pytest.raises(ConfigError, match=r"runs a and c do not share a split \(3 vs 2 folds\)"):
        compare_runs([a, c])
    more = {**FOLDS, 2: FOLDS[2] + ["p12"]}  # one more patient: its folds train on more
    d = make_run(tmp_path, "d", RUN_B, folds=more)
    with pytest.raises(ConfigError, match=r"runs a and d do not share a split \(fold 0 trains on different patients, e.g. 'p12'"):
        compare_runs([a, d])


def test_results_files_without_splits_json_are_checked_by_their_trials(tmp_path):
    a = make_run(tmp_path, "a", RUN_A, splits=False)
    b = make_run(tmp_path, "b", RUN_B, splits=False)
    assert len(compare_runs([a / "results.json", b]).get("rows")) == 4
    other = make_run(tmp_path, "o", RUN_B, folds={0: FOLDS[1], 1: FOLDS[0], 2: FOLDS[2]}, splits=False)
    with pytest.raises(ConfigError, match="do not share a split"):
        compare_runs([a, other])


def test_runs_with_the_same_folder_name(tmp_path):
    a = make_run(tmp_path / "x", "run", RUN_A)
    b = make_run(tmp_path / "y", "run", RUN_B)
    labels = {r["label"] for r in compare_runs([a, b])["rows"]}
    assert labels == {"x/run:single", "x/run:joint", "y/run:single", "y/run:joint"}
    with pytest.raises(ConfigError, match="given twice"):
        compare_runs([a, a])
    with pytest.raises(ConfigError, match="at least two"):
        compare_runs([a])


def test_config_differences_ignore_run_and_resources():
    metas = [{"config": {"train": {"lr": 1}, "run": {"out_dir": "a"}, "resources": {"cpus_per_trial": 1}}},
             {"config": {"train": {"lr": 2}, "run": {"out_dir": "b"}, "resources": {"cpus_per_trial": 2}, "profile": "cpu"}}]
    assert config_differences(metas) == ["profile", "train.lr"]


# ----------------------------------------------------------------------------- the command


def test_cli_compare_json_and_table(runs):
    a, b = runs
    r = runner.invoke(app, ["compare", str(a), str(b), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data == json.loads(json.dumps(compare_runs([a, b])))
    assert all(not isinstance(v, float) or math.isfinite(v) for row in data["rows"] for v in row.values())
    r = runner.invoke(app, ["compare", str(a), str(b)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for text in ("comparing 2 runs of one split", "runA:single (baseline)", "runB:joint", "differ in: train.epochs"):
        assert text in r.stdout, text


def test_cli_compare_refuses_other_splits_in_one_line(tmp_path):
    a = make_run(tmp_path, "a", RUN_A)
    b = make_run(tmp_path, "b", RUN_B, folds={0: FOLDS[1], 1: FOLDS[0], 2: FOLDS[2]})
    r = runner.invoke(app, ["compare", str(a), str(b)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: runs a and b do not share a split")
    r = runner.invoke(app, ["compare", str(a), str(tmp_path / "missing")])
    assert r.exit_code == 1 and "results file not found" in r.stderr
