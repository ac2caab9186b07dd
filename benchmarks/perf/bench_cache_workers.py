"""How much faster is the slice cache built in worker processes?

Builds the cache of the same phantom patients (the ``cpu`` profile's settings
from ``benchmarks/kidney.toml``) twice in one run, each into a fresh cache
folder with the phantom already generated: in the main process
(``resources.cache_workers = 1``) and with the default worker count, and
prints

    speed-up = in-process build time / build time with workers

with the worker count, and checks that both files hold the same arrays.

    python benchmarks/perf/bench_cache_workers.py [--patients 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report  # noqa: E402


def build(patients: int, workers: int | None, name: str) -> tuple[float, Path]:
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache

    sets = [f"data.phantom.patients={patients}", f"experiment.name={name}"]
    if workers is not None:
        sets.append(f"resources.cache_workers={workers}")
    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", sets)
    t = time.perf_counter()
    path = build_cache(cfg)
    return time.perf_counter() - t, path


def same_arrays(a: Path, b: Path) -> bool:
    import h5py
    import numpy as np

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return all(n in fb and np.array_equal(fa[n][...], fb[n][...]) for n in names) and len(names) > 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_workers

    with tempfile.TemporaryDirectory() as work:
        os.environ["MTLBENCH_CACHE_DIR"] = work
        from mtlbench.assemble import make_source

        cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", [f"data.phantom.patients={args.patients}"])
        make_source(cfg).patient_ids()  # generate the phantom first: it is not what is measured
        workers = build_workers(cfg, args.patients)
        serial_s, serial = build(args.patients, 1, "serial")
        parallel_s, parallel = build(args.patients, None, "workers")
        same = same_arrays(serial, parallel)
    print(f"{args.patients} patients: in-process {serial_s:.1f} s, {workers} workers {parallel_s:.1f} s")
    _report.figure("patients", args.patients)
    _report.figure("workers", workers)
    _report.figure("serial_s", serial_s)
    _report.figure("workers_s", parallel_s)
    _report.check("cache build speed-up with workers", serial_s / parallel_s, "informative", None,
                  note=f"{workers} workers, {args.patients} patients; same arrays: {same}")
    _report.check("cache built with workers holds the same arrays", float(same), "1", same, unit="")
    _report.finish("cache_workers", args.json)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
