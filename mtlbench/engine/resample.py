"""Resampling network outputs from the cache grid back to a patient's original grid (and slice resizing).

Both functions follow the cache grid's pixel-centre convention (``mtlbench.data.grid``):
by default cache pixel (r, c) has its centre at original continuous index
j = (r + 0.5) * Y / H - 0.5, i = (c + 0.5) * X / W - 0.5
(``F.interpolate(..., align_corners=False)``); with a fixed
``preprocess.spacing_mm`` the cache slice is a centred crop or pad of the
image slice, read from the cache affine. Segmentation evaluation and
``mtlbench predict`` both go through :func:`labels_to_original`, so the label
maps predict writes are exactly the ones the reported metrics measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtlbench.api import Geometry

# Upper bound on the float32 temporaries of one chunk of slices (bytes).
CHUNK_BYTES = 64 * 2**20


def _chunk_slices(channels: int, height: int, width: int) -> int:
    return max(1, CHUNK_BYTES // max(1, 4 * channels * height * width))


def labels_to_original(
    output: np.ndarray, geometry: Geometry, index_to_physical: np.ndarray | None = None
) -> np.ndarray:
    """(S, C, H, W) logits on the cache grid -> uint8 (Z, Y, X) label map on ``geometry``'s grid.

    Softmax over C, bilinear resampling of each slice's probabilities onto the
    original (Y, X) grid, argmax over C. ``index_to_physical`` is the cache
    affine (``CachedPatient.index_to_physical``); without it the cache slice
    is taken to be the whole image slice resized. Original pixels beyond a
    cropped cache slice (a fixed ``preprocess.spacing_mm``) are background.
    Slices are processed in chunks so memory stays bounded. Every original
    slice must be present (S == Z), else ValueError.
    """
    from mtlbench.data.grid import plain_axis, plane_of

    out = np.asarray(output)
    if out.ndim != 4:
        raise ValueError(f"labels_to_original expects (S, C, H, W) output, got shape {out.shape}")
    x_size, y_size, z_size = (int(v) for v in geometry.size)
    s, c, h, w = out.shape
    if s != z_size:
        raise ValueError(
            f"labels_to_original: output has {s} slices but the original grid has {z_size}; "
            "every slice must be predicted"
        )
    if c > 256:
        raise ValueError(f"labels_to_original: {c} channels do not fit a uint8 label map")
    plane = None if index_to_physical is None else plane_of(index_to_physical, geometry, (h, w))
    plain = plane is None or plane == (plain_axis(y_size, h), plain_axis(x_size, w))
    sampling = None if plain else _sampling_grid(plane, (h, w), (y_size, x_size))  # type: ignore[arg-type]
    result = np.empty((z_size, y_size, x_size), dtype=np.uint8)
    step = _chunk_slices(c, max(h, y_size), max(w, x_size))
    with torch.no_grad():
        for start in range(0, s, step):
            chunk = torch.from_numpy(np.ascontiguousarray(out[start : start + step], dtype=np.float32))
            prob = torch.softmax(chunk, dim=1)
            if sampling is not None:
                grid, outside = sampling
                prob = F.grid_sample(
                    prob, grid.expand(prob.shape[0], -1, -1, -1), mode="bilinear",
                    padding_mode="border", align_corners=False,
                )
            elif (h, w) != (y_size, x_size):
                prob = F.interpolate(prob, size=(y_size, x_size), mode="bilinear", align_corners=False)
            labels = channel_argmax(prob)
            if sampling is not None:
                labels[:, outside] = 0
            result[start : start + step] = labels.numpy()
    return result


def _sampling_grid(plane, cache_size, original_size) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.grid_sample``'s (1, Y, X, 2) grid of each original pixel's place on the cache slice
    (``align_corners=False`` units), and the (Y, X) mask of original pixels beyond the cache slice."""
    coords, beyond = [], []
    for (scale, offset), n_cache, n_orig in zip(plane, cache_size, original_size):
        u = (np.arange(n_orig) + 0.5 - offset) / scale  # original pixel centre, as a cache pixel-edge coordinate
        coords.append(torch.from_numpy(2.0 * u / n_cache - 1.0).float())
        beyond.append(torch.from_numpy((u < 0.0) | (u > n_cache)))
    rows, cols = coords
    grid = torch.stack(torch.broadcast_tensors(cols[None, :], rows[:, None]), dim=-1)[None]
    outside = beyond[0][:, None] | beyond[1][None, :]
    return grid, outside


def channel_argmax(prob: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 as uint8 (first maximum wins, like torch.argmax).

    A running comparison over the few channels: several times faster than
    ``argmax(dim=1)`` on (B, C, H, W), which reduces over a strided axis.
    """
    best = prob[:, 0].clone()
    label = torch.zeros(best.shape, dtype=torch.uint8)
    for c in range(1, prob.shape[1]):
        better = prob[:, c] > best
        best = torch.where(better, prob[:, c], best)
        label[better] = c
    return label


def resize_to(array: np.ndarray, size: Sequence[int], mode: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """Resize the last two axes of a (..., H, W) array to ``size`` = (H', W') with ``F.interpolate``.

    ``mode`` is any ``F.interpolate`` 2D mode ("bilinear", "nearest-exact",
    "bicubic", "area", ...); the interpolating modes use ``align_corners=False``.
    "nearest"/"nearest-exact" keep the dtype (exactly, for integers up to
    2**24); the other modes return float32. ``antialias`` applies to
    bilinear/bicubic when shrinking.
    """
    arr = np.asarray(array)
    if arr.ndim < 2:
        raise ValueError(f"resize_to expects at least 2 dimensions, got shape {arr.shape}")
    lead, (h, w) = arr.shape[:-2], arr.shape[-2:]
    new = (int(size[0]), int(size[1]))
    t = torch.from_numpy(np.ascontiguousarray(arr.reshape(-1, 1, h, w), dtype=np.float32))
    kwargs: dict = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": antialias}
    with torch.no_grad():
        res = F.interpolate(t, size=new, mode=mode, **kwargs).numpy().reshape(*lead, *new)
    if mode in ("nearest", "nearest-exact"):
        return res.astype(arr.dtype)
    return res.astype(np.float32, copy=False)
