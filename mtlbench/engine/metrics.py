"""Pure numpy/scipy evaluation numerics: overlap (IoU, Dice), HD95, heatmap RMSE and landmark decoding.

Definitions (used by the built-in tasks and by ``mtlbench predict``):

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
* **Heatmap RMSE** is ``sqrt(mean((pred - ref) ** 2))`` over every voxel.
* **Landmark decoding**: in a heatmap channel holding k landmarks, the k
  highest local maxima (3x3x3 neighbourhood) are kept with greedy non-maximum
  suppression (a peak closer than ``radius_mm`` in physical space to a higher
  kept one is dropped), each is refined to sub-voxel precision with a 3-point
  parabola per axis (offset clipped to +-0.5 voxel) and mapped to LPS mm with
  the grid's ``index_to_physical``. Peaks are named by matching them to the
  reference positions with the assignment of minimum total distance
  (``scipy.optimize.linear_sum_assignment``), so a swap of two landmarks that
  share a channel is not counted as an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

DEFAULT_NMS_RADIUS_MM = 15.0
_SLICES_PER_CHUNK = 16
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


# ----------------------------------------------------------------------------- heatmaps


def heatmap_rmse(pred: np.ndarray, ref: np.ndarray) -> float:
    """sqrt(mean((pred - ref)^2)) over all voxels, accumulated in float64."""
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"heatmap shapes differ: prediction {p.shape}, reference {r.shape}")
    if p.size == 0:
        return float("nan")
    p2, r2 = p.reshape(p.shape[0], -1), r.reshape(r.shape[0], -1)
    total = 0.0
    for start in range(0, p2.shape[0], _SLICES_PER_CHUNK):
        diff = p2[start : start + _SLICES_PER_CHUNK].astype(np.float64) - r2[start : start + _SLICES_PER_CHUNK]
        total += float(np.einsum("ij,ij->", diff, diff))
    return float(np.sqrt(total / p.size))


def find_peaks_3d(
    volume: np.ndarray,
    k: int,
    index_to_physical: np.ndarray,
    radius_mm: float = DEFAULT_NMS_RADIUS_MM,
) -> np.ndarray:
    """(m, 3) int indices of the ``k`` highest local maxima of a 3-D array, highest first (m <= k).

    A local maximum equals the maximum of its 3x3x3 neighbourhood; peaks
    closer than ``radius_mm`` (physical distance through ``index_to_physical``)
    to a higher kept peak are suppressed. Non-finite values are ignored.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"find_peaks_3d expects a 3-D array, got shape {vol.shape}")
    if k <= 0 or vol.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    vol = np.where(np.isfinite(vol), vol, -np.inf)
    is_max = (vol == ndimage.maximum_filter(vol, size=3, mode="nearest")) & np.isfinite(vol)
    idx = np.argwhere(is_max)
    if idx.shape[0] == 0:
        return np.zeros((0, 3), dtype=np.int64)
    values = vol[tuple(idx.T)]
    order = np.argsort(-values, kind="stable")
    idx = idx[order]
    phys = idx @ np.asarray(index_to_physical, dtype=np.float64)[:3, :3].T
    alive = np.ones(idx.shape[0], dtype=bool)
    kept: list[int] = []
    while len(kept) < k:
        rest = np.flatnonzero(alive)
        if rest.size == 0:
            break
        best = int(rest[0])  # sorted: the first alive candidate is the highest
        kept.append(best)
        near = np.linalg.norm(phys[rest] - phys[best], axis=1) < radius_mm
        alive[rest[near]] = False
    return idx[kept].astype(np.int64)


