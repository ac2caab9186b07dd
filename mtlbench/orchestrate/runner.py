"""``mtlbench run``: build the cache once, expand the grid, schedule every trial on Ray Tune.

The driver prepares everything large once (the HDF5 slice cache, the slice
arrays in Ray's object store via ``tune.with_parameters``, one copy shared by
every trial on a node; or, past ``resources.memory_budget_mb``, nothing: each
trial then streams its batches from the cache) and hands each trial only its
small spec through ``param_space``. Finished trials are found on disk
(``trials/<id>/result.json``), so ``--resume`` reruns only what did not finish.
Ray's own output goes to ``RUN_DIR/ray.log``; the terminal shows a live table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from mtlbench.config import Config, check_trainable, to_toml
from mtlbench.engine.tracking import epoch_scalars, final_scalars, mlflow_key
from mtlbench.engine.trialspec import TrialSpec
from mtlbench.errors import ConfigError, DataError
from mtlbench.fsutil import write_text
from mtlbench.orchestrate.grid import expand
from mtlbench.orchestrate.results import (
    RESULTS,
    TRIALS,
    finished_record,
    metric_meta,
    read_record,
    trial_dir,
    write_results,
)

RESOLVED = "config.toml"
SPLITS = "splits.json"


def default_run_dir(cfg: Config) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.out_dir) / f"{cfg.experiment.name}-{stamp}"


def _trainable(config: dict[str, Any], data: Any = None, setup: dict[str, Any] | None = None) -> None:
    """Ray Tune's function trainable: one trial, reporting after every epoch."""
    from ray import tune

    from mtlbench.config import load_config
    from mtlbench.engine.train import run_trial

    assert setup is not None
    if not (Path(setup["run_dir"]) / RESOLVED).is_file():
        raise RuntimeError(
            f"run folder {setup['run_dir']} is not visible on this node: on a multi-node cluster put --out "
            "on shared storage mounted at the same path everywhere"
        )
    cfg = load_config(Path(setup["run_dir"]) / RESOLVED)  # the run's recorded config, as resume reads it
    spec = TrialSpec(**config["trial"])
    main = setup["main_metric"]
    out = Path(setup["run_dir"]) / "trials" / spec.id

    def on_epoch(entry: dict[str, Any]) -> None:
        value = entry.get("metrics", {}).get(main, float("nan"))
        # every scalar of the epoch (what MLflow logs), at step = epoch (timesteps_total)
        tune.report({**_scalars(epoch_scalars(entry)), "epoch": entry["epoch"], "timesteps_total": entry["epoch"],
                     "main_metric": value, "done": False})

    record = run_trial(cfg, spec, setup["cache"], setup["folds"], out, data=data, loader=setup["loader"],
                       cpus=setup["cpus"], on_epoch=on_epoch)
    epochs = len(record["history"])
    tune.report({**_scalars(final_scalars(record["metrics"])), "epoch": epochs, "timesteps_total": epochs,
                 "main_metric": record["metrics"].get(main, float("nan")), "status": record["status"], "done": True})


def _scalars(tags: dict[str, float]) -> dict[str, float]:
    """Tracking scalars as Ray result keys that are valid MLflow metric names."""
    return {mlflow_key(k): v for k, v in tags.items()}


def _trial_name(trial: Any) -> str:
    """Ray's name of a trial (MLflow's run name): the mtlbench trial id."""
    return TrialSpec(**trial.config["trial"]).id


def _mlflow_callbacks(cfg: Config) -> list[Any]:
    """Ray's MLflowLoggerCallback for ``[run.mlflow]`` (one MLflow run per trial), or nothing."""
    ml = cfg.run.mlflow
    if ml is None or not ml.enabled:
        return []
    from urllib.parse import urlparse

    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = ml.tracking_uri
    if uri is not None and urlparse(uri).scheme in ("", "file"):
        # a local folder: absolute (the driver's working directory now), and MLflow 3's file-store opt-in
        path = Path(urlparse(uri).path if uri.startswith("file:") else uri).expanduser().resolve()
        uri = path.as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=ml.experiment_name or cfg.experiment.name,
                                 tags=dict(ml.tags))]


