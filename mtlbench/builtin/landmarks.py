"""The built-in ``landmarks`` task: Gaussian heatmaps of landmarks, made at cache time, learned by regression.

Everything about heatmaps lives here, so that the core knows none of it:

* **Encoding** (:func:`gaussian_heatmaps`): landmark n is the Gaussian
  ``exp(-d^2 / (2 sigma^2))`` of the physical distance d (mm) from a voxel
  centre of the cache grid to its LPS position, so every blob is a sphere in
  patient space whatever the spacing or direction of the grid; it is computed
  only inside the index box holding the ball of radius ``truncate * sigma``
  (:func:`gaussian_box`). Channel g is the voxel-wise maximum over the
  landmarks of ``groups[g]``.
* **Heatmap RMSE** (:func:`heatmap_rmse`) is ``sqrt(mean((pred - ref) ** 2))``
  over every voxel of the patient's cache grid (the study's metric).
* **Decoding** (:func:`locate_landmarks`): in a channel holding k landmarks,
  the k highest local maxima (3x3x3 neighbourhood) are kept with greedy
  non-maximum suppression (a peak closer than ``radius_mm`` in physical space
  to a higher kept one is dropped), each is refined to sub-voxel precision
  with a 3-point parabola per axis (offset clipped to +-0.5 voxel) and mapped
  to LPS mm. Peaks are named by matching them to the reference positions with
  the assignment of minimum total distance
  (``scipy.optimize.linear_sum_assignment``), so a swap of two landmarks that
  share a channel is not counted as an error.

Other plugins may import these functions (e.g. a coordinate-regression task).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from mtlbench import hookimpl
from mtlbench.api import CacheGrid, EvalVolume, MetricInfo, Params, Patient, Picture, Target, Task
from mtlbench.data.grid import index_to_physical as index_to_physical_points
from mtlbench.data.grid import physical_to_index

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_NMS_RADIUS_MM = 15.0
DETECT_RADII_MM: tuple[int, ...] = (2, 4, 10)
_SLICES_PER_CHUNK = 16


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ----------------------------------------------------------------------------- encoding


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


# ----------------------------------------------------------------------------- metrics and decoding


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
    from scipy import ndimage

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


def decode_channel(
    channel: np.ndarray,
    k: int,
    index_to_physical: np.ndarray,
    radius_mm: float = DEFAULT_NMS_RADIUS_MM,
) -> np.ndarray:
    """(m, 3) LPS positions of the ``k`` strongest peaks of one (S, H, W) heatmap, highest first."""
    peaks = find_peaks_3d(channel, k, index_to_physical, radius_mm)
    return index_to_physical_points(refine_subvoxel(channel, peaks), index_to_physical).reshape(-1, 3)


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


# ----------------------------------------------------------------------------- the task


class LandmarkParams(Params):
    sigma_mm: float = Field(5.0, gt=0, description="standard deviation of each Gaussian blob in mm")
    truncate: float = Field(4.0, gt=0, description="each Gaussian is computed within truncate * sigma_mm of its landmark")
    groups: list[list[str]] | None = Field(
        None, description="the landmarks of each heatmap channel (default: all of data.landmarks in one channel)"
    )
    loss: Literal["rmse", "mse"] = Field("rmse", description="rmse: sqrt of the batch mean squared error (the study's)")
    foreground_weight: float = Field(
        1.0, ge=1.0, description="weight of a pixel is 1 + (foreground_weight - 1) * target: blobs count more than background"
    )

    @model_validator(mode="after")
    def _groups(self) -> "LandmarkParams":
        if self.groups is not None:
            if not self.groups or any(not g for g in self.groups):
                raise ValueError("groups must list at least one non-empty group of landmark names")
            names = [n for g in self.groups for n in g]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"groups: landmark {twice[0]!r} is in more than one channel")
        return self


class Landmarks(Task):
    """Landmark heatmap regression: one Gaussian map per channel (``params.groups``).

    Target ``heatmaps`` (S, C, H, W) float32, made at cache time from the
    patient's LPS landmarks (module docstring), warped bilinearly with 0
    outside. Loss: RMSE (sqrt of the mean squared error over the batch, the
    study's) or MSE. Metrics: ``rmse`` of the heatmaps over the patient's
    whole volume on the cache grid (the study's metric) at every evaluation;
    in the final evaluation also the localisation error in mm per landmark
    and its mean, and ``detect_<r>mm``, the fraction of the patient's
    landmarks found within r mm. Decoding: :func:`locate_landmarks`, so a
    left/right swap within one channel is not penalised. Ground-truth
    landmarks outside the cache grid cannot be localised and are left out
    (their error is NaN).
    """

    name = "landmarks"
    description = "landmark Gaussian heatmap regression: RMSE loss; heatmap RMSE, error in mm, detection rates"
    kind = "regression"
    head = "conv"
    Params = LandmarkParams
    nms_radius_mm: float = DEFAULT_NMS_RADIUS_MM

    def __init__(self, params: LandmarkParams, info) -> None:
        super().__init__(params, info)
        self.params: LandmarkParams = params
        known = list(info.landmarks)
        for g, members in enumerate(params.groups or []):
            for name in members:
                if name not in known:
                    from mtlbench.errors import ConfigError

                    raise ConfigError(
                        f"params.groups[{g}]: landmark {name!r} is not in data.landmarks ({', '.join(known) or 'none'})"
                    )

    def channel_groups(self) -> list[list[str]]:
        """The landmark names of each output channel (no channel when no landmark is configured)."""
        if self.params.groups is not None:
            return [list(g) for g in self.params.groups]
        return [list(self.info.landmarks)] if self.info.landmarks else []

    def targets(self) -> list[Target]:
        return [Target("heatmaps", len(self.channel_groups()), "float32", warp="linear", fill=0.0)]

    def target_settings(self) -> dict:
        return {
            "sigma_mm": self.params.sigma_mm,
            "truncate": self.params.truncate,
            "groups": self.channel_groups(),
        }

    def prepare(self, patient: Patient, grid: CacheGrid) -> dict[str, np.ndarray]:
        present = {lm.name: lm.position for lm in patient.landmarks}
        names = [n for n in self.info.landmarks if n in present]
        positions = np.array([present[n] for n in names], dtype=np.float64).reshape(-1, 3)
        index_groups = [[names.index(n) for n in members if n in names] for members in self.channel_groups()]
        maps = gaussian_heatmaps(
            grid.shape, grid.index_to_physical, positions, index_groups, self.params.sigma_mm, self.params.truncate
        )
        return {"heatmaps": np.ascontiguousarray(np.moveaxis(maps, 0, 1))}  # (S, C, H, W)

    def out_channels(self) -> int:
        return max(1, len(self.channel_groups()))

    def loss(self, output: "torch.Tensor", batch) -> "torch.Tensor":
        import torch.nn.functional as F

        target = batch["heatmaps"].to(output.dtype)
        if self.params.foreground_weight == 1.0:
            mse = F.mse_loss(output, target)
        else:  # a weighted mean: the same scale as the plain one when every weight is 1
            w = 1.0 + (self.params.foreground_weight - 1.0) * target
            mse = (w * (output - target) ** 2).sum() / w.sum()
        if self.params.loss == "mse":
            return mse
        return mse.clamp_min(1e-12).sqrt()  # the clamp keeps the gradient finite at a perfect fit

    def metrics(self) -> dict[str, MetricInfo]:
        out = {"rmse": MetricInfo(False, "", (0.0, None))}
        for name in self.info.landmarks:
            out[f"error_mm_{name}"] = MetricInfo(False, "mm", (0.0, None))
        out["error_mm_mean"] = MetricInfo(False, "mm", (0.0, None))
        for r in DETECT_RADII_MM:
            out[f"detect_{r}mm"] = MetricInfo(True, "", (0.0, 1.0))
        return out

    def main_metric(self) -> str:
        return "rmse"

    def evaluate(self, volume: EvalVolume) -> dict[str, float]:
        pred = self._channels_first(volume)
        ref = np.moveaxis(np.asarray(volume.targets["heatmaps"]), 1, 0)  # (C, S, H, W)
        if pred.shape != ref.shape:
            raise ValueError(
                f"patient {volume.patient}: landmark output {np.shape(volume.output)} (S, C, H, W) does not "
                f"match the cached heatmaps {np.shape(volume.targets['heatmaps'])} (S, C, H, W)"
            )
        out = {"rmse": heatmap_rmse(pred, ref)}
        if volume.final:
            out.update(self._localise(pred, volume))
        return out

    def export(self, volume: EvalVolume, out_dir: Path) -> list[Path]:
        """Write ``<patient>_landmarks.fcsv`` (LPS) with the decoded landmark positions.

        Landmarks the patient has a ground-truth position for (inside the grid)
        are decoded exactly as the final evaluation decodes them; channels with
        no such landmark are decoded without a reference (peaks named in group
        order by decreasing height). Landmarks without a peak are left out.
        """
        from mtlbench.api import Landmark
        from mtlbench.data.landmarks import write_fcsv

        pred = self._channels_first(volume)
        reference = self._reference(volume, pred.shape[1:])
        groups = self.channel_groups()
        found = locate_landmarks(pred, volume.index_to_physical, groups, reference, self.nms_radius_mm)
        rest = [[] if any(n in reference for n in g) else g for g in groups]
        found.update(locate_landmarks(pred, volume.index_to_physical, rest, None, self.nms_radius_mm))
        order = list(self.info.landmarks) + [n for n in found if n not in self.info.landmarks]
        points = [
            Landmark(n, tuple(float(v) for v in found[n])) for n in order if n in found and np.all(np.isfinite(found[n]))
        ]
        path = Path(out_dir) / f"{volume.patient}_landmarks.fcsv"
        write_fcsv(path, points)
        return [path]

    def pictures(self, volume: EvalVolume, index: int) -> list[Picture]:
        """The ground-truth and predicted heatmaps of the slice (maximum over channels)."""
        truth = np.asarray(volume.targets["heatmaps"][index])
        pred = np.asarray(volume.output[index])
        return [
            Picture(
                "landmark heatmap",
                "map",
                truth.max(axis=0).astype(np.float32) if truth.shape[0] else None,
                pred.max(axis=0).astype(np.float32) if pred.shape[0] else None,
            )
        ]

    def reference(self, volume: EvalVolume, train) -> dict[str, float]:
        """What no learning achieves on this patient: ``rmse`` of the all-zero map; the localisation
        metrics of the mean training position.

        The mean training position of a landmark is the mean over the training
        patients of its cache index with the slice as a fraction of the
        patient's slice range (rows and columns are on the same H x W grid for
        every patient), placed on this patient's grid and mapped to LPS.
        """
        ref = np.asarray(volume.targets["heatmaps"])
        out = {"rmse": heatmap_rmse(np.zeros_like(ref), ref)}
        guess = self._mean_position(volume, train)
        reference = self._reference(volume, tuple(volume.record.shape))
        errors = {n: float(np.linalg.norm(guess[n] - pos)) if n in guess else float("nan") for n, pos in reference.items()}
        out.update(self._summary(errors))
        return out

    def _mean_position(self, volume: EvalVolume, train) -> dict[str, np.ndarray]:
        rel: dict[str, list[np.ndarray]] = {}
        for rec in train:
            s = max(1, int(rec.shape[0]) - 1)
            for lm in rec.landmarks:
                idx = physical_to_index(lm.position, rec.index_to_physical)[0]
                rel.setdefault(lm.name, []).append(np.array([idx[0] / s, idx[1], idx[2]]))
        s = max(1, int(volume.record.shape[0]) - 1)
        out = {}
        for name, values in rel.items():
            m = np.mean(values, axis=0)
            out[name] = index_to_physical_points([[m[0] * s, m[1], m[2]]], volume.index_to_physical)[0]
        return out

    def _summary(self, errors: dict[str, float]) -> dict[str, float]:
        out = {f"error_mm_{name}": errors.get(name, float("nan")) for name in self.info.landmarks}
        values = list(errors.values())
        out["error_mm_mean"] = _nanmean(values)
        for r in DETECT_RADII_MM:
            # a NaN error (no peak found) counts as a miss
            out[f"detect_{r}mm"] = (
                float(np.mean([not math.isnan(e) and e <= r for e in values])) if values else float("nan")
            )
        return out

    def _channels_first(self, volume: EvalVolume) -> np.ndarray:
        """The output as (C, S, H, W), the layout the decoding works in."""
        output = np.asarray(volume.output)
        if output.ndim != 4:
            raise ValueError(f"patient {volume.patient}: landmark output must be (S, C, H, W), got {output.shape}")
        return np.moveaxis(output, 1, 0)[: len(self.channel_groups())]

    def _reference(self, volume: EvalVolume, grid_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The patient's ground-truth positions of the landmarks in a channel that lie inside the cache grid."""
        known = {n for g in self.channel_groups() for n in g} & set(self.info.landmarks)
        return {
            lm.name: np.asarray(lm.position, dtype=np.float64)
            for lm in volume.landmarks
            if lm.name in known and _inside(lm.position, volume.index_to_physical, grid_shape)
        }

    def _localise(self, pred: np.ndarray, volume: EvalVolume) -> dict[str, float]:
        reference = self._reference(volume, pred.shape[1:])
        found = locate_landmarks(pred, volume.index_to_physical, self.channel_groups(), reference, self.nms_radius_mm)
        errors = {
            name: float(np.linalg.norm(found[name] - pos)) if name in found else float("nan")
            for name, pos in reference.items()
        }
        return self._summary(errors)


def _inside(position, affine: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether an LPS point lies within the grid's extent (continuous index in [-0.5, n - 0.5])."""
    idx = physical_to_index(position, affine)[0]
    return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(shape[:3]) - 0.5))


@hookimpl
def register_tasks(register):
    register(Landmarks)