def refine_subvoxel(volume: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Continuous (m, 3) indices: each integer peak shifted by a 3-point parabola fit per axis.

    Along each axis the offset is ``0.5 * (f[-1] - f[+1]) / (f[-1] - 2 f[0] + f[+1])``,
    clipped to [-0.5, 0.5]; it is 0 at the array border or when the three
    values are not strictly concave.
    """
    vol = np.asarray(volume)
    pk = np.atleast_2d(np.asarray(peaks, dtype=np.int64)).reshape(-1, vol.ndim)
    out = pk.astype(np.float64)
    for n, p in enumerate(pk):
        for axis in range(vol.ndim):
            if p[axis] <= 0 or p[axis] >= vol.shape[axis] - 1:
                continue
            lo, hi = p.copy(), p.copy()
            lo[axis] -= 1
            hi[axis] += 1
            fm, f0, fp = float(vol[tuple(lo)]), float(vol[tuple(p)]), float(vol[tuple(hi)])
            denom = fm - 2.0 * f0 + fp
            if not np.isfinite(denom) or denom >= 0:
                continue
            out[n, axis] += float(np.clip(0.5 * (fm - fp) / denom, -0.5, 0.5))
    return out


def to_physical(indices: np.ndarray, index_to_physical: np.ndarray) -> np.ndarray:
    """(m, 3) continuous indices -> (m, 3) LPS mm through a 4x4 affine."""
    a = np.asarray(index_to_physical, dtype=np.float64)
    return np.atleast_2d(np.asarray(indices, dtype=np.float64)) @ a[:3, :3].T + a[:3, 3]


def decode_channel(
    channel: np.ndarray,
    k: int,
    index_to_physical: np.ndarray,
    radius_mm: float = DEFAULT_NMS_RADIUS_MM,
) -> np.ndarray:
    """(m, 3) LPS positions of the ``k`` strongest peaks of one (S, H, W) heatmap, highest first."""
    peaks = find_peaks_3d(channel, k, index_to_physical, radius_mm)
    return to_physical(refine_subvoxel(channel, peaks), index_to_physical).reshape(-1, 3)


def assign_peaks(peaks_lps: np.ndarray, names: Sequence[str], reference: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """Name peaks by the minimum-total-distance matching to the reference positions of ``names``.

    A name left without a peak (fewer peaks than names) gets a NaN position.
    """
    from scipy.optimize import linear_sum_assignment

    names = list(names)
    out = {n: np.full(3, np.nan) for n in names}
    peaks = np.asarray(peaks_lps, dtype=np.float64).reshape(-1, 3)
    if not names or peaks.shape[0] == 0:
        return out
    ref = np.array([reference[n] for n in names], dtype=np.float64).reshape(-1, 3)
    cost = np.linalg.norm(ref[:, None, :] - peaks[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    for r, c in zip(rows, cols):
        out[names[r]] = peaks[c].copy()
    return out


def locate_landmarks(
    heatmaps: np.ndarray,
    index_to_physical: np.ndarray,
    groups: Sequence[Sequence[str]],
    reference: Mapping[str, Sequence[float]] | None = None,
    radius_mm: float = DEFAULT_NMS_RADIUS_MM,
) -> dict[str, np.ndarray]:
    """Decode landmark positions (LPS mm) from (C, S, H, W) heatmaps; channel c holds ``groups[c]``.

    With ``reference`` ({name: LPS position}) only the names it has are
    located: channel c is decoded for as many peaks as it has reference names,
    and peaks are named by :func:`assign_peaks`. Without a reference every
    name of every group is located and the peaks of a channel are named in
    group order by decreasing height (only meaningful for one-landmark channels).
    Names without a peak map to NaN positions.
    """
    hm = np.asarray(heatmaps)
    if hm.ndim != 4:
        raise ValueError(f"locate_landmarks expects (C, S, H, W) heatmaps, got shape {hm.shape}")
    if len(groups) > hm.shape[0]:
        raise ValueError(f"{len(groups)} landmark groups but only {hm.shape[0]} heatmap channels")
    out: dict[str, np.ndarray] = {}
    for c, group in enumerate(groups):
        names = [n for n in group if reference is None or n in reference]
        if not names:
            continue
        peaks = decode_channel(hm[c], len(names), index_to_physical, radius_mm)
        if reference is not None:
            out.update(assign_peaks(peaks, names, reference))
        else:
            for i, name in enumerate(names):
                out[name] = peaks[i].copy() if i < peaks.shape[0] else np.full(3, np.nan)
    return out
