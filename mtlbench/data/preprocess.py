"""Turns one loaded Patient into its slice-cache record: orientation, intensity, slice resizing, the label map, then each task's targets.

The core prepares what every run needs (the volume reindexed to the canonical
orientation, ``mtlbench.data.orient``; the normalised image and the organ
label map on the cache grid, the label map on the original grid); every task
that declares targets then computes them from the patient and the cache grid
(``Task.prepare``). Grid conventions: ``mtlbench.data.grid``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from mtlbench.api import CachedPatient, CacheGrid, Landmark, Patient, Target, Task
from mtlbench.data.grid import cache_affine
from mtlbench.data.orient import Reorientation, reorientation
from mtlbench.errors import ConfigError, DataError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.config import Config



# ----------------------------------------------------------------------------- intensity


def normalize(image_hu: np.ndarray, clamp: Sequence[float], scale: float) -> np.ndarray:
    """Clip to ``clamp`` = (low, high) HU, then divide by ``scale``; float32."""
    low, high = float(clamp[0]), float(clamp[1])
    out = np.clip(np.asarray(image_hu, dtype=np.float32), low, high)
    out /= np.float32(scale)
    return out


# ----------------------------------------------------------------------------- labels


def label_map(
    masks: dict[str, np.ndarray], organs: Sequence[str], shape: Sequence[int] | None = None
) -> np.ndarray:
    """uint8 label map: 0 background, organ ``organs[i]`` -> i + 1.

    Where masks overlap, the organ listed LATER in ``organs`` wins. Organs
    missing from ``masks`` are simply absent; masks of organs not in ``organs``
    are ignored. ``shape`` is needed only when no listed organ has a mask.
    """
    if len(organs) > 255:
        raise ConfigError(f"data.organs: at most 255 organs fit a uint8 label map, got {len(organs)}")
    present = [(i, masks[o]) for i, o in enumerate(organs) if o in masks]
    if shape is None:
        if not present:
            raise ValueError("label_map: no mask for any organ and no shape given")
        shape = np.shape(present[0][1])
    out = np.zeros(tuple(shape), dtype=np.uint8)
    for i, mask in present:
        m = np.asarray(mask)
        if m.shape != out.shape:
            raise DataError(f"mask of {organs[i]!r} has shape {m.shape}, expected {out.shape}")
        out[m.astype(bool, copy=False)] = i + 1
    return out


# ----------------------------------------------------------------------------- patients


def patient_landmarks(patient: Patient, names: Sequence[str]) -> list[Landmark]:
    """The patient's landmarks named in ``names``, in that order; duplicates are a DataError."""
    by_name: dict[str, Landmark] = {}
    for lm in patient.landmarks:
        if lm.name in by_name and lm.name in names:
            raise DataError(f"patient {patient.id}: landmark {lm.name!r} is given twice")
        by_name.setdefault(lm.name, lm)
    return [by_name[n] for n in names if n in by_name]


def preprocess_patient(patient: Patient, cfg: "Config", tasks: Mapping[str, Task] | None = None) -> CachedPatient:
    """Normalise, resize and label one patient, then run every task's ``prepare`` on it.

    ``tasks`` maps task labels to instantiated tasks (``mtlbench.assemble.make_tasks``);
    what each returns is checked against its declared targets.
    """
    geometry = patient.geometry
    expected = tuple(reversed(geometry.size))
    if tuple(patient.image.shape) != expected:
        raise DataError(
            f"patient {patient.id}: image shape {tuple(patient.image.shape)} does not match its "
            f"geometry size {tuple(geometry.size)} (x, y, z)"
        )
    pre = cfg.preprocess
    try:  # on the file's own grid first: label_map checks every mask's shape against the image's
        orig_labels = label_map(patient.masks, cfg.data.organs, expected)
    except DataError as exc:
        raise DataError(f"patient {patient.id}: {exc}") from None
    turn = reorientation(geometry, pre.orientation)
    patient = reorient_patient(patient, turn)
    orig_labels = np.ascontiguousarray(turn.apply(orig_labels))
    geometry = patient.geometry
    size = tuple(int(v) for v in pre.slice_size)
    affine = cache_affine(geometry, size, pre.spacing_mm)
    grid = CacheGrid((int(orig_labels.shape[0]),) + size, affine, geometry)  # type: ignore[arg-type]
    # padding beyond the image (a fixed spacing with a larger field of view) is the window's lowest value
    image = grid.resample(normalize(patient.image, pre.clamp, pre.scale), "linear", fill=pre.clamp[0] / pre.scale)
    labels = grid.resample(orig_labels, "nearest")
    landmarks = patient_landmarks(patient, cfg.data.landmarks)
    record = CachedPatient(
        id=patient.id,
        image=image,
        labels=labels,
        orig_labels=orig_labels,
        index_to_physical=affine,
        geometry=geometry,
        landmarks=landmarks,
        files=dict(patient.files),
        source_geometry=None if turn.identity else turn.source,
    )
    grid = record.grid()
    seen = replace(patient, landmarks=landmarks)  # the configured landmarks only, as the cache records them
    for label, task in (tasks or {}).items():
        declared = task.targets()
        if not declared:
            continue
        out = task.prepare(seen, grid)
        record.targets[label] = check_targets(label, task, declared, out, grid, patient.id)
    return record


def reorient_patient(patient: Patient, turn: Reorientation) -> Patient:
    """The patient with image and masks reindexed by ``turn`` (``mtlbench.data.orient.reorientation`` of its
    geometry); the same voxels, so landmarks (physical points) are unchanged. Mask shapes are the caller's to check."""
    if turn.identity:
        return patient
    return replace(
        patient,
        image=turn.apply(patient.image),
        masks={organ: turn.apply(mask) for organ, mask in patient.masks.items()},
        geometry=turn.target,
    )


def check_targets(
    label: str, task: Task, declared: Sequence[Target], arrays: Any, grid: CacheGrid, patient: str
) -> dict[str, np.ndarray]:
    """The arrays a task's ``prepare`` returned, each checked against its Target and cast to its dtype."""
    where = f"task {label!r} ({type(task).__name__}.prepare), patient {patient}"
    if not isinstance(arrays, Mapping):
        raise PluginError(f"{where}: returned {type(arrays).__name__}, expected a dict of arrays")
    names = [t.name for t in declared]
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        raise PluginError(
            f"{where}: returned {sorted(arrays)}, but the task declares targets {names}"
        )
    out = {}
    for t in declared:
        arr = np.asarray(arrays[t.name])
        if t.per_slice:
            want = (grid.shape[0],) + t.slice_shape(grid.shape[1:])
            if tuple(arr.shape) != want:
                raise PluginError(f"{where}: target {t.name!r} has shape {tuple(arr.shape)}, expected {want}")
        out[t.name] = np.ascontiguousarray(arr.astype(t.dtype, copy=False))
    return out
