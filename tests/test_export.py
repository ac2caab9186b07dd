"""mtlbench export: results.json as CSV, and trials recording their leaderboard label."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from mtlbench.cli import app
from mtlbench.orchestrate.results import write_results


def trial(tid, strategy, params, fold, iou):
    return {"id": tid, "dir": f"trials/{tid}", "strategy": strategy, "use": strategy, "params": params, "fold": fold,
            "seed": 0, "status": "completed", "metrics": {"seg/iou_mean": iou}, "reference": {"seg/iou_mean": 0.0},
            "per_patient": [{"patient": f"p{fold}", "seg/iou_mean": iou, "reference": {"seg/iou_mean": 0.0}}],
            "config": {"big": "copy"}}


def test_export_writes_trials_and_patients(tmp_path):
    records = [trial("a", "joint", {"w": 1}, 0, 0.5), trial("b", "joint", {"w": 3}, 0, 0.4), trial("c", "single", {}, 1, 0.7)]
    write_results(tmp_path, {"main_metric": "seg/iou_mean", "baseline": "single"}, records)
    saved = json.loads((tmp_path / "results.json").read_text())["trials"]
    assert [t["label"] for t in saved] == ["joint w=1", "joint w=3", "single"]
    r = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "csv" / "trials.csv")))
    assert [row["label"] for row in rows] == ["joint w=1", "joint w=3", "single"]
    assert rows[1]["seg/iou_mean"] == "0.4" and rows[1]["reference:seg/iou_mean"] == "0.0"
    patients = list(csv.DictReader(open(tmp_path / "csv" / "patients.csv")))
    assert [(p["trial"], p["patient"], p["seg/iou_mean"]) for p in patients] == [("a", "p0", "0.5"), ("b", "p0", "0.4"), ("c", "p1", "0.7")]
    assert "reference" not in patients[0]
