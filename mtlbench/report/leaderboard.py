"""The leaderboard: one row per strategy and parameter point, with fold statistics and paired tests against its baseline."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtlbench.engine.trialspec import flatten_params
from mtlbench.errors import ConfigError, DataError
from mtlbench.report.stats import corrected_paired_t, describe, holm, paired_test

ALPHA = 0.05
TEST = "corrected paired t-test over cross-validation folds (Nadeau & Bengio)"
RULE = (
    "better: mean difference to the baseline in the metric's good direction with Holm-adjusted two-sided "
    "corrected paired t-test p < 0.05 over folds (n = folds x seeds; a fold's test patients share one model, "
    "so the fold is the unit; the patient-level Wilcoxon test is shown for reference only)"
)
STATUSES = ("completed", "failed", "diverged")
_LOWER_IS_BETTER_PREFIXES = ("rmse", "hd", "error", "loss", "mse", "mae", "asd", "assd")


# ----------------------------------------------------------------------------- loading


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN_DIR/results.json`` (or the file itself when given); bad files raise DataError naming them."""
    path = Path(run_dir)
    if not path.is_file():
        path = path / "results.json"
    if not path.is_file():
        raise DataError(f"{path}: results file not found (expected RUN_DIR/results.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or not isinstance(data.get("trials"), list):
        raise DataError(f"{path}: expected an object with 'meta' (object) and 'trials' (list)")
    for i, trial in enumerate(data["trials"]):
        if not isinstance(trial, dict):
            raise DataError(f"{path}: trials[{i}] is not an object")
        for key in ("strategy", "fold", "status"):
            if key not in trial:
                raise DataError(f"{path}: trials[{i}] lacks {key!r}")
        for key in ("metrics",):
            if not isinstance(trial.get(key) or {}, dict):
                raise DataError(f"{path}: trials[{i}].{key} is not an object")
        if not isinstance(trial.get("per_patient") or [], list):
            raise DataError(f"{path}: trials[{i}].per_patient is not a list")
    return data


# ----------------------------------------------------------------------------- rows


@dataclass
class RowGroup:
    """The trials of one leaderboard row: a strategy label at one parameter point."""

    strategy: str
    params: dict[str, Any]
    key: str
    label: str = ""
    compare_to: str | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completed(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t.get("status") == "completed"]

    def count(self, status: str) -> int:
        return sum(1 for t in self.trials if t.get("status") == status)


def canonical(params: Any) -> str:
    """Parameters as canonical JSON (sorted keys, no spaces): the identity of a parameter point."""
    return json.dumps(params or {}, sort_keys=True, separators=(",", ":"), default=str)


def format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def varying_params(groups: list[RowGroup]) -> list[str]:
    """The dotted parameter keys whose values differ between ``groups`` (missing counts as different)."""
    flats = [flatten_params(g.params) for g in groups]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({canonical(f[k]) if k in f else "<missing>" for f in flats}) > 1]


def group_rows(results: dict[str, Any]) -> list[RowGroup]:
    """Group trials into rows by (strategy label, canonical params), in order of first appearance.

    A row's label is the strategy label, followed by the parameters that differ
    between that strategy's rows (``"joint weights.landmarks=3"``).
    """
    groups: dict[tuple[str, str], RowGroup] = {}
    for trial in results.get("trials", []):
        strategy = str(trial.get("strategy"))
        params = trial.get("params") or {}
        key = (strategy, canonical(params))
        group = groups.get(key)
        if group is None:
            group = groups[key] = RowGroup(strategy=strategy, params=params, key=key[1])
        group.trials.append(trial)
        if group.compare_to is None and trial.get("compare_to"):
            group.compare_to = str(trial["compare_to"])
    rows = list(groups.values())
    by_strategy: dict[str, list[RowGroup]] = {}
    for g in rows:
        by_strategy.setdefault(g.strategy, []).append(g)
    for siblings in by_strategy.values():
        keys = varying_params(siblings) if len(siblings) > 1 else []
        for g in siblings:
            flat = flatten_params(g.params)
            parts = [f"{k}={format_value(flat[k])}" if k in flat else f"{k}=-" for k in keys]
            g.label = " ".join([g.strategy, *parts])
    return rows


