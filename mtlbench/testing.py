"""A test helper for plugin authors: run a tiny benchmark with your task or strategy and get its results back.

    from mtlbench.testing import run_tiny_benchmark

    def test_my_task_learns_something(tmp_path):
        res = run_tiny_benchmark(tmp_path, tasks={"mytask": {}}, strategies={"single": {}, "joint": {}})
        joint = [t for t in res.trials if t["strategy"] == "joint"]
        assert all(t["status"] == "completed" for t in joint)
        assert "mytask/my_metric" in joint[0]["metrics"]

It builds a real slice cache from the embedded phantom (4 patients, 32 x 32
slices, 2 folds, 2 epochs: about half a minute on one CPU core), trains every
trial with the real engine and writes a real run folder (results.json,
checkpoints, plots, report.md). By default the trials run one after another
in the test's process; ``ray=True`` schedules them on Ray Tune as ``mtlbench
run`` does. The cache goes to ``tmp_path / "cache"`` unless
``MTLBENCH_CACHE_DIR`` is set. Your plugin must be installed (an entry point
in the ``mtlbench`` group), exactly as a user would install it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The benchmark ``run_tiny_benchmark`` starts from; ``tasks``, ``strategies`` and ``overrides`` change it.
TINY: dict[str, Any] = {
    "experiment": {"name": "tiny", "folds": 2},
    "data": {"source": "phantom", "phantom": {"patients": 4, "seed": 3}},
    "preprocess": {"slice_size": [32, 32]},
    "model": {"widths": [4, 8, 16]},
    "train": {"epochs": 2, "batch_size": 8, "slices_per_epoch": 48, "lr": 0.003},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
}
TINY_HEAD = {"width": 4, "convs": 1}


@dataclass
class TinyRun:
    """What ``run_tiny_benchmark`` returns."""

    run_dir: Path
    results: dict[str, Any]  # results.json: {"meta": ..., "trials": [...]}
    leaderboard: dict[str, Any]  # as ``mtlbench leaderboard --json`` prints it
    cache: Path  # the HDF5 slice cache

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.results["trials"]


def tiny_config(
    tasks: dict[str, dict[str, Any]] | None = None,
    strategies: dict[str, dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The tiny benchmark as a config dict: segmentation (always) plus ``tasks``, and ``strategies``.

    Each task table is a ``[tasks.<label>]`` table (``use``, ``params``,
    ``head``, ``head_params``); tails default to one 4-channel convolution.
    ``strategies`` defaults to the single-task baseline and ``joint``.
    ``overrides`` is deep-merged last (e.g. ``{"train": {"epochs": 3}}``).
    """
    from mtlbench.config import deep_merge

    raw = copy.deepcopy(TINY)
    table = {"segmentation": {}}
    table.update(tasks or {})
    raw["tasks"] = {label: {"head_params": dict(TINY_HEAD), **copy.deepcopy(t)} for label, t in table.items()}
    raw["strategies"] = copy.deepcopy(strategies) if strategies is not None else {"single": {}, "joint": {}}
    return deep_merge(raw, overrides or {})


def run_tiny_benchmark(
    tmp_path: str | Path,
    tasks: dict[str, dict[str, Any]] | None = None,
    strategies: dict[str, dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    ray: bool = False,
) -> TinyRun:
    """Run the tiny benchmark (``tiny_config``) into ``tmp_path / "run"``; see the module docstring."""
    import tomli_w
    from rich.console import Console

    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config
    from mtlbench.orchestrate.runner import run_experiment
    from mtlbench.report.leaderboard import build_leaderboard
    from mtlbench.report.markdown import write_report

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_config(tasks, strategies, overrides)))
    saved = os.environ.get("MTLBENCH_CACHE_DIR")
    if saved is None:
        os.environ["MTLBENCH_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        cfg = load_config(config)
        resolve_plugins(cfg, source=str(config))
        run_dir = tmp_path / "run"
        out = run_experiment(cfg, run_dir, console=Console(quiet=True), local=not ray)
        results = {"meta": out["meta"], "trials": out["trials"]}
        write_report(run_dir)
        return TinyRun(run_dir.resolve(), results, build_leaderboard(results), Path(out["cache"]))
    finally:
        if saved is None:
            os.environ.pop("MTLBENCH_CACHE_DIR", None)
