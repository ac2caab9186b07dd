"""What does Ray Tune cost for short trials?

Runs the same N short trials (a tiny phantom benchmark) twice in one run:
through Ray Tune (``run_experiment``: Ray start-up, trial processes, object
store, reporting) and in-process one after another (``run_trial``), and prints

    overhead ratio = (Ray wall time x trials running at once) / in-process wall time

normalised by parallelism: 1.0 means Ray adds nothing beyond splitting the work
over its workers; the amount above 1 is start-up and per-trial cost spread over
the work. Also prints the per-trial cost in seconds.

    python benchmarks/perf/bench_ray_overhead.py [--epochs N]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--profile", default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mtlbench-bench-cache"))

    from rich.console import Console

    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache, load_slices, open_cache
    from mtlbench.data.folds import make_folds
    from mtlbench.engine.train import run_trial
    from mtlbench.orchestrate.grid import expand
    from mtlbench.orchestrate.runner import run_experiment

    sets = ["data.phantom.patients=6", "experiment.folds=2", f"train.epochs={args.epochs}",
            "train.slices_per_epoch=64", "strategies.joint.enabled=false", "strategies.uncertainty.enabled=false",
            "resources.cpus_per_trial=1"]
    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", args.profile, sets)
    resolve_plugins(cfg)
    cache = build_cache(cfg)
    info = open_cache(cache)
    folds = make_folds(list(info.patients), cfg.experiment.folds, cfg.experiment.fold_seed)
    specs = expand(cfg)
    work = Path(tempfile.mkdtemp(prefix="mtlbench-ray-bench-"))

    t0 = time.perf_counter()
    data = load_slices(cache, list(info.patients))
    for s in specs:
        run_trial(cfg, s, cache, folds, work / "inproc" / s.id, data=data, cpus=1)
    t_seq = time.perf_counter() - t0

    quiet = Console(file=io.StringIO())
    t0 = time.perf_counter()
    run_experiment(cfg, work / "ray", console=quiet)
    t_ray = time.perf_counter() - t0
    parallel = min(len(specs), max(1, int((os.cpu_count() or 1) // cfg.resources.cpus_per_trial)))

    ratio = t_ray * parallel / t_seq
    per_trial = (t_ray * parallel - t_seq) / len(specs)
    print(f"{len(specs)} trials, {args.epochs} epochs each, {parallel} at a time under Ray")
    print(f"in-process, one after another: {t_seq:.1f} s")
    print(f"Ray Tune: {t_ray:.1f} s wall")
    print(f"overhead ratio (Ray wall x parallelism / in-process): {ratio:.2f}x")
    print(f"Ray cost per trial (start-up included): {per_trial:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
