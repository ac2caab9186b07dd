"""Pure numpy/scipy evaluation numerics of label maps: overlap (IoU, Dice), HD95 and NSD.

Definitions (used by the built-in segmentation task; other tasks may use them):

* **Overlap** is volumetric: counts over the whole volume, never averaged per
  slice. Empty-reference rule: reference and prediction both empty -> NaN
  (left out of means); exactly one of them empty -> IoU = Dice = 0.
* **Surfaces** (HD95 and NSD): the surface of a mask is the mask minus its
  binary erosion by the 6-connected cross, voxels outside the array counting as
  background (medpy's and MONAI's border voxels). Each surface voxel is a
  point at its voxel centre; distances are Euclidean in mm with the voxel
  spacing (anisotropic spacing included), from each surface voxel of one mask
  to the nearest surface voxel of the other: the directed sets d(P->R) and
  d(R->P).
* **HD95** (mm), ``convention="pooled"`` (the default, medpy's ``hd95``): the
  95th percentile (numpy's linear interpolation) of d(P->R) and d(R->P)
  concatenated. ``convention="max_directed"`` (MONAI's
  ``compute_hausdorff_distance(percentile=95)``, Metrics Reloaded): the larger
  of the 95th percentiles of d(P->R) and of d(R->P) (the pooled value lies
  between the two, up to interpolation). NaN if either mask is empty.
* **NSD** (normalised surface Dice at a tolerance tau in mm, Nikolov et al.
  2021): (#{d(P->R) <= tau} + #{d(R->P) <= tau}) / (#surface voxels of P + #surface
  voxels of R). Surface elements are counted voxels, each of weight one (as
  MONAI's ``compute_surface_dice`` with ``use_subvoxels=False``), not the
  area-weighted surfels at voxel corners of DeepMind's ``surface-distance``.
  Both masks empty -> NaN; exactly one empty -> 0 (as IoU and Dice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

_CHUNK_VOXELS = 2**22
HD95_CONVENTIONS = ("pooled", "max_directed")
_FEW_CLASSES = 4  # up to this many classes the confusion matrix is counted by compares, not bincount
_TIE_MM = 1e-9  # NSD counts d <= tau + this: a distance equal to tau stays in despite float rounding


# ----------------------------------------------------------------------------- overlap


def confusion(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 voxel counts, rows = prediction, columns = reference."""
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    for name, a in (("prediction", p), ("reference", r)):
        if a.size and (int(a.min()) < 0 or int(a.max()) >= n_classes):
            raise ValueError(f"{name} labels must lie in 0..{n_classes - 1}, got {int(a.min())}..{int(a.max())}")
    pf, rf = p.reshape(-1), r.reshape(-1)
    if n_classes <= _FEW_CLASSES:  # one uint8 code per voxel, counted by vectorised compares (3x the bincount's speed)
        code = pf.astype(np.uint8, copy=False) * np.uint8(n_classes) + rf.astype(np.uint8, copy=False)
        return np.array([np.count_nonzero(code == k) for k in range(n_classes * n_classes)],
                        dtype=np.int64).reshape(n_classes, n_classes)
    counts = np.zeros(n_classes * n_classes, dtype=np.int64)
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


# ----------------------------------------------------------------------------- surface distances: HD95, NSD


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels: the mask minus its erosion by the 6-connected cross (outside the array = background)."""
    m = np.asarray(mask, dtype=bool)
    return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1), border_value=0)


def _extent(masks: Sequence[np.ndarray], axis: int) -> tuple[int, int] | None:
    """First and last index along ``axis`` where any of ``masks`` is set; None if all are empty."""
    other = tuple(i for i in range(masks[0].ndim) if i != axis)
    hit = np.zeros(masks[0].shape[axis], dtype=bool)
    for m in masks:
        hit |= m.any(axis=other)
    idx = np.flatnonzero(hit)
    return (int(idx[0]), int(idx[-1])) if idx.size else None


def _crop(*masks: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the union of ``masks`` grown by one voxel (so the surface inside it is that of the whole array).

    Narrowed axis by axis, so after the first axis only the slab holding the masks is scanned. All empty: an empty box.
    """
    shape = masks[0].shape
    box = [slice(0, n) for n in shape]
    for axis in range(len(shape)):
        ext = _extent([m[tuple(box)] for m in masks], axis)
        if ext is None:
            return tuple(slice(0, 0) for _ in shape)
        lo, hi = ext
        start = box[axis].start
        box[axis] = slice(max(start + lo - 1, 0), min(start + hi + 2, shape[axis]))
    return tuple(box)


