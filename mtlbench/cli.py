"""The ``mtlbench`` command line: parses arguments, calls one function per command, prints.

Heavy libraries (torch, ray, SimpleITK, h5py) are imported inside the commands
that need them, so ``mtlbench --help`` and ``mtlbench plugins`` stay fast.
Bad input (a :class:`mtlbench.errors.MtlbenchError`) becomes one line on stderr
and exit code 2 (usage, config, plugins) or 1 (data); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from mtlbench import __version__
from mtlbench.errors import MtlbenchError

_STATE = {"debug": False}

app = typer.Typer(
    name="mtlbench",
    help="Benchmark multi-task learning strategies for medical image segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect benchmark configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MtlbenchError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MtlbenchError as exc:
            if _STATE["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a file-system failure no mtlbench check worded: still one line, exit 1
            if _STATE["debug"]:
                raise
            typer.echo(f"error: {os_error_line(exc)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            hint = _STATE.get("resume_hint")
            typer.echo("interrupted" + (f"; finished trials are kept. Continue with: {hint}" if hint else ""), err=True)
            raise typer.Exit(130) from None

    return wrapper


def os_error_line(exc: OSError) -> str:
    """``<file>: <reason>`` for an OSError (both files of a failed rename), on one line."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(files)}: {reason}" if files else reason


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mtlbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    _STATE["debug"] = debug
    _setup_logging()


def _setup_logging() -> None:
    """mtlbench's data warnings (a dropped landmark, a resampled mask) as one line each on stderr."""
    import logging

    class _Stderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is at the time (a test runner swaps it between invocations)."""

        @property  # type: ignore[override]
        def stream(self):  # noqa: D401
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    log = logging.getLogger("mtlbench")
    if not any(getattr(h, "_mtlbench", False) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._mtlbench = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False


# Options shared by every command that reads a config.
ProfileOpt = typer.Option(None, "--profile", "-p", help="Apply the \\[profiles.NAME] table over the base config.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key: --set train.epochs=5 (repeatable).")


def console() -> Any:
    """A rich console for tables: the terminal's width ($COLUMNS when set), else 120 columns for a file or pipe."""
    import os

    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=120)


def load(config: Path, profile: Optional[str], sets: Optional[List[str]], auto_profile: bool = False) -> Any:
    """Load, validate and resolve plugins of a config; announce an automatic profile."""
    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config

    cfg = load_config(config, profile, sets)
    remote = bool(os.environ.get("RAY_ADDRESS")) or _STATE.get("address") is not None
    if auto_profile and profile is None and cfg.profile is None and cfg.experiment.cpu_profile and not remote:
        from mtlbench.devices import gpu_available

        if not gpu_available():
            name = cfg.experiment.cpu_profile
            typer.echo(
                f"No GPU found: using the '{name}' profile (smaller, faster). "
                f"Force the full protocol with --profile full.",
                err=True,
            )
            cfg = load_config(config, name, sets)
    resolve_plugins(cfg, source=str(config))
    return cfg


@app.command("plugins")
@handle_errors
def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """List the installed tasks, heads, strategies and dataset sources, and who provides them."""
    from mtlbench.plugins import get_manager

    data = get_manager().as_json()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mtlbench plugins")
    for col in ("kind", "name", "plugin", "distribution", "description"):
        table.add_column(col)
    for kind, items in data.items():
        for item in items:
            table.add_row(kind, item["name"], item["plugin"], f"{item['distribution']} {item['version']}", item["description"])
    Console().print(table)