# ----------------------------------------------------------------------------- metrics


def available_metrics(results: dict[str, Any]) -> list[str]:
    keys: set[str] = set()
    for trial in results.get("trials", []):
        keys.update((trial.get("metrics") or {}).keys())
    return sorted(keys)


def resolve_metric(results: dict[str, Any], metric: str | None = None) -> str:
    """The metric key to rank by: ``metric`` or meta.main_metric; "iou_mean" finds "segmentation/iou_mean".

    Raises ConfigError listing the available keys when no trial has the metric
    (unless no trial has any metric at all, e.g. every trial failed).
    """
    meta = results.get("meta") or {}
    chosen = metric or meta.get("main_metric")
    available = available_metrics(results)
    if not chosen:
        raise ConfigError(f"results meta has no main_metric; choose one of: {', '.join(available) or 'none'}")
    if chosen in available or not available:
        return chosen
    if "/" not in chosen:
        hits = [k for k in available if k.split("/", 1)[-1] == chosen]
        if len(hits) == 1:
            return hits[0]
    raise ConfigError(f"metric {chosen!r} is in no trial's metrics; available: {', '.join(available)}")


def higher_is_better(meta: dict[str, Any], metric: str) -> bool:
    """meta.directions[metric]; without an entry, names like rmse/hd95/error/loss are lower-is-better."""
    directions = meta.get("directions") or {}
    if metric in directions:
        return bool(directions[metric])
    name = metric.split("/", 1)[-1].lower()
    return not name.startswith(_LOWER_IS_BETTER_PREFIXES)


def family_columns(meta: dict[str, Any], metric: str, available: list[str]) -> dict[str, str]:
    """Per-organ (or per-landmark) keys of the metric's family: "seg/iou_mean" -> {"kidney_right": "seg/iou_kidney_right"}."""
    task, sep, name = metric.rpartition("/")
    if not name.endswith("_mean"):
        return {}
    prefix = f"{task}{sep}{name[: -len('mean')]}"
    known = set(available) | set((meta.get("directions") or {}).keys())
    parts = list(meta.get("organs") or []) + list(meta.get("landmarks") or [])
    return {p: f"{prefix}{p}" for p in parts if f"{prefix}{p}" in known}


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def fold_values(trials: list[dict[str, Any]], key: str, section: str = "metrics") -> list[dict[str, Any]]:
    """Per fold: the metric averaged over that fold's trials (seeds) that report it; sorted by fold.

    ``section="reference"`` reads the trials' trivial-reference values instead.
    """
    per_fold: dict[Any, list[float]] = {}
    for trial in trials:
        v = _num((trial.get(section) or {}).get(key))
        if not math.isnan(v):
            per_fold.setdefault(trial.get("fold"), []).append(v)
    return [
        {"fold": fold, "value": float(np.mean(vals)), "n_trials": len(vals)}
        for fold, vals in sorted(per_fold.items(), key=lambda kv: (str(type(kv[0])), kv[0]))
    ]


def patient_values(trials: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Per test patient: the metric averaged over the trials (seeds) that tested the patient."""
    acc: dict[str, list[float]] = {}
    for trial in trials:
        for rec in trial.get("per_patient") or []:
            if not isinstance(rec, dict) or "patient" not in rec:
                continue
            v = _num(rec.get(key))
            if not math.isnan(v):
                acc.setdefault(str(rec["patient"]), []).append(v)
    return {p: float(np.mean(v)) for p, v in acc.items()}


def compare_patients(row: RowGroup, base: RowGroup, key: str) -> dict[str, Any]:
    """Paired test of ``row`` minus ``base`` over the test patients both have a value for."""
    a, b = patient_values(row.completed, key), patient_values(base.completed, key)
    common = sorted(set(a) & set(b))
    result = paired_test([a[p] for p in common], [b[p] for p in common])
    result["patients"] = common
    return result


def unit_values(trials: list[dict[str, Any]], key: str) -> dict[tuple[Any, ...], float]:
    """Per (fold, seed): the trial's metric (its mean over the fold's test patients)."""
    out: dict[tuple[Any, ...], float] = {}
    for trial in trials:
        v = _num((trial.get("metrics") or {}).get(key))
        if not math.isnan(v):
            out[(trial.get("fold"), trial.get("seed"))] = v
    return out


def _fold_means(units: dict[tuple[Any, ...], float]) -> dict[tuple[Any, ...], float]:
    per_fold: dict[Any, list[float]] = {}
    for (fold, _), v in units.items():
        per_fold.setdefault(fold, []).append(v)
    return {(fold,): float(np.mean(v)) for fold, v in per_fold.items()}


def holdout_ratio(trials: list[dict[str, Any]], folds: int | None) -> float:
    """n_test / n_train of the trials' folds (their patient lists), else 1 / (k - 1) for k folds (``folds``, or those seen)."""
    ratios = [
        len(t["test_patients"]) / len(t["train_patients"])
        for t in trials
        if t.get("test_patients") and t.get("train_patients")
    ]
    if ratios:
        return float(np.mean(ratios))
    k = folds or len({t.get("fold") for t in trials})
    return 1.0 / (k - 1) if k > 1 else 0.0


