"""Cost per training step of every installed strategy, as a ratio to joint, on the cpu-profile model.

Each strategy runs in its own process (so peak memory is its own): the
kidney benchmark's `cpu` profile model (48 x 48 slices, widths 8-64, batch 8,
segmentation + landmarks), one thread, real batches from the slice cache with
augmentation, `--steps` timed optimizer steps after 3 warm-up steps. Printed
per strategy: ms per step, its ratio to joint, and the growth of the process's
peak resident memory during the timed steps over that of joint (the model and
data are the same for all, so the difference is the strategy's).

    python benchmarks/perf/bench_strategies.py [--steps 30] [--only jd_upgrad,pcgrad]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Parameters for the strategies that have required ones (as in tests/e2e/test_every_strategy.py).
REQUIRED = {
    "jd_cagrad": {"c": 0.4},
    "jd_fairgrad": {"alpha": 1.0},
    "jd_constant": {"weights": [1.0, 1.0]},
    "jd_trimmedmean": {"trim_number": 0},
}


def _sets(name: str) -> list[str]:
    import json as _json

    out = [f'strategies.bench.use="{name}"']
    out += [f"strategies.bench.params.{k}={_json.dumps(v)}" for k, v in REQUIRED.get(name, {}).items()]
    return out


def child(name: str, steps: int) -> dict:
    import resource
    import time

    import numpy as np
    import torch

    from mtlbench.api import StepContext
    from mtlbench.assemble import make_strategy
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache, load_slices, open_cache
    from mtlbench.data.folds import make_folds
    from mtlbench.engine.augment import random_affine
    from mtlbench.engine.train import _batch, build_components, make_model, target_rules, task_batch
    from mtlbench.engine.trialspec import TrialSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", ["data.phantom.patients=6", "experiment.folds=2",
                                                                     *_sets(name)])
    cache = build_cache(cfg)
    info = open_cache(cache)
    folds = make_folds(list(info.patients), 2, 0)
    data = load_slices(cache, folds[0]["train"])
    comp = build_components(cfg, TrialSpec(fold=0, strategy="bench", params=REQUIRED.get(name, {})))
    model = make_model(cfg, comp).to(memory_format=torch.channels_last)
    strategy = comp.strategy
    groups = [{"params": list(model.parameters())}]
    extra = list(strategy.parameters())
    groups += [g if isinstance(g, dict) else {"params": [g]} for g in extra]
    opt = torch.optim.Adam(groups, lr=cfg.train.lr)
    rules = target_rules(comp)
    keys = list(rules)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    shared, tails = model.shared_parameters(), {k: list(v) for k, v in model.task_parameters().items()}
    last = model.last_shared_parameters()
    kinds = {t: comp.tasks[t].kind for t in comp.tasks}
    history = [{t: 1.0 for t in comp.tasks}, {t: 0.9 for t in comp.tasks}]
    batches = [_batch(data, rng.choice(len(data), size=cfg.train.batch_size, replace=False), keys, "cpu") for _ in range(4)]
    model.train()

    def step(i: int) -> None:
        image, targets = batches[i % len(batches)]
        image, targets = random_affine(image, targets, rules, cfg.augment, gen)
        names = strategy.tasks_for_step(i)
        outputs, features = model.forward_with_features(image, names)
        losses = {t: comp.tasks[t].loss(outputs[t], task_batch(t, targets)) for t in names}
        opt.zero_grad(set_to_none=True)
        strategy.backward(losses, StepContext(i, 0, shared, tails, kinds, features, last, history))
        opt.step()

    for i in range(3):
        step(i)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for i in range(steps):
        step(3 + i)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": 1000 * elapsed / steps, "peak_mb": after / 1024, "growth_mb": (after - before) / 1024}


def strategies() -> list[str]:
    from mtlbench.assemble import make_strategy
    from mtlbench.config import load_config
    from mtlbench.errors import MtlbenchError
    from mtlbench.plugins import get_manager

    names = []
    for name in get_manager().registry("strategies").names():
        cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", _sets(name))
        try:
            make_strategy(cfg, "bench", REQUIRED.get(name, {}))
        except MtlbenchError as exc:  # needs parameters or an extra that is not installed
            print(f"skipped {name}: {exc}", file=sys.stderr)
            continue
        names.append(name)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated strategy names (joint is always measured)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache

    # the cache first, so that no child's peak memory includes building it
    build_cache(load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", ["data.phantom.patients=6", "experiment.folds=2"]))
    names = [n for n in args.only.split(",") if n] or strategies()
    names = ["joint"] + [n for n in names if n != "joint"]
    rows = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in names:
        r = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"{name}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
    base = rows["joint"]
    print(f"cpu-profile model (48 x 48, widths 8-64, batch 8, 1 thread), {args.steps} steps each; ratios to joint")
    print(f"{'strategy':22s} {'ms/step':>8s} {'x joint':>8s} {'peak MB':>8s} {'+MB vs joint':>12s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['ms']:8.1f} {r['ms'] / base['ms']:8.2f} {r['peak_mb']:8.0f} {r['peak_mb'] - base['peak_mb']:12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
