"""Do streamed training batches (StreamingSlices) train as fast as in-memory ones (SliceData), in bounded memory?

Builds (once, under $MTLBENCH_CACHE_DIR, default a folder in /tmp) a phantom
cache with the kidney benchmark's ``cpu`` profile and ``--patients`` patients
(default 40), then runs each mode in its own fresh subprocess, so that its
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is that mode's alone:

- baseline: the model, Adam and the training step on one synthetic batch of
  the right shapes, no slice data: what every mode holds anyway. It also
  times the step to size the run (``--seconds`` per mode) unless ``--steps``;
- in-memory: ``load_slices`` of fold 0's training patients, the step fed by
  ``SliceData.batches``;
- streaming: ``open_stream`` of the same patients, the step fed by
  ``StreamingSlices.batches`` (``--read-ahead``, ``--chunk-cache-mb``);
- streaming, no chunk cache: the same with ``chunk_cache_mb=0`` and a third
  of the steps. The default chunk cache (16 MB, ``open_stream``'s default)
  holds half of the 40 patients' decompressed training slices at 48 x 48, so
  this mode shows the memory of streaming proper.

The step is ``run_trial``'s (cpu profile U-Net from ``build_components`` and
``make_model``, ``random_affine`` with ``target_rules``, the joint strategy's
losses and backward, Adam, 1 torch thread). Both data modes start from the
same seed and take the same index batches (foreground-oversampled random
batches of 8 drawn by ``run_trial``'s ``_epoch_order``): ``--warmup`` steps,
then K timed ones; identical losses in both confirm identical batches.
Afterwards the loader alone (batches/s, no model) runs over the same batches;
the streaming process also times its reads synchronously, once as done (one
read per run of consecutive slices) and once with one HDF5 fancy read per
patient and dataset (the design not taken).

Checks:

- streamed / in-memory training slices/s >= 0.8;
- streaming peak RSS / in-memory peak RSS: informative (the absolute MB are
  figures; at 48 x 48 the slices are small next to torch, so expect near 1);
- streaming RSS growth over the baseline <= (read_ahead + 2) batches + the
  chunk cache + 100 MB, the bound ``mtlbench.data.stream`` promises (queued,
  being read and being used batches, HDF5's chunk caches) plus slack for
  h5py's and the index's own memory;
- the same growth without a chunk cache: informative, beside in-memory's;
- streamed loader alone / training slices/s >= 1: the loader is not the limit.

    python benchmarks/perf/bench_streaming.py [--patients 40] [--seconds 20] [--steps K] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
MODES = ("baseline", "in-memory", "streaming")
RESULT = "RESULT "
SLACK_MB = 100.0
NO_CACHE = "streaming, no chunk cache"


def config(patients: int) -> Any:
    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import load_config

    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu", [f"data.phantom.patients={patients}"])
    resolve_plugins(cfg)
    return cfg


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- one mode (a subprocess)


class Trainer:
    """``run_trial``'s training step (joint strategy, cpu profile) with its model, optimizer and generator."""

    def __init__(self, cfg: Any, seed: int) -> None:
        import torch

        from mtlbench.devices import step_settings
        from mtlbench.engine.train import build_components, make_model, seed_everything, target_rules
        from mtlbench.engine.trialspec import TrialSpec

        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)  # as run_trial does on CPU
        seed_everything(seed)
        self.cfg = cfg
        self.comp = build_components(cfg, TrialSpec(fold=0, strategy="joint", params={"weights": {"landmarks": 1.0}}))
        self.settings = step_settings("cpu", self.comp.train)
        self.model = make_model(cfg, self.comp).to(memory_format=self.settings.memory_format)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.comp.train.lr)
        self.rules = target_rules(self.comp)
        self.keys = list(self.rules)
        self.gen = torch.Generator().manual_seed(seed)
        self.shared = list(self.model.shared_parameters())
        self.tails = {t: list(p) for t, p in self.model.task_parameters().items()}
        self.last = self.model.last_shared_parameters()
        self.kinds = {t: self.comp.tasks[t].kind for t in self.comp.tasks}
        self.history: list[dict[str, float]] = []

    def step(self, i: int, batch: dict[str, Any]) -> float:
        """One step on ``batch`` (as ``SliceData.batches`` yields it); the sum of the losses."""
        import numpy as np
        import torch

        from mtlbench.api import StepContext
        from mtlbench.engine.augment import random_affine
        from mtlbench.engine.train import task_batch

        image = torch.from_numpy(batch["image"]).unsqueeze(1).to(memory_format=self.settings.memory_format)
        targets = {"labels": torch.from_numpy(batch["labels"].astype(np.int64))}
        targets.update({k: torch.from_numpy(batch[k]) for k in self.keys if k != "labels"})
        image, targets = random_affine(image, targets, self.rules, self.cfg.augment, self.gen)
        names = self.comp.strategy.tasks_for_step(i)
        with self.settings.autocast():
            outputs, features = self.model.forward_with_features(image, names)
            losses = {t: self.comp.tasks[t].loss(outputs[t].float(), task_batch(t, targets)).float() for t in names}
        self.opt.zero_grad(set_to_none=True)
        ctx = StepContext(step=i, epoch=0, shared_parameters=self.shared, task_parameters=self.tails,
                          task_kinds=self.kinds, features=features, last_shared_parameters=self.last,
                          loss_history=self.history)
        self.comp.strategy.backward(losses, ctx)
        self.opt.step()
        return float(sum(float(l.detach()) for l in losses.values()))


