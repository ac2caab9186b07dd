"""Tests for mtlbench.report.leaderboard on a results dict built here (2 folds, 3 strategy rows)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from scipy import stats as st

from mtlbench.errors import ConfigError, DataError
from mtlbench.report.leaderboard import build_leaderboard, load_results, render_leaderboard
from mtlbench.report.stats import holm

ORGANS = ["kidney_right", "kidney_left"]
FOLDS = {0: ["p0", "p1", "p2", "p3"], 1: ["p4", "p5", "p6", "p7"]}
SEEDS = [0, 1]
# row -> (strategy, params, shift added to the baseline's per-patient IoU)
ROWS = {
    "single": ("single", {}, 0.0),
    "joint1": ("joint", {"weights": {"segmentation": 1, "landmarks": 1}}, 0.05),
    "joint3": ("joint", {"weights": {"segmentation": 1, "landmarks": 3}}, -0.03),
}
BROKEN = {("joint3", 1, 1): "failed", ("joint3", 0, 1): "diverged"}


def make_results(seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    base = {p: {o: 0.7 + 0.1 * rng.random() for o in ORGANS} for ps in FOLDS.values() for p in ps}
    trials = []
    for row, (strategy, params, shift) in ROWS.items():
        for fold, patients in FOLDS.items():
            for s in SEEDS:
                status = BROKEN.get((row, fold, s), "completed")
                rec = {
                    "id": f"{row}-f{fold}-s{s}",
                    "dir": f"trials/{row}-f{fold}-s{s}",
                    "fold": fold,
                    "strategy": strategy,
                    "use": strategy,
                    "params": copy.deepcopy(params),
                    "seed": s,
                    "status": status,
                    "error": None if status == "completed" else f"{status} at epoch 2",
                    "metrics": {},
                    "per_patient": [],
                    "history": [],
                    "wall_time_s": 10.0,
                    "peak_memory_mb": 100.0,
                    "config": {},
                    "compare_to": None,
                }
                if status == "completed":
                    for p in patients:
                        pp = {"patient": p}
                        for o in ORGANS:
                            pp[f"segmentation/iou_{o}"] = base[p][o] + shift + 0.01 * rng.standard_normal()
                        pp["segmentation/iou_mean"] = float(np.mean([pp[f"segmentation/iou_{o}"] for o in ORGANS]))
                        if strategy == "joint":
                            pp["landmarks/rmse"] = 0.016 + 0.001 * rng.random()
                        rec["per_patient"].append(pp)
                    keys = [k for k in rec["per_patient"][0] if k != "patient"]
                    rec["metrics"] = {k: float(np.mean([pp[k] for pp in rec["per_patient"]])) for k in keys}
                trials.append(rec)
    meta = {
        "experiment": "unit",
        "main_metric": "segmentation/iou_mean",
        "baseline": "single",
        "directions": {
            "segmentation/iou_mean": True,
            "segmentation/iou_kidney_right": True,
            "segmentation/iou_kidney_left": True,
            "landmarks/rmse": False,
        },
        "organs": ORGANS,
        "landmarks": ["renal_pelvis_right", "renal_pelvis_left"],
        "aux_metrics": ["landmarks/rmse"],
        "created": "2025-01-01T00:00:00",
    }
    return {"meta": meta, "trials": trials}


def _trials(results, row, status="completed"):
    strategy, params, _ = ROWS[row]
    return [t for t in results["trials"] if t["strategy"] == strategy and t["params"] == params and t["status"] == status]


def _fold_means(results, row, key="segmentation/iou_mean"):
    done = _trials(results, row)
    return [np.mean([t["metrics"][key] for t in done if t["fold"] == f]) for f in sorted(FOLDS)]


def _patient_means(results, row, key="segmentation/iou_mean"):
    acc = {}
    for t in _trials(results, row):
        for pp in t["per_patient"]:
            acc.setdefault(pp["patient"], []).append(pp[key])
    return {p: np.mean(v) for p, v in acc.items()}


@pytest.fixture()
def results():
    return make_results()


@pytest.fixture()
def board(results):
    return build_leaderboard(results)


def _row(board, label):
    return next(r for r in board["rows"] if r["label"] == label)


def test_rows_labels_and_order(board):
    labels = [r["label"] for r in board["rows"]]
    assert labels == ["joint weights.landmarks=1", "single", "joint weights.landmarks=3"]
    assert [r["rank"] for r in board["rows"]] == [1, 2, 3]
    assert board["metric"] == "segmentation/iou_mean" and board["direction"] == "higher"
    assert [r["is_baseline"] for r in board["rows"]] == [False, True, False]
    assert board["rule"].startswith("better: mean difference to the baseline")


def test_counts(board):
    assert [(r["completed"], r["failed"], r["diverged"]) for r in board["rows"]] == [(4, 0, 0), (4, 0, 0), (2, 1, 1)]


def test_fold_statistics_match_numpy(results, board):
    for row, label in (("single", "single"), ("joint3", "joint weights.landmarks=3")):
        r = _row(board, label)
        folds = _fold_means(results, row)
        assert [f["value"] for f in r["folds"]] == pytest.approx(folds)
        assert [f["fold"] for f in r["folds"]] == [0, 1]
        assert r["n_folds"] == 2
        assert r["mean"] == pytest.approx(np.mean(folds))
        assert r["std"] == pytest.approx(np.std(folds, ddof=1))
        lo, hi = st.t.interval(0.95, 1, loc=np.mean(folds), scale=st.sem(folds))
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    # joint3 has one completed seed per fold (the others failed / diverged)
    assert [f["n_trials"] for f in _row(board, "joint weights.landmarks=3")["folds"]] == [1, 1]


def test_organ_and_aux_columns(results, board):
    assert board["organ_metrics"] == {o: f"segmentation/iou_{o}" for o in ORGANS}
    r = _row(board, "joint weights.landmarks=1")
    for o in ORGANS:
        assert r["organs"][o] == pytest.approx(np.mean(_fold_means(results, "joint1", f"segmentation/iou_{o}")))
    rmse = _fold_means(results, "joint1", "landmarks/rmse")
    assert r["aux"]["metric"] == "landmarks/rmse"
    assert r["aux"]["mean"] == pytest.approx(np.mean(rmse))
    assert r["aux"]["std"] == pytest.approx(np.std(rmse, ddof=1))
    assert _row(board, "single")["aux"] is None


def _unit_means(results, row):
    """(fold, seed) -> the trial's segmentation/iou_mean, computed from its per-patient values."""
    return {
        (t["fold"], t["seed"]): float(np.mean([p["segmentation/iou_mean"] for p in t["per_patient"]]))
        for t in _trials(results, row)
    }


