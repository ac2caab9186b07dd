"""``make bench``: every judged benchmark in one run, one table of figure, target and verdict, and one JSON file.

Runs, each in its own process (their output streams through):

- bench_precision.py: the CPU training step under the settings trials use
  (``mtlbench.devices.step_settings``) vs torch's plain fp32 step, at the
  ``cpu`` profile's shape; and the metric check (pytest
  ``tests/test_precision.py::test_bf16_trial_within_fp32_seed_spread``:
  a short trial's metrics in bf16 stay within fp32's seed-to-seed spread);
- bench_ray_overhead.py: what Ray Tune costs at 14 s trials;
- bench_streaming.py: training slices/s streamed from the HDF5 cache vs in memory, and peak RSS;
- bench_memory_share.py: one copy of the training slices across two concurrent trials;
- bench_growth.py: how cache, data and trial times grow with the number of patients.

The other scripts in this folder are diagnostics run on their own.

    python benchmarks/perf/run_all.py [--out runs/bench] [--only NAME,NAME] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import _report  # noqa: E402

#: name -> (script, arguments, arguments with --quick)
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "precision": ("bench_precision.py", ["--rounds", "5", "--steps", "5"], ["--rounds", "2", "--steps", "3"]),
    "ray_overhead": ("bench_ray_overhead.py", [], []),
    "streaming": ("bench_streaming.py", [], ["--patients", "10"]),
    "memory_share": ("bench_memory_share.py", [], ["--patients", "20"]),
    "growth": ("bench_growth.py", [], ["--patients", "5,10"]),
}
METRIC_TEST = "tests/test_precision.py::test_bf16_trial_within_fp32_seed_spread"


def run_one(name: str, script: str, args: list[str], work: Path) -> dict:
    """Run one benchmark; its JSON report, or a failed check when it wrote none."""
    out = work / f"{name}.json"
    t = time.perf_counter()
    code = subprocess.call([sys.executable, str(HERE / script), *args, "--json", str(out)], cwd=ROOT)
    took = time.perf_counter() - t
    if out.is_file():
        report = json.loads(out.read_text())
    else:
        report = {"bench": name, "checks": [], "figures": {}}
    if code != 0:
        report["checks"].append({"name": f"{script} finished", "value": float(code), "unit": "", "target": "exit 0",
                                 "pass": False, "note": "the benchmark exited with an error"})
    report["seconds"] = took
    return report


def metric_check() -> dict:
    """The bf16-vs-fp32 metric check as one judged row (the pytest test's verdict)."""
    t = time.perf_counter()
    # without native bf16 the test skips; emulated bf16 runs the same arithmetic, only slower
    env = {**os.environ, "MTLBENCH_TEST_EMULATED_BF16": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", METRIC_TEST], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    print(r.stdout[-2000:], r.stderr[-2000:], sep="\n")
    skipped = " skipped" in r.stdout.splitlines()[-1] if r.stdout.strip() else False
    passed = None if skipped else r.returncode == 0
    check = {"name": "fast-step metrics within fp32 seed spread", "value": float(r.returncode == 0), "unit": "",
             "target": "pytest passes", "pass": passed, "note": METRIC_TEST + (" (skipped)" if skipped else "")}
    return {"bench": "precision_metrics", "checks": [check], "figures": {}, "seconds": time.perf_counter() - t}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(SUITE)}, metrics")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run; figures not for the docs)")
    args = ap.parse_args()
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mtlbench-bench-cache"))
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reports = []
    for name, (script, full, quick) in SUITE.items():
        if not only or name in only:
            print(f"\n=== {name}: {script}", flush=True)
            reports.append(run_one(name, script, quick if args.quick else full, work))
    if not only or "metrics" in only:
        print("\n=== metrics: " + METRIC_TEST, flush=True)
        reports.append(metric_check())
    total = time.perf_counter() - t0

    rows = [(r["bench"], c) for r in reports for c in r["checks"]]
    width = max([len(c["name"]) for _, c in rows] + [10])
    print(f"\nmtlbench benchmarks on {_report.machine()}: {total / 60:.1f} min")
    print(f"{'bench':14s} {'figure':{width}s} {'value':>10s}  {'target':12s} verdict")
    for bench, c in rows:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[c["pass"]]
        print(f"{bench:14s} {c['name']:{width}s} {c['value']:10.3g}{c['unit'][:2]:2s} {c['target']:12s} {verdict}")
    summary = {"machine": _report.machine(), "minutes": total / 60, "quick": args.quick, "reports": reports}
    path = work / "bench.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    print(f"written: {path}")
    return 1 if any(c["pass"] is False for _, c in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
