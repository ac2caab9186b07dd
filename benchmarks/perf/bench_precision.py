"""ms per training step in fp32 contiguous, fp32 channels-last and bf16 channels-last, as ratios to fp32 channels-last.

The step is the trainer's (``mtlbench.engine.train.run_trial``): a real batch
from the slice cache, augmentation, the forward pass and losses under the
variant's autocast (``StepSettings.autocast``), the joint strategy's backward
outside it, Adam. Each variant has its own model and optimizer from the same
seed. The variants take turns in rounds (the order rotated every round), so
machine load affects all alike; each round's time is divided by the fp32
channels-last time of the same round, and the median and range of these
ratios over the rounds are printed. One step's FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products, forward and backward) and divided by each variant's median time.

Shapes: the kidney benchmark's ``cpu`` profile (48 x 48, widths 8-64,
batch 8) and, with ``--full``, the full protocol's (256 x 256, widths
64-1024, batch ``--full-batch``), whose steps take about 20 s of one core
in fp32 (several minutes in emulated bf16: ``--only`` picks the variants).
bf16 is timed whether or not the CPU has native bf16 (``mtlbench.devices.
cpu_bf16_support`` says which; without it oneDNN emulates it), which is what
``train.precision = "auto"`` decides on. ``--compile`` adds fp32
channels-last under ``torch.compile`` (trunk and tails, as ``train.compile =
true`` does) and prints its compile time.

    python benchmarks/perf/bench_precision.py [--rounds 5] [--steps 5] [--threads 1] [--compile]
        [--only "fp32 contiguous,bf16 channels-last"] [--full [--full-rounds 2] [--full-steps 1] [--full-batch 2]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "fp32 channels-last"
PLAIN = "fp32 contiguous, per-tensor Adam"  # torch's defaults: what a plain training loop runs
AUTO = "auto (what trials run here)"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402


def variants(compile_: bool, only: list[str]) -> dict[str, Any]:
    import torch

    from mtlbench.devices import StepSettings

    from mtlbench.devices import step_settings

    auto = step_settings("cpu")
    out = {
        PLAIN: StepSettings("cpu", None, False, False, False),
        "fp32 contiguous": StepSettings("cpu", None, False, False, True),
        REFERENCE: StepSettings("cpu", None, True, False, True),
        "bf16 channels-last": StepSettings("cpu", torch.bfloat16, True, False, True),
        AUTO: auto,
    }
    if compile_:
        out["fp32 channels-last compiled"] = StepSettings("cpu", None, True, True)
    unknown = [n for n in only if n not in out]
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {', '.join(unknown)}; variants: {', '.join(out)}")
    return {n: s for n, s in out.items() if not only or n in only or n in (REFERENCE, PLAIN, AUTO)}


def make_step(profile: str, sets: list[str], settings: Any, device: str = "cpu") -> tuple[Callable[[int], None], Any]:
    """A closure running training step i of the joint strategy under ``settings`` on ``device``, and the config.

    Four real cache batches are gathered once onto ``device``; each step augments one there.
    """
    import numpy as np
    import torch

    from mtlbench.api import StepContext
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache, load_slices, open_cache
    from mtlbench.data.folds import make_folds
    from mtlbench.engine.augment import random_affine
    from mtlbench.engine.train import _batch, build_components, make_model, target_rules, task_batch
    from mtlbench.engine.trialspec import TrialSpec

    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", profile, sets)
    cache = build_cache(cfg)
    folds = make_folds(list(open_cache(cache).patients), cfg.experiment.folds, 0)
    data = load_slices(cache, folds[0]["train"])
    torch.manual_seed(0)
    comp = build_components(cfg, TrialSpec(fold=0, strategy="joint", params={"weights": {"landmarks": 1.0}}))
    model = make_model(cfg, comp).to(device=device, memory_format=settings.memory_format)
    if settings.compile:
        for part in (model.trunk, *model.tails.values()):
            part.compile()
    strategy = comp.strategy
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=settings.fused_optimizer or None)
    rules = target_rules(comp)
    keys = list(rules)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    shared, tails = model.shared_parameters(), {k: list(v) for k, v in model.task_parameters().items()}
    last = model.last_shared_parameters()
    kinds = {t: comp.tasks[t].kind for t in comp.tasks}
    batches = [_batch(data, rng.choice(len(data), size=cfg.train.batch_size, replace=False), keys, device)
               for _ in range(4)]
    model.train()

    def step(i: int) -> None:  # as in run_trial
        image, targets = batches[i % len(batches)]
        image, targets = random_affine(image, targets, rules, cfg.augment, gen)
        names = strategy.tasks_for_step(i)
        with settings.autocast():
            outputs, features = model.forward_with_features(image, names)
            losses = {t: comp.tasks[t].loss(outputs[t].float(), task_batch(t, targets)).float() for t in names}
        opt.zero_grad(set_to_none=True)
        strategy.backward(losses, StepContext(i, 0, shared, tails, kinds, features, last, []))
        opt.step()

    return step, cfg


def count_flops(step: Callable[[int], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(0)
    return float(counter.get_total_flops())


def measure(title: str, profile: str, sets: list[str], rounds: int, steps: int, settings: dict[str, Any],
            warmup: int = 2) -> dict[str, float]:
    """Median ms/step of every variant (also printed with its ratio to fp32 channels-last)."""
    built = {}
    for name, s in settings.items():
        step, cfg = make_step(profile, sets, s)
        t0 = time.perf_counter()
        for i in range(warmup):  # (and the compilation, for the compiled variant)
            step(i)
        warm = time.perf_counter() - t0
        built[name] = step
        if s.compile:
            print(f"  {name}: the {warmup} warm-up steps (compiling) took {warm:.1f} s")
    flops = count_flops(built[REFERENCE])
    h, w = cfg.preprocess.slice_size
    print(f"{title}: {h} x {w}, widths {cfg.model.widths[0]}-{cfg.model.widths[-1]}, batch {cfg.train.batch_size}, "
          f"joint strategy, {rounds} rounds x {steps} steps, one step = {flops / 1e9:.2f} GFLOP")
    ms: dict[str, list[float]] = {n: [] for n in built}
    names = list(built)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for i in range(steps):
                built[name](warmup + r * steps + i)
            ms[name].append(1000 * (time.perf_counter() - t0) / steps)
    print(f"  {'variant':32s} {'ms/step':>9s} {'GFLOP/s':>8s} {'time / fp32 CL: median [min, max]':>35s}")
    for name in names:
        ratios = [a / b for a, b in zip(ms[name], ms[REFERENCE])]
        med = statistics.median(ms[name])
        print(f"  {name:32s} {med:9.1f} {flops / 1e9 / (med / 1000):8.1f} "
              f"{statistics.median(ratios):14.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")
    return {n: statistics.median(v) for n, v in ms.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the cpu profile runs 1 per trial)")
    ap.add_argument("--full", action="store_true", help="also the full-protocol shape (minutes)")
    ap.add_argument("--full-rounds", type=int, default=2)
    ap.add_argument("--full-steps", type=int, default=1)
    ap.add_argument("--full-batch", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time fp32 channels-last under torch.compile")
    ap.add_argument("--only", default="", help="comma-separated variants (fp32 channels-last, plain and auto are always timed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import platform

    import torch

    from mtlbench.devices import cpu_bf16_support, read_cpu_flags

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as run_trial does on CPU (and compiled code needs)
    native, why = cpu_bf16_support()
    flags = read_cpu_flags() or frozenset()
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "unknown"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"flags: {isa}; native bf16: {'yes' if native else 'no'} ({why})")
    print(f"train.precision = 'auto' here: {'bf16' if native else 'fp32'}")
    small = ["data.phantom.patients=6", "experiment.folds=2"]
    chosen = variants(args.compile, [n.strip() for n in args.only.split(",") if n.strip()])
    ms = measure("cpu profile", "cpu", small, args.rounds, args.steps, chosen)
    auto = chosen[AUTO]
    speedup = ms[PLAIN] / ms[AUTO]
    _report.check("cpu fast step: plain fp32 / auto settings", speedup, "> 1", speedup > 1,
                  note=f"auto here: {auto.precision}, channels-last {auto.channels_last}, fused Adam {auto.fused_optimizer}")
    _report.figure("ms_per_step", ms)
    if args.full:
        full = ["data.phantom.patients=2", "experiment.folds=2", f"train.batch_size={args.full_batch}"]
        measure("full protocol", "full", full, args.full_rounds, args.full_steps, chosen, warmup=1)
    _report.finish("precision", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
