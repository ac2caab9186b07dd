"""The cache grid: in-plane slice resampling, the cache index -> LPS affine, and points between the two.

Conventions, used by the slice cache, the tasks' ``prepare`` (through
``mtlbench.api.CacheGrid``) and evaluation alike:

* arrays are numpy order (z, y, x) = (k, j, i); slices are along axis 0;
* each in-plane axis of the cache is an :data:`AxisMap` ``(scale, offset)``:
  cache pixel ``o`` covers the original pixel-edge coordinate
  ``u = scale * (o + 0.5) + offset``, i.e. its centre sits at original
  continuous index ``u - 0.5``;
* by default (``preprocess.spacing_mm`` unset) the whole slice is resized:
  ``scale = n_in / n_out``, ``offset = 0``, so j = (r + 0.5) * Y / H - 0.5
  (torch's ``align_corners=False``);
* with a fixed spacing, ``scale = spacing_out / spacing_in`` and the offset
  centres the cache slice on the image slice; cache pixels beyond the image
  are padding (``fill``), image pixels beyond the cache slice are cropped;
* :func:`cache_affine` is the matching (slice, row, col) -> LPS mm affine, and
  :func:`plane_of` reads the axis maps back from it, so the affine stored in
  the cache is the one source of truth.

numpy / scipy only; nothing of mtlbench is imported at run time, so
``mtlbench.api`` may use it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.api import Geometry

#: One in-plane axis of the cache grid: (scale, offset), see the module docstring.
AxisMap = tuple[float, float]

IMAGE_MODES = ("bilinear",)
LABEL_MODES = ("nearest-exact",)
_SLICE_BATCH = 32


# ----------------------------------------------------------------------------- resizing


def plain_axis(n_in: int, n_out: int) -> AxisMap:
    """The axis map of resizing ``n_in`` pixels to ``n_out`` over the same extent."""
    return (n_in / n_out, 0.0)


def spacing_axis(n_in: int, spacing_in: float, n_out: int, spacing_out: float) -> AxisMap:
    """The axis map of ``n_out`` pixels of ``spacing_out`` mm centred on ``n_in`` pixels of ``spacing_in`` mm."""
    scale = float(spacing_out) / float(spacing_in)
    return (scale, 0.5 * n_in - 0.5 * scale * n_out)


def _inside(n_in: int, n_out: int, axis: AxisMap) -> np.ndarray:
    """Which output pixels have their centre on the input's extent (pixel-edge coordinate in [0, n_in])."""
    scale, offset = axis
    u = scale * (np.arange(n_out) + 0.5) + offset
    return (u >= 0.0) & (u <= n_in)


def _aa_bilinear_weights(n_in: int, n_out: int, axis: AxisMap | None = None) -> "scipy.sparse.csr_matrix":  # noqa: F821
    """(n_out, n_in) sparse matrix of antialiased bilinear (triangle filter) weights.

    With the plain axis map these are the weights of torch's ``interpolate(mode="bilinear",
    align_corners=False, antialias=True)`` (and PIL's): output pixel ``o`` is
    centred on input coordinate ``scale * (o + 0.5) + offset``; when shrinking
    the triangle is widened by the scale factor; weights are renormalised where
    the support leaves the image. When enlarging this is plain bilinear
    interpolation with the source coordinate clamped at the border. Rows of
    output pixels centred beyond the input are empty (the caller fills them).
    """
    from scipy import sparse

    scale, offset = plain_axis(n_in, n_out) if axis is None else axis
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    inside = _inside(n_in, n_out, (scale, offset))
    rows, cols, vals = [], [], []
    for o in range(n_out):
        if not inside[o]:
            continue
        center = scale * (o + 0.5) + offset
        lo = max(math.floor(center - support + 0.5), 0)
        hi = min(math.floor(center + support + 0.5), n_in)
        idx = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((idx - center + 0.5) * invscale), 0.0, None)
        total = w.sum()
        if total > 0:
            w = w / total
        rows.extend([o] * len(idx))
        cols.extend(idx.tolist())
        vals.extend(w.tolist())
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float32)


def _nearest_exact_index(n_in: int, n_out: int, axis: AxisMap | None = None) -> np.ndarray:
    """Source index of each output pixel for centre-aligned nearest ("nearest-exact"); -1 beyond the input."""
    scale, offset = plain_axis(n_in, n_out) if axis is None else axis
    if offset == 0.0:
        src = np.floor((np.arange(n_out) + 0.5) * scale).astype(np.int64)
    else:
        src = np.floor(scale * (np.arange(n_out) + 0.5) + offset).astype(np.int64)
    src = np.minimum(src, n_in - 1)  # a centre exactly on the far edge belongs to the last pixel
    src[~_inside(n_in, n_out, (scale, offset))] = -1
    return src