@contextlib.contextmanager
def _quiet_to(log_path: Path) -> Iterator[None]:
    """Send everything written to fd 1/2 by Ray (and its C++ core) to ``log_path``; rich keeps the real stdout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_experiment(
    cfg: Config,
    run_dir: Path,
    *,
    address: str | None = None,
    resume: bool = False,
    console: Any = None,
    local: bool = False,
) -> dict[str, Any]:
    """Run (or resume) an experiment into ``run_dir``; return the written results.

    ``local`` runs the trials one after another in this process instead of on
    Ray Tune (same trial code, same files; for tests and debugging).
    """
    from rich.console import Console

    console = console or Console()
    check_trainable(cfg)
    run_dir = run_dir.resolve()
    if resume:
        if not (run_dir / RESOLVED).is_file():
            raise ConfigError(f"--resume: {run_dir} is not a run folder (no {RESOLVED})")
    elif (run_dir / RESOLVED).exists():
        if not _failed_start(run_dir):
            raise ConfigError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
        console.print(f"{run_dir}: taking over a start that finished no trial")
        _remove_start(run_dir, created=False)
    created = not run_dir.exists()
    try:
        return _run_in(cfg, run_dir, address=address, resume=resume, console=console, local=local)
    except Exception:
        # A start that fails before any trial finished leaves nothing in the way of
        # the fixed command (Ctrl-C is not an Exception: its folder stays for --resume).
        if not resume and _failed_start(run_dir):
            _remove_start(run_dir, created=created)
        raise


#: What a run writes into its folder before the first trial finishes.
_START_FILES = (RESOLVED, SPLITS, "ray.log")
_START_DIRS = (TRIALS, "ray")


def _failed_start(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run that wrote no results and finished no trial."""
    if (run_dir / RESULTS).exists():
        return False
    trials = run_dir / TRIALS
    return not (trials.is_dir() and any(read_record(d) is not None for d in trials.iterdir() if d.is_dir()))


def _remove_start(run_dir: Path, *, created: bool) -> None:
    """Remove what a failed start wrote: the whole folder when this run created it, else only its own files."""
    import shutil

    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in _START_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in _START_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _run_in(cfg: Config, run_dir: Path, *, address: str | None, resume: bool, console: Any, local: bool) -> dict[str, Any]:
    """The body of :func:`run_experiment` once ``run_dir`` is known to be free (or resumed)."""
    from mtlbench.data.cache import build_cache, load_slices, open_cache
    from mtlbench.data.folds import load_folds, make_folds, save_folds

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / RESOLVED, to_toml(cfg))

    t_cache = time.time()
    cache = build_cache(cfg, progress=True, console=console)
    info = open_cache(cache)
    console.print(f"slice cache: {cache} ({len(info.patients)} patients, {time.time() - t_cache:.1f} s)")
    splits = run_dir / SPLITS
    if splits.is_file():
        folds = load_folds(splits, list(info.patients))
        if len(folds) != cfg.experiment.folds:
            raise DataError(f"{splits}: {len(folds)} folds, but experiment.folds is {cfg.experiment.folds}")
    else:
        folds = make_folds(list(info.patients), cfg.experiment.folds, cfg.experiment.fold_seed)
        save_folds(splits, folds)
    meta = metric_meta(cfg, info)
    if meta["main_metric"] not in meta["directions"]:
        raise ConfigError(
            f"experiment.main_metric: {meta['main_metric']!r} is not a metric of the tasks; "
            f"available: {', '.join(sorted(meta['directions']))}"
        )

    specs = expand(cfg)
    done = {s.id: finished_record(run_dir, s) for s in specs}
    pending = [s for s in specs if done[s.id] is None]
    console.print(
        f"{len(specs)} trials ({len(specs) - len(pending)} already finished, {len(pending)} to run) "
        f"in {run_dir}"
    )
    errors: dict[str, str] = {}
    if pending:
        loader, why = choose_loader(cfg, cache, list(info.patients))
        console.print(f"training data: {why}")
        data = load_slices(cache, list(info.patients)) if loader == "memory" else None  # else each trial streams
        if local:
            errors = _local(cfg, run_dir, pending, data, loader, cache, folds, console)
        else:
            errors = _tune(cfg, run_dir, pending, data, loader, cache, folds, meta, address, console)
    records = []
    for s in specs:
        rec = done[s.id] or read_record(trial_dir(run_dir, s))
        if rec is None or rec.get("status") not in ("completed", "diverged"):
            from mtlbench.engine.train import failed_record

            rec = failed_record(s, cfg, trial_dir(run_dir, s), RuntimeError(errors.get(s.id, "trial produced no result")))
        records.append(rec)
    path = write_results(run_dir, meta, records)
    return {"path": path, "meta": meta, "trials": records, "cache": cache}


def choose_loader(cfg: Config, cache: Path, patients: list[str]) -> tuple[str, str]:
    """``("memory" | "stream", why)``: ``resources.loader``, where "auto" streams once the slices exceed the budget.

    The budget is ``resources.memory_budget_mb``, by default a quarter of this
    machine's memory; what is compared is what one in-memory copy of every
    patient's training slices takes (the object shared by all trials).
    """
    from mtlbench.data.cache import stacked_nbytes

    mode = cfg.resources.loader
    need = stacked_nbytes(cache, patients) / 2**20
    if mode != "auto":
        return mode, f"resources.loader = {mode!r} ({need:.0f} MB of training slices)"
    budget = cfg.resources.memory_budget_mb or default_memory_budget_mb()
    source = "resources.memory_budget_mb" if cfg.resources.memory_budget_mb else "a quarter of this machine's memory"
    if need <= budget:
        return "memory", f"{need:.0f} MB of training slices in memory (budget {budget} MB: {source})"
    return "stream", f"streamed from the cache: {need:.0f} MB of training slices exceed the budget of {budget} MB ({source})"


