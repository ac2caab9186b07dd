"""Is the data pipeline fast enough to keep training busy?

Measures, in one run on this machine, with the kidney benchmark's settings
(the ``cpu`` profile by default, ``--profile full`` for the protocol):

- the training step: forward + losses + backward + Adam step of the joint
  strategy's model, on batches already in memory (slices/s);
- the data pipeline: reading the training slices from the HDF5 cache, gathering
  random batches and augmenting them (one affine per sample) (slices/s);

and prints pipeline / step. Above 1 means the pipeline produces slices faster
than training consumes them, so it is not what limits training; the script
exits with status 1 otherwise.

    python benchmarks/perf/bench_train_pipeline.py [--profile cpu|full] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--patients", type=int, default=6)
    args = ap.parse_args()
    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mtlbench-bench-cache"))

    import numpy as np
    import torch

    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config
    from mtlbench.data.cache import build_cache, load_slices, open_cache
    from mtlbench.data.folds import make_folds
    from mtlbench.engine.augment import random_affine
    from mtlbench.engine.train import _batch, build_components, make_model, target_rules, task_batch
    from mtlbench.engine.trialspec import TrialSpec
    from mtlbench.api import StepContext

    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", args.profile,
                      [f"data.phantom.patients={args.patients}", "experiment.folds=2"])
    resolve_plugins(cfg)
    torch.set_num_threads(1)
    cache = build_cache(cfg)
    info = open_cache(cache)
    folds = make_folds(list(info.patients), 2, 0)
    train_ids = folds[0]["train"]
    bs = cfg.train.batch_size
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    spec = TrialSpec(fold=0, strategy="joint", params={"weights": {"landmarks": 1.0}})
    comp = build_components(cfg, spec)
    rules = target_rules(comp)
    keys = list(rules)

    # data pipeline: cache read + batch gather + augmentation
    t0 = time.perf_counter()
    data = load_slices(cache, train_ids)
    t_read = time.perf_counter() - t0
    n = len(data)
    t0 = time.perf_counter()
    produced = 0
    for _ in range(args.steps):
        idx = rng.choice(n, size=bs, replace=False)
        image, targets = _batch(data, idx, keys, "cpu")
        random_affine(image, targets, rules, cfg.augment, gen)
        produced += bs
    t_aug = time.perf_counter() - t0
    # reading is done once per trial; charge it to as many slices as one epoch uses
    per_epoch = cfg.train.slices_per_epoch or n
    pipeline_rate = per_epoch / (t_read + t_aug * per_epoch / produced)

    # training step on in-memory batches
    model = make_model(cfg, comp)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    batches = [_batch(data, rng.choice(n, size=bs, replace=False), keys, "cpu") for _ in range(3)]
    shared = model.shared_parameters()
    tails = {k: list(v) for k, v in model.task_parameters().items()}
    kinds = {t: comp.tasks[t].kind for t in comp.tasks}

    def step(i: int) -> None:
        image, targets = batches[i % len(batches)]
        names = comp.strategy.tasks_for_step(i)
        out = model(image, names)
        losses = {t: comp.tasks[t].loss(out[t], task_batch(t, targets)) for t in names}
        opt.zero_grad(set_to_none=True)
        comp.strategy.backward(losses, StepContext(i, 0, shared, tails, kinds))
        opt.step()

    model.train()
    step(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    t_step = time.perf_counter() - t0
    step_rate = args.steps * bs / t_step

    ratio = pipeline_rate / step_rate
    print(f"profile {args.profile}: slices {info.slice_size}, widths {cfg.model.widths}, batch {bs}, 1 thread")
    print(f"cache read: {n} slices in {t_read:.3f} s; augmentation: {produced / t_aug:.0f} slices/s")
    print(f"data pipeline: {pipeline_rate:.0f} slices/s (read + gather + augment, per epoch of {per_epoch} slices)")
    print(f"training step: {step_rate:.0f} slices/s")
    print(f"pipeline / training ratio: {ratio:.1f}x")
    if ratio <= 1.0:
        print("FAIL: the data pipeline is slower than training", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
