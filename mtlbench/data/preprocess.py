"""Turns one loaded Patient into cache-ready arrays: intensity, slice resizing, label maps and landmark heatmaps.

Conventions (see the project contract):

* arrays are numpy order (z, y, x) = (k, j, i); slices are along axis 0;
* the in-plane resize from (Y, X) to (H, W) is pixel-centre aligned: cache
  pixel (r, c) has its centre at original continuous index
  j = (r + 0.5) * Y / H - 0.5, i = (c + 0.5) * X / W - 0.5 (torch's
  ``align_corners=False``); :func:`cache_affine` is the matching
  (slice, row, col) -> LPS mm affine;
* heatmaps are evaluated directly on the cache grid from the landmarks' LPS
  positions with distances measured in millimetres, so every blob is a sphere
  in patient space whatever the spacing or direction of the grid.

Everything here is numpy / scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from mtlbench.api import Geometry, Landmark, Patient
from mtlbench.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.config import Config

IMAGE_MODES = ("bilinear",)
LABEL_MODES = ("nearest-exact",)
_SLICE_BATCH = 32


# ----------------------------------------------------------------------------- intensity


def normalize(image_hu: np.ndarray, clamp: Sequence[float], scale: float) -> np.ndarray:
    """Clip to ``clamp`` = (low, high) HU, then divide by ``scale``; float32."""
    low, high = float(clamp[0]), float(clamp[1])
    out = np.clip(np.asarray(image_hu, dtype=np.float32), low, high)
    out /= np.float32(scale)
    return out


# ----------------------------------------------------------------------------- resizing


def _aa_bilinear_weights(n_in: int, n_out: int) -> "scipy.sparse.csr_matrix":  # noqa: F821
    """(n_out, n_in) sparse matrix of antialiased bilinear (triangle filter) weights.

    Same weights as torch's ``interpolate(mode="bilinear", align_corners=False,
    antialias=True)`` (and PIL's): output pixel ``o`` is centred on input
    coordinate ``(o + 0.5) * n_in / n_out``; when shrinking the triangle is
    widened by the scale factor; weights are renormalised where the support
    leaves the image. When enlarging this is plain bilinear interpolation with
    the source coordinate clamped at the border.
    """
    from scipy import sparse

    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    rows, cols, vals = [], [], []
    for o in range(n_out):
        center = scale * (o + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        idx = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((idx - center + 0.5) * invscale), 0.0, None)
        total = w.sum()
        if total > 0:
            w = w / total
        rows.extend([o] * len(idx))
        cols.extend(idx.tolist())
        vals.extend(w.tolist())
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float32)


def _nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for centre-aligned nearest ("nearest-exact")."""
    src = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(src, n_in - 1)


def resize_slices(volume: np.ndarray, size: Sequence[int], mode: str) -> np.ndarray:
    """Resize every slice of ``volume`` (S, Y, X) to ``size`` = (H, W).

    ``mode="bilinear"`` (images): antialiased bilinear, float32 result.
    ``mode="nearest-exact"`` (label maps): centre-aligned nearest, dtype kept.
    Both follow the pixel-centre convention in the module docstring.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"resize_slices expects a (S, Y, X) volume, got shape {vol.shape}")
    s, y, x = vol.shape
    h, w = int(size[0]), int(size[1])
    if mode in LABEL_MODES:
        return np.ascontiguousarray(vol[:, _nearest_exact_index(y, h)][:, :, _nearest_exact_index(x, w)])
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {IMAGE_MODES + LABEL_MODES}")
    if (y, x) == (h, w):
        return vol.astype(np.float32, copy=True)
    wy = _aa_bilinear_weights(y, h)
    wx_t = _aa_bilinear_weights(x, w).T.tocsr()
    out = np.empty((s, h, w), dtype=np.float32)
    for start in range(0, s, _SLICE_BATCH):  # bounded temporary memory for big volumes
        chunk = vol[start : start + _SLICE_BATCH].astype(np.float32, copy=False)
        n = chunk.shape[0]
        # rows: (Y, n*X) -> (H, n*X); then columns: (n*H, X) @ (X, W)
        tmp = wy @ chunk.transpose(1, 0, 2).reshape(y, n * x)
        tmp = np.ascontiguousarray(tmp.reshape(h, n, x).transpose(1, 0, 2)).reshape(n * h, x)
        out[start : start + n] = (tmp @ wx_t).reshape(n, h, w)
    return out


# ----------------------------------------------------------------------------- geometry


def cache_affine(geometry: Geometry, slice_size: Sequence[int]) -> np.ndarray:
    """4x4 affine: cache index (slice s, row r, col c, 1) -> LPS mm.

    It is ``geometry.index_to_physical()`` applied after the in-plane map
    k = s, j = (r + 0.5) * Y / H - 0.5, i = (c + 0.5) * X / W - 0.5.
    """
    x_size, y_size, _ = geometry.size
    h, w = int(slice_size[0]), int(slice_size[1])
    fy, fx = y_size / h, x_size / w
    scaling = np.eye(4)
    scaling[1, 1], scaling[1, 3] = fy, 0.5 * fy - 0.5
    scaling[2, 2], scaling[2, 3] = fx, 0.5 * fx - 0.5
    return geometry.index_to_physical() @ scaling


def physical_to_index(points_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) LPS points -> (N, 3) continuous indices through the inverse of a 4x4 affine."""
    pts = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return pts @ inv[:3, :3].T + inv[:3, 3]


# ----------------------------------------------------------------------------- heatmaps


def gaussian_box(
    center_index: np.ndarray, affine: np.ndarray, radius_mm: float, shape: Sequence[int]
) -> tuple[slice, slice, slice] | None:
    """Index box (clipped to ``shape``) containing every voxel within ``radius_mm`` of a point.

    An index offset ``delta`` maps to the physical offset ``L @ delta`` (``L`` the
    affine's 3x3 part), so the physical ball of radius R maps to an ellipsoid
    whose extent along index axis ``a`` is ``R * ||row a of L^-1||``: exact for
    oblique directions and anisotropic spacing alike. ``None`` if the box
    misses the grid.
    """
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    # a hair wider so voxels exactly on the sphere are not lost to rounding
    half = radius_mm * np.linalg.norm(inv, axis=1) * (1.0 + 1e-9)
    lo = np.ceil(center_index - half).astype(np.int64)
    hi = np.floor(center_index + half).astype(np.int64) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(shape, dtype=np.int64))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def gaussian_heatmaps(
    shape: Sequence[int],
    affine: np.ndarray,
    points_lps: np.ndarray,
    groups: Sequence[Sequence[int]],
    sigma_mm: float,
    truncate: float,
) -> np.ndarray:
    """(C, S, H, W) float32 landmark heatmaps on a grid described by ``affine``.

    Landmark n is the Gaussian ``exp(-d^2 / (2 sigma_mm^2))`` of the physical
    distance d (mm) from voxel centre to ``points_lps[n]``: it is 1 at the
    continuous landmark position. It is evaluated only in the index box that
    contains the ball of radius ``truncate * sigma_mm`` (see
    :func:`gaussian_box`); voxels outside that box are 0, so the error against
    an untruncated Gaussian is below ``exp(-truncate^2 / 2)``. Channel g is the
    voxel-wise maximum over the landmarks ``groups[g]`` (indices into
    ``points_lps``). Landmarks off the grid contribute where their box overlaps
    it; non-finite positions contribute nothing.
    """
    shape = tuple(int(v) for v in shape)
    out = np.zeros((len(groups),) + shape, dtype=np.float32)
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    if pts.size == 0 or not groups:
        return out
    affine = np.asarray(affine, dtype=np.float64)
    lin = affine[:3, :3]
    centers = physical_to_index(pts, affine)
    radius = float(truncate) * float(sigma_mm)
    inv_two_sigma2 = 1.0 / (2.0 * float(sigma_mm) ** 2)
    for n in range(len(pts)):
        channels = [g for g, members in enumerate(groups) if n in members]
        if not channels or not np.all(np.isfinite(pts[n])):
            continue
        box = gaussian_box(centers[n], affine, radius, shape)
        if box is None:
            continue
        blob = _blob(box, centers[n], lin, inv_two_sigma2)
        for g in channels:
            region = out[(g,) + box]
            np.maximum(region, blob, out=region)
    return out