def plan_batches(data: Any, cfg: Any, count: int, seed: int) -> list[Any]:
    """``count`` index batches as run_trial draws them: epochs of foreground-oversampled random slices."""
    import numpy as np

    from mtlbench.engine.train import _epoch_order

    tc = cfg.train
    rng = np.random.default_rng(seed)
    train_idx = np.arange(len(data))
    fg_idx = np.flatnonzero(data.foreground)
    per_epoch = len(train_idx) if tc.slices_per_epoch is None else min(tc.slices_per_epoch, len(train_idx))
    plan: list[Any] = []
    while len(plan) < count:
        order = _epoch_order(rng, train_idx, fg_idx, per_epoch, tc.foreground_fraction)
        plan += [order[b : b + tc.batch_size] for b in range(0, len(order), tc.batch_size)]
    return plan[:count]


def train(trainer: Trainer, batches: Iterator[dict[str, Any]], warmup: int) -> tuple[float, list[float], int]:
    """(seconds of the steps after ``warmup``, every step's loss, slices in the timed steps)."""
    losses, slices, t0 = [], 0, time.perf_counter()
    for i, batch in enumerate(batches):
        if i == warmup:
            slices, t0 = 0, time.perf_counter()
        losses.append(trainer.step(i, batch))
        slices += len(batch["image"])
    return time.perf_counter() - t0, losses, slices


def loader_seconds(source: Any, plan: list[Any], keys: list[str]) -> float:
    """Seconds to iterate ``source.batches`` over ``plan`` with nothing else to do."""
    t0 = time.perf_counter()
    for _ in source.batches(plan, keys):
        pass
    return time.perf_counter() - t0


def fancy_seconds(stream: Any, plan: list[Any], keys: list[str]) -> float:
    """Reading ``plan`` with one HDF5 fancy read per patient and dataset (synchronous), the design not taken.

    The same open datasets (and chunk caches) as ``stream``'s own reads; only the selection differs.
    """
    import numpy as np

    names = ["image", "labels", *(k for k in keys if k != "labels")]
    t0 = time.perf_counter()
    for idx in plan:
        uniq = np.unique(idx)
        owner = stream.patient_index[uniq]
        for p in np.unique(owner):
            datasets = stream._patient_datasets(stream.patients[p])
            sel = stream.slice_index[uniq[owner == p]]
            for name in names:
                datasets[name][sel]
    return time.perf_counter() - t0


