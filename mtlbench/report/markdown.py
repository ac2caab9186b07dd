"""The Markdown report of a run folder: summary, leaderboard with its rule, statistics explained, embedded plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtlbench.fsutil import write_text
from mtlbench.report.leaderboard import (
    build_leaderboard,
    display_label,
    fmt_aux,
    fmt_ci,
    fmt_counts,
    fmt_delta,
    fmt_patient_delta,
    fmt_mean_std,
    fmt_num,
    load_results,
)
from mtlbench.report.plots import PLOTS_DIR, make_plots

REPORT_NAME = "report.md"

STATISTICS_TEXT = """\
- **Rows.** One row per strategy label and parameter point (trials with the same `strategy` and the
  same `params`, compared as canonical JSON). Only `completed` trials enter the statistics; `failed`
  and `diverged` trials are counted in the ok/failed/diverged column.
- **Fold values.** For each cross-validation fold the metric is averaged over that fold's seeds; the
  row's mean ± std (sample standard deviation, ddof = 1) is over these fold values, and the 95% CI is
  the t-interval mean ± t(0.975, n_folds − 1) · std / √n_folds. Per-organ columns and the auxiliary
  metric are averaged the same way.
- **Δ vs baseline.** The row's comparison target is its `compare_to` strategy or, if none, the
  experiment's baseline (the first parameter point of that strategy). The unit of comparison is the
  cross-validation trial: for every (fold, seed) both rows have, the trial's metric (its mean over the
  fold's test patients) of the row minus that of the target. The patients of one fold share one model,
  so they are not independent samples; the fold is. Δ is the mean of these paired differences and `n`
  their number (folds × seeds; when the rows share no seed, each fold's seeds are averaged and `n` is
  the number of folds).
- **The deciding test.** The corrected resampled paired t-test (Nadeau & Bengio 2003; Bouckaert &
  Frank 2004): t = Δ / sqrt((1/n + n_test/n_train) · s²) with n − 1 degrees of freedom, where s² is the
  variance of the paired differences and n_test/n_train the ratio of test to training patients of a
  fold. The correction accounts for the folds' overlapping training sets, which make their results
  correlated; without it the plain t-test is too confident. Two-sided, Holm–Bonferroni adjusted over all
  rows that are compared; "better" needs p_holm < 0.05 and Δ in the metric's good direction.
- **Auxiliary metric and its trivial reference.** Each task says what no learning achieves on the same
  test patients (`Task.reference`: e.g. an all-zero map for a map regression, the mean training
  position for a localisation). The auxiliary column shows the learned value and its ratio
  to that reference (×1.00: no better than the trivial predictor; below 1 is better for an error). Do
  not read anything into an auxiliary task whose ratio is near 1: it was not learned.
