"""Tests for mtlbench.report.plots and markdown on a small run folder built here."""

from __future__ import annotations

import copy
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from mtlbench.data.grid import cache_affine
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


CONFIG = {
    "experiment": {"name": "plots-test", "folds": 2},
    "data": {"landmarks": ["renal_pelvis_right"]},
    "preprocess": {"slice_size": [H, W]},
    "train": {"epochs": 3, "batch_size": 2, "lr": 1e-4},
    "strategies": {"single": {}, "joint": {"grid": {"weights.landmarks": [1, 3]}}},
    "profile": "cpu",
}


def _example(path: Path, patient: str, joint: bool) -> None:
    """example.npz as the engine writes it: the real tasks' pictures of one hand-made slice."""
    from mtlbench.api import CachedPatient, Geometry
    from mtlbench.assemble import make_tasks
    from mtlbench.config import validate_config
    from mtlbench.engine.train import example_arrays

    yy, xx = np.mgrid[0:H, 0:W]
    labels = np.zeros((1, H, W), np.uint8)
    labels[0, 10:30, 8:20] = 1
    labels[0, 12:32, 28:40] = 2
    pred = np.zeros_like(labels)
    pred[0, 13:33, 10:22] = 1
    pred[0, 12:30, 30:42] = 2
    heat = np.exp(-((yy - 20) ** 2 + (xx - 14) ** 2) / 18.0).astype(np.float32)[None, None]
    geometry = Geometry(size=(W, H, 1), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    rec = CachedPatient(
        id=patient,
        image=np.linspace(-1.0, 1.0, H * W, dtype=np.float32).reshape(1, H, W),
        labels=labels,
        orig_labels=labels,
        index_to_physical=cache_affine(geometry, (H, W)),
        geometry=geometry,
        targets={"landmarks": {"heatmaps": heat}},
    )
    outputs = {"segmentation": 10.0 * np.moveaxis(np.eye(3, dtype=np.float32)[pred], -1, 1)}
    if joint:
        outputs["landmarks"] = 0.8 * np.roll(heat, 2, axis=3)
    comp = types.SimpleNamespace(model_tasks=list(outputs), tasks=make_tasks(validate_config(CONFIG)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **example_arrays(rec, outputs, comp))


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
                    "train": {"loss/segmentation": 1.0 / (e + 1), "grad_norm/segmentation": 2.0 / (e + 1),
                              **({"loss/landmarks": 0.1 / (e + 1), "grad_norm/landmarks": 0.02 * (e + 1),
                                  "lambda/landmarks": float(params["weights"]["landmarks"])} if strategy == "joint" else {})},
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
                    "train": {"epochs": 3, "batch_size": 2, "lr": 1e-4, "lr_decay_epoch": 10 if r < 2 else 20},
                    "compare_to": None,
                }
            )
            _example(root / "trials" / name / "example.npz", patients[0], strategy == "joint")
    trials.append(dict(trials[0], id="broken", dir="trials/broken", status="failed", error="boom", metrics={}, per_patient=[], history=[]))
    # written as a run writes it: metric_meta of the config, then write_results (which strips trial configs)
    from mtlbench.config import validate_config
    from mtlbench.orchestrate.results import metric_meta, write_results

    cfg = validate_config(CONFIG)
    meta = metric_meta(cfg, types.SimpleNamespace(organs=cfg.data.organs, landmarks=cfg.data.landmarks))
    for t in trials:
        t["config"] = cfg.to_toml_dict()  # what run_trial records; results.json keeps it once, in meta
    write_results(root, meta, trials)
    return root


@pytest.fixture(autouse=True)
def _fast_figures(request, monkeypatch):
    """Low-resolution PNGs only, except where a test checks the vector copies (rendering dominates the time)."""
    import mtlbench.report.plots as plots

    monkeypatch.setattr(plots, "DPI", 50)
    if "vector" not in request.node.name:
        monkeypatch.setattr(plots, "FORMATS", ("png",))


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
        + ["lambda_sweep.png", "grad_norms.png"]
        + [f"overlay_0{i}_{s}.png" for i, s in ((1, "single"), (2, "joint_weights.landmarks-1"), (3, "joint_weights.landmarks-3"))]
    )
    for p in paths:
        assert p.parent == run / "plots"
        _readable_png(p)
    assert not list((run / "plots").glob(".*"))  # no temporary files left behind


def test_overlay_colours():
    """One colour per organ for the prediction's fill; the ground truth is drawn as outlines on top."""
    from mtlbench.report.plots import ORGAN_COLOURS, label_names

    pred = np.array([[0, 2, 2, 1]], np.uint8)
    rgba = overlay_rgba(pred)
    assert rgba[0, 0, 3] == 0.0
    assert tuple(rgba[0, 1, :3]) == pytest.approx(ORGAN_COLOURS[1]) and rgba[0, 1, 3] > 0
    assert tuple(rgba[0, 3, :3]) == pytest.approx(ORGAN_COLOURS[0])
    assert label_names(["kidney_right", "kidney_left"], np.array([0, 1, 2, 5])) == {
        1: "kidney_right", 2: "kidney_left", 5: "label 5"}