def compare_units(row: RowGroup, base: RowGroup, key: str, folds: int | None = None) -> dict[str, Any]:
    """The deciding test of ``row`` minus ``base``: one paired value per (fold, seed) both have.

    When the two rows share no (fold, seed), each fold's seeds are averaged and
    folds are paired instead. The test is :func:`corrected_paired_t`.
    """
    a, b = unit_values(row.completed, key), unit_values(base.completed, key)
    unit = "fold x seed"
    common = sorted(set(a) & set(b), key=str)
    if not common:
        a, b, unit = _fold_means(a), _fold_means(b), "fold"
        common = sorted(set(a) & set(b), key=str)
    result = corrected_paired_t([a[u] - b[u] for u in common], holdout_ratio(row.completed + base.completed, folds))
    result.update(test=TEST, unit=unit)
    return result


# ----------------------------------------------------------------------------- the board


def build_leaderboard(results: dict[str, Any], metric: str | None = None) -> dict[str, Any]:
    """Rank strategy rows by ``metric`` (default meta.main_metric); JSON-serialisable, NaN as null."""
    meta = results.get("meta") or {}
    metric = resolve_metric(results, metric)
    higher = higher_is_better(meta, metric)
    available = available_metrics(results)
    organ_keys = family_columns(meta, metric, available)
    aux_key = next((k for k in meta.get("aux_metrics") or [] if k != metric), None)
    baseline = meta.get("baseline")
    groups = group_rows(results)

    def first_of(label: str | None) -> RowGroup | None:
        return next((g for g in groups if g.strategy == label), None) if label else None

    base_row = first_of(baseline)
    rows: list[dict[str, Any]] = []
    for g in groups:
        rows.append(_row(g, metric, organ_keys, aux_key, meta))
        target = first_of(g.compare_to or baseline)
        row = rows[-1]
        row["is_baseline"] = g is base_row
        row["compare_to"] = target.label if target is not None and target is not g else None
        if target is not None and target is not g:
            vs = compare_units(g, target, metric, meta.get("folds"))
            patients = compare_patients(g, target, metric)
            patients.pop("patients")
            vs["patient_level"] = patients
            row["vs_baseline"] = vs
        else:
            row["vs_baseline"] = None

    compared = [r for r in rows if r["vs_baseline"] is not None]
    for r, p in zip(compared, holm([r["vs_baseline"]["p"] for r in compared])):
        r["vs_baseline"]["p_holm"] = p
    for r, p in zip(compared, holm([r["vs_baseline"]["patient_level"]["p_wilcoxon"] for r in compared])):
        r["vs_baseline"]["patient_level"]["p_holm"] = p
    for r in rows:
        vs = r["vs_baseline"]
        if vs is None or vs["n"] == 0:
            r["better"] = None
            continue
        diff = vs["mean_diff"]
        good = (diff > 0) if higher else (diff < 0)
        r["better"] = bool(good and vs["p_holm"] < ALPHA)  # NaN compares False

    rows.sort(key=lambda r: (math.isnan(r["mean"]), -r["mean"] if higher else r["mean"]))
    rank = 0
    for r in rows:
        if not math.isnan(r["mean"]):
            rank += 1
            r["rank"] = rank
        else:
            r["rank"] = None
    board = {
        "metric": metric,
        "direction": "higher" if higher else "lower",
        "higher_is_better": higher,
        "baseline": baseline,
        "alpha": ALPHA,
        "test": TEST,
        "rule": RULE,
        "organ_metrics": organ_keys,
        "aux_metric": aux_key,
        "rows": rows,
    }
    return _jsonable(board)


