"""``mtlbench compare``: one leaderboard across several runs of the same split.

Every trial of every run becomes a trial of one merged results dict, its
strategy label prefixed with its run's name (``<run folder name>:<label>``),
and :func:`mtlbench.report.leaderboard.build_leaderboard` ranks them: the
fold-level corrected paired t-test pairs rows over the (fold, seed) units they
share, the patient-level Wilcoxon test over the patients they share, exactly
as within one run. That pairing is only meaningful when the runs split the
patients the same way, so runs whose folds differ are refused.

Like the rest of ``mtlbench.report`` this imports neither torch nor Ray.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mtlbench.errors import ConfigError
from mtlbench.report.leaderboard import build_leaderboard, group_rows, load_results, render_leaderboard

SPLITS = "splits.json"
#: Config sections that do not change what a trial learns; left out of ``config_differences``.
_NOT_COMPARED = ("run", "resources")


def _run_paths(run_dirs: list[str | Path]) -> list[Path]:
    """Each argument as its run folder (a ``results.json`` given directly stands for its folder)."""
    out = []
    for d in run_dirs:
        p = Path(d)
        out.append(p.parent if p.is_file() else p)
    return out


def run_names(paths: list[Path]) -> list[str]:
    """The run folders' names; where two are equal, their parent's name too (``a/run``, ``b/run``)."""
    resolved = [p.resolve() for p in paths]
    names = [p.name for p in resolved]
    for depth in range(2, 6):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        names = ["/".join(r.parts[-depth:]) if n in dup else n for n, r in zip(names, resolved)]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"run {twice} is given twice")
    return names


def run_split(run_dir: Path, results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """fold -> {"test": set, "train": set or None}: the run's ``splits.json``, else what its trials record.

    Without ``splits.json`` (a results file copied on its own) the trials'
    ``test_patients`` / ``train_patients``, or the patients of their
    ``per_patient`` rows, say which patients each fold tested.
    """
    path = run_dir / SPLITS
    if path.is_file():
        from mtlbench.data.folds import load_folds

        return {f["fold"]: {"test": set(f["test"]), "train": set(f["train"])} for f in load_folds(path)}
    split: dict[int, dict[str, Any]] = {}
    for trial in results["trials"]:
        fold = split.setdefault(trial["fold"], {"test": set(), "train": None})
        if trial.get("test_patients"):
            fold["test"].update(map(str, trial["test_patients"]))
        for rec in trial.get("per_patient") or []:
            if isinstance(rec, dict) and "patient" in rec:
                fold["test"].add(str(rec["patient"]))
        if trial.get("train_patients"):
            fold["train"] = set(map(str, trial["train_patients"]))
    return split


def check_same_split(names: list[str], splits: list[dict[int, dict[str, Any]]]) -> None:
    """ConfigError (one line) unless every run has the first run's folds, each testing the same patients."""
    ref_name, ref = names[0], splits[0]
    if not any(f["test"] for f in ref.values()):
        raise ConfigError(f"run {ref_name}: no splits.json and no trial names its test patients; cannot check the split")
    for name, split in zip(names[1:], splits[1:]):
        why = _split_difference(ref, split)
        if why:
            raise ConfigError(
                f"runs {ref_name} and {name} do not share a split ({why}); only runs with the same folds "
                "(the same splits.json: patients, experiment.folds and experiment.fold_seed) can be compared"
            )


def _split_difference(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> str | None:
    if sorted(a) != sorted(b):
        return f"{len(a)} vs {len(b)} folds"
    for fold in sorted(a):
        ta, tb = a[fold]["test"], b[fold]["test"]
        if ta and tb and ta != tb:
            other = sorted(ta ^ tb)
            return f"fold {fold} tests different patients, e.g. {other[0]!r}"
        tra, trb = a[fold]["train"], b[fold]["train"]
        if tra is not None and trb is not None and tra != trb:
            return f"fold {fold} trains on different patients, e.g. {sorted(tra ^ trb)[0]!r}"
    return None


def _flat(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(value, sort_keys=True, default=str)}


def config_differences(metas: list[dict[str, Any]]) -> list[str]:
    """Dotted config keys (``meta.config``) whose values differ between the runs, ``run``/``resources`` left out."""
    flats = [_flat({k: v for k, v in (m.get("config") or {}).items() if k not in _NOT_COMPARED}) for m in metas]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({f.get(k, "<unset>") for f in flats}) > 1]


