"""One trial: (fold, strategy, strategy parameters, seed) trained and evaluated, without Ray.

``run_trial`` is the function every scheduler calls (``mtlbench train`` in-process,
Ray Tune in ``mtlbench run``). It knows no task or strategy by name: tasks give
targets, losses and metrics; the strategy turns losses into gradients.
"""

from __future__ import annotations

import json
import math
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mtlbench.api import CachedPatient, EvalVolume, StepContext, Target
from mtlbench.assemble import make_heads, make_strategy, make_tasks, train_config
from mtlbench.config import Config, TrainConfig
from mtlbench.data.cache import SliceData, load_patient, load_slices
from mtlbench.devices import choose_device, memory_format, set_threads, step_settings
from mtlbench.engine.augment import LABELS_RULE, random_affine
from mtlbench.engine.checkpoint import save_checkpoint
from mtlbench.engine.model import MultiTaskModel, build_model
from mtlbench.engine.tracking import TENSORBOARD, TrialTracker
from mtlbench.engine.trialspec import TrialSpec
from mtlbench.errors import ConfigError, TrialError
from mtlbench.fsutil import atomic_path, write_json

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
EXAMPLE = "example.npz"


class Diverged(TrialError):
    """A loss became NaN or infinite."""


@dataclass
class Components:
    """The instantiated plugins of a trial."""

    tasks: dict[str, Any]
    heads: dict[str, Any]
    strategy: Any
    model_tasks: list[str]
    train: TrainConfig


def build_components(cfg: Config, spec: TrialSpec, manager: Any = None) -> Components:
    """The trial's tasks, heads and strategy, built by ``mtlbench.assemble`` (validated, one-line errors)."""
    tasks = make_tasks(cfg, manager)
    heads = make_heads(cfg, tasks, manager)
    strategy = make_strategy(cfg, spec.strategy, spec.params, manager)
    return Components(tasks, heads, strategy, strategy.model_tasks(), train_config(cfg, spec.strategy))


def make_model(cfg: Config, comp: Components) -> MultiTaskModel:
    return build_model(cfg, {t: comp.tasks[t] for t in comp.model_tasks}, {t: comp.heads[t] for t in comp.model_tasks})