def clip_to_bounds(meta: dict[str, Any], metric: str, low: float, high: float) -> tuple[float, float]:
    """A confidence interval clipped to the metric's range (``meta.bounds``, from ``MetricInfo.bounds``)."""
    lo, hi = ((meta.get("bounds") or {}).get(metric) or [None, None])[:2]
    if lo is not None and not math.isnan(low):
        low = max(low, float(lo))
    if hi is not None and not math.isnan(high):
        high = min(high, float(hi))
    return low, high


def _row(g: RowGroup, metric: str, organ_keys: dict[str, str], aux_key: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    done = g.completed
    folds = fold_values(done, metric)
    desc = describe([f["value"] for f in folds])
    desc["ci_low"], desc["ci_high"] = clip_to_bounds(meta, metric, desc["ci_low"], desc["ci_high"])
    organs = {name: describe([f["value"] for f in fold_values(done, key)])["mean"] for name, key in organ_keys.items()}
    aux = None
    if aux_key is not None:
        a = describe([f["value"] for f in fold_values(done, aux_key)])
        if a["n"]:
            ref = describe([f["value"] for f in fold_values(done, aux_key, "reference")])
            ratio = a["mean"] / ref["mean"] if ref["n"] and ref["mean"] not in (0.0,) else math.nan
            aux = {
                "metric": aux_key, "mean": a["mean"], "std": a["std"], "higher_is_better": higher_is_better(meta, aux_key),
                "reference": ref["mean"] if ref["n"] else None, "ratio_to_reference": ratio,
            }
    return {
        "rank": None,
        "strategy": g.strategy,
        "params": g.params,
        "label": g.label,
        "mean": desc["mean"],
        "std": desc["std"],
        "ci_low": desc["ci_low"],
        "ci_high": desc["ci_high"],
        "n_folds": desc["n"],
        "folds": folds,
        "organs": organs,
        "aux": aux,
        "trials": len(g.trials),
        "completed": g.count("completed"),
        "failed": g.count("failed"),
        "diverged": g.count("diverged"),
    }


def _jsonable(value: Any) -> Any:
    """Plain Python types; non-finite floats become None so the board is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


# ----------------------------------------------------------------------------- text formatting


def fmt_num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_mean_std(row: dict[str, Any], digits: int = 4) -> str:
    if row.get("mean") is None:
        return "—"
    std = row.get("std")
    return fmt_num(row["mean"], digits) + ("" if std is None else f" ± {std:.{digits}f}")


def fmt_ci(row: dict[str, Any], digits: int = 4) -> str:
    if row.get("ci_low") is None or row.get("ci_high") is None:
        return "—"
    return f"[{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"


def fmt_aux(row: dict[str, Any], digits: int = 4) -> str:
    """The auxiliary metric, mean ± std, and its ratio to the trivial reference (x1.00 = no better than it)."""
    aux = row.get("aux")
    if not aux:
        return "—"
    text = fmt_num(aux["mean"], digits) + ("" if aux.get("std") is None else f" ± {aux['std']:.{digits}f}")
    if aux.get("ratio_to_reference") is not None:
        text += f" (×{aux['ratio_to_reference']:.2f} ref)"
    return text


def fmt_delta(row: dict[str, Any], digits: int = 4) -> str:
    if row.get("is_baseline"):
        return "(baseline)"
    vs = row.get("vs_baseline")
    if not vs or vs.get("mean_diff") is None:
        return "—"
    return f"{vs['mean_diff']:+.{digits}f} (p={fmt_p(vs.get('p_holm'))}, n={vs['n']})"


def fmt_patient_delta(row: dict[str, Any], digits: int = 4) -> str:
    """The patient-level Wilcoxon comparison (for reference; it does not decide)."""
    vs = (row.get("vs_baseline") or {}).get("patient_level")
    if not vs or vs.get("mean_diff") is None:
        return "—"
    return f"{vs['mean_diff']:+.{digits}f} (p={fmt_p(vs.get('p_holm'))}, n={vs['n']})"


def fmt_counts(row: dict[str, Any]) -> str:
    return f"{row['completed']}/{row['failed']}/{row['diverged']}"


def display_label(row: dict[str, Any]) -> str:
    return row["label"] + (" (baseline)" if row.get("is_baseline") else "")


def leaderboard_columns(board: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """The board's data columns as (header, cells per row), in display order (rank and label are keys)."""
    from rich.text import Text

    rows = board["rows"]
    cols: list[tuple[str, list[Any]]] = [
        ("mean ± std", [fmt_mean_std(r) for r in rows]),
        ("95% CI", [fmt_ci(r) for r in rows]),
    ]
    for organ in board["organ_metrics"]:
        cols.append((organ, [fmt_num(r["organs"].get(o)) for r in rows for o in [organ]]))
    if board.get("aux_metric"):
        cols.append((f"{board['aux_metric']} (× trivial ref)", [fmt_aux(r) for r in rows]))
    cols.append(
        (
            "Δ vs baseline (p Holm, n folds)",
            [
                Text(fmt_delta(r) + (" *" if r.get("better") else ""), style="green" if r.get("better") else "")
                for r in rows
            ],
        )
    )
    cols.append(("ok/failed/diverged", [fmt_counts(r) for r in rows]))
    return cols


def _cell_width(cell: Any) -> int:
    from rich.cells import cell_len

    return cell_len(cell.plain if hasattr(cell, "plain") else str(cell))


def _column_width(header: str, cells: list[Any]) -> int:
    """The width a column needs with no cell cut: its widest cell, or its header's longest word (headers wrap)."""
    return max([_cell_width(c) for c in cells] + [max(len(w) for w in header.split())])


def _add_column(table: Any, header: str, cells: list[Any], **kwargs: Any) -> None:
    """A column at least as wide as its widest cell, so rich wraps the header, never a number."""
    table.add_column(header, width=_column_width(header, cells), overflow="fold", **kwargs)


def pack_columns(key_width: int, widths: list[int], total: int) -> list[list[int]]:
    """Greedy groups of column indices whose table (key columns + group) fits in ``total`` columns.

    A rich table with box borders spends 3 columns per column (padding + rule) plus 1;
    a column wider than any table could hold gets a table of its own.
    """
    groups: list[list[int]] = [[]]
    used = key_width
    for i, w in enumerate(widths):
        if groups[-1] and used + w + 3 > total:
            groups.append([])
            used = key_width
        groups[-1].append(i)
        used += w + 3
    return groups


def render_leaderboard(board: dict[str, Any], console: Any = None) -> Any:
    """Print the board as rich table(s) followed by the rule; returns the (first) Table.

    No number or label is ever cut: when the columns do not fit the console's
    width, the board is printed as several tables, each repeating the rank and
    strategy columns, with the data columns split between them in order.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    arrow = "↑" if board["higher_is_better"] else "↓"
    rows = board["rows"]
    ranks = ["" if r["rank"] is None else str(r["rank"]) for r in rows]
    labels = [display_label(r) for r in rows]
    cols = leaderboard_columns(board)
    key_width = 1 + (_column_width("#", ranks) + 3) + (_column_width("strategy", labels) + 3)
    groups = pack_columns(key_width, [_column_width(h, c) for h, c in cols], console.width)
    first = None
    for n, group in enumerate(groups, start=1):
        title = f"mtlbench leaderboard: {board['metric']} ({arrow} better)" if n == 1 else "leaderboard, continued"
        if len(groups) > 1:
            title += f" [{n}/{len(groups)}]"
        table = Table(title=title)
        _add_column(table, "#", ranks, justify="right")
        _add_column(table, "strategy", labels)
        for i in group:
            _add_column(table, cols[i][0], cols[i][1], justify="right")
        for k, row in enumerate(rows):
            style = "bold cyan" if row.get("is_baseline") else ("dim" if row["mean"] is None else None)
            table.add_row(ranks[k], Text(labels[k]), *[cols[i][1][k] for i in group], style=style)
        console.print(table)
        first = first or table
    console.print(Text(f"* {board['rule']}. Baseline: {board.get('baseline')}."))
    return first