def baseline_batch(cache: Path, keys: list[str], batch: int) -> dict[str, Any]:
    """A synthetic batch of the cache's shapes and dtypes (zeros)."""
    import numpy as np

    from mtlbench.data.cache import open_cache

    info = open_cache(cache)
    h, w = info.slice_size
    out = {"image": np.zeros((batch, h, w), np.float32), "labels": np.zeros((batch, h, w), np.uint8)}
    for label, t in info.slice_targets():
        if f"{label}/{t.name}" in keys:
            out[f"{label}/{t.name}"] = np.zeros((batch,) + t.slice_shape((h, w)), t.dtype)
    return out


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    """What one subprocess measures for ``args.worker``."""
    from mtlbench.data.cache import load_slices, open_cache
    from mtlbench.data.folds import make_folds
    from mtlbench.data.stream import open_stream

    cfg = config(args.patients)
    cache = Path(args.cache)
    trainer = Trainer(cfg, args.seed)
    bs = cfg.train.batch_size
    if args.worker == "baseline":
        batch = baseline_batch(cache, trainer.keys, bs)
        steps = args.steps or 30
        seconds, _, slices = train(trainer, iter([batch] * (args.warmup + steps)), args.warmup)
        return {"step_s": seconds / steps, "slices_per_s": slices / seconds, "peak_rss_mb": peak_rss_mb()}
    info = open_cache(cache)
    fold = make_folds(list(info.patients), cfg.experiment.folds, cfg.experiment.fold_seed)[0]
    ids = list(fold["train"])
    tasks = trainer.comp.model_tasks
    t0 = time.perf_counter()
    if args.worker == "in-memory":
        data = load_slices(cache, ids, tasks=tasks)
        extra = {"data_mb": sum(a.nbytes for a in (data.image, data.labels, data.patient_index, data.slice_index,
                                                    *data.targets.values())) / 2**20}
    else:
        data = open_stream(cache, ids, tasks=tasks, read_ahead=args.read_ahead, chunk_cache_mb=args.chunk_cache_mb)
        extra = {}
    open_s = time.perf_counter() - t0
    plan = plan_batches(data, cfg, args.warmup + args.steps, args.seed)
    seconds, losses, slices = train(trainer, data.batches(plan, trainer.keys), args.warmup)
    out = {
        "slices": len(data), "patients": len(ids), "open_s": open_s, "step_s": seconds / args.steps,
        "slices_per_s": slices / seconds, "losses": losses, "peak_rss_mb": peak_rss_mb(),
        "batch_mb": sum(v.nbytes for v in next(data.batches(plan[:1], trainer.keys)).values()) / 2**20,
        **extra,
    }
    loader_s = loader_seconds(data, plan, trainer.keys)
    out["loader_batches_per_s"] = len(plan) / loader_s
    out["loader_slices_per_s"] = sum(len(b) for b in plan) / loader_s
    if args.worker == "streaming":
        sync = open_stream(cache, ids, tasks=tasks, read_ahead=0, chunk_cache_mb=args.chunk_cache_mb)
        out["sync_runs_batches_per_s"] = len(plan) / loader_seconds(sync, plan, trainer.keys)
        out["sync_fancy_batches_per_s"] = len(plan) / fancy_seconds(sync, plan, trainer.keys)
        out["peak_rss_mb_after_loader"] = peak_rss_mb()
        sync.close()
        data.close()
    return out


# ----------------------------------------------------------------------------- the parent