def corrected_t(d: np.ndarray, ratio: float) -> float:
    """Two-sided p of the Nadeau-Bengio corrected paired t-test, written out."""
    n = len(d)
    t = d.mean() / np.sqrt((1 / n + ratio) * d.var(ddof=1))
    return float(2 * st.t.sf(abs(t), n - 1))


def test_deciding_test_is_over_folds_and_holm_adjusted(results, board):
    base = _unit_means(results, "single")
    raw = {}
    assert board["test"].startswith("corrected paired t-test")
    for row, label, n in (("joint1", "joint weights.landmarks=1", 4), ("joint3", "joint weights.landmarks=3", 2)):
        mine = _unit_means(results, row)
        common = sorted(set(mine) & set(base))
        d = np.array([mine[u] - base[u] for u in common])
        vs = _row(board, label)["vs_baseline"]
        assert vs["n"] == len(common) == n and vs["unit"] == "fold x seed"
        assert vs["mean_diff"] == pytest.approx(d.mean())
        assert vs["p"] == pytest.approx(corrected_t(d, 1.0))  # 2 folds: n_test / n_train = 1
        raw[label] = vs["p"]
    labels = list(raw)
    for label, p in zip(labels, holm([raw[k] for k in labels])):
        assert _row(board, label)["vs_baseline"]["p_holm"] == pytest.approx(p)
    assert _row(board, "joint weights.landmarks=1")["better"] is True
    assert _row(board, "joint weights.landmarks=3")["better"] is False  # worse, whatever its p
    assert _row(board, "single")["vs_baseline"] is None and _row(board, "single")["better"] is None