def merge_runs(names: list[str], runs: list[dict[str, Any]], baseline: str | None = None) -> dict[str, Any]:
    """One results dict of every run's trials, strategies (and ``compare_to``) prefixed ``<run>:``.

    The baseline is ``baseline`` (``RUN:LABEL``, or a label of the first run),
    else the first run's ``meta.baseline`` (or, when that run has no such
    trials, the first run's that does).
    """
    meta = copy.deepcopy(runs[0]["meta"])
    for key in ("directions", "units", "bounds"):
        merged: dict[str, Any] = {}
        for run in reversed(runs):
            merged.update(run["meta"].get(key) or {})
        meta[key] = merged
    meta["aux_metrics"] = list(dict.fromkeys(k for run in runs for k in run["meta"].get("aux_metrics") or []))
    trials = []
    for name, run in zip(names, runs):
        for t in run["trials"]:
            t = dict(t)
            t["run"] = name
            t["id"] = f"{name}:{t.get('id')}"
            t["strategy"] = f"{name}:{t['strategy']}"
            if t.get("compare_to"):
                t["compare_to"] = f"{name}:{t['compare_to']}"
            trials.append(t)
    strategies = list(dict.fromkeys(t["strategy"] for t in trials))
    if baseline is not None:
        chosen = baseline if ":" in baseline and baseline.split(":", 1)[0] in names else f"{names[0]}:{baseline}"
        if chosen not in strategies:
            raise ConfigError(f"--baseline {baseline!r}: no such row; choose one of: {', '.join(strategies)}")
    else:
        own = [f"{n}:{r['meta'].get('baseline')}" for n, r in zip(names, runs)]
        chosen = next((b for b in own if b in strategies), own[0])
    meta["baseline"] = chosen
    meta["experiment"] = ", ".join(dict.fromkeys(str(r["meta"].get("experiment")) for r in runs))
    return {"meta": meta, "trials": trials}


def compare_runs(run_dirs: list[str | Path], metric: str | None = None, baseline: str | None = None) -> dict[str, Any]:
    """The leaderboard across ``run_dirs`` (at least two runs of one split); JSON-serialisable.

    The board of :func:`build_leaderboard` (metric default: the first run's
    main metric) plus ``runs`` (name, path, experiment, created, trials, main
    metric per run) and ``config_differences`` (the config keys in which the
    runs differ). Runs that do not share their folds raise ConfigError.
    """
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run folders")
    paths = _run_paths(run_dirs)
    names = run_names(paths)
    runs = [load_results(p) for p in paths]
    check_same_split(names, [run_split(p, r) for p, r in zip(paths, runs)])
    merged = merge_runs(names, runs, baseline)
    board = build_leaderboard(merged, metric)
    run_of = {g.strategy: g.trials[0]["run"] for g in group_rows(merged)}
    for row in board["rows"]:
        row["run"] = run_of.get(row["strategy"])
    board["runs"] = [
        {
            "name": name,
            "path": str(path.resolve()),
            "experiment": run["meta"].get("experiment"),
            "created": run["meta"].get("created"),
            "main_metric": run["meta"].get("main_metric"),
            "trials": len(run["trials"]),
        }
        for name, path, run in zip(names, paths, runs)
    ]
    board["config_differences"] = config_differences([r["meta"] for r in runs])
    return board


def render_comparison(board: dict[str, Any], console: Any = None) -> None:
    """The runs compared, the leaderboard (``render_leaderboard``), then the config keys the runs differ in."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    runs = "; ".join(f"{r['name']} = {r['path']} ({r['trials']} trials)" for r in board["runs"])
    console.print(Text(f"comparing {len(board['runs'])} runs of one split: {runs}"))
    render_leaderboard(board, console)
    diff = board.get("config_differences") or []
    if diff:
        shown = ", ".join(diff[:12]) + (f" and {len(diff) - 12} more" if len(diff) > 12 else "")
        console.print(Text(f"The runs' configs differ in: {shown}."))
    else:
        console.print(Text("The runs' configs are the same apart from [run] and [resources]."))

