"""Figures from a run folder: learning curves, the parameter (lambda) sweep, learned weights, gradient
norms and example-slice overlays, each as a PNG (for reports) and a PDF (vector, for papers) beside it."""

from __future__ import annotations

import json
import math
import re
import zipfile
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from mtlbench.errors import DataError
from mtlbench.fsutil import atomic_path
from mtlbench.report.leaderboard import (
    RowGroup,
    fold_values,
    group_rows,
    higher_is_better,
    load_results,
    resolve_metric,
    varying_params,
)
from mtlbench.engine.trialspec import flatten_params
from mtlbench.report.stats import describe

PLOTS_DIR = "plots"
DPI = 200
#: Formats every figure is written in: the PNG the reports embed, and a vector copy.
FORMATS = ("png", "pdf")
# Soft-tissue CT window (HU): level 40, width 400.
WINDOW_LEVEL_HU = 40.0
WINDOW_WIDTH_HU = 400.0
DEFAULT_SCALE = 500.0
GT_COLOUR = (0.0, 0.85, 0.0)
PRED_COLOUR = (0.95, 0.1, 0.1)
OVERLAY_ALPHA = 0.45
#: One colour per organ (label value 1, 2, ...) in overlays.
ORGAN_COLOURS = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
                 (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81)]
#: How metric-name parts are written on an axis.
_WORDS = {"iou": "IoU", "dice": "Dice", "hd95": "HD95", "nsd": "NSD", "rmse": "RMSE", "mae": "MAE", "mse": "MSE",
          "mm": "", "mean": "mean"}


def metric_label(meta: dict[str, Any] | None, key: str) -> str:
    """An axis label from a metric key and its unit: 'segmentation/iou_mean' -> 'segmentation: IoU mean',
    'landmarks/error_mm_mean' -> 'landmarks: error mean [mm]' (the unit from ``meta.units``)."""
    task, _, name = key.rpartition("/")
    text = " ".join(w for w in (_WORDS.get(part, part) for part in name.split("_")) if w)
    unit = ((meta or {}).get("units") or {}).get(key)
    return (f"{task}: " if task else "") + text + (f" [{unit}]" if unit else "")


def slug(text: str) -> str:
    """A file-name-safe form of a row label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("=", "-")).strip("_") or "row"


def _figure(ncols: int, width: float = 5.0, height: float = 4.0) -> tuple[Any, list[Any]]:
    """A figure drawn by the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


#: Where ``_save`` hands figures while :func:`make_plots` runs (its pool of writer processes), else None.
_WRITERS: ContextVar[Any] = ContextVar("mtlbench_plot_writers", default=None)


def _save(fig: Any, path: Path) -> Path:
    """Write ``path`` (a .png) and the same figure in every other of :data:`FORMATS` beside it; returns the PNG.

    Inside :func:`make_plots` the figure is pickled to a writer process instead (drawing it, twice, is most
    of a report's time) and written there; make_plots waits for every write."""
    writers = _WRITERS.get()
    if writers is None:
        _write(fig, path, DPI, FORMATS)
    else:  # the settings travel with the figure: a writer process sees only the module's defaults
        writers.append((writers.pool.submit(_write, fig, path, DPI, FORMATS), fig, path))
    return path


def _write(fig: Any, path: Path, dpi: int, formats: tuple[str, ...]) -> None:
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        with atomic_path(target, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)


class _Writers(list):
    """The pending writes of one make_plots call, and the pool they run in."""

    def __init__(self, pool: Any) -> None:
        super().__init__()
        self.pool = pool


def _writer_count() -> int:
    """Writer processes for make_plots: the CPUs this process may use, at most 4; 0 (write in-process) on one."""
    from mtlbench.devices import available_cpus

    n = available_cpus()
    return 0 if n < 2 else min(n, 4)


# ----------------------------------------------------------------------------- learning curves


def _curve(trials: list[dict[str, Any]], section: str, key: str) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """Per fold: (epochs, value averaged over the fold's trials) from history[*][section][key]."""
    per_fold: dict[Any, dict[int, list[float]]] = {}
    for trial in trials:
        for entry in trial.get("history") or []:
            try:
                value = float((entry.get(section) or {}).get(key))
                epoch = int(entry["epoch"])
            except (TypeError, ValueError, KeyError):
                continue
            if math.isfinite(value):
                per_fold.setdefault(trial.get("fold"), {}).setdefault(epoch, []).append(value)
    out = {}
    for fold in sorted(per_fold, key=str):
        epochs = sorted(per_fold[fold])
        out[fold] = (np.array(epochs), np.array([np.mean(per_fold[fold][e]) for e in epochs]))
    return out


