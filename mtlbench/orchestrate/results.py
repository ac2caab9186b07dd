"""The run folder's results store: trial records in, ``results.json`` (atomic) out."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from mtlbench.config import Config
from mtlbench.engine.trialspec import TrialSpec
from mtlbench.fsutil import write_json

RESULTS = "results.json"
TRIALS = "trials"
FINISHED = ("completed", "diverged")


def trial_dir(run_dir: Path, spec: TrialSpec) -> Path:
    return (run_dir / TRIALS / spec.id).resolve()


def read_record(path: Path) -> dict[str, Any] | None:
    """A trial's result.json, or None when absent or unreadable (an interrupted trial)."""
    f = path / "result.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_record(run_dir: Path, spec: TrialSpec) -> dict[str, Any] | None:
    rec = read_record(trial_dir(run_dir, spec))
    return rec if rec is not None and rec.get("status") in FINISHED else None


def metric_meta(cfg: Config, cache_info: Any) -> dict[str, Any]:
    """Metric directions and units, the main and auxiliary metrics, and the resolved config, from the configured tasks."""
    from mtlbench.assemble import make_tasks

    directions: dict[str, bool] = {}
    units: dict[str, str] = {}
    bounds: dict[str, list[float | None]] = {}
    aux: list[str] = []
    for label, task in make_tasks(cfg).items():
        for key, m in task.metrics().items():
            directions[f"{label}/{key}"] = m.higher_is_better
            if m.unit:
                units[f"{label}/{key}"] = m.unit
            if any(b is not None for b in m.bounds):
                bounds[f"{label}/{key}"] = list(m.bounds)
        if label != cfg.experiment.main_task:
            aux.append(f"{label}/{task.main_metric()}")
    return {
        "experiment": cfg.experiment.name,
        "main_metric": f"{cfg.experiment.main_task}/{cfg.experiment.main_metric}",
        "baseline": cfg.experiment.baseline,
        "directions": directions,
        "units": units,
        "bounds": bounds,
        "organs": list(cache_info.organs),
        "landmarks": list(cache_info.landmarks),
        "aux_metrics": aux,
        "folds": cfg.experiment.folds,
        "seeds": list(cfg.experiment.seeds),
        "profile": cfg.profile,
        "preprocess": {"clamp": list(cfg.preprocess.clamp), "scale": cfg.preprocess.scale},
        "config": cfg.to_toml_dict(),
    }


def write_results(run_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """Write results.json atomically; trial records are stored without their config copy (``meta.config`` has it once)."""
    from mtlbench.report.leaderboard import group_rows

    labels = {id(t): g.label for g in group_rows({"trials": records}) for t in g.trials}
    trials = []
    for rec in records:
        label = labels.get(id(rec))
        rec = {k: v for k, v in rec.items() if k not in ("config", "folds")}
        rec["label"] = label  # the leaderboard row the trial belongs to
        if rec.get("dir"):  # relative, so a run folder can be moved or shared
            d = Path(rec["dir"])
            rec["dir"] = str(d.relative_to(run_dir)) if d.is_relative_to(run_dir) else str(d)
        trials.append(rec)
    meta = dict(meta, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    path = run_dir / RESULTS
    write_json(path, {"meta": meta, "trials": trials})
    return path