def _blob(box: tuple[slice, slice, slice], center: np.ndarray, lin: np.ndarray, inv_two_sigma2: float) -> np.ndarray:
    """Gaussian values in ``box``: physical offset = lin @ (index - center)."""
    dk = np.arange(box[0].start, box[0].stop) - center[0]
    dj = np.arange(box[1].start, box[1].stop) - center[1]
    di = np.arange(box[2].start, box[2].stop) - center[2]
    d2 = np.zeros((len(dk), len(dj), len(di)))
    for axis in range(3):  # each physical coordinate of the offset
        comp = (
            lin[axis, 0] * dk[:, None, None]
            + lin[axis, 1] * dj[None, :, None]
            + lin[axis, 2] * di[None, None, :]
        )
        d2 += comp * comp
    return np.exp(-d2 * inv_two_sigma2).astype(np.float32)


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


@dataclass
class PreparedPatient:
    """One patient's cache content, as written by the cache builder and read back by ``load_patient``."""

    id: str
    image: np.ndarray  # (S, H, W) float32
    labels: np.ndarray  # (S, H, W) uint8
    heatmaps: np.ndarray  # (C, S, H, W) float32
    orig_labels: np.ndarray  # (Z, Y, X) uint8
    index_to_physical: np.ndarray  # 4x4, cache (s, r, c) -> LPS
    geometry: Geometry
    landmarks: list[Landmark]  # the configured ones present, LPS
    files: dict[str, str] = field(default_factory=dict)


