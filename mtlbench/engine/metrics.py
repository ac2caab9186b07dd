"""Pure numpy/scipy evaluation numerics of label maps: overlap (IoU, Dice) and HD95.

Definitions (used by the built-in segmentation task; other tasks may use them):

* **Overlap** is volumetric: counts over the whole volume, never averaged per
  slice. Empty-reference rule: reference and prediction both empty -> NaN
  (left out of means); exactly one of them empty -> IoU = Dice = 0.
* **HD95** (mm) is the 95th percentile (numpy's linear interpolation) of the
  *union* of the two directed surface-distance sets, as medpy's ``hd95``
  defines it: the surface of a mask is the mask minus its binary erosion
  (6-connected cross, voxels outside the array count as background); for each
  surface voxel of A the distance (with the voxel spacing) to the nearest
  surface voxel of B, and vice versa; both lists are concatenated and the 95th
  percentile taken. NaN if either mask is empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_CHUNK_VOXELS = 2**22


# ----------------------------------------------------------------------------- overlap


def confusion(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 voxel counts, rows = prediction, columns = reference."""
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    for name, a in (("prediction", p), ("reference", r)):
        if a.size and (int(a.min()) < 0 or int(a.max()) >= n_classes):
            raise ValueError(f"{name} labels must lie in 0..{n_classes - 1}, got {int(a.min())}..{int(a.max())}")
    counts = np.zeros(n_classes * n_classes, dtype=np.int64)
    pf, rf = p.reshape(-1), r.reshape(-1)
    for start in range(0, pf.size, _CHUNK_VOXELS):  # bounded temporaries on big volumes
        idx = pf[start : start + _CHUNK_VOXELS].astype(np.int64) * n_classes + rf[start : start + _CHUNK_VOXELS]
        counts += np.bincount(idx, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def overlap(pred_labels: np.ndarray, ref_labels: np.ndarray, n_organs: int) -> dict[int, tuple[float, float]]:
    """{label: (IoU, Dice)} for labels 1..n_organs, volumetric, with the empty-reference rule."""
    cm = confusion(pred_labels, ref_labels, n_organs + 1)
    out: dict[int, tuple[float, float]] = {}
    for label in range(1, n_organs + 1):
        inter = int(cm[label, label])
        n_pred, n_ref = int(cm[label, :].sum()), int(cm[:, label].sum())
        if n_pred == 0 and n_ref == 0:
            out[label] = (float("nan"), float("nan"))
            continue
        union = n_pred + n_ref - inter
        out[label] = (inter / union, 2.0 * inter / (n_pred + n_ref))
    return out


# ----------------------------------------------------------------------------- HD95


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels: the mask minus its erosion by the 6-connected cross."""
    m = np.asarray(mask, dtype=bool)
    return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1), border_value=0)


def _crop(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a | b grown by one voxel (so erosion near the box edge is unchanged)."""
    box = []
    for axis in range(a.ndim):
        other = tuple(i for i in range(a.ndim) if i != axis)
        hit = np.flatnonzero(a.any(axis=other) | b.any(axis=other))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, a.shape[axis])))
    return tuple(box)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b`` (both non-empty)."""
    sa, sb = surface(a), surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=[float(v) for v in spacing])
    return dist_to_b[sa]


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th percentile Hausdorff distance in mm (definition in the module docstring); NaN if a mask is empty."""
    p, r = np.asarray(pred_mask, dtype=bool), np.asarray(ref_mask, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    if len(spacing_zyx) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing_zyx)} does not match a {p.ndim}-D mask")
    if not p.any() or not r.any():
        return float("nan")
    box = _crop(p, r)  # distances between the two surfaces only depend on this box
    p, r = p[box], r[box]
    d = np.concatenate([surface_distances(p, r, spacing_zyx), surface_distances(r, p, spacing_zyx)])
    return float(np.percentile(d, 95))