- **Patient level, for reference.** The Wilcoxon signed-rank test over test patients (each patient's
  metric averaged over seeds, paired with the target's) is shown in its own column and in the JSON
  (`vs_baseline.patient_level`), Holm-adjusted the same way. It treats patients of one fold as
  independent, so it overstates significance; it does not decide.
- **Caveat.** With a handful of test patients the tests have little power: "not better" is not
  "equal". Look at the CI of the fold means and the per-patient Δ together.
"""


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def leaderboard_markdown(board: dict[str, Any]) -> str:
    """The leaderboard as a Markdown table followed by the rule."""
    arrow = "↑" if board["higher_is_better"] else "↓"
    organs = list(board["organ_metrics"])
    header = ["#", "strategy", f"{board['metric']} mean ± std ({arrow})", "95% CI", *organs]
    if board.get("aux_metric"):
        header += [board["aux_metric"], "trivial reference"]
    header += ["Δ vs baseline (p Holm, n folds)", "better", "patients: Δ (Wilcoxon p Holm, n)", "ok/failed/diverged"]
    rows = []
    for row in board["rows"]:
        label = display_label(row)
        cells = ["" if row["rank"] is None else row["rank"], f"**{label}**" if row.get("is_baseline") else label]
        cells += [fmt_mean_std(row), fmt_ci(row), *[fmt_num(row["organs"].get(o)) for o in organs]]
        if board.get("aux_metric"):
            aux = row.get("aux") or {}
            cells += [fmt_aux(row), fmt_num(aux.get("reference"))]
        better = {True: "yes", False: "no", None: ""}[row.get("better")]
        cells += [fmt_delta(row), better, fmt_patient_delta(row), fmt_counts(row)]
        rows.append(cells)
    align = ["--:", ":--", "--:", "--:", *["--:"] * len(organs)]
    align += ["--:", "--:"] if board.get("aux_metric") else []
    align += ["--:", ":-:", "--:", "--:"]
    return _table(header, rows, align) + f"\n\n*Rule* — {board['rule']}. Baseline: `{board.get('baseline')}`.\n"


def folds_markdown(board: dict[str, Any]) -> str:
    folds = sorted({f["fold"] for r in board["rows"] for f in r["folds"]}, key=str)
    if not folds:
        return ""
    header = ["strategy", *[f"fold {f}" for f in folds]]
    rows = []
    for row in board["rows"]:
        by_fold = {f["fold"]: f for f in row["folds"]}
        rows.append([row["label"], *[fmt_num(by_fold[f]["value"]) if f in by_fold else "—" for f in folds]])
    return _table(header, rows, [":--", *["--:"] * len(folds)]) + "\n"


def _run_config(results: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved config, as results.json records it once in ``meta.config``."""
    cfg = (results.get("meta") or {}).get("config")
    return cfg if isinstance(cfg, dict) else {}


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _lr_text(cfg: dict[str, Any]) -> str | None:
    lr = _get(cfg, "train.lr")
    if lr is None:
        return None
    factor, epoch = _get(cfg, "train.lr_decay_factor"), _get(cfg, "train.lr_decay_epoch")
    return f"{lr} (×{factor} at epoch {epoch})" if factor is not None and epoch is not None else str(lr)


def _train_differences(results: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """Per strategy label, the train settings that differ from the run's ``[train]`` (e.g. a later lr decay)."""
    ref = _get(cfg, "train") or {}
    seen: dict[str, list[str]] = {}
    for trial in results.get("trials") or []:
        train = trial.get("train") if isinstance(trial.get("train"), dict) else {}
        diffs = [f"{k}={train[k]}" for k in sorted(train) if train[k] != ref.get(k)]
        label = str(trial.get("strategy"))
        for d in diffs:
            if d not in seen.setdefault(label, []):
                seen[label].append(d)
    text = "; ".join(f"`{label}`: {', '.join(d)}" for label, d in seen.items() if d)
    return text or None


def summary_markdown(results: dict[str, Any], board: dict[str, Any]) -> str:
    meta = results.get("meta") or {}
    trials = results.get("trials") or []
    cfg = _run_config(results)
    counts = {s: sum(1 for t in trials if t.get("status") == s) for s in ("completed", "failed", "diverged")}
    folds = sorted({t.get("fold") for t in trials}, key=str)
    seeds = sorted({t.get("seed") for t in trials}, key=str)
    wall = sum(float(t.get("wall_time_s") or 0.0) for t in trials)
    peak = max([float(t.get("peak_memory_mb") or 0.0) for t in trials] + [0.0])
    items = [
        ("experiment", meta.get("experiment")),
        ("created", meta.get("created")),
        ("profile", cfg.get("profile")),
        ("main metric", f"`{board['metric']}` ({board['direction']} is better)"),
        ("baseline", f"`{meta.get('baseline')}`"),
        ("auxiliary metrics", ", ".join(f"`{m}`" for m in meta.get("aux_metrics") or []) or "—"),
        ("strategies", ", ".join(f"`{r['label']}`" for r in board["rows"]) or "—"),
        ("folds", f"{len(folds)} ({', '.join(str(f) for f in folds)})"),
        ("seeds", ", ".join(str(s) for s in seeds)),
        ("trials", f"{len(trials)}: {counts['completed']} completed, {counts['failed']} failed, {counts['diverged']} diverged"),
        ("organs", ", ".join(meta.get("organs") or []) or "—"),
        ("landmarks", ", ".join(meta.get("landmarks") or []) or "—"),
        ("data source", _get(cfg, "data.source")),
        ("slice size", _get(cfg, "preprocess.slice_size")),
        ("epochs", _get(cfg, "train.epochs")),
        ("batch size", _get(cfg, "train.batch_size")),
        ("learning rate", _lr_text(cfg)),
        ("train settings that differ", _train_differences(results, cfg)),
        ("compute", f"{wall / 3600:.2f} h of trial time, peak memory {peak:.0f} MB"),
    ]
    rows = [[k, v] for k, v in items if v is not None]
    return _table(["", ""], rows, [":--", ":--"]) + "\n"


def problems_markdown(results: dict[str, Any]) -> str:
    bad = [t for t in results.get("trials") or [] if t.get("status") in ("failed", "diverged")]
    if not bad:
        return ""
    rows = []
    for t in bad:
        error = str(t.get("error") or "").strip().splitlines()
        msg = error[-1] if error else ""
        rows.append([t.get("id", ""), t.get("strategy"), t.get("fold"), t.get("seed"), t.get("status"), msg[:200]])
    return _table(["trial", "strategy", "fold", "seed", "status", "error"], rows) + "\n"


def figures_markdown(paths: list[Path], run_dir: Path) -> str:
    sections = {
        "Learning curves": "curves_",
        "Parameter sweep": "lambda_sweep",
        "Learned loss weights": "learned_weights",
        "Gradient norms": "grad_norms",
        "Example slices": "overlay_",
    }
    captions = {
        "Learning curves": "Main metric per epoch for each fold (thin) and the mean over folds (thick); "
        "then each task's training loss on its own axis when logged. Every figure has a PDF beside it.",
        "Parameter sweep": "Main and auxiliary metrics (for landmarks also the localisation error in mm) "
        "against the swept parameter (mean ± std over folds); the grey band is the baseline's mean ± std.",
        "Learned loss weights": "Per epoch, the weight a learned-weighting strategy puts on each task's loss as "
        "the task computes it (`lambda/<task>`, comparable to joint's lambdas); thin lines: folds.",
        "Gradient norms": "Per epoch, the norm of each task's unweighted loss gradient on the shared trunk "
        "(sampled every `train.grad_norm_every` steps): a task with a 100x smaller gradient needs lambda ~ 100 "
        "to weigh as much.",
        "Example slices": "The test slice with the most organ voxels from each row's first completed trial: "
        "what each task draws of it (label maps: one colour per organ, prediction filled, ground truth outlined; "
        "float maps: ground truth next to prediction; points: ground truth o, prediction x).",
    }
    rels = sorted({p.resolve().relative_to(run_dir.resolve()).as_posix() for p in paths})
    out = []
    used: set[str] = set()
    for title, prefix in sections.items():
        mine = [r for r in rels if Path(r).name.startswith(prefix)]
        if not mine:
            continue
        used.update(mine)
        out.append(f"### {title}\n\n{captions[title]}\n")
        out += [f"![{Path(r).stem}]({r})\n" for r in mine]
    rest = [r for r in rels if r not in used]
    if rest:
        out.append("### Other figures\n")
        out += [f"![{Path(r).stem}]({r})\n" for r in rest]
    return "\n".join(out) if out else "No figures (no history and no example slices in this run).\n"


def report_parts(
    run_dir: Path, results: dict[str, Any], board: dict[str, Any], replot: bool = False
) -> tuple[list[str], str]:
    """The report's Markdown sections in order, and its title; plots are made first when
    ``RUN_DIR/plots`` has none (or ``replot``). Shared by report.md and report.html."""
    pngs = sorted((run_dir / PLOTS_DIR).glob("*.png")) if (run_dir / PLOTS_DIR).is_dir() else []
    if replot or not pngs:
        pngs = make_plots(run_dir)
    name = (results.get("meta") or {}).get("experiment") or run_dir.name
    title = f"mtlbench report: {name}"
    parts = [
        f"# {title}\n",
        "## Experiment\n",
        summary_markdown(results, board),
        "## Leaderboard\n",
        leaderboard_markdown(board),
    ]
    folds = folds_markdown(board)
    if folds:
        parts += [f"### Per-fold values of `{board['metric']}` (mean over seeds)\n", folds]
    problems = problems_markdown(results)
    if problems:
        parts += ["## Failed and diverged trials\n", problems]
    parts += ["## Statistics\n", STATISTICS_TEXT, "## Figures\n", figures_markdown(pngs, run_dir)]
    return parts, title


def write_report(run_dir: str | Path, replot: bool = False) -> Path:
    """Write ``RUN_DIR/report.md`` (atomically); plots are made first when ``RUN_DIR/plots`` has none."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    parts, _ = report_parts(run_dir, results, build_leaderboard(results), replot=replot)
    path = run_dir / REPORT_NAME
    write_text(path, "\n".join(parts))
    return path
