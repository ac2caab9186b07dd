"""The cache grid: in-plane slice resizing, the cache index -> LPS affine, and points between the two.

Conventions, used by the slice cache, the tasks' ``prepare`` (through
``mtlbench.api.CacheGrid``) and evaluation alike:

* arrays are numpy order (z, y, x) = (k, j, i); slices are along axis 0;
* the in-plane resize from (Y, X) to (H, W) is pixel-centre aligned: cache
  pixel (r, c) has its centre at original continuous index
  j = (r + 0.5) * Y / H - 0.5, i = (c + 0.5) * X / W - 0.5 (torch's
  ``align_corners=False``); :func:`cache_affine` is the matching
  (slice, row, col) -> LPS mm affine.

numpy / scipy only; nothing of mtlbench is imported at run time, so
``mtlbench.api`` may use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.api import Geometry

IMAGE_MODES = ("bilinear",)
LABEL_MODES = ("nearest-exact",)
_SLICE_BATCH = 32


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
