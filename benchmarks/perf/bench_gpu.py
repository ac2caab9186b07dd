"""The training step on a GPU: achieved model FLOP/s and its fraction of the card's peak, eager vs the fast settings.

Prepared for a session that has a GPU (none of the sessions so far had one;
without CUDA this script says so and exits 0, measuring nothing). It runs,
on ``cuda:0``:

1. the full protocol's step (256 x 256, widths 64-1024, the joint strategy,
   real cache batches, augmentation on the GPU, Adam) at the largest batch in
   ``--batches`` that fits, for each variant: fp32 contiguous (eager, torch's
   defaults), and the settings ``mtlbench.devices.step_settings("cuda")``
   picks ("auto": bf16 autocast and channels-last where the card has native
   bf16, fused Adam), with and without ``torch.compile``; FLOPs of one step
   from ``torch.utils.flop_counter.FlopCounterMode`` (forward and backward
   convolutions and matrix products), achieved FLOP/s = FLOPs / median step
   time, and its fraction of the card's dense peak for the precision
   (``PEAK_TFLOPS``, from the vendors' data sheets; unknown cards print no fraction);
2. packing: the cpu profile's small trial step alone vs ``--pack`` copies
   stepping in separate processes at once on the same GPU (what
   ``resources.gpus_per_trial = 1 / pack`` does), as total steps/s;
3. one short kidney trial (``run_trial``, cpu-profile sizes, 2 epochs) on the
   GPU, with slices resident on the GPU, and its timings.

    python benchmarks/perf/bench_gpu.py [--batches 32,16,8,4] [--steps 10] [--pack 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report  # noqa: E402

#: Dense (no sparsity) peak TFLOP/s by card name fragment and precision, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.0, "fp32": 82.6},
}


def peak(name: str, precision: str) -> float | None:
    for key, values in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return values.get(precision)
    return None


def make_step(profile: str, sets: list[str], settings, device: str):
    """bench_precision's training step (the trainer's, joint strategy) on ``device``, its FLOPs and the config."""
    from bench_precision import count_flops, make_step as precision_step

    step, cfg = precision_step(profile, sets, settings, device)
    return step, count_flops(step), cfg


def time_steps(step, steps: int, warmup: int = 3) -> float:
    """Median seconds per step (CUDA-synchronised), after ``warmup`` steps (compilation included there)."""
    import torch

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(warmup + i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def full_step(args, name: str) -> None:
    import torch

    from mtlbench.devices import StepSettings, step_settings

    auto = step_settings("cuda")
    variants = {
        "fp32 contiguous, eager (torch defaults)": StepSettings("cuda", None, False, False, False),
        f"auto ({auto.precision}, channels-last {auto.channels_last}, fused Adam)": auto,
        "auto + torch.compile": StepSettings("cuda", auto.autocast_dtype, auto.channels_last, True, True),
    }
    print(f"full protocol step on {name}")
    base = None
    for label, s in variants.items():
        for bs in [int(b) for b in args.batches.split(",")]:
            try:
                sets = ["data.phantom.patients=3", "experiment.folds=3", f"train.batch_size={bs}"]
                step, flops, _ = make_step("full", sets, s, "cuda:0")
                sec = time_steps(step, args.steps)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            tflops = flops / sec / 1e12
            p = peak(name, s.precision)
            frac = f", {100 * tflops / p:.0f}% of the {p:.0f} TFLOP/s {s.precision} peak" if p else ""
            print(f"  {label}: batch {bs}, {1000 * sec:.1f} ms/step, {flops / 1e12:.2f} TFLOP/step, "
                  f"{tflops:.1f} TFLOP/s{frac}; {bs / sec:.0f} slices/s")
            per_slice = sec / bs
            base = base or per_slice
            _report.check(f"full step, {label}: time per slice vs eager fp32", base / per_slice, "informative", None)
            _report.figure(f"full/{label}", {"batch": bs, "ms": 1000 * sec, "tflops": tflops, "peak": p})
            break
        torch.cuda.empty_cache()


def _packed_worker(args: tuple) -> float:
    steps, start = args
    from mtlbench.devices import step_settings

    step, _, _ = make_step("cpu", ["data.phantom.patients=6", "experiment.folds=2", "train.device=cuda"],
                           step_settings("cuda"), "cuda:0")
    time_steps(step, 2)
    while time.time() < start:  # all copies start stepping together
        time.sleep(0.01)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    import torch

    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t)


def packing(args) -> None:
    alone = _packed_worker((args.steps * 10, time.time()))
    start = time.time() + 60  # time for every process to import and build
    with mp.get_context("spawn").Pool(args.pack) as pool:
        rates = pool.map(_packed_worker, [(args.steps * 10, start)] * args.pack)
    gain = sum(rates) / alone
    print(f"cpu-profile step: alone {alone:.0f} steps/s; {args.pack} processes on one GPU: {sum(rates):.0f} steps/s in all")
    _report.check(f"{args.pack} small trials packed on one GPU: total steps/s vs one", gain, "> 1", gain > 1)


def short_trial(args) -> None:
    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache, open_cache
    from mtlbench.data.folds import make_folds
    from mtlbench.engine.train import run_trial
    from mtlbench.orchestrate.grid import expand

    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", ["train.epochs=2", "train.device=cuda"])
    resolve_plugins(cfg)
    cache = build_cache(cfg)
    folds = make_folds(list(open_cache(cache).patients), cfg.experiment.folds, 0)
    spec = [s for s in expand(cfg) if s.strategy == "joint"][0]
    rec = run_trial(cfg, spec, cache, folds, Path(tempfile.mkdtemp()) / spec.id)
    print(f"short kidney trial on the GPU: {rec['wall_time_s']:.1f} s, timings {rec['timings']}, "
          f"IoU {rec['metrics']['segmentation/iou_mean']:.3f}, step settings {rec['step_settings']['reason']}")
    _report.figure("short_trial", {"wall_s": rec["wall_time_s"], "timings": rec["timings"]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,16,8,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pack", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mtlbench-bench-cache"))
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (this benchmark runs only on a GPU)")
        _report.finish("gpu", args.json)
        return 0
    name = torch.cuda.get_device_name(0)
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    _report.figure("device", name)
    full_step(args, name)
    packing(args)
    short_trial(args)
    _report.finish("gpu", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
