"""``mtlbench predict``: a trained trial's predictions for its test patients, as files for 3D Slicer.

Every task writes its own files (``Task.export``); the built-ins write the label
map on the patient's original grid and the landmarks as LPS .fcsv.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mtlbench.config import validate_config
from mtlbench.data.cache import build_cache, load_patient
from mtlbench.engine.train import CHECKPOINT, RESULT, build_components, eval_volume, make_model, predict_volume
from mtlbench.engine.trialspec import TrialSpec
from mtlbench.devices import memory_format
from mtlbench.errors import DataError


def load_trial(trial_dir: Path) -> dict:
    f = trial_dir / RESULT
    if not f.is_file():
        raise DataError(f"{trial_dir}: no {RESULT} (not a finished trial folder)")
    try:
        rec = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
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
    state = torch.load(trial_dir / CHECKPOINT, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    model.to(device=device, memory_format=memory_format(device))  # as in training: identical outputs
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for pid in rec["test_patients"]:
        p = load_patient(cache, pid)
        outputs = predict_volume(model, p.image, device)
        for task in comp.model_tasks:
            vol = eval_volume(p, task, outputs[task], final=True)
            written.extend(comp.tasks[task].export(vol, out_dir))
    return written
