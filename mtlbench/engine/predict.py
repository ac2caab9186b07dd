"""``mtlbench predict``: predictions as files for 3D Slicer, of a trial for its test patients, or of
a run's models for new images (``-i``): the fold ensemble of one strategy row, or one trial.

Every task writes its own files (``Task.export``); the built-ins write the label
map on the image's own grid and the landmarks as LPS .fcsv. For new images the
models' outputs are combined by each task (``Task.combine``: the mean, or for
segmentation the mean of probabilities), and ``labels.json`` names every label value.

Every failure is one line naming the file: a damaged checkpoint (its digest is
checked first, :mod:`mtlbench.engine.checkpoint`), one that does not fit the
trial's model, a damaged slice cache, an output folder that cannot be written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtlbench.config import validate_config
from mtlbench.data.cache import build_cache, load_patient
from mtlbench.engine.checkpoint import load_checkpoint
from mtlbench.engine.train import CHECKPOINT, RESULT, build_components, eval_volume, make_model, predict_volume
from mtlbench.engine.trialspec import TrialSpec
from mtlbench.devices import memory_format
from mtlbench.errors import ConfigError, DataError
from mtlbench.fsutil import storage_errors, write_json

#: Written beside new images' predictions: label value -> organ, and which models made them.
LABELS_JSON = "labels.json"


def load_trial(trial_dir: Path) -> dict:
    """The record of a completed trial folder (DataError when it is not one or has no checkpoint)."""
    f = trial_dir / RESULT
    if not f.is_file():
        raise DataError(f"{trial_dir}: no {RESULT} (not a finished trial folder)")
    try:
        rec = json.loads(f.read_text())
    except OSError as exc:
        raise DataError(f"{f}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{f}: not valid JSON: {exc}") from None
    if rec.get("status") != "completed":
        raise DataError(f"{trial_dir}: trial status is {rec.get('status')!r}, nothing to predict with")
    if not (trial_dir / CHECKPOINT).is_file():
        raise DataError(f"{trial_dir}: no {CHECKPOINT}")
    return rec


def predict_trial(trial_dir: str | Path, out_dir: str | Path, device: str = "cpu") -> list[Path]:
    """Write every task's prediction files for the trial's test patients into ``out_dir``."""
    trial_dir, out_dir = Path(trial_dir), Path(out_dir)
    rec = load_trial(trial_dir)
    cfg = validate_config(rec["config"], source=str(trial_dir / RESULT))
    spec = TrialSpec(fold=rec["fold"], strategy=rec["strategy"], params=rec["params"], seed=rec["seed"])
    cache = Path(rec["cache"])
    if not cache.is_file():
        cache = build_cache(cfg)  # same data + settings give the same key; a change is caught below
    comp = build_components(cfg, spec)
    model = make_model(cfg, comp)
    _load_weights(model, trial_dir / CHECKPOINT, device)
    model.to(device=device, memory_format=memory_format(device))  # as in training: identical outputs
    with storage_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for pid in rec["test_patients"]:
        p = load_patient(cache, pid)
        outputs = predict_volume(model, p.image, device)
        for task in comp.model_tasks:
            vol = eval_volume(p, task, outputs[task], final=True)
            written.extend(comp.tasks[task].export(vol, out_dir))
    return written


def _load_weights(model: Any, path: Path, device: str) -> None:
    """Load the checkpoint at ``path`` (digest checked) into ``model``; a mismatch is a DataError naming the file."""
    state = load_checkpoint(path, map_location=device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise DataError(f"{path}: checkpoint does not fit the trial's model ({first[:200]})") from None


# ----------------------------------------------------------------------------- new images


def find_images(inputs: Path) -> dict[str, Path]:
    """Case id -> image file: one volume file, or every volume file of a folder.

    The id is the file name without its suffix and without nnU-Net's channel
    suffix ``_0000`` (``case_0000.nii.gz`` -> ``case``). A folder without volumes,
    or two files giving one id, is a DataError naming the folder.
    """
    from mtlbench.data.io import volume_suffix

    inputs = Path(inputs)
    if not inputs.exists():
        raise DataError(f"{inputs}: no such file or folder")
    files = [inputs] if inputs.is_file() else sorted(p for p in inputs.iterdir() if p.is_file() and volume_suffix(p))
    if not files:
        raise DataError(f"{inputs}: no image (.nii.gz, .nii, .nrrd, .mha, .mhd) in this folder")
    cases: dict[str, Path] = {}
    for f in files:
        suffix = volume_suffix(f)
        if not suffix:
            raise DataError(f"{f}: not a volume file ({', '.join(('.nii.gz', '.nii', '.nrrd', '.mha', '.mhd'))})")
        case = f.name[: -len(suffix)]
        case = case[:-5] if case.endswith("_0000") else case
        if case in cases:
            raise DataError(f"{inputs}: {cases[case].name} and {f.name} are both case {case!r}")
        cases[case] = f
    return cases


def run_trials(run_dir: Path, strategy: str | None) -> tuple[list[Path], str]:
    """The completed trial folders of one leaderboard row of a run (default: its baseline row), and the row label."""
    from mtlbench.report.leaderboard import group_rows, load_results

    results = load_results(run_dir)
    rows = group_rows(results)
    meta = results.get("meta") or {}
    if strategy is None:
        row = next((g for g in rows if g.strategy == meta.get("baseline")), None)
        if row is None:
            raise ConfigError(f"{run_dir}: no baseline row; choose one with --strategy")
    else:
        row = next((g for g in rows if g.label == strategy), None) or next(
            (g for g in rows if g.strategy == strategy and len([r for r in rows if r.strategy == strategy]) == 1), None
        )
        if row is None:
            raise ConfigError(
                f"{run_dir}: no leaderboard row {strategy!r}; rows: {', '.join(g.label for g in rows)}"
            )
    dirs = [run_dir / str(t["dir"]) for t in row.completed if t.get("dir")]
    if not dirs:
        raise DataError(f"{run_dir}: row {row.label!r} has no completed trial to predict with")
    return dirs, row.label


def _image_patient(case: str, path: Path) -> Any:
    """A Patient of one new image: HU voxels and grid, no masks or landmarks (a NaN voxel is a DataError)."""
    import numpy as np

    from mtlbench.api import Patient
    from mtlbench.data.io import read_volume

    image, geometry = read_volume(path)
    bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    if bad:
        raise DataError(f"{path}: {bad} NaN or infinite voxels")
    return Patient(id=case, image=image.astype(np.float32, copy=False), geometry=geometry, masks={},
                   files={"image": str(path)})


def predict_images(
    source: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    strategy: str | None = None,
    device: str = "cpu",
) -> list[Path]:
    """Predict new images with a run's models and write every task's files plus ``labels.json`` into ``out_dir``.

    ``source`` is a run folder (the fold ensemble of the row ``strategy``, default the
    baseline: every completed fold x seed trial, combined by ``Task.combine``) or one
    trial folder. Images are preprocessed exactly as the run's cache was (intensity
    window, slice size) and predictions are written on each image's own grid.
    """
    from mtlbench.data.preprocess import preprocess_patient

    source, out_dir = Path(source), Path(out_dir)
    if (source / RESULT).is_file():
        trial_dirs, label = [source], load_trial(source)["strategy"]
    else:
        trial_dirs, label = run_trials(source, strategy)
    cases = find_images(Path(inputs))
    models = []
    for trial_dir in trial_dirs:
        rec = load_trial(trial_dir)
        cfg = validate_config(rec["config"], source=str(trial_dir / RESULT))
        spec = TrialSpec(fold=rec["fold"], strategy=rec["strategy"], params=rec["params"], seed=rec["seed"])
        comp = build_components(cfg, spec)
        model = make_model(cfg, comp)
        _load_weights(model, trial_dir / CHECKPOINT, device)
        models.append((rec["id"], cfg, comp, model.to(device=device, memory_format=memory_format(device))))
    cfg, comp = models[0][1], models[0][2]
    if any((m[1].preprocess, m[1].data.organs) != (cfg.preprocess, cfg.data.organs) for m in models):
        raise DataError(f"{source}: the row's trials were preprocessed differently; predict with one trial folder")
    with storage_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for case, path in cases.items():
        record = preprocess_patient(_image_patient(case, path), cfg)
        per_task: dict[str, list[Any]] = {}
        for _, _, mcomp, model in models:
            for task, out in predict_volume(model, record.image, device).items():
                per_task.setdefault(task, []).append(out)
        for task in comp.model_tasks:
            combined = comp.tasks[task].combine(per_task[task]) if len(per_task[task]) > 1 else per_task[task][0]
            written.extend(comp.tasks[task].export(eval_volume(record, task, combined, final=True), out_dir))
    labels = out_dir / LABELS_JSON
    write_json(labels, {
        "labels": {"0": "background", **{str(i): o for i, o in enumerate(cfg.data.organs, start=1)}},
        "landmarks": list(cfg.data.landmarks),
        "strategy": label,
        "trials": [m[0] for m in models],
        "ensemble": "per task: Task.combine over the trials (segmentation: mean of probabilities)" if len(models) > 1 else None,
        "images": {case: str(p) for case, p in cases.items()},
    })
    return written + [labels]