def target_rules(comp: Components) -> dict[str, Target]:
    """How each batch key is augmented: the core's labels and every model task's per-slice targets."""
    rules = {"labels": LABELS_RULE}
    for label in comp.model_tasks:
        for t in comp.tasks[label].targets():
            if t.per_slice:
                rules[f"{label}/{t.name}"] = t
    return rules


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _batch(data: SliceData, idx: np.ndarray, keys: list[str], device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The image (B, 1, H, W) and the targets named by ``keys`` ("labels" and "<task>/<target>") of slices ``idx``."""
    idx = np.sort(idx)  # numpy gathers are faster sorted; order inside a batch is irrelevant
    image = torch.from_numpy(np.ascontiguousarray(data.image[idx])).unsqueeze(1)
    targets = {"labels": torch.from_numpy(data.labels[idx].astype(np.int64)).to(device)}
    for key in keys:
        if key != "labels":
            targets[key] = torch.from_numpy(np.ascontiguousarray(data.targets[key][idx])).to(device)
    return image.to(device=device, memory_format=memory_format(device)), targets


def task_batch(label: str, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``Task.loss`` of ``label`` receives: the labels and its own targets by name."""
    prefix = f"{label}/"
    out = {"labels": targets["labels"]}
    out.update({k[len(prefix):]: v for k, v in targets.items() if k.startswith(prefix)})
    return out


@torch.no_grad()
def predict_volume(model: MultiTaskModel, image: np.ndarray, device: str, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Run the model over every slice of one patient: task -> (S, C, H, W) float32."""
    model.eval()
    outs: dict[str, list[np.ndarray]] = {}
    for start in range(0, image.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(image[start : start + batch_size])).unsqueeze(1)
        x = x.to(device=device, memory_format=memory_format(device))
        for task, out in model(x).items():
            outs.setdefault(task, []).append(out.float().cpu().numpy())
    return {t: np.concatenate(v, axis=0) for t, v in outs.items()}


def eval_volume(rec: CachedPatient, label: str, output: np.ndarray, final: bool) -> EvalVolume:
    """A cached patient and task ``label``'s output over its slices, as tasks receive them."""
    return EvalVolume(record=rec, output=output, targets=rec.targets.get(label, {}), final=final)


def evaluate(
    model: MultiTaskModel,
    comp: Components,
    records: list[CachedPatient],
    device: str,
    final: bool,
    train: list[CachedPatient] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Metrics of every test patient and their means (NaN-aware); also returns the raw outputs.

    With ``train`` (the training patients without arrays) each row also gets
    ``reference``: the tasks' trivial-predictor metrics (``Task.reference``),
    and the means get a ``reference`` dict of their means.
    """
    per_patient: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for rec in records:
        out = predict_volume(model, rec.image, device)
        outputs[rec.id] = out
        row: dict[str, Any] = {"patient": rec.id}
        ref: dict[str, float] = {}
        for task in comp.model_tasks:
            vol = eval_volume(rec, task, out[task], final)
            for key, value in comp.tasks[task].evaluate(vol).items():
                row[f"{task}/{key}"] = float(value)
            if train is not None:
                for key, value in (comp.tasks[task].reference(vol, train) or {}).items():
                    ref[f"{task}/{key}"] = float(value)
        if ref:
            row["reference"] = ref
        per_patient.append(row)
    means: dict[str, Any] = _nanmeans(per_patient)
    refs = _nanmeans([r["reference"] for r in per_patient if "reference" in r])
    if refs:
        means["reference"] = refs
    return means, per_patient, outputs


def _nanmeans(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    means = {}
    for k in keys:
        vals = np.array([r.get(k, np.nan) for r in rows], dtype=float)
        means[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return means


def example_arrays(rec: CachedPatient, outputs: dict[str, np.ndarray], comp: Components) -> dict[str, Any]:
    """The arrays of ``example.npz``: the slice with the most organ voxels and every model task's pictures.

    Keys: ``image``, ``patient``, ``slice``, ``pictures`` (json list of
    {task, title, style, unit, truth, pred} with the array keys of truth and
    pred, or null) and ``p<i>_truth`` / ``p<i>_pred`` arrays.
    """
    counts = (rec.labels > 0).reshape(rec.labels.shape[0], -1).sum(axis=1)
    s = int(np.argmax(counts))
    ex: dict[str, Any] = {
        "image": rec.image[s].astype(np.float32),
        "patient": np.array(rec.id),
        "slice": np.array(s),
    }
    meta = []
    for task in comp.model_tasks:
        vol = eval_volume(rec, task, outputs[task], final=False)
        for pic in comp.tasks[task].pictures(vol, s) or []:
            i = len(meta)
            item = {"task": task, "title": pic.title, "style": pic.style, "unit": pic.unit, "truth": None, "pred": None}
            for part in ("truth", "pred"):
                arr = getattr(pic, part)
                if arr is not None:
                    item[part] = f"p{i}_{part}"
                    ex[item[part]] = np.asarray(arr)
            meta.append(item)
    ex["pictures"] = np.array(json.dumps(meta))
    return ex


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated() / 2**20)
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_trial(
    cfg: Config,
    spec: TrialSpec,
    cache_path: str | Path,
    folds: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    data: SliceData | None = None,
    cpus: float | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    manager: Any = None,
) -> dict[str, Any]:
    """Train and evaluate one trial; write result.json, checkpoint.pt and example.npz into ``out_dir``.

    Returns the trial record (see docs/results.md). A NaN/inf loss gives status
    ``diverged``; an exception propagates (the caller records ``failed``).
    ``data`` may hold preloaded slices of (at least) the fold's patients; they
    are indexed per batch, never copied as a whole.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fold = next((f for f in folds if f["fold"] == spec.fold), None)
    if fold is None:
        raise ConfigError(f"fold {spec.fold} does not exist (folds: 0..{len(folds) - 1})")
    comp = build_components(cfg, spec, manager)
    tc = comp.train
    device = choose_device(tc.device)
    settings = step_settings(device, tc)  # autocast dtype, memory format, compile (mtlbench.devices)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    threads = set_threads(cpus) if device == "cpu" else None
    seed_everything(spec.seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    if data is None:
        data = load_slices(cache_path, list(fold["train"]), tasks=comp.model_tasks)
    pos = {p: i for i, p in enumerate(data.patients)}
    missing = [p for p in fold["train"] if p not in pos]
    if missing:
        raise ConfigError(f"fold {spec.fold}: training patients missing from the slice data: {', '.join(missing)}")
    train_idx = np.flatnonzero(np.isin(data.patient_index, [pos[p] for p in fold["train"]]))
    fg_idx = train_idx[data.labels[train_idx].reshape(len(train_idx), -1).any(axis=1)]
    records = [load_patient(cache_path, p) for p in fold["test"]]
    rules = target_rules(comp)
    keys = list(rules)
    missing_targets = [k for k in keys if k != "labels" and k not in data.targets]
    if missing_targets:
        raise ConfigError(f"the slice data lacks the targets {', '.join(missing_targets)}; prepare the cache again")

    fmt = settings.memory_format
    model = make_model(cfg, comp).to(device=device, memory_format=fmt)
    if settings.compile:  # in place: parameter names and checkpoints stay those of the plain model
        for part in (model.trunk, *model.tails.values()):
            part.compile()
    strategy = comp.strategy
    groups = [
        {"params": list(model.parameters()), "weight_decay": tc.weight_decay},
    ]
    sparams = list(strategy.parameters())  # parameters, or param-group dicts with their own "lr"
    plain = [p for p in sparams if not isinstance(p, dict)]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    groups += [{"weight_decay": 0.0, **g} for g in sparams if isinstance(g, dict)]
    optimizer = torch.optim.Adam(groups, lr=tc.lr)
    milestones = [tc.lr_decay_epoch] if 0 < tc.lr_decay_epoch < tc.epochs else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=tc.lr_decay_factor)
    ctx_shared = list(model.shared_parameters())
    ctx_tasks = {t: list(p) for t, p in model.task_parameters().items()}
    ctx_last = model.last_shared_parameters()
    loss_history: list[dict[str, float]] = []
    kinds = {t: comp.tasks[t].kind for t in comp.tasks}
    gen = torch.Generator().manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)

    per_epoch = len(train_idx) if tc.slices_per_epoch is None else min(tc.slices_per_epoch, len(train_idx))
    steps_per_epoch = max(1, math.ceil(per_epoch / tc.batch_size))
    history: list[dict[str, Any]] = []
    record: dict[str, Any] = {
        **base_record(spec, cfg, out_dir),
        "status": "running",
        "error": None,
        "device": device,
        "threads": threads,
        "test_patients": list(fold["test"]),
        "train_patients": list(fold["train"]),
        "cache": str(Path(cache_path).resolve()),
        "step_settings": settings.to_record(),  # what ran: precision, channels-last, compile, and why
    }
    step = 0
    status, error = "completed", None
    info = {k: record[k] for k in ("id", "fold", "strategy", "params", "seed")}
    tracker = TrialTracker(out_dir / TENSORBOARD, cfg.run.tensorboard, info)  # live TensorBoard scalars
    try:
        for epoch in range(tc.epochs):
            te = time.time()
            model.train()
            order = _epoch_order(rng, train_idx, fg_idx, per_epoch, tc.foreground_fraction)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for b in range(steps_per_epoch):
                idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                if len(idx) == 0:
                    continue
                image, targets = _batch(data, idx, keys, device)
                image, targets = random_affine(image, targets, rules, cfg.augment, gen)
                names = strategy.tasks_for_step(step)
                with settings.autocast():  # forward and losses only; the strategy's backward runs outside
                    outputs, features = model.forward_with_features(image, names)  # only this step's tails
                    # float32 outputs in, float32 losses out (no-ops in fp32): no task or strategy sees bf16 losses
                    losses = {t: comp.tasks[t].loss(outputs[t].float(), task_batch(t, targets)).float() for t in names}
                for t, l in losses.items():
                    if not torch.isfinite(l):
                        raise Diverged(f"loss of task {t!r} became {float(l)} at epoch {epoch + 1}, step {step}")
                if tc.grad_norm_every and step % tc.grad_norm_every == 0:
                    for t, norm in shared_grad_norms(losses, ctx_shared).items():
                        _acc(sums, counts, f"grad_norm/{t}", norm)
                optimizer.zero_grad(set_to_none=True)
                ctx = StepContext(
                    step=step, epoch=epoch, shared_parameters=ctx_shared, task_parameters=ctx_tasks, task_kinds=kinds,
                    features=features, last_shared_parameters=ctx_last, loss_history=loss_history,
                )
                log = strategy.backward(losses, ctx) or {}
                optimizer.step()
                for t, l in losses.items():
                    _acc(sums, counts, f"loss/{t}", float(l.detach()))
                for k, v in log.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        _acc(sums, counts, k, float(v))
                    else:
                        _acc(sums, counts, f"{k}={v}", 1.0, count=False)
                step += 1
                if on_step is not None:
                    on_step(epoch, b + 1)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            train_log = {k: (sums[k] / counts[k] if k in counts else sums[k]) for k in sorted(sums)}
            loss_history.append({k.removeprefix("loss/"): v for k, v in train_log.items() if k.startswith("loss/")})
            for k, v in (strategy.on_epoch_end(epoch, loss_history) or {}).items():
                train_log[f"{k}={v}" if isinstance(v, str) else k] = 1.0 if isinstance(v, str) else float(v)
            entry: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train": train_log}
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
                metrics, _, _ = evaluate(model, comp, records, device, final=False)
                entry["metrics"] = metrics
            entry["time_s"] = time.time() - te
            history.append(entry)
            tracker.epoch(entry)
            if on_epoch is not None:
                on_epoch(entry)
        train_records = [load_patient(cache_path, p, arrays=False) for p in fold["train"]]
        metrics, per_patient, outputs = evaluate(model, comp, records, device, final=True, train=train_records)
        reference = metrics.pop("reference", {})
        tracker.final(metrics)
        if records:
            with atomic_path(out_dir / EXAMPLE, suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **example_arrays(records[0], outputs[records[0].id], comp))
        save_checkpoint(out_dir / CHECKPOINT, {"model": model.state_dict(), "strategy": strategy.state_dict()})
    except Diverged as exc:
        status, error = "diverged", str(exc)
        metrics, per_patient, reference = {}, [], {}
    finally:
        tracker.close()
    record.update(
        status=status,
        error=error,
        metrics=metrics,
        reference=reference,
        per_patient=per_patient,
        history=history,
        wall_time_s=time.time() - t0,
        peak_memory_mb=_peak_memory_mb(device),
        config=cfg.to_toml_dict(),
        folds=folds,
    )
    write_json(out_dir / RESULT, record)
    return record


def shared_grad_norms(losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
    """The L2 norm of each task's (unweighted) loss gradient on the shared trunk; the graph is kept for the step.

    Logged at every ``train.grad_norm_every``-th step, it shows what a loss
    weight does: a task whose gradient is 100x smaller needs lambda ~ 100 to
    matter as much.
    """
    out = {}
    params = [p for p in shared if p.requires_grad]
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        total = sum(float(g.detach().pow(2).sum()) for g in grads if g is not None)
        out[task] = math.sqrt(total)
    return out


def _epoch_order(
    rng: np.random.Generator, train_idx: np.ndarray, fg_idx: np.ndarray, n: int, fg_fraction: float
) -> np.ndarray:
    """The slices of one epoch: a random subset of ``n``, of which ``fg_fraction`` contain an organ.

    Foreground oversampling (as nnU-Net does per patch) keeps small organs in
    most batches; the rest is drawn from all training slices so the network
    still sees slices without organs.
    """
    n_fg = int(round(n * fg_fraction)) if len(fg_idx) else 0
    rest = rng.permutation(train_idx)[: n - n_fg]
    fg = rng.choice(fg_idx, size=n_fg, replace=n_fg > len(fg_idx)) if n_fg else fg_idx[:0]
    return rng.permutation(np.concatenate([fg, rest]))


def _acc(sums: dict[str, float], counts: dict[str, int], key: str, value: float, count: bool = True) -> None:
    sums[key] = sums.get(key, 0.0) + value
    if count:
        counts[key] = counts.get(key, 0) + 1


def base_record(spec: TrialSpec, cfg: Config, out_dir: str | Path) -> dict[str, Any]:
    """The fields that identify a trial in results.json, whatever its outcome (with its effective ``[train]``)."""
    try:
        train = train_config(cfg, spec.strategy).model_dump(mode="json")
    except (ConfigError, KeyError):
        train = None
    return {
        "id": spec.id,
        "dir": str(out_dir),
        "fold": spec.fold,
        "strategy": spec.strategy,
        "use": cfg.strategy_use(spec.strategy),
        "params": spec.params,
        "seed": spec.seed,
        "compare_to": cfg.strategies[spec.strategy].compare_to if spec.strategy in cfg.strategies else None,
        "train": train,
    }


def failed_record(spec: TrialSpec, cfg: Config, out_dir: str | Path, exc: BaseException) -> dict[str, Any]:
    """The record of a trial that raised."""
    return {
        **base_record(spec, cfg, out_dir),
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
        "metrics": {},
        "per_patient": [],
        "history": [],
        "wall_time_s": None,
        "peak_memory_mb": None,
        "config": cfg.to_toml_dict(),
    }