def test_figures_have_a_vector_copy_and_readable_axes(tmp_path):
    """Every PNG has a PDF beside it; axes name metric and unit; each task's loss has its own axis."""
    from mtlbench.report.plots import metric_label, plot_learning_curves, sweep_aux_keys

    run = make_run(tmp_path)
    for png in make_plots(run):
        pdf = png.with_suffix(".pdf")
        assert pdf.is_file() and pdf.read_bytes().startswith(b"%PDF"), pdf
    meta = json.loads((run / "results.json").read_text())["meta"]
    assert metric_label(meta, "landmarks/error_mm_mean") == "landmarks: error mean [mm]"
    assert metric_label(meta, "segmentation/iou_mean") == "segmentation: IoU mean"
    assert sweep_aux_keys(meta, "segmentation/iou_mean") == ["landmarks/rmse", "landmarks/error_mm_mean"]
    results = json.loads((run / "results.json").read_text())
    joint = plot_learning_curves(results, tmp_path / "curves")[1]
    single = plot_learning_curves(results, tmp_path / "curves")[0]
    # metric + segmentation loss + landmarks loss panels vs metric + segmentation loss
    assert imread(joint).shape[1] > 1.3 * imread(single).shape[1]


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
    with pytest.raises(DataError, match=r"r0-f0.*example\.npz: lacks the array 'pictures'"):
        plot_overlays(results, run, run / "plots")
    np.savez(bad, image=np.zeros((4, 4), np.float32), p0_truth=np.zeros((3, 3)),
             pictures=np.array(json.dumps([{"style": "map", "truth": "p0_truth", "pred": None}])))
    with pytest.raises(DataError, match=r"'p0_truth' has shape \(3, 3\), 'image' has \(4, 4\)"):
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
    assert len(links) == 8  # curves x 3, sweep, gradient norms, overlays x 3 (fixed lambdas: no weights plot)
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("plots/")
        _readable_png(run / link)
    board = build_leaderboard(json.loads((run / "results.json").read_text()))
    assert board["rule"] in text
    for row in board["rows"]:
        assert row["label"] in text
    assert "| broken | single | 0 | 0 | failed | boom |" in text
    assert "# mtlbench report: plots-test" in text
    # the run's settings come from results.json's meta.config (trial records carry no config)
    assert "config" not in json.loads((run / "results.json").read_text())["trials"][0]
    for row in ("| profile | cpu |", "| data source | phantom |", "| slice size | [48, 48] |", "| epochs | 3 |",
                "| batch size | 2 |", "| learning rate | 0.0001 (×0.1 at epoch 10) |"):
        assert row in text, row
    assert "lr_decay_epoch=20" in text  # the joint lambda-3 row trained with another schedule


def test_overlays_draw_what_each_task_pictures(tmp_path):
    run = make_run(tmp_path)
    ex = np.load(run / "trials" / "r1-f0" / "example.npz")
    pictures = json.loads(str(ex["pictures"]))
    assert [(p["task"], p["style"]) for p in pictures] == [("segmentation", "labels"), ("landmarks", "map")]
    assert ex[pictures[1]["truth"]].shape == (H, W) and float(ex[pictures[1]["truth"]].max()) == pytest.approx(1.0)
    single = json.loads(str(np.load(run / "trials" / "r0-f0" / "example.npz")["pictures"]))
    assert [p["task"] for p in single] == ["segmentation"]  # the baseline has no landmark tail
    paths = plot_overlays(json.loads((run / "results.json").read_text()), run, run / "plots")
    widths = [imread(p).shape[1] for p in paths]
    assert widths[1] > 2 * widths[0]  # organs + truth map + predicted map vs organs only


def test_parallel_writes_equal_serial_ones_and_survive_a_script_without_main_guard(tmp_path, monkeypatch):
    """make_plots draws in writer processes when it has 2+ CPUs: the files are byte-identical to writing them
    in-process, and a script that calls it at top level (no ``if __name__ == "__main__"``, so spawned
    children cannot start) still gets every figure, written in-process."""
    import subprocess
    import sys

    from mtlbench.report import plots

    run = make_run(tmp_path / "a")
    monkeypatch.setattr(plots, "_writer_count", lambda: 2)
    parallel = {p.name: p.read_bytes() for p in make_plots(run)}
    monkeypatch.setattr(plots, "_writer_count", lambda: 0)
    serial = {p.name: p.read_bytes() for p in make_plots(run)}
    assert parallel == serial and len(serial) >= 3

    other = make_run(tmp_path / "b")
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from mtlbench.report import plots\n"
        "plots._writer_count = lambda: 2\n"
        f"print(len(plots.make_plots({str(other)!r})))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) == len(serial)
    assert sorted(p.name for p in (other / "plots").glob("*.png")) == sorted(serial)  # (and, there, their PDFs)