def default_memory_budget_mb() -> int:
    """A quarter of this machine's physical memory, in MB (1024 when it cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1024
    return max(1, int(total / 4 / 2**20))


def _local(
    cfg: Config,
    run_dir: Path,
    pending: list[TrialSpec],
    data: Any,
    loader: str,
    cache: Path,
    folds: list[dict[str, Any]],
    console: Any,
) -> dict[str, str]:
    """Run ``pending`` sequentially in this process; return {trial id: error} for trials that raised."""
    from mtlbench.engine.train import run_trial

    errors: dict[str, str] = {}
    for n, spec in enumerate(pending, start=1):
        console.print(f"trial {n}/{len(pending)}: {spec.id}")
        try:
            run_trial(cfg, spec, cache, folds, trial_dir(run_dir, spec), data=data, loader=loader,
                      cpus=cfg.resources.cpus_per_trial)
        except Exception as exc:  # recorded as failed, as a Ray trial would be
            errors[spec.id] = f"{type(exc).__name__}: {_one_line(exc)}"
    return errors


def _tune(
    cfg: Config,
    run_dir: Path,
    pending: list[TrialSpec],
    data: Any,
    loader: str,
    cache: Path,
    folds: list[dict[str, Any]],
    meta: dict[str, Any],
    address: str | None,
    console: Any,
) -> dict[str, str]:
    """Schedule ``pending`` on Ray Tune; return {trial id: error} for trials that failed."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ctrl-C must stop the run (and leave unfinished trials for --resume), not be swallowed by Tune.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # A local Ray starts its workers at niceness 15, so anything else on the machine (the driver, Ray's
    # daemons, another job) preempts the trials: trials get normal priority (bench_ray_overhead.py).
    os.environ.setdefault("RAY_worker_niceness", "0")
    log = run_dir / "ray.log"
    with _quiet_to(log):
        import ray
        from ray import tune

        logging.getLogger("ray").handlers[:] = [logging.FileHandler(log)]
        logging.getLogger("ray").propagate = False
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                ignore_reinit_error=True,
                configure_logging=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"--address {address}: cannot start or reach Ray ({_one_line(exc)})") from None
        try:
            total = ray.cluster_resources()
            n_gpu = float(total.get("GPU", 0.0))
            node_cpu, node_gpu = _largest_node()
            cpus = min(float(cfg.resources.cpus_per_trial), node_cpu)
            gpus = float(cfg.resources.gpus_per_trial) if n_gpu > 0 else 0.0
            if gpus > node_gpu:
                raise ConfigError(
                    f"resources.gpus_per_trial = {gpus:g}, but the largest node has {node_gpu:g} GPU(s); "
                    "trials would wait forever"
                )
            n_cpu = float(total.get("CPU", 1.0))
            concurrency = cfg.resources.max_concurrent or max(1, int(n_cpu // cpus))
            if gpus > 0:
                concurrency = min(concurrency, max(1, int(n_gpu // gpus)))
            setup = {
                "cache": str(cache),
                "folds": folds,
                "run_dir": str(run_dir),
                "main_metric": meta["main_metric"],
                "cpus": cpus,
                "loader": loader,
            }
            trainable = tune.with_resources(
                tune.with_parameters(_trainable, data=data, setup=setup), {"cpu": cpus, "gpu": gpus}
            )
            storage = Path(cfg.run.storage_path).resolve() if cfg.run.storage_path else run_dir / "ray"
            attempt = dt.datetime.now().strftime("tune-%Y%m%d-%H%M%S")
            display = LiveDisplay(pending, cfg.train.epochs, concurrency, console)
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([asdict(s) for s in pending])},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True,
                                            trial_name_creator=_trial_name),
                run_config=tune.RunConfig(
                    name=attempt,
                    storage_path=str(storage),
                    failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
                    verbose=0,
                    callbacks=[display, *_mlflow_callbacks(cfg)],
                ),
            )
            with display.live():
                grid = tuner.fit()
            errors = {}
            for result in grid:
                spec = TrialSpec(**result.config["trial"])
                if result.error is not None:
                    errors[spec.id] = _one_line(result.error)
            unfinished = [s for s in pending if s.id not in errors and read_record(trial_dir(run_dir, s)) is None]
            if unfinished:  # Tune stopped early (a signal): leave them for --resume, write no results
                raise KeyboardInterrupt(f"{len(unfinished)} trials unfinished")
            resources = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") + " per trial"
            console.print(f"Ray: {len(pending)} trials, {concurrency} at a time, {resources}; log: {log}")
            return errors
        finally:
            ray.shutdown()


def _largest_node() -> tuple[float, float]:
    """The most CPUs and GPUs one live node offers (a trial cannot span nodes)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return 1.0, 0.0
    return max(float(n.get("CPU", 0)) for n in nodes), max(float(n.get("GPU", 0)) for n in nodes)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    last = [l for l in text if l.strip()]
    msg = last[-1] if last else type(error).__name__
    return msg[:500]


class LiveDisplay:
    """A Ray Tune callback that keeps a rich table of the run's progress."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # subclass Tune's Callback lazily (ray import)
        from ray import tune

        klass = type("LiveDisplayCallback", (_LiveDisplayMixin, tune.Callback), {})
        obj = object.__new__(klass)
        obj.__init__(*args, **kwargs)
        return obj


class _LiveDisplayMixin:
    def __init__(self, pending: list[TrialSpec], epochs: int, concurrency: int, console: Any) -> None:
        self.total = len(pending)
        self.epochs = epochs
        self.concurrency = concurrency
        self.console = console
        self.state: dict[str, dict[str, Any]] = {}
        self.start = time.time()
        self.durations: list[float] = []
        self._live: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) for restores; the
        # terminal handles stay in the driver.
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "_live")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, console=None, _live=None)

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        from rich.live import Live

        # get_renderable: every refresh re-renders, so the clock and the estimate move between trial events
        with Live(console=self.console, refresh_per_second=2, transient=True, get_renderable=self.render) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None
        self.console.print(self.summary())

    def _id(self, trial: Any) -> str:
        return TrialSpec(**trial.config["trial"]).id

    def _update(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.state[self._id(trial)] = {"status": "running", "epoch": 0, "metric": float("nan"), "t0": time.time()}
        self._update()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        st = self.state.setdefault(self._id(trial), {"status": "running", "t0": time.time()})
        st["epoch"] = result.get("epoch", 0)
        st["metric"] = result.get("main_metric", float("nan"))
        if result.get("done"):
            st["status"] = result.get("status", "completed")
        self._update()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self.state.setdefault(self._id(trial), {"t0": time.time()})
        if st.get("status") == "running":
            st["status"] = "completed"
        self.durations.append(time.time() - st.get("t0", time.time()))
        self._update()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self.state.setdefault(self._id(trial), {"t0": time.time()})
        st["status"] = "failed"
        self._update()

    def epochs_done(self) -> float:
        """Trial-epochs trained so far: a finished trial counts all its epochs, a running one those it reported."""
        done = 0.0
        for st in self.state.values():
            done += self.epochs if st.get("status", "running") != "running" else min(st.get("epoch", 0), self.epochs)
        return done

    def remaining(self) -> float | None:
        """Seconds left, from the rate of trial-epochs so far (known after the first epoch, not the first trial)."""
        done, total = self.epochs_done(), self.total * self.epochs
        elapsed = time.time() - self.start
        if done <= 0 or elapsed <= 0:
            return None
        return (total - done) * elapsed / done

    def summary(self) -> str:
        """One line: trials done / running / pending / failed / diverged, elapsed and remaining time."""
        counts = {"completed": 0, "running": 0, "failed": 0, "diverged": 0}
        for st in self.state.values():
            counts[st.get("status", "running")] = counts.get(st.get("status", "running"), 0) + 1
        finished = counts["completed"] + counts["failed"] + counts["diverged"]
        pending = self.total - finished - counts["running"]
        left = self.remaining()
        return (
            f"trials: {counts['completed']} done, {counts['running']} running, {pending} pending, "
            f"{counts['failed']} failed, {counts['diverged']} diverged — elapsed {_fmt(time.time() - self.start)}, "
            f"remaining ~{'?' if left is None else _fmt(left)}"
        )

    def render(self) -> Any:
        """The bar (trial-epochs done of all), the summary line, and a table of the running trials."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        total = max(1, self.total * self.epochs)
        done = self.epochs_done()
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total, completed=done, width=40), Text(f"{100 * done / total:3.0f}%"))
        table = Table(expand=False)
        table.add_column("running trial")
        table.add_column("epoch", justify="right")
        table.add_column("main metric", justify="right")
        for tid, st in sorted(self.state.items()):
            if st.get("status") == "running":
                m = st.get("metric", float("nan"))
                table.add_row(tid, f"{st.get('epoch', 0)}/{self.epochs}", "-" if m != m else f"{m:.4f}")
        return Group(bar, Text(self.summary()), table) if table.row_count else Group(bar, Text(self.summary()))


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"

