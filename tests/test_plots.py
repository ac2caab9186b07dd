"""Tests for mtlbench.report.plots and markdown on a small run folder built here."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from mtlbench.errors import DataError
from mtlbench.report.leaderboard import build_leaderboard
from mtlbench.report.markdown import write_report
from mtlbench.report.leaderboard import group_rows
from mtlbench.report.plots import find_sweeps, make_plots, overlay_rgba, plot_lambda_sweep, plot_overlays

H = W = 48
ROWS = [
    ("single", {}, 0.0),
    ("joint", {"weights": {"landmarks": 1}}, 0.02),
    ("joint", {"weights": {"landmarks": 3}}, -0.01),
]
FOLDS = {0: ["a", "b"], 1: ["c", "d"]}


def _example(path: Path, patient: str, with_pred_heatmap: bool) -> None:
    yy, xx = np.mgrid[0:H, 0:W]
    labels = np.zeros((H, W), np.uint8)
    labels[10:30, 8:20] = 1
    labels[12:32, 28:40] = 2
    pred = np.zeros_like(labels)
    pred[13:33, 10:22] = 1
    pred[12:30, 30:42] = 2
    heat = np.exp(-((yy - 20) ** 2 + (xx - 14) ** 2) / 18.0).astype(np.float32)
    arrays = {
        "image": (np.linspace(-1.0, 1.0, H * W, dtype=np.float32).reshape(H, W)),
        "labels": labels,
        "pred": pred,
        "heatmap": heat,
        "patient": np.array(patient),
        "slice": np.array(17),
    }
    if with_pred_heatmap:
        arrays["pred_heatmap"] = 0.8 * np.roll(heat, 2, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def make_run(root: Path) -> Path:
    rng = np.random.default_rng(3)
    trials = []
    for r, (strategy, params, shift) in enumerate(ROWS):
        for fold, patients in FOLDS.items():
            name = f"r{r}-f{fold}"
            per_patient = [{"patient": p, "segmentation/iou_mean": 0.7 + shift + 0.02 * rng.random()} for p in patients]
            metrics = {"segmentation/iou_mean": float(np.mean([pp["segmentation/iou_mean"] for pp in per_patient]))}
            if strategy == "joint":
                metrics["landmarks/rmse"] = 0.017 - 0.0005 * r
            history = [
                {
                    "epoch": e,
                    "lr": 1e-4,
                    "train": {"loss/segmentation": 1.0 / (e + 1), **({"loss/landmarks": 0.1 / (e + 1)} if strategy == "joint" else {})},
                    "metrics": {"segmentation/iou_mean": metrics["segmentation/iou_mean"] * (e + 1) / 3},
                    "time_s": 1.0,
                }
                for e in range(3)
            ]
            trials.append(
                {
                    "id": name, "dir": f"trials/{name}", "fold": fold, "strategy": strategy, "use": strategy,
                    "params": copy.deepcopy(params), "seed": 0, "status": "completed", "error": None,
                    "metrics": metrics, "per_patient": per_patient, "history": history,
                    "wall_time_s": 5.0, "peak_memory_mb": 50.0,
                    "config": {"preprocess": {"scale": 500.0}, "train": {"epochs": 3, "batch_size": 2, "lr": 1e-4}},
                    "compare_to": None,
                }
            )
            _example(root / "trials" / name / "example.npz", patients[0], strategy == "joint")
    trials.append(dict(trials[0], id="broken", dir="trials/broken", status="failed", error="boom", metrics={}, per_patient=[], history=[]))
    meta = {
        "experiment": "plots-test", "main_metric": "segmentation/iou_mean", "baseline": "single",
        "directions": {"segmentation/iou_mean": True, "landmarks/rmse": False},
        "organs": ["kidney_right", "kidney_left"], "landmarks": ["renal_pelvis_right"],
        "aux_metrics": ["landmarks/rmse"], "created": "2025-01-01T00:00:00",
    }
    (root / "results.json").write_text(json.dumps({"meta": meta, "trials": trials}))
    return root


def _readable_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas


def test_make_plots_writes_readable_pngs(tmp_path):
    run = make_run(tmp_path)
    paths = make_plots(run)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [f"curves_0{i}_{s}.png" for i, s in ((1, "single"), (2, "joint_weights.landmarks-1"), (3, "joint_weights.landmarks-3"))]
        + ["lambda_sweep.png"]
        + [f"overlay_0{i}_{s}.png" for i, s in ((1, "single"), (2, "joint_weights.landmarks-1"), (3, "joint_weights.landmarks-3"))]
    )
    for p in paths:
        assert p.parent == run / "plots"
        _readable_png(p)
    assert not list((run / "plots").glob(".*"))  # no temporary files left behind


def test_overlay_colours():
    labels = np.array([[1, 1, 0, 0]], np.uint8)
    pred = np.array([[0, 2, 2, 0]], np.uint8)
    rgba = overlay_rgba(labels, pred)
    assert tuple(rgba[0, 0, :3]) == pytest.approx((0.0, 0.85, 0.0))  # ground truth only: green
    assert tuple(rgba[0, 1, :3]) == pytest.approx((1.0, 0.9, 0.0))  # both: yellow
    assert tuple(rgba[0, 2, :3]) == pytest.approx((0.95, 0.1, 0.1))  # prediction only: red
    assert rgba[0, 3, 3] == 0.0 and rgba[0, 0, 3] > 0


def test_sweep_detection_and_none_without_sweep(tmp_path):
    results = json.loads((make_run(tmp_path) / "results.json").read_text())
    sweeps = find_sweeps(group_rows(results))
    assert [(s, k, [x for x, _ in pts]) for s, k, pts in sweeps] == [("joint", "weights.landmarks", [1.0, 3.0])]
    results["trials"] = [t for t in results["trials"] if t["params"] != {"weights": {"landmarks": 3}}]
    assert plot_lambda_sweep(results, tmp_path / "out") is None


def test_bad_example_raises_data_error(tmp_path):
    run = make_run(tmp_path)
    bad = run / "trials" / "r0-f0" / "example.npz"
    np.savez(bad, image=np.zeros((4, 4), np.float32))
    results = json.loads((run / "results.json").read_text())
    with pytest.raises(DataError, match=r"r0-f0.*example\.npz: lacks the array 'labels'"):
        plot_overlays(results, run, run / "plots")
    bad.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"example\.npz: not a readable \.npz file"):
        plot_overlays(results, run, run / "plots")


def test_write_report_embeds_plots(tmp_path):
    run = make_run(tmp_path)
    path = write_report(run)  # no plots yet: makes them
    assert path == run / "report.md"
    text = path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 7
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("plots/")
        _readable_png(run / link)
    board = build_leaderboard(json.loads((run / "results.json").read_text()))
    assert board["rule"] in text
    for row in board["rows"]:
        assert row["label"] in text
    assert "| broken | single | 0 | 0 | failed | boom |" in text
    assert "# mtlbench report: plots-test" in text