def _fold_mean(curves: dict[Any, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean across folds at every epoch any fold reports (folds lacking the epoch are left out)."""
    epochs = sorted({int(e) for xs, _ in curves.values() for e in xs})
    means = []
    for e in epochs:
        vals = [ys[xs == e][0] for xs, ys in curves.values() if np.any(xs == e)]
        means.append(float(np.mean(vals)))
    return np.array(epochs), np.array(means)


FOLD_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]


def _draw_folds(ax: Any, curves: dict[Any, tuple[np.ndarray, np.ndarray]], colour: Any, name: str, label_folds: bool) -> None:
    """Thin line per fold (one colour per fold when ``label_folds``, else ``colour``), thick mean in ``colour``."""
    for j, (fold, (xs, ys)) in enumerate(curves.items()):
        c = FOLD_COLOURS[j % len(FOLD_COLOURS)] if label_folds else colour
        ax.plot(xs, ys, color=c, lw=1.0, alpha=0.6, label=f"fold {fold}" if label_folds else None)
    xs, ys = _fold_mean(curves)
    ax.plot(xs, ys, color=colour, lw=2.6, label=name)


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_learning_curves(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One figure per row (``curves_NN_<label>``): the main metric per epoch for each fold (thin) and their
    mean (thick), then one panel per task's training loss ``loss/<task>`` (each on its own axis: losses of
    different tasks differ by orders of magnitude)."""
    meta = results.get("meta") or {}
    metric = resolve_metric(results)
    out_dir = Path(out_dir)
    paths = []
    for i, group in enumerate(group_rows(results), start=1):
        trials = group.completed
        metric_curves = _curve(trials, "metrics", metric)
        loss_curves = {k: c for k in _train_keys(trials, "loss/") if (c := _curve(trials, "train", k))}
        if not metric_curves and not loss_curves:
            continue
        fig, axes = _figure(1 + len(loss_curves), width=4.4, height=3.6)
        ax = axes[0]
        if metric_curves:
            _draw_folds(ax, metric_curves, "black", "mean over folds", label_folds=True)
            ax.legend(fontsize=7)
        else:  # e.g. the auxiliary task's own single-task row has no main-task tail
            ax.text(0.5, 0.5, f"this row has no {metric}", ha="center", va="center", transform=ax.transAxes)
        arrow = "↑" if higher_is_better(meta, metric) else "↓"
        ax.set(title=f"test metric ({arrow} better)", xlabel="epoch", ylabel=metric_label(meta, metric))
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
        for j, (lax, (key, curves)) in enumerate(zip(axes[1:], loss_curves.items())):
            task = key.removeprefix("loss/")
            _draw_folds(lax, curves, FOLD_COLOURS[j % len(FOLD_COLOURS)], "mean over folds", label_folds=False)
            lax.set(title=f"training loss: {task}", xlabel="epoch", ylabel=f"{task} loss (epoch mean; thin: folds)")
            lax.grid(alpha=0.3)
            lax.legend(fontsize=7)
            _integer_epochs(lax)
        fig.suptitle(group.label, fontsize=11)
        paths.append(_save(fig, out_dir / f"curves_{i:02d}_{slug(group.label)}.png"))
    return paths


# ----------------------------------------------------------------------------- weights and gradient norms


def _train_keys(trials: list[dict[str, Any]], prefix: str) -> list[str]:
    return sorted({k for t in trials for h in t.get("history") or [] for k in (h.get("train") or {}) if k.startswith(prefix)})


def plot_train_signal(results: dict[str, Any], out_dir: str | Path, prefix: str, name: str, ylabel: str,
                      only_varying: bool = False) -> Path | None:
    """``<name>.png``: per row, every ``<prefix><task>`` of the training history per epoch (mean over folds, thin
    lines per fold), log scale; None when no row logs one. ``only_varying`` skips rows whose values never change
    (fixed weights)."""
    panels = []
    for group in group_rows(results):
        trials = group.completed
        curves = {k: c for k in _train_keys(trials, prefix) if (c := _curve(trials, "train", k))}
        if only_varying:
            curves = {k: c for k, c in curves.items() if any(np.ptp(ys) > 1e-9 * max(1.0, abs(ys).max()) for _, ys in c.values())}
        if curves:
            panels.append((group.label, curves))
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, curves) in zip(axes, panels):
        for j, (key, c) in enumerate(curves.items()):
            _draw_folds(ax, c, FOLD_COLOURS[j % len(FOLD_COLOURS)], key.removeprefix(prefix), label_folds=False)
        ax.set_yscale("log")
        ax.set(title=label, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        _integer_epochs(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, Path(out_dir) / f"{name}.png")


# ----------------------------------------------------------------------------- parameter sweep


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def find_sweeps(groups: list[RowGroup]) -> list[tuple[str, str, list[tuple[float, RowGroup]]]]:
    """Strategies whose rows differ in exactly one numeric parameter: (strategy, key, [(value, row)])."""
    by_strategy: dict[str, list[RowGroup]] = {}
    for g in groups:
        by_strategy.setdefault(g.strategy, []).append(g)
    sweeps = []
    for strategy, siblings in by_strategy.items():
        if len(siblings) < 2:
            continue
        keys = varying_params(siblings)
        if len(keys) != 1:
            continue
        values = [flatten_params(g.params).get(keys[0]) for g in siblings]
        if all(_is_number(v) for v in values):
            points = sorted(zip((float(v) for v in values), siblings), key=lambda p: p[0])
            sweeps.append((strategy, keys[0], points))
    return sweeps


def _fold_stats(group: RowGroup, key: str) -> tuple[float, float]:
    d = describe([f["value"] for f in fold_values(group.completed, key)])
    return d["mean"], d["std"]


def _baseline_band(ax: Any, base: RowGroup | None, key: str) -> None:
    if base is None:
        return
    mean, std = _fold_stats(base, key)
    if math.isnan(mean):
        return
    ax.axhline(mean, color="grey", lw=1.5, ls="--", label=f"baseline {base.label} (mean ± std)")
    if not math.isnan(std):
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.2)


def sweep_aux_keys(meta: dict[str, Any], metric: str) -> list[str]:
    """The auxiliary tasks' metrics a sweep shows: each one's main metric, then its per-item means measured
    in mm (e.g. the landmarks' localisation error), which say more than a map's RMSE."""
    aux = [k for k in meta.get("aux_metrics") or [] if k != metric]
    tasks = {k.split("/", 1)[0] for k in aux}
    units = meta.get("units") or {}
    mm = sorted(k for k, u in units.items() if u == "mm" and k.split("/", 1)[0] in tasks and k.endswith("_mean"))
    return aux + [k for k in mm if k not in aux]


def plot_lambda_sweep(results: dict[str, Any], out_dir: str | Path) -> Path | None:
    """``lambda_sweep.png``: main (and auxiliary) metric against the swept numeric parameter,
    mean ± std over folds, the baseline as a horizontal band; None when no strategy sweeps one parameter."""
    meta = results.get("meta") or {}
    metric = resolve_metric(results)
    groups = group_rows(results)
    sweeps = find_sweeps(groups)
    if not sweeps:
        return None
    keys = [metric] + [k for k in sweep_aux_keys(meta, metric) if any(
        not math.isnan(_fold_stats(g, k)[0]) for _, _, pts in sweeps for _, g in pts
    )]
    base = next((g for g in groups if g.strategy == meta.get("baseline")), None)
    fig, axes = _figure(len(keys))
    same_param = len({k for _, k, _ in sweeps}) == 1
    for ax, key in zip(axes, keys):
        for strategy, param, points in sweeps:
            xs = np.array([x for x, _ in points])
            stats = np.array([_fold_stats(g, key) for _, g in points], dtype=float)
            ok = ~np.isnan(stats[:, 0])
            if not ok.any():
                continue
            yerr = np.nan_to_num(stats[ok, 1], nan=0.0)
            name = strategy if same_param else f"{strategy} ({param})"
            ax.errorbar(xs[ok], stats[ok, 0], yerr=yerr, marker="o", capsize=4, lw=1.8, label=f"{name}: mean ± std over folds")
        _baseline_band(ax, base, key)
        if same_param:
            ax.set_xticks(sorted({x for _, _, pts in sweeps for x, _ in pts}))
        arrow = "↑" if higher_is_better(meta, key) else "↓"
        xlabel = sweeps[0][1] if same_param else "parameter value"
        ax.set(title=f"{key} ({arrow} better)", xlabel=xlabel, ylabel=f"{metric_label(meta, key)} (mean ± std over folds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / "lambda_sweep.png")


# ----------------------------------------------------------------------------- overlays


REQUIRED_ARRAYS = ("image", "pictures")
STYLES = ("labels", "map", "signed", "points")


def load_example(path: Path) -> dict[str, Any]:
    """One example.npz: its arrays and ``pictures`` (the decoded list); a bad file raises DataError naming it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    for key in REQUIRED_ARRAYS:
        if key not in data:
            raise DataError(f"{path}: lacks the array {key!r}")
    shape = data["image"].shape
    if len(shape) != 2:
        raise DataError(f"{path}: 'image' must be 2-D (H, W), got shape {shape}")
    try:
        pictures = json.loads(str(data["pictures"]))
        assert isinstance(pictures, list)
    except (json.JSONDecodeError, AssertionError):
        raise DataError(f"{path}: 'pictures' is not a JSON list") from None
    for i, pic in enumerate(pictures):
        if not isinstance(pic, dict) or pic.get("style") not in STYLES:
            raise DataError(f"{path}: pictures[{i}] has no style of {', '.join(STYLES)}")
        for part in ("truth", "pred"):
            key = pic.get(part)
            if key is None:
                continue
            if key not in data:
                raise DataError(f"{path}: pictures[{i}].{part} names the missing array {key!r}")
            arr = data[key]
            if pic["style"] == "points":
                if arr.ndim != 2 or arr.shape[1] != 2:
                    raise DataError(f"{path}: {key!r} must be (K, 2) points, got shape {arr.shape}")
            elif arr.shape != shape:
                raise DataError(f"{path}: {key!r} has shape {arr.shape}, 'image' has {shape}")
    data["pictures"] = pictures
    return data


def overlay_rgba(pred: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGBA layer: each predicted label value v > 0 filled in ``ORGAN_COLOURS[v - 1]``, elsewhere transparent."""
    rgba = np.zeros(pred.shape + (4,), dtype=np.float32)
    for value in np.unique(pred[pred > 0]):
        mask = pred == value
        rgba[mask, :3] = ORGAN_COLOURS[(int(value) - 1) % len(ORGAN_COLOURS)]
        rgba[mask, 3] = alpha
    return rgba


def label_names(organs: list[str], values: np.ndarray) -> dict[int, str]:
    """Label value -> name: value v is the run's v-th organ (``meta.organs``), else 'label v'."""
    return {int(v): organs[int(v) - 1] if 0 < int(v) <= len(organs) else f"label {int(v)}" for v in values if v > 0}


def _scale(meta: dict[str, Any] | None) -> float:
    """The intensity scale the run's slices were divided by (``meta.preprocess.scale``)."""
    try:
        return float((meta or {})["preprocess"]["scale"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_SCALE


def _example_path(run_dir: Path, trial: dict[str, Any]) -> Path | None:
    if not trial.get("dir"):
        return None
    path = run_dir / str(trial["dir"]) / "example.npz"
    return path if path.is_file() else None


def _panels(pictures: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """One panel per labels/points picture, two (truth, prediction) per map picture."""
    out = []
    for pic in pictures:
        if pic["style"] in ("labels", "points"):
            out.append((pic, "both"))
        else:
            out += [(pic, part) for part in ("truth", "pred") if pic.get(part) is not None]
    return out


def _ct(ax: Any, image: np.ndarray, lo: float, hi: float) -> None:
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")


def _draw_panel(fig: Any, ax: Any, ex: dict[str, Any], pic: dict[str, Any], part: str, lo: float, hi: float,
                organs: list[str]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    truth = ex.get(pic["truth"]) if pic.get("truth") else None
    pred = ex.get(pic["pred"]) if pic.get("pred") else None
    name = f"{pic.get('task', '?')}: {pic.get('title', '')}"
    if pic["style"] == "labels":
        _ct(ax, ex["image"], lo, hi)
        empty = np.zeros(ex["image"].shape, dtype=np.uint8)
        truth = empty if truth is None else truth
        pred = empty if pred is None else pred
        ax.imshow(overlay_rgba(pred), interpolation="nearest")
        names = label_names(organs, np.union1d(np.unique(truth), np.unique(pred)))
        for value in names:
            if np.any(truth == value):
                ax.contour((truth == value).astype(float), levels=[0.5], linewidths=1.4,
                           colors=[ORGAN_COLOURS[(value - 1) % len(ORGAN_COLOURS)]])
        handles = [Patch(color=ORGAN_COLOURS[(v - 1) % len(ORGAN_COLOURS)], label=n) for v, n in names.items()]
        handles += [Line2D([], [], color="white", lw=1.4, label="ground truth: outline"),
                    Patch(facecolor="white", alpha=OVERLAY_ALPHA, label="prediction: fill")]
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
        ax.set_title(name, fontsize=9)
    elif pic["style"] == "points":
        _ct(ax, ex["image"], lo, hi)
        for arr, colour, marker, label in ((truth, GT_COLOUR, "o", "ground truth"), (pred, PRED_COLOUR, "x", "prediction")):
            if arr is not None:
                ok = np.all(np.isfinite(arr), axis=1)
                ax.scatter(arr[ok, 1], arr[ok, 0], s=40, c=[colour], marker=marker, linewidths=1.5)
        ax.legend(
            handles=[Line2D([], [], color=GT_COLOUR, marker="o", ls="", label="ground truth"),
                     Line2D([], [], color=PRED_COLOUR, marker="x", ls="", label="prediction")],
            loc="lower right", fontsize=7, framealpha=0.7,
        )
        ax.set_xlim(-0.5, ex["image"].shape[1] - 0.5)
        ax.set_ylim(ex["image"].shape[0] - 0.5, -0.5)
        ax.set_title(name, fontsize=9)
    else:
        both = [a for a in (truth, pred) if a is not None]
        finite = [float(np.nanmax(np.abs(a))) for a in both if np.isfinite(a).any()]
        top = max(finite + [1e-6])
        arr = truth if part == "truth" else pred
        if pic["style"] == "signed":
            im = ax.imshow(arr, cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
        else:
            im = ax.imshow(arr, cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        if pic.get("unit"):
            bar.set_label(pic["unit"])
        ax.set_title(f"{name} ({'ground truth' if part == 'truth' else 'prediction'})", fontsize=9)


def plot_overlays(results: dict[str, Any], run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per row (``overlay_NN_<label>.png``) from its first completed trial with an example.npz:
    the test slice with every picture the row's tasks drew (``Task.pictures``): label maps over the CT,
    points over the CT, float maps as ground truth next to prediction."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    paths = []
    scale = _scale(results.get("meta"))
    organs = list((results.get("meta") or {}).get("organs") or [])
    lo = (WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2) / scale
    hi = (WINDOW_LEVEL_HU + WINDOW_WIDTH_HU / 2) / scale
    for i, group in enumerate(group_rows(results), start=1):
        found = next(((t, p) for t in group.completed if (p := _example_path(run_dir, t)) is not None), None)
        if found is None:
            continue
        trial, path = found
        ex = load_example(path)
        panels = _panels(ex["pictures"])
        fig, axes = _figure(max(1, len(panels)), width=4.2, height=4.4)
        if not panels:
            _ct(axes[0], ex["image"], lo, hi)
            axes[0].set_title(f"CT W{WINDOW_WIDTH_HU:.0f}/L{WINDOW_LEVEL_HU:.0f} HU (no task drew a picture)", fontsize=9)
        for ax, (pic, part) in zip(axes, panels):
            _draw_panel(fig, ax, ex, pic, part, lo, hi, organs)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        patient = str(ex["patient"]) if "patient" in ex else "?"
        where = f"slice {int(ex['slice'])}" if "slice" in ex else "slice ?"
        fig.suptitle(
            f"{group.label} — patient {patient}, {where} (fold {trial.get('fold')}, seed {trial.get('seed')}); "
            f"CT W{WINDOW_WIDTH_HU:.0f}/L{WINDOW_LEVEL_HU:.0f} HU",
            fontsize=10,
        )
        paths.append(_save(fig, out_dir / f"overlay_{i:02d}_{slug(group.label)}.png"))
    return paths


# ----------------------------------------------------------------------------- all


def make_plots(run_dir: str | Path) -> list[Path]:
    """Every figure of a run into ``RUN_DIR/plots/``: learning curves, the sweep (if any), overlays."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    out_dir = run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = _writer_count()
    if not workers:
        return _all_plots(results, run_dir, out_dir)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: the caller may hold threads (Ray's, torch's) that a forked child must not inherit
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        writes = _Writers(pool)
        token = _WRITERS.set(writes)
        try:
            paths = _all_plots(results, run_dir, out_dir)
        finally:
            _WRITERS.reset(token)
        for future, fig, path in writes:
            try:
                future.result()  # a failed write raises here (the pool finishes the others first)
            except BrokenProcessPool:  # e.g. a script without a __main__ guard: its children cannot start
                _write(fig, path, DPI, FORMATS)
    return paths


def _all_plots(results: dict[str, Any], run_dir: Path, out_dir: Path) -> list[Path]:
    paths = plot_learning_curves(results, out_dir)
    sweep = plot_lambda_sweep(results, out_dir)
    if sweep is not None:
        paths.append(sweep)
    for extra in (
        plot_train_signal(results, out_dir, "lambda/", "learned_weights",
                          "weight on the task's loss (mean over the epoch)", only_varying=True),
        plot_train_signal(results, out_dir, "grad_norm/", "grad_norms", "‖∇ task loss‖ on the shared trunk"),
    ):
        if extra is not None:
            paths.append(extra)
    paths.extend(plot_overlays(results, run_dir, out_dir))
    return paths