def resize_slices(
    volume: np.ndarray,
    size: Sequence[int],
    mode: str,
    plane: tuple[AxisMap, AxisMap] | None = None,
    fill: float = 0.0,
) -> np.ndarray:
    """Resample every slice of ``volume`` (S, Y, X) onto an (H, W) = ``size`` cache slice.

    ``plane`` = (rows, cols) axis maps (module docstring); None resizes the
    whole slice. ``mode="bilinear"`` (images): antialiased bilinear, float32
    result. ``mode="nearest-exact"`` (label maps): centre-aligned nearest,
    dtype kept. Cache pixels centred beyond the image get ``fill``.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"resize_slices expects a (S, Y, X) volume, got shape {vol.shape}")
    s, y, x = vol.shape
    h, w = int(size[0]), int(size[1])
    rows, cols = (plain_axis(y, h), plain_axis(x, w)) if plane is None else plane
    if mode in LABEL_MODES:
        ri, ci = _nearest_exact_index(y, h, rows), _nearest_exact_index(x, w, cols)
        out = vol[:, np.maximum(ri, 0)][:, :, np.maximum(ci, 0)]
        if (ri < 0).any() or (ci < 0).any():
            out[:, ri < 0] = fill
            out[:, :, ci < 0] = fill
        return np.ascontiguousarray(out)
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {IMAGE_MODES + LABEL_MODES}")
    if (y, x) == (h, w) and rows == plain_axis(y, h) and cols == plain_axis(x, w):
        return vol.astype(np.float32, copy=True)
    wy = _aa_bilinear_weights(y, h, rows)
    wx_t = _aa_bilinear_weights(x, w, cols).T.tocsr()
    out = np.empty((s, h, w), dtype=np.float32)
    for start in range(0, s, _SLICE_BATCH):  # bounded temporary memory for big volumes
        chunk = vol[start : start + _SLICE_BATCH].astype(np.float32, copy=False)
        n = chunk.shape[0]
        # rows: (Y, n*X) -> (H, n*X); then columns: (n*H, X) @ (X, W)
        tmp = wy @ chunk.transpose(1, 0, 2).reshape(y, n * x)
        tmp = np.ascontiguousarray(tmp.reshape(h, n, x).transpose(1, 0, 2)).reshape(n * h, x)
        out[start : start + n] = (tmp @ wx_t).reshape(n, h, w)
    outside_r, outside_c = ~_inside(y, h, rows), ~_inside(x, w, cols)
    if outside_r.any() or outside_c.any():
        out[:, outside_r] = fill
        out[:, :, outside_c] = fill
    return out


# ----------------------------------------------------------------------------- geometry


def cache_plane(
    geometry: Geometry, slice_size: Sequence[int], spacing_mm: Sequence[float] | None = None
) -> tuple[AxisMap, AxisMap]:
    """The (rows, cols) axis maps of the cache slice: the whole slice resized to ``slice_size``, or,
    with ``spacing_mm`` = (row, col) mm, ``slice_size`` pixels of that spacing centred on the slice."""
    x_size, y_size, _ = geometry.size
    h, w = int(slice_size[0]), int(slice_size[1])
    if spacing_mm is None:
        return plain_axis(y_size, h), plain_axis(x_size, w)
    sx, sy = float(geometry.spacing[0]), float(geometry.spacing[1])
    return spacing_axis(y_size, sy, h, float(spacing_mm[0])), spacing_axis(x_size, sx, w, float(spacing_mm[1]))


def cache_affine(
    geometry: Geometry, slice_size: Sequence[int], spacing_mm: Sequence[float] | None = None
) -> np.ndarray:
    """4x4 affine: cache index (slice s, row r, col c, 1) -> LPS mm.

    It is ``geometry.index_to_physical()`` applied after the in-plane map
    k = s, j = scale_r * (r + 0.5) + offset_r - 0.5 (and i likewise) of
    :func:`cache_plane`; by default j = (r + 0.5) * Y / H - 0.5.
    """
    (fy, oy), (fx, ox) = cache_plane(geometry, slice_size, spacing_mm)
    scaling = np.eye(4)
    scaling[1, 1], scaling[1, 3] = fy, 0.5 * fy + oy - 0.5
    scaling[2, 2], scaling[2, 3] = fx, 0.5 * fx + ox - 0.5
    return geometry.index_to_physical() @ scaling


def plane_of(affine: np.ndarray, geometry: Geometry, slice_size: Sequence[int]) -> tuple[AxisMap, AxisMap]:
    """The (rows, cols) axis maps a cache affine (:func:`cache_affine`) encodes; the plain resize exactly
    when that is what it encodes (so resampling through it repeats the cache's own resize bit for bit)."""
    scaling = np.linalg.solve(geometry.index_to_physical(), np.asarray(affine, dtype=np.float64))
    x_size, y_size, _ = geometry.size
    out = []
    for axis, n_in, n_out in ((1, y_size, int(slice_size[0])), (2, x_size, int(slice_size[1]))):
        scale = float(scaling[axis, axis])
        offset = float(scaling[axis, 3]) - 0.5 * scale + 0.5
        plain = plain_axis(n_in, n_out)
        close = abs(scale - plain[0]) <= 1e-9 * plain[0] and abs(offset) <= 1e-6
        out.append(plain if close else (scale, offset))
    return out[0], out[1]


def physical_to_index(points_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) LPS points -> (N, 3) continuous indices through the inverse of a 4x4 index -> LPS affine.

    For an image grid pass ``geometry.index_to_physical()`` (numpy-order
    indices k, j, i); for the cache grid its ``index_to_physical``.
    """
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return pts @ inv[:3, :3].T + inv[:3, 3]


def index_to_physical(indices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) continuous indices -> (N, 3) LPS points through a 4x4 index -> LPS affine."""
    a = np.asarray(affine, dtype=np.float64)
    return np.asarray(indices, dtype=np.float64).reshape(-1, 3) @ a[:3, :3].T + a[:3, 3]
