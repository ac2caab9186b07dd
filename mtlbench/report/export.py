"""``mtlbench export``: a run's results as flat CSV tables (one row per trial, one per trial and test patient)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from mtlbench.fsutil import write_text
from mtlbench.report.leaderboard import load_results

TRIAL_FIELDS = ("id", "label", "strategy", "use", "fold", "seed", "status", "wall_time_s", "peak_memory_mb", "error")


def _csv(header: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in header})
    return buf.getvalue()


def export_csv(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``trials.csv`` and ``patients.csv`` (into ``out_dir``, default the run folder); return their paths.

    trials.csv: the trial's identity, status and every final metric (mean over
    its test patients) and trivial reference (``reference:<metric>``).
    patients.csv: one row per trial and test patient with that patient's metrics.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    results = load_results(run_dir)
    trials = results["trials"]
    metrics = sorted({k for t in trials for k in (t.get("metrics") or {})})
    refs = sorted({k for t in trials for k in (t.get("reference") or {})})
    rows = []
    for t in trials:
        row = {k: t.get(k) for k in TRIAL_FIELDS}
        row.update(t.get("metrics") or {})
        row.update({f"reference:{k}": v for k, v in (t.get("reference") or {}).items()})
        rows.append(row)
    header = list(TRIAL_FIELDS) + metrics + [f"reference:{k}" for k in refs]
    per_patient = [
        {"trial": t.get("id"), "label": t.get("label"), "fold": t.get("fold"), "seed": t.get("seed"), **p}
        for t in trials for p in (t.get("per_patient") or []) if isinstance(p, dict)
    ]
    pkeys = sorted({k for p in per_patient for k, v in p.items() if k not in ("trial", "label", "fold", "seed", "patient")
                    and not isinstance(v, dict)})
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "trials.csv", out / "patients.csv"]
    write_text(paths[0], _csv(header, rows))
    write_text(paths[1], _csv(["trial", "label", "fold", "seed", "patient", *pkeys], per_patient))
    return paths