def _surface_points(mask: np.ndarray) -> np.ndarray:
    """(n, ndim) int64 array indices of the surface voxels, extracted inside the mask's own bounding box."""
    box = _crop(mask)
    points = np.argwhere(surface(mask[box]))
    return points + np.array([b.start for b in box], dtype=np.int64)


def _nearest(from_idx: np.ndarray, to_idx: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel index in ``from_idx`` to the nearest one in ``to_idx`` (inf if that is empty).

    A k-d tree over the voxel centres in mm finds the nearest voxel; the distance is then computed from the
    integer index difference, sqrt(sum((d_i s_i)^2)), the same expression a distance transform evaluates.
    """
    if len(to_idx) == 0:
        return np.full(len(from_idx), np.inf)
    if len(from_idx) == 0:
        return np.zeros(0)
    tree = cKDTree(to_idx * spacing, leafsize=32, balanced_tree=False, compact_nodes=False)
    _, nn = tree.query(from_idx * spacing, k=1)
    diff = (from_idx - to_idx[nn]) * spacing
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed surface distances (mm) of a prediction and a reference mask.

    ``pred_to_ref[k]``: from the k-th surface voxel of the prediction to the nearest surface voxel of the
    reference (inf when the reference is empty); ``ref_to_pred`` the other way. An empty mask has no surface
    voxels, so its own array is empty. HD95 and NSD both read these, so they are computed once per organ.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray

    def hd95(self, convention: str = "pooled") -> float:
        """HD95 (mm) by ``convention`` (see the module docstring); NaN if either mask is empty."""
        if convention not in HD95_CONVENTIONS:
            raise ValueError(f"unknown HD95 convention {convention!r}; choose one of {', '.join(HD95_CONVENTIONS)}")
        a, b = self.pred_to_ref, self.ref_to_pred
        if a.size == 0 or b.size == 0:
            return float("nan")
        if convention == "pooled":
            return float(np.percentile(np.concatenate([a, b]), 95))
        return float(max(np.percentile(a, 95), np.percentile(b, 95)))

    def nsd(self, tolerance_mm: float) -> float:
        """Normalised surface Dice at ``tolerance_mm`` (see the module docstring): NaN if both masks are empty."""
        tol = float(tolerance_mm)
        if not tol >= 0:
            raise ValueError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")
        n = self.pred_to_ref.size + self.ref_to_pred.size
        if n == 0:
            return float("nan")
        limit = tol + _TIE_MM  # "<= tolerance", robust to the last-bit rounding of a distance equal to it
        close = np.count_nonzero(self.pred_to_ref <= limit) + np.count_nonzero(self.ref_to_pred <= limit)
        return float(close / n)


def surface_distances_of(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_zyx: Sequence[float]) -> SurfaceDistances:
    """Both directed surface-distance sets of two masks of one grid with voxel ``spacing_zyx`` (mm, array axis order).

    Each surface is extracted inside its mask's bounding box grown by one voxel, which gives the surface
    of the whole array (a stray voxel far away enlarges only its own mask's box); only surface voxels
    enter the distance search, so its cost follows the surface size, not the distance between the masks.
    """
    p, r = np.asarray(pred_mask, dtype=bool), np.asarray(ref_mask, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    if len(spacing_zyx) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing_zyx)} does not match a {p.ndim}-D mask")
    spacing = np.asarray([float(v) for v in spacing_zyx], dtype=np.float64)
    sp, sr = _surface_points(p), _surface_points(r)
    return SurfaceDistances(_nearest(sp, sr, spacing), _nearest(sr, sp, spacing))


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    return surface_distances_of(a, b, spacing).pred_to_ref


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_zyx: Sequence[float], convention: str = "pooled") -> float:
    """95th percentile Hausdorff distance in mm (definition in the module docstring); NaN if a mask is empty."""
    if convention not in HD95_CONVENTIONS:
        raise ValueError(f"unknown HD95 convention {convention!r}; choose one of {', '.join(HD95_CONVENTIONS)}")
    return surface_distances_of(pred_mask, ref_mask, spacing_zyx).hd95(convention)


def nsd(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (definition in the module docstring); NaN if both masks are empty."""
    return surface_distances_of(pred_mask, ref_mask, spacing_zyx).nsd(tolerance_mm)
