"""How does the cost of a run grow with the number of patients?

Runs the kidney benchmark's ``cpu``-profile data path on 5, 10, 20 and 40
phantom patients (``--patients``) and prints, per size:

- the slice cache's build time (phantom generation, SimpleITK read,
  preprocessing, HDF5 write) and size on disk, in a fresh cache folder;
- loading every patient's training slices into memory (what ``mtlbench run``
  puts into Ray's object store) and their size;
- one trial per fold (the ``single`` strategy, ``--epochs`` epochs of a fixed
  ``train.slices_per_epoch``, so training work per trial is the same at every
  size and what grows is visible), split as each trial's own
  ``result.json["timings"]`` records it: start-up in the trial, training,
  evaluation every ``eval_every`` epochs, the final evaluation on the original
  grid, reporting (example and checkpoint). The trials run in this process
  (``run_experiment(local=True)``), so Ray's start-up (measured by
  bench_ray_overhead.py) is not in these figures;

and the least-squares growth per patient of each (the slope of the line
through the four sizes), with the voxels per patient, for extrapolating to
real CTs (docs/performance.md does). Judged: nothing; the table is the result.

    python benchmarks/perf/bench_growth.py [--patients 5,10,20,40] [--epochs 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report  # noqa: E402

PHASES = ("startup_s", "train_s", "eval_s", "final_eval_s", "report_s")


def measure(n: int, epochs: int, work: Path) -> dict[str, float]:
    """Every figure of one size, in a fresh cache folder."""
    import h5py
    from rich.console import Console

    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache, load_slices, open_cache
    from mtlbench.orchestrate.runner import run_experiment

    os.environ["MTLBENCH_CACHE_DIR"] = str(work / f"cache-{n}")
    sets = [f"data.phantom.patients={n}", "experiment.folds=5", f"train.epochs={epochs}", "train.eval_every=1",
            "train.slices_per_epoch=256", "run.tensorboard=false"]
    sets += [f"strategies.{s}.enabled=false" for s in ("single_landmarks", "joint", "alternate", "uncertainty")]
    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", sets)
    resolve_plugins(cfg)
    t = time.perf_counter()
    cache = build_cache(cfg)
    build_s = time.perf_counter() - t
    info = open_cache(cache)
    t = time.perf_counter()
    data = load_slices(cache, list(info.patients))
    load_s = time.perf_counter() - t
    slices_mb = data.nbytes / 2**20
    with h5py.File(cache, "r") as f:
        voxels = sum(int(f["patients"][p]["orig_labels"].size) for p in info.patients) / len(info.patients)
    del data
    t = time.perf_counter()
    res = run_experiment(cfg, work / f"run-{n}", console=Console(file=io.StringIO()), local=True)
    run_s = time.perf_counter() - t
    trials = [r for r in res["trials"] if r["status"] == "completed"]
    if len(trials) != len(res["trials"]):
        raise RuntimeError(f"{n} patients: {len(res['trials']) - len(trials)} trials did not complete")
    row = {
        "patients": n,
        "cache_build_s": build_s,
        "cache_mb": cache.stat().st_size / 2**20,
        "load_slices_s": load_s,
        "slices_mb": slices_mb,
        "voxels_per_patient": voxels,
        "run_s": run_s,
        "trial_s": sum(r["wall_time_s"] for r in trials) / len(trials),
    }
    for phase in PHASES:
        row[phase] = sum(r["timings"][phase] for r in trials) / len(trials)
    return row


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys on xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return b, my - b * mx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", default="5,10,20,40")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(v) for v in args.patients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mtlbench-growth-"))
    rows = [measure(n, args.epochs, work) for n in sizes]

    cols = [("patients", "patients", "{:.0f}"), ("cache_build_s", "cache build s", "{:.1f}"),
            ("cache_mb", "cache MB", "{:.1f}"), ("load_slices_s", "load s", "{:.2f}"), ("slices_mb", "slices MB", "{:.1f}"),
            ("startup_s", "trial start s", "{:.2f}"), ("train_s", "train s", "{:.2f}"), ("eval_s", "eval s", "{:.2f}"),
            ("final_eval_s", "final eval s", "{:.2f}"), ("report_s", "report s", "{:.2f}"), ("trial_s", "trial s", "{:.2f}")]
    print(f"{args.epochs} epoch(s) of 256 slices per trial, one trial per fold (5 folds), in-process; {_report.machine()}")
    print("  ".join(f"{h:>13s}" for _, h, _ in cols))
    for r in rows:
        print("  ".join(f"{fmt.format(r[k]):>13s}" for k, _, fmt in cols))
    growth = {}
    xs = [float(r["patients"]) for r in rows]
    for key, head, _ in cols[1:]:
        b, a = slope(xs, [r[key] for r in rows])
        growth[key] = {"per_patient": b, "intercept": a}
    print("  ".join(f"{'per patient':>13s}" if k == "patients" else f"{growth[k]['per_patient']:13.3g}" for k, _, _ in cols))
    print(f"voxels per patient (original grid): {rows[0]['voxels_per_patient']:.3g}")
    _report.figure("rows", rows)
    _report.figure("growth", growth)
    _report.check("cache build per patient", growth["cache_build_s"]["per_patient"], "informative", None, unit=" s")
    _report.check("final evaluation per test patient", growth["final_eval_s"]["per_patient"] * 5, "informative", None,
                  unit=" s", note="slope x 5 folds: each fold tests n/5 patients")
    _report.finish("growth", args.json)
    print(json.dumps({"growth_per_patient": {k: round(v["per_patient"], 4) for k, v in growth.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