def test_patient_level_wilcoxon_is_kept_for_reference(results, board):
    base = _patient_means(results, "single")
    raw = {}
    for row, label in (("joint1", "joint weights.landmarks=1"), ("joint3", "joint weights.landmarks=3")):
        mine = _patient_means(results, row)
        common = sorted(set(mine) & set(base))
        d = np.array([mine[p] - base[p] for p in common])
        vs = _row(board, label)["vs_baseline"]["patient_level"]
        assert vs["n"] == len(common) == 8
        assert vs["mean_diff"] == pytest.approx(d.mean())
        assert vs["p_wilcoxon"] == pytest.approx(st.wilcoxon(d).pvalue)
        assert vs["p_ttest"] == pytest.approx(st.ttest_rel(d + 0.0, np.zeros_like(d)).pvalue)
        raw[label] = vs["p_wilcoxon"]
    for label, p in zip(list(raw), holm(list(raw.values()))):
        assert _row(board, label)["vs_baseline"]["patient_level"]["p_holm"] == pytest.approx(p)


def test_clustered_data_patient_test_significant_fold_test_decides_not():
    """5 folds x 4 patients: every patient of a fold moves with its fold's model.

    Most folds gain, one loses: 16 of 20 patient differences are positive, so a
    Wilcoxon test over patients calls the row better; over the 5 folds (the
    independent units) the gain is not significant, and the rule follows the folds.
    """
    rng = np.random.default_rng(0)
    fold_gain = [0.06, 0.05, 0.07, -0.02, 0.04]
    trials = []
    for strategy, gains in (("single", [0.0] * 5), ("joint", fold_gain)):
        for fold, gain in enumerate(gains):
            per_patient = [
                {"patient": f"f{fold}p{i}", "segmentation/iou_mean": 0.7 + 0.01 * i + gain + 0.001 * rng.standard_normal()}
                for i in range(4)
            ]
            trials.append({
                "id": f"{strategy}-{fold}", "fold": fold, "seed": 0, "strategy": strategy, "params": {},
                "status": "completed", "per_patient": per_patient,
                "metrics": {"segmentation/iou_mean": float(np.mean([p["segmentation/iou_mean"] for p in per_patient]))},
                "test_patients": [p["patient"] for p in per_patient], "train_patients": [f"x{j}" for j in range(16)],
            })
    results = {"meta": {"main_metric": "segmentation/iou_mean", "baseline": "single", "folds": 5,
                        "directions": {"segmentation/iou_mean": True}}, "trials": trials}
    row = _row(build_leaderboard(results), "joint")
    patients = row["vs_baseline"]["patient_level"]
    assert patients["n"] == 20 and patients["p_holm"] < 0.01  # the patient-level test is fooled
    vs = row["vs_baseline"]
    assert vs["n"] == 5 and vs["p_holm"] > 0.05  # the fold-level test is not
    assert vs["p"] == pytest.approx(corrected_t(np.array(fold_gain) + 0.0, 4 / 16), abs=0.02)
    assert row["better"] is False


def test_compare_to_uses_first_param_point_of_the_target(results):
    for t in _trials(results, "joint3") + _trials(results, "joint3", "failed"):
        t["compare_to"] = "joint"
    board = build_leaderboard(results)
    r = _row(board, "joint weights.landmarks=3")
    assert r["compare_to"] == "joint weights.landmarks=1"
    a, b = _patient_means(results, "joint3"), _patient_means(results, "joint1")
    assert r["vs_baseline"]["patient_level"]["mean_diff"] == pytest.approx(np.mean([a[p] - b[p] for p in sorted(a)]))
    ua, ub = _unit_means(results, "joint3"), _unit_means(results, "joint1")
    assert r["vs_baseline"]["mean_diff"] == pytest.approx(np.mean([ua[u] - ub[u] for u in sorted(ua)]))
    # the target row itself compares to the experiment baseline
    assert _row(board, "joint weights.landmarks=1")["compare_to"] == "single"