def heatmap_groups(cfg: "Config") -> list[list[str]]:
    """The landmark names of each heatmap channel.

    ``preprocess.landmark_groups`` if set (every name must be in
    ``data.landmarks``), else one channel with all of ``data.landmarks``
    (no channel at all when no landmark is configured).
    """
    known = list(cfg.data.landmarks)
    groups = cfg.preprocess.landmark_groups
    if groups is None:
        return [known] if known else []
    for g, members in enumerate(groups):
        for name in members:
            if name not in known:
                raise ConfigError(
                    f"preprocess.landmark_groups[{g}]: landmark {name!r} is not in data.landmarks "
                    f"({', '.join(known) or 'none'})"
                )
    return [list(m) for m in groups]


def patient_landmarks(patient: Patient, names: Sequence[str]) -> list[Landmark]:
    """The patient's landmarks named in ``names``, in that order; duplicates are a DataError."""
    by_name: dict[str, Landmark] = {}
    for lm in patient.landmarks:
        if lm.name in by_name and lm.name in names:
            raise DataError(f"patient {patient.id}: landmark {lm.name!r} is given twice")
        by_name.setdefault(lm.name, lm)
    return [by_name[n] for n in names if n in by_name]


def preprocess_patient(patient: Patient, cfg: "Config") -> PreparedPatient:
    """Normalise, resize and encode one patient for the slice cache."""
    geometry = patient.geometry
    expected = tuple(reversed(geometry.size))
    if tuple(patient.image.shape) != expected:
        raise DataError(
            f"patient {patient.id}: image shape {tuple(patient.image.shape)} does not match its "
            f"geometry size {tuple(geometry.size)} (x, y, z)"
        )
    pre = cfg.preprocess
    size = tuple(int(v) for v in pre.slice_size)
    image = resize_slices(normalize(patient.image, pre.clamp, pre.scale), size, "bilinear")
    try:
        orig_labels = label_map(patient.masks, cfg.data.organs, expected)
    except DataError as exc:
        raise DataError(f"patient {patient.id}: {exc}") from None
    labels = resize_slices(orig_labels, size, "nearest-exact")
    affine = cache_affine(geometry, size)
    groups = heatmap_groups(cfg)
    landmarks = patient_landmarks(patient, cfg.data.landmarks)
    names = [lm.name for lm in landmarks]
    positions = np.array([lm.position for lm in landmarks], dtype=np.float64).reshape(-1, 3)
    index_groups = [[names.index(n) for n in members if n in names] for members in groups]
    heatmaps = gaussian_heatmaps(
        (expected[0],) + size, affine, positions, index_groups, pre.sigma_mm, pre.truncate
    )
    return PreparedPatient(
        id=patient.id,
        image=image,
        labels=labels,
        heatmaps=heatmaps,
        orig_labels=orig_labels,
        index_to_physical=affine,
        geometry=geometry,
        landmarks=landmarks,
        files=dict(patient.files),
    )
