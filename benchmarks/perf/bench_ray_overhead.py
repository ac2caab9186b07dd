"""What does Ray Tune cost for short trials?

Runs the same N short trials (a tiny phantom benchmark, about 14 s each here)
three ways in one run and compares wall times:

- **in-process**, one after another (``run_trial``): the work itself;
- **process pool**: ``--parallel`` plain worker processes (``multiprocessing``,
  spawn) that each import torch and run their share of the trials: what
  running in parallel costs on this machine without Ray (process start,
  imports, two trials sharing the memory system);
- **Ray Tune** (``run_experiment``: Ray start-up, trial actors, object store,
  reporting, shutdown).

and prints

    overhead ratio    = (Ray wall x parallelism) / in-process wall     (the issue's figure: 1.0 = perfect scaling)
    pool ratio        = (pool wall x parallelism) / in-process wall    (the same for plain processes)
    Ray / pool        = Ray wall / pool wall                           (what Ray adds beyond parallel processes)

plus the fixed part of Ray's cost (``ray.init``, time to the first trial's
start, shutdown) read from the trials' own timings.

    python benchmarks/perf/bench_ray_overhead.py [--epochs N] [--folds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report  # noqa: E402


def setup(epochs: int, folds: int, profile: str):
    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache, open_cache
    from mtlbench.data.folds import make_folds

    sets = ["data.phantom.patients=6", f"experiment.folds={folds}", f"train.epochs={epochs}",
            "train.slices_per_epoch=64", "strategies.joint.enabled=false", "strategies.uncertainty.enabled=false",
            "resources.cpus_per_trial=1", "run.tensorboard=false"]
    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", profile, sets)
    resolve_plugins(cfg)
    cache = build_cache(cfg)
    info = open_cache(cache)
    return cfg, cache, info, make_folds(list(info.patients), cfg.experiment.folds, cfg.experiment.fold_seed)


def pool_worker(args: tuple) -> list[float]:
    """One plain worker process: import, load the slices, run its trials one after another (wall times)."""
    epochs, folds, profile, specs, out = args
    from mtlbench.data.cache import load_slices
    from mtlbench.engine.train import run_trial
    from mtlbench.engine.trialspec import TrialSpec

    cfg, cache, info, fold_list = setup(epochs, folds, profile)
    data = load_slices(cache, list(info.patients))
    walls = []
    for s in specs:
        spec = TrialSpec(**s)
        walls.append(run_trial(cfg, spec, cache, fold_list, Path(out) / spec.id, data=data, cpus=1)["wall_time_s"])
    return walls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mtlbench-bench-cache"))

    from dataclasses import asdict

    from rich.console import Console

    from mtlbench.data.cache import load_slices
    from mtlbench.engine.train import run_trial
    from mtlbench.orchestrate.grid import expand
    from mtlbench.orchestrate.runner import run_experiment

    cfg, cache, info, folds = setup(args.epochs, args.folds, args.profile)
    specs = expand(cfg)
    work = Path(tempfile.mkdtemp(prefix="mtlbench-ray-bench-"))
    parallel = min(len(specs), max(1, int((os.cpu_count() or 1) // cfg.resources.cpus_per_trial)))

    t0 = time.perf_counter()
    data = load_slices(cache, list(info.patients))
    seq_walls = [run_trial(cfg, s, cache, folds, work / "inproc" / s.id, data=data, cpus=1)["wall_time_s"] for s in specs]
    t_seq = time.perf_counter() - t0

    shares = [[asdict(s) for s in specs[i::parallel]] for i in range(parallel)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(parallel) as pool:
        pool_walls = pool.map(pool_worker, [(args.epochs, args.folds, args.profile, sh, str(work / "pool")) for sh in shares])
    t_pool = time.perf_counter() - t0

    wall0, t0 = time.time(), time.perf_counter()
    res = run_experiment(cfg, work / "ray", console=Console(file=io.StringIO()))
    t_ray = time.perf_counter() - t0
    ray_walls = [r["wall_time_s"] for r in res["trials"]]
    ends = [(work / "ray" / "trials" / r["id"] / "result.json").stat().st_mtime for r in res["trials"]]
    first_start = min(e - w for e, w in zip(ends, ray_walls)) - wall0
    after_last = wall0 + t_ray - max(ends)

    ratio = t_ray * parallel / t_seq
    pool_ratio = t_pool * parallel / t_seq
    print(f"{len(specs)} trials, {args.epochs} epochs each (mean in-process trial {t_seq / len(specs):.1f} s), "
          f"{parallel} at a time in the pool and under Ray; {_report.machine()}")
    print(f"in-process, one after another: {t_seq:.1f} s (trial walls sum {sum(seq_walls):.1f} s)")
    print(f"process pool of {parallel}:      {t_pool:.1f} s (trial walls sum {sum(sum(w) for w in pool_walls):.1f} s)")
    print(f"Ray Tune:                      {t_ray:.1f} s (trial walls sum {sum(ray_walls):.1f} s; the first trial "
          f"started {first_start:.1f} s after the run did, the run ended {after_last:.1f} s after the last trial)")
    print(f"Ray cost per trial (start-up included): {(t_ray * parallel - t_seq) / len(specs):.1f} s")
    _report.check("Ray overhead at 14 s trials: Ray wall x parallelism / in-process", ratio, "<= 1.15", ratio <= 1.15)
    _report.check("plain process pool: pool wall x parallelism / in-process", pool_ratio, "informative", None)
    _report.check("Ray / plain process pool", t_ray / t_pool, "<= 1.15", t_ray / t_pool <= 1.15)
    _report.figure("seconds", {"in_process": t_seq, "pool": t_pool, "ray": t_ray, "ray_first_start": first_start,
                               "ray_after_last": after_last})
    _report.figure("trial_walls", {"in_process": seq_walls, "pool": pool_walls, "ray": ray_walls})
    _report.finish("ray_overhead", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