@config_app.command("show")
@handle_errors
def config_show(
    config: Path = typer.Argument(..., help="Benchmark TOML file."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Print the resolved configuration (profile and overrides applied) as TOML."""
    from mtlbench.config import to_toml

    cfg = load(config, profile, set_, auto_profile=True)  # what `run` would use on this machine
    typer.echo(to_toml(cfg), nl=False)


# Plugins add data commands here too (the built-in phantom source adds ``data phantom``).
data_app = typer.Typer(help="Generate, read and prepare data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
@handle_errors
def data_prepare(
    config: Path = typer.Argument(..., help="Benchmark TOML file."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Build (or verify) the HDF5 slice cache for CONFIG; print its path last."""
    from mtlbench.data.cache import build_cache

    cfg = load(config, profile, set_, auto_profile=True)  # the cache `run` will use
    path = build_cache(cfg, progress=True)
    typer.echo(str(path))


@app.command("train")
@handle_errors
def train_cmd(
    config: Path = typer.Argument(..., help="Benchmark TOML file."),
    fold: int = typer.Option(0, "--fold", "-k", min=0, help="Test fold."),
    strategy: str = typer.Option(..., "--strategy", help="Strategy label: a key of the config's \\[strategies] table."),
    point: int = typer.Option(0, "--point", min=0, help="Which point of the strategy's parameter grid."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default: the first of experiment.seeds)."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Trial folder (default: runs/train-<id>)."),
) -> None:
    """Train and evaluate one trial in this process (no Ray): result.json + checkpoint.pt in --out."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mtlbench.config import expand_grid
    from mtlbench.data.cache import build_cache, open_cache
    from mtlbench.data.folds import make_folds
    from mtlbench.engine.train import run_trial
    from mtlbench.engine.trialspec import TrialSpec
    from mtlbench.errors import ConfigError

    cfg = load(config, profile, set_, auto_profile=True)
    if strategy not in cfg.strategies:
        raise ConfigError(f"--strategy {strategy!r}: not in [strategies] ({', '.join(cfg.strategies)})")
    points = expand_grid(cfg.strategies[strategy])
    if point >= len(points):
        raise ConfigError(f"--point {point}: strategy {strategy!r} has {len(points)} parameter point(s)")
    if fold >= cfg.experiment.folds:
        raise ConfigError(f"--fold {fold}: experiment.folds is {cfg.experiment.folds}")
    cache = build_cache(cfg, progress=True)
    info = open_cache(cache)
    folds = make_folds(list(info.patients), cfg.experiment.folds, cfg.experiment.fold_seed)
    spec = TrialSpec(fold=fold, strategy=strategy, params=points[point], seed=cfg.experiment.seeds[0] if seed is None else seed)
    out = out or Path(cfg.run.out_dir) / f"train-{spec.id}"
    from mtlbench.orchestrate.runner import choose_loader

    loader, why = choose_loader(cfg, cache, list(folds[fold]["train"]))
    typer.echo(f"trial {spec.id}: params {json.dumps(spec.params)}; training data: {why}", err=True)
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols) as bar:
        job = bar.add_task("epoch 1", total=None, info="")

        def on_step(epoch: int, step: int) -> None:
            bar.update(job, description=f"epoch {epoch + 1}", completed=step)

        def on_epoch(entry: dict) -> None:
            shown = {k: v for k, v in entry.get("metrics", {}).items() if k.endswith("_mean") or k.endswith("rmse")}
            bar.update(job, info=" ".join(f"{k}={v:.4f}" for k, v in shown.items()))

        record = run_trial(cfg, spec, cache, folds, out, loader=loader, on_step=on_step, on_epoch=on_epoch)
    _print_trial(record)
    typer.echo(str(out / "result.json"))


def _print_trial(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{record['id']}: {record['status']}")
    table.add_column("metric")
    table.add_column("mean over test patients", justify="right")
    for k, v in sorted(record.get("metrics", {}).items()):
        table.add_row(k, f"{v:.4f}")
    Console(stderr=True).print(table)


@app.command("predict")
@handle_errors
def predict_cmd(
    source: Path = typer.Argument(..., help="A finished trial folder, or with -i a run folder (fold ensemble)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the prediction files."),
    images: Optional[Path] = typer.Option(
        None, "--input", "-i", help="New images: one volume file or a folder of them (nnU-Net's case_0000 names work)."
    ),
    strategy: Optional[str] = typer.Option(
        None, "--strategy", help="With a run folder: the leaderboard row whose fold models are ensembled (default: the baseline)."
    ),
) -> None:
    """Write predictions (label maps on each image's grid, .fcsv landmarks): of a trial for its test patients,
    or with -i of a run's fold ensemble (or one trial) for new images, with a labels.json naming every label."""
    from mtlbench.engine.predict import predict_images, predict_trial

    paths = predict_trial(source, out) if images is None else predict_images(source, images, out, strategy)
    for path in paths:
        typer.echo(str(path))


@app.command("run")
@handle_errors
def run_cmd(
    config: Optional[Path] = typer.Argument(None, help="Benchmark TOML file (not needed with --resume)."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<experiment>-<timestamp>)."),
    address: Optional[str] = typer.Option(None, "--address", help="Attach to a Ray cluster (else RAY_ADDRESS, else local)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out without redoing finished trials."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip report.md and the plots (make them later with `mtlbench report`)."),
) -> None:
    """Run every fold x strategy x parameter x seed trial on Ray Tune; print the leaderboard."""
    from mtlbench.errors import ConfigError
    from mtlbench.orchestrate.runner import RESOLVED, default_run_dir, run_experiment
    from mtlbench.report.leaderboard import build_leaderboard, render_leaderboard
    from mtlbench.report.markdown import write_report

    from mtlbench.config import to_toml

    out_console = console()
    _STATE["address"] = address
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        if not (out / RESOLVED).is_file():
            raise ConfigError(f"--resume: {out} is not a run folder (no {RESOLVED})")
        cfg = load(out / RESOLVED, None, None)
        if config is not None:  # the command line that started the run is fine, as long as it means the same
            again = load(config, profile, set_, auto_profile=True)
            if to_toml(again) != to_toml(cfg):
                raise ConfigError(
                    f"--resume: {config} with these --profile/--set gives a different config than the one recorded "
                    f"in {out / RESOLVED} (first difference: {_first_difference(cfg.to_toml_dict(), again.to_toml_dict())}); "
                    "resume without CONFIG to continue the recorded run"
                )
        elif profile or set_:
            raise ConfigError("--resume continues with RUN_DIR/config.toml; --profile and --set need the CONFIG they apply to")
        out_console.print(f"resuming {out} with its recorded config")
    else:
        if config is None:
            raise ConfigError("run needs a benchmark CONFIG (or --resume --out RUN_DIR)")
        cfg = load(config, profile, set_, auto_profile=True)
        from mtlbench.config import check_trainable

        check_trainable(cfg, str(config))
    run_dir = out or default_run_dir(cfg)
    _STATE["resume_hint"] = f"mtlbench run --resume --out {run_dir}"
    results = run_experiment(cfg, run_dir, address=address, resume=resume, console=out_console)
    board = build_leaderboard({"meta": results["meta"], "trials": results["trials"]})
    render_leaderboard(board, out_console)
    if no_report:
        out_console.print(f"results: {results['path']}")
        return
    report = write_report(run_dir)
    out_console.print(f"results: {results['path']}\nreport: {report}")


@app.command("leaderboard")
@handle_errors
def leaderboard_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with a 'rows' list."),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="Rank by this metric key (default: the main metric)."),
) -> None:
    """The leaderboard of a run: mean +- std over folds, 95% CI, paired test against the baseline."""
    from mtlbench.report.leaderboard import build_leaderboard, load_results, render_leaderboard

    board = build_leaderboard(load_results(run_dir), metric)
    if as_json:
        typer.echo(json.dumps(board, indent=2, default=str))
    else:
        render_leaderboard(board, console())


@app.command("compare")
@handle_errors
def compare_cmd(
    run_dirs: List[Path] = typer.Argument(..., help="Two or more run folders of the same split (splits.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with a 'rows' list."),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="Rank by this metric key (default: the first run's main metric)."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", "-b", help="The row every other is tested against: RUN:LABEL (default: the first run's baseline)."
    ),
) -> None:
    """One leaderboard across runs: rows RUN:STRATEGY, paired tests over the folds and patients they share."""
    from mtlbench.report.compare import compare_runs, render_comparison

    board = compare_runs(run_dirs, metric, baseline)
    if as_json:
        typer.echo(json.dumps(board, indent=2, default=str))
    else:
        render_comparison(board, console())


@app.command("export")
@handle_errors
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the CSV files (default: the run folder)."),
) -> None:
    """Write the run's results as CSV: trials.csv (one row per trial) and patients.csv (per trial and test patient)."""
    from mtlbench.report.export import export_csv

    for path in export_csv(run_dir, out):
        typer.echo(str(path))


@app.command("report")
@handle_errors
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    html: bool = typer.Option(False, "--html", help="Also write RUN_DIR/report.html: self-contained, opens offline."),
    replot: bool = typer.Option(False, "--replot", help="Redraw the figures even when RUN_DIR/plots has them."),
) -> None:
    """Write RUN_DIR/report.md (and with --html report.html) with the leaderboard and the plots."""
    from mtlbench.report.markdown import write_report

    typer.echo(str(write_report(run_dir, replot=replot)))
    if html:
        from mtlbench.report.html import write_html_report

        typer.echo(str(write_html_report(run_dir)))


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """The dotted key where two config dicts first differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return path or "<root>"


def _register_plugin_commands() -> None:
    from mtlbench.plugins import get_manager

    try:
        before = {id(a): len(a.registered_commands) for a in (app, data_app)}
        get_manager().register_commands(app)
        for typer_app in (app, data_app):  # plugin commands get the same one-line errors
            for info in typer_app.registered_commands[before[id(typer_app)]:]:
                if info.callback is not None:
                    info.callback = handle_errors(info.callback)
    except MtlbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None


def main() -> None:
    _register_plugin_commands()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