def test_lower_is_better_metric_and_short_name(results):
    board = build_leaderboard(results, "rmse")
    assert board["metric"] == "landmarks/rmse" and board["direction"] == "lower"
    means = [r["mean"] for r in board["rows"] if r["mean"] is not None]
    assert means == sorted(means)
    # the baseline trains no landmark tail: no value, ranked last, no comparison possible
    single = _row(board, "single")
    assert single["mean"] is None and single["rank"] is None and board["rows"][-1] is single
    assert all(r["vs_baseline"]["n"] == 0 for r in board["rows"] if not r["is_baseline"])


def test_unknown_metric_lists_available(results):
    with pytest.raises(ConfigError, match=r"segmentation/iou_dice.*available:.*segmentation/iou_mean"):
        build_leaderboard(results, "segmentation/iou_dice")


def test_json_round_trip(board):
    text = json.dumps(board, allow_nan=False)
    assert json.loads(text) == board


def test_render_leaderboard(board):
    from rich.console import Console

    console = Console(record=True, width=250)
    render_leaderboard(board, console)
    out = console.export_text()
    assert "single (baseline)" in out
    assert "joint weights.landmarks=3" in out
    assert "4/0/0" in out and "2/1/1" in out
    assert "Holm-adjusted two-sided" in out.replace("\n", " ")


def test_load_results(tmp_path, results):
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert load_results(tmp_path) == results
    with pytest.raises(DataError, match="results.json.*not found"):
        load_results(tmp_path / "missing")
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(DataError, match=r"results.json: not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "trials": [{"fold": 0}]}))
    with pytest.raises(DataError, match=r"trials\[0\] lacks 'strategy'"):
        load_results(tmp_path)


def test_all_failed_run_still_builds():
    results = make_results()
    for t in results["trials"]:
        t.update(status="failed", metrics={}, per_patient=[])
    board = build_leaderboard(results)
    assert all(r["mean"] is None and r["failed"] == r["trials"] for r in board["rows"])
    json.dumps(board, allow_nan=False)
    assert not any(math.isnan(r["completed"]) for r in board["rows"])


def test_confidence_interval_is_clipped_to_the_metric_range():
    trials = [
        {"id": f"s{f}", "fold": f, "seed": 0, "strategy": "single", "params": {}, "status": "completed",
         "metrics": {"seg/iou_mean": v}, "per_patient": []}
        for f, v in enumerate([0.0, 0.02, 0.0, 0.01])
    ]
    meta = {"main_metric": "seg/iou_mean", "baseline": "single", "bounds": {"seg/iou_mean": [0.0, 1.0]}}
    row = build_leaderboard({"meta": meta, "trials": trials})["rows"][0]
    assert row["ci_low"] == 0.0 and 0 < row["ci_high"] < 1  # the t-interval would reach below 0
    unbounded = build_leaderboard({"meta": {**meta, "bounds": {}}, "trials": trials})["rows"][0]
    assert unbounded["ci_low"] < 0


@pytest.mark.parametrize("width", [60, 80, 120])
def test_narrow_terminal_cuts_no_number_and_no_label(board, width):
    """Columns that do not fit are split over several tables; every cell is printed whole."""
    from rich.console import Console

    from mtlbench.report.leaderboard import display_label, leaderboard_columns

    console = Console(record=True, width=width)
    render_leaderboard(board, console)
    out = console.export_text()
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width
    for row in board["rows"]:
        assert display_label(row) in out
    for _, cells in leaderboard_columns(board):
        for cell in cells:
            assert getattr(cell, "plain", str(cell)) in out