def spawn(
    mode: str, args: argparse.Namespace, cache: Path, steps: int, chunk_cache_mb: float | None = None
) -> dict[str, Any]:
    """Run ``mode`` in a fresh interpreter; its result (the process's stderr and exit 1 if it failed)."""
    mb = args.chunk_cache_mb if chunk_cache_mb is None else chunk_cache_mb
    cmd = [sys.executable, __file__, "--worker", mode, "--cache", str(cache), "--patients", str(args.patients),
           "--steps", str(steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--read-ahead", str(args.read_ahead), "--chunk-cache-mb", str(mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mode {mode}: the subprocess failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT):])


def report(args: argparse.Namespace, res: dict[str, dict[str, Any]], steps: int) -> None:
    from _report import check, figure

    base, mem, st, bare = res["baseline"], res["in-memory"], res["streaming"], res[NO_CACHE]
    print(f"{mem['patients']} training patients, {mem['slices']} slices ({mem['data_mb']:.1f} MB in memory), "
          f"{args.warmup} warm-up + {steps} timed steps of {mem['batch_mb'] * 1024:.0f} KB batches; "
          f"read_ahead {args.read_ahead}, chunk cache {args.chunk_cache_mb:g} MB")
    print(f"  {'mode':26s} {'open s':>7s} {'ms/step':>8s} {'train slices/s':>15s} {'loader batches/s':>17s} "
          f"{'peak RSS MB':>12s} {'over baseline MB':>17s}")
    for name, r in res.items():
        loader = f"{r['loader_batches_per_s']:17.0f}" if "loader_batches_per_s" in r else f"{'-':>17s}"
        opened = f"{r['open_s']:7.2f}" if "open_s" in r else f"{'-':>7s}"
        print(f"  {name:26s} {opened} {1000 * r['step_s']:8.1f} {r['slices_per_s']:15.0f} {loader} "
              f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] - base['peak_rss_mb']:17.0f}")
    print(f"  synchronous reads, batches/s: one per run of consecutive slices {st['sync_runs_batches_per_s']:.0f}, "
          f"one fancy read per patient {st['sync_fancy_batches_per_s']:.0f}")
    same = mem["losses"] == st["losses"] and bare["losses"] == mem["losses"][: len(bare["losses"])]
    print(f"  identical losses in every data mode ({len(mem['losses'])} steps): {'yes' if same else 'NO'}")

    for name, r in res.items():
        figure(f"{name} peak RSS MB", round(r["peak_rss_mb"], 1))
        figure(f"{name} ms per step", round(1000 * r["step_s"], 2))
    figure("in-memory training slices MB", round(mem["data_mb"], 2))
    figure("training slices", mem["slices"])
    figure("in-memory loader batches/s", round(mem["loader_batches_per_s"], 1))
    figure("streamed loader batches/s", round(st["loader_batches_per_s"], 1))
    figure("synchronous reads, runs, batches/s", round(st["sync_runs_batches_per_s"], 1))
    figure("synchronous reads, fancy per patient, batches/s", round(st["sync_fancy_batches_per_s"], 1))
    figure("identical losses", same)
    check("streamed / in-memory training slices/s", st["slices_per_s"] / mem["slices_per_s"], ">= 0.8",
          st["slices_per_s"] / mem["slices_per_s"] >= 0.8)
    check("streaming / in-memory peak RSS", st["peak_rss_mb"] / mem["peak_rss_mb"], "informative", None,
          note=f"{st['peak_rss_mb']:.0f} MB vs {mem['peak_rss_mb']:.0f} MB; slices {mem['data_mb']:.0f} MB")
    bound = (args.read_ahead + 2) * st["batch_mb"] + args.chunk_cache_mb + SLACK_MB
    growth = st["peak_rss_mb"] - base["peak_rss_mb"]
    check("streaming RSS growth over the model-only baseline", growth, f"<= {bound:.0f} MB", growth <= bound, unit=" MB",
          note="(read_ahead + 2) batches + chunk cache + 100 MB")
    bare_growth = bare["peak_rss_mb"] - base["peak_rss_mb"]
    check("streaming RSS growth over the baseline, no chunk cache", bare_growth, "informative", None, unit=" MB",
          note=f"in-memory: {mem['peak_rss_mb'] - base['peak_rss_mb']:.0f} MB")
    figure("streamed, no chunk cache / in-memory training slices/s", round(bare["slices_per_s"] / mem["slices_per_s"], 3))
    headroom = st["loader_slices_per_s"] / st["slices_per_s"]
    check("streamed loader alone / streamed training slices/s", headroom, ">= 1", headroom >= 1)
    if not same:
        check("identical losses in every data mode", 0.0, "== 1", False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed training per data mode (sets K)")
    ap.add_argument("--steps", type=int, default=0, help="K timed steps (default: from --seconds and the baseline)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-ahead", type=int, default=4)
    ap.add_argument("--chunk-cache-mb", type=float, default=16.0)
    ap.add_argument("--json", default=None, help="write the checks and figures here")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(RESULT + json.dumps(run_mode(args)))
        return 0
    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mtlbench-bench-cache"))

    from _report import finish

    from mtlbench.data.cache import build_cache

    t0 = time.perf_counter()
    cache = build_cache(config(args.patients))
    print(f"cache {cache} ready in {time.perf_counter() - t0:.1f} s")
    res = {"baseline": spawn("baseline", args, cache, 30)}
    steps = args.steps or max(10, math.ceil(args.seconds / res["baseline"]["step_s"]))
    for mode in MODES[1:]:
        res[mode] = spawn(mode, args, cache, steps)
    res[NO_CACHE] = spawn("streaming", args, cache, max(10, steps // 3), chunk_cache_mb=0)
    report(args, res, steps)
    finish("bench_streaming", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
