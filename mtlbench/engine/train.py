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
from mtlbench.devices import choose_device, deterministic_algorithms, memory_format, set_threads, step_settings
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


def _batch(data: Any, idx: np.ndarray, keys: list[str], device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The image (B, 1, H, W) and the targets named by ``keys`` ("labels" and "<task>/<target>") of slices ``idx``."""
    arrays = next(iter(data.batches([idx], keys)))  # rows in the order of np.sort(idx), as every loader gives them
    return to_device(arrays, keys, device, memory_format(device))


def to_device(
    arrays: dict[str, Any], keys: list[str], device: str, fmt: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of a loader (numpy arrays, or tensors already on the device) as the image and the targets."""

    def tensor(a: Any) -> torch.Tensor:
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))

    image = tensor(arrays["image"]).unsqueeze(1).to(device=device, memory_format=fmt)
    targets = {"labels": tensor(arrays["labels"]).to(device=device, dtype=torch.int64)}
    for key in keys:
        if key != "labels":
            targets[key] = tensor(arrays[key]).to(device)
    return image, targets


def open_loader(
    loader: str, cache_path: str | Path, patients: list[str], tasks: list[str], device: str
) -> tuple[Any, str]:
    """The trial's own training data when none was handed in: ``(data, loader)``.

    ``loader`` "stream" reads batches from the cache (bounded memory,
    ``mtlbench.data.stream``); "memory" loads the fold's training slices, onto
    the GPU when they fit there (``mtlbench.devices.resident_on_device``).
    """
    if loader == "stream":
        from mtlbench.data.stream import open_stream

        return open_stream(cache_path, patients, tasks=tasks), "stream"
    data = load_slices(cache_path, patients, tasks=tasks)
    return on_device(data, device), "memory"


def on_device(data: Any, device: str) -> Any:
    """``data`` with its arrays on ``device`` when it is a GPU and they fit (else ``data`` itself)."""
    from mtlbench.devices import resident_on_device

    if not isinstance(data, SliceData) or not resident_on_device(device, data.nbytes):
        return data
    return DeviceSlices.from_slices(data, device)


class DeviceSlices:
    """Training slices resident on a GPU: batches are gathered there, no host-to-device copy per step.

    Same surface as :class:`SliceData` for the trainer (``patients``,
    ``patient_index``, ``slice_index``, ``foreground``, ``targets_available``,
    ``batches``); the indices stay numpy arrays on the host.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], host: SliceData) -> None:
        self.arrays = arrays
        self.patients = host.patients
        self.patient_index = host.patient_index
        self.slice_index = host.slice_index
        self.foreground = host.foreground
        self.targets_available = set(host.targets)

    @classmethod
    def from_slices(cls, data: SliceData, device: str) -> "DeviceSlices":
        arrays = {"image": torch.from_numpy(data.image).to(device), "labels": torch.from_numpy(data.labels).to(device)}
        arrays.update({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in data.targets.items()})
        return cls(arrays, data)

    def __len__(self) -> int:
        return int(self.arrays["image"].shape[0])

    def batches(self, batches: Any, keys: Any) -> Any:
        device = self.arrays["image"].device
        for idx in batches:
            i = torch.from_numpy(np.sort(np.asarray(idx, dtype=np.int64))).to(device)
            yield {k: self.arrays[k].index_select(0, i) for k in {"image", "labels", *keys}}


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
    data: Any = None,
    loader: str = "memory",
    cpus: float | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    manager: Any = None,
) -> dict[str, Any]:
    """Train and evaluate one trial; write result.json, checkpoint.pt and example.npz into ``out_dir``.

    Returns the trial record (see docs/results.md). A NaN/inf loss gives status
    ``diverged``; an exception propagates (the caller records ``failed``).
    ``data`` may hold preloaded slices of (at least) the fold's patients (a
    ``SliceData``, e.g. from Ray's object store); they are indexed per batch,
    never copied as a whole. Without it the trial opens its own: ``loader``
    "memory" loads the fold's training slices, "stream" reads each batch from
    the cache (``mtlbench.data.stream``).
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
        deterministic_algorithms(True, compiling=settings.compile)

    opened = data is None  # a stream opened here is closed when the trial ends
    if data is None:
        data, loader = open_loader(loader, cache_path, list(fold["train"]), comp.model_tasks, device)
    else:
        data, loader = on_device(data, device), "memory"
    pos = {p: i for i, p in enumerate(data.patients)}
    missing = [p for p in fold["train"] if p not in pos]
    if missing:
        raise ConfigError(f"fold {spec.fold}: training patients missing from the slice data: {', '.join(missing)}")
    train_idx = np.flatnonzero(np.isin(data.patient_index, [pos[p] for p in fold["train"]]))
    fg_idx = train_idx[data.foreground[train_idx]]
    records = [load_patient(cache_path, p) for p in fold["test"]]
    rules = target_rules(comp)
    keys = list(rules)
    missing_targets = [k for k in keys if k != "labels" and k not in data.targets_available]
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
    optimizer = torch.optim.Adam(groups, lr=tc.lr, fused=settings.fused_optimizer or None)
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
        "loader": loader,
        "step_settings": settings.to_record(),  # what ran: precision, channels-last, compile, and why
    }
    step = 0
    status, error = "completed", None
    timings = {"startup_s": time.time() - t0, "train_s": 0.0, "eval_s": 0.0, "final_eval_s": 0.0, "report_s": 0.0}
    info = {k: record[k] for k in ("id", "fold", "strategy", "params", "seed")}
    tracker = TrialTracker(out_dir / TENSORBOARD, cfg.run.tensorboard, info)  # live TensorBoard scalars
    try:
        for epoch in range(tc.epochs):
            te = time.time()
            model.train()
            order = _epoch_order(rng, train_idx, fg_idx, per_epoch, tc.foreground_fraction)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            plan = [order[b * tc.batch_size : (b + 1) * tc.batch_size] for b in range(steps_per_epoch)]
            plan = [idx for idx in plan if len(idx)]  # the epoch's batches, known up front: a loader may read ahead
            for b, arrays in enumerate(data.batches(plan, keys)):
                image, targets = to_device(arrays, keys, device, fmt)
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
            timings["train_s"] += time.time() - te
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
                tv = time.time()
                metrics, _, _ = evaluate(model, comp, records, device, final=False)
                entry["metrics"] = metrics
                timings["eval_s"] += time.time() - tv
            entry["time_s"] = time.time() - te
            history.append(entry)
            tracker.epoch(entry)
            if on_epoch is not None:
                on_epoch(entry)
        tv = time.time()
        train_records = [load_patient(cache_path, p, arrays=False) for p in fold["train"]]
        metrics, per_patient, outputs = evaluate(model, comp, records, device, final=True, train=train_records)
        reference = metrics.pop("reference", {})
        tr = time.time()
        timings["final_eval_s"] = tr - tv
        tracker.final(metrics)
        if records:
            with atomic_path(out_dir / EXAMPLE, suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **example_arrays(records[0], outputs[records[0].id], comp))
        save_checkpoint(out_dir / CHECKPOINT, {"model": model.state_dict(), "strategy": strategy.state_dict()})
        timings["report_s"] = time.time() - tr
    except Diverged as exc:
        status, error = "diverged", str(exc)
        metrics, per_patient, reference = {}, [], {}
    finally:
        tracker.close()
        if opened and hasattr(data, "close"):
            data.close()
    record.update(
        status=status,
        error=error,
        metrics=metrics,
        reference=reference,
        per_patient=per_patient,
        history=history,
        wall_time_s=time.time() - t0,
        timings=timings,
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

