"""The ``sdm`` task: signed distance maps of the organs, regressed next to segmentation.

This module owns everything about the maps (after Bischke et al. 2019, who
regress a distance transform next to the segmentation):

* **Encoding** (:func:`signed_distance`, :func:`scaled_sdm`): the signed
  distance of a boolean mask, computed in 3-D on the patient's *original* grid
  with its anisotropic spacing, clipped to ``[-clip_mm, clip_mm]`` and divided
  by ``clip_mm``. The exact definition is in :func:`signed_distance`. The
  Euclidean distance transforms are computed only in the mask's bounding box
  grown by ``clip_mm`` (:func:`grown_box`): everything farther is clipped
  anyway, so the result is identical to the full-volume transform (the test
  suite checks it) at a fraction of the cost.
* **The cache target** (:meth:`SignedDistance.prepare`): one channel per
  organ, resampled to the cache grid bilinearly (``CacheGrid.resample``).
* **Metrics** (:func:`band_mae_mm`, :func:`sign_dice`): the error in mm where
  the truth is not saturated, over all voxels, and the Dice of the signs.

Nothing here imports torch or scipy at module level: the CLI imports every
plugin when it starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from mtlbench.api import CacheGrid, DatasetInfo, EvalVolume, MetricInfo, Params, Patient, Picture, Target, Task

if TYPE_CHECKING:  # pragma: no cover
    import torch

TARGET = "sdm"
# Bilinear resampling of a saturated region gives 1 +- a few float32 ulps
# (0.99999994 ...); values this close to +-1 are snapped to exactly +-1 so
# that "saturated" (|t| == 1) and the metric band (|t| < 1) are well defined.
SNAP = 1e-6


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ----------------------------------------------------------------------------- encoding


def grown_box(mask: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float) -> tuple[slice, ...] | None:
    """The bounding box of ``mask``'s True voxels grown by ``margin_mm`` on every side, clipped to the array.

    Along axis a the box grows by ``ceil(margin_mm / spacing[a]) + 1`` voxels,
    so every voxel left outside it is more than ``margin_mm`` away (along that
    axis alone) from every True voxel. ``None`` for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    box = []
    for axis in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != axis)
        hit = np.flatnonzero(m.any(axis=other))
        grow = int(math.ceil(float(margin_mm) / float(spacing_zyx[axis]))) + 1
        box.append(slice(max(int(hit[0]) - grow, 0), min(int(hit[-1]) + 1 + grow, m.shape[axis])))
    return tuple(box)


def _signed_edt(mask: np.ndarray, sampling: tuple[float, ...]) -> np.ndarray:
    """``edt(~mask) - edt(mask)`` (float64, mm); -inf inside when the array holds no outside voxel."""
    from scipy import ndimage

    if mask.all():  # scipy's transform of an array without background is meaningless
        return np.full(mask.shape, -np.inf)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)  # 0 inside
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)  # 0 outside
    outside -= inside
    return outside


def signed_distance(
    mask: np.ndarray, spacing_zyx: Sequence[float], clip_mm: float | None = None, crop: bool = True
) -> np.ndarray:
    """The signed distance map (mm, float32) of a boolean (Z, Y, X) mask with voxel size ``spacing_zyx``.

    With voxel centres as points, D(x, A) the Euclidean distance in mm from
    the centre of voxel x to the nearest centre of a voxel of set A, and M
    the mask's voxels::

        sdm(x) = D(x, M)           > 0   for x outside the organ
        sdm(x) = -D(x, not M)      < 0   for x inside the organ

    i.e. ``edt(~mask) - edt(mask)`` with scipy's ``distance_transform_edt``
    and ``sampling=spacing_zyx``. No voxel is exactly 0: a voxel next to the
    organ surface has magnitude one voxel step, so the zero crossing of the
    linearly interpolated map lies halfway between the centres of an inside
    and an outside voxel -- on the voxel faces that bound the voxelised organ.
    Only voxels of the array count (nothing is assumed beyond its border).
    An empty mask gives +inf everywhere, a mask without outside voxels -inf.

    With ``clip_mm`` the map is clipped to ``[-clip_mm, clip_mm]``; then, with
    ``crop`` (the default), the transforms run only in :func:`grown_box` with
    margin ``clip_mm``, which gives exactly the same result: a voxel outside
    that box is more than ``clip_mm`` from the organ (clipped to +clip_mm), and
    every distance below ``clip_mm`` from a voxel in the box is realised by a
    voxel in the box. Without ``clip_mm`` the whole array is transformed.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"signed_distance expects a 3-D (z, y, x) mask, got shape {m.shape}")
    sampling = tuple(float(s) for s in spacing_zyx)
    if len(sampling) != 3 or not all(s > 0 and math.isfinite(s) for s in sampling):
        raise ValueError(f"spacing must be three positive numbers (z, y, x), got {tuple(spacing_zyx)}")
    far = math.inf if clip_mm is None else float(clip_mm)
    out = np.full(m.shape, far, dtype=np.float32)
    if clip_mm is not None and crop:
        box = grown_box(m, sampling, far)
    else:
        box = tuple(slice(0, n) for n in m.shape) if m.any() else None
    if box is None:
        return out
    d = _signed_edt(m[box], sampling)
    if clip_mm is not None:
        np.clip(d, -far, far, out=d)
    out[box] = d
    return out


def scaled_sdm(mask: np.ndarray, spacing_zyx: Sequence[float], clip_mm: float) -> np.ndarray:
    """``clip(signed_distance(mask), -clip_mm, clip_mm) / clip_mm``: float32 in [-1, 1] on the mask's grid."""
    out = signed_distance(mask, spacing_zyx, clip_mm)
    out /= np.float32(clip_mm)
    return out


def snap_saturated(values: np.ndarray, tol: float = SNAP) -> np.ndarray:
    """Clip to [-1, 1] in place and set values within ``tol`` of +-1 to exactly +-1."""
    np.clip(values, -1.0, 1.0, out=values)
    values[values >= 1.0 - tol] = 1.0
    values[values <= -1.0 + tol] = -1.0
    return values


# ----------------------------------------------------------------------------- metrics


def band_mae_mm(pred_mm: np.ndarray, truth_mm: np.ndarray, band: np.ndarray | None = None) -> float:
    """Mean of |pred - truth| (float64) over the voxels of ``band`` (all voxels when None); NaN if none."""
    p = np.asarray(pred_mm, dtype=np.float64)
    t = np.asarray(truth_mm, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: prediction {p.shape}, truth {t.shape}")
    err = np.abs(p - t)
    if band is not None:
        err = err[np.asarray(band, dtype=bool)]
    return float(err.mean()) if err.size else float("nan")


def sign_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of the negative (inside) voxels of two maps: 2|P & T| / (|P| + |T|); NaN when both are empty."""
    p, t = np.asarray(pred) < 0, np.asarray(truth) < 0
    total = int(p.sum()) + int(t.sum())
    return 2.0 * int(np.logical_and(p, t).sum()) / total if total else float("nan")


# ----------------------------------------------------------------------------- the task


class SdmParams(Params):
    clip_mm: float = Field(
        20.0,
        gt=0,
        allow_inf_nan=False,
        description="distances are clipped to [-clip_mm, clip_mm] and divided by clip_mm (target in [-1, 1])",
    )
    loss: Literal["l1", "mse"] = Field(
        "l1", description="l1: mean absolute error over the batch; mse: mean squared error"
    )
    organs: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="the organs to map, one channel each, in this order (default: all of data.organs)"
    )

    @field_validator("organs")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            twice = sorted({n for n in v if v.count(n) > 1})
            if twice:
                raise ValueError(f"organ {twice[0]!r} is listed twice")
        return v


class SignedDistance(Task):
    """Signed distance map regression: one channel per organ (``params.organs``, default ``data.organs``).

    Target ``sdm`` (S, C, H, W) float32, made once per patient at cache time:
    for each organ, :func:`signed_distance` of its mask on the original grid
    (negative inside, positive outside, mm, with the grid's anisotropic
    spacing), clipped to [-clip_mm, clip_mm], divided by clip_mm, resampled to
    the cache grid by ``CacheGrid.resample(..., "linear")`` and snapped
    (values within 1e-6 of +-1 become +-1). An organ the patient lacks, or
    with an empty mask, gives a channel of +1 (far outside everywhere), which
    is also what augmentation fills in outside the image.

    Output: the tail's raw output *is* the scaled map (no activation; the
    loss sees it as it is). Loss: ``l1`` (default), the mean of
    |output - target| over the batch, or ``mse``, the mean squared error.

    Metrics, per patient on its whole cache grid, with the predicted distance
    ``p = clip(output, -1, 1) * clip_mm`` and the true one ``t = target * clip_mm``:

    * ``mae_mm_<organ>``: mean |p - t| over the band where the truth is not
      saturated (|t| < clip_mm), since beyond it both are clipped; NaN when
      the band is empty (organ absent);
    * ``mae_mm``: the mean over organs of ``mae_mm_<organ>`` (NaNs left
      out); the main metric;
    * ``mae_mm_all``: mean |p - t| over every voxel of every organ channel;
    * ``sign_dice_<organ>`` and ``sign_dice_mean``: Dice of the regions
      p < 0 and t < 0 (the organ as the maps' zero level set on the cache
      grid); NaN when both are empty.

    The picture is the minimum over the organ channels (the map of the union
    of the organs where they do not touch), in mm.
    """

    name = "sdm"
    description = "signed distance maps of the organs (regression, L1/MSE): error in mm near the surfaces"
    kind = "regression"
    head = "conv"
    Params = SdmParams
    target_version = 1

    def __init__(self, params: SdmParams, info: DatasetInfo) -> None:
        super().__init__(params, info)
        self.params: SdmParams = params
        known = list(info.organs)
        for name in params.organs or []:
            if name not in known:
                from mtlbench.errors import ConfigError

                raise ConfigError(
                    f"params.organs: organ {name!r} is not in data.organs ({', '.join(known) or 'none'})"
                )

    def organs(self) -> list[str]:
        """The organ of each channel, in channel order."""
        return list(self.params.organs) if self.params.organs is not None else list(self.info.organs)

    # -- targets ---------------------------------------------------------------

    def targets(self) -> list[Target]:
        return [Target(TARGET, len(self.organs()), "float32", warp="linear", fill=1.0)]

    def target_settings(self) -> dict:
        # not the loss: changing it must not rebuild the cache
        return {"clip_mm": float(self.params.clip_mm), "organs": self.organs()}

    def prepare(self, patient: Patient, grid: CacheGrid) -> dict[str, np.ndarray]:
        from mtlbench.errors import DataError

        geometry = patient.geometry
        expected = tuple(reversed(geometry.size))
        spacing_zyx = tuple(reversed(geometry.spacing))
        organs = self.organs()
        out = np.ones((grid.shape[0], len(organs), grid.shape[1], grid.shape[2]), dtype=np.float32)
        for c, organ in enumerate(organs):  # one organ at a time: one original-grid volume in memory
            mask = patient.masks.get(organ)
            if mask is None:
                continue
            if tuple(np.shape(mask)) != expected:
                raise DataError(
                    f"patient {patient.id}: mask of {organ!r} has shape {tuple(np.shape(mask))}, expected {expected}"
                )
            if not np.any(mask):
                continue
            scaled = scaled_sdm(mask, spacing_zyx, self.params.clip_mm)
            out[:, c] = snap_saturated(grid.resample(scaled, "linear", fill=1.0))  # beyond the scan: far outside
        return {TARGET: out}

    # -- training ----------------------------------------------------------------

    def out_channels(self) -> int:
        return len(self.organs())

    def loss(self, output: "torch.Tensor", batch: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        import torch.nn.functional as F

        target = batch[TARGET].to(output.dtype)
        if self.params.loss == "mse":
            return F.mse_loss(output, target)
        return F.l1_loss(output, target)

    # -- evaluation --------------------------------------------------------------

    def metrics(self) -> dict[str, MetricInfo]:
        mm, dice = MetricInfo(higher_is_better=False, unit="mm"), MetricInfo(higher_is_better=True)
        out: dict[str, MetricInfo] = {}
        for organ in self.organs():
            out[f"mae_mm_{organ}"] = mm
        out["mae_mm"] = mm
        out["mae_mm_all"] = mm
        for organ in self.organs():
            out[f"sign_dice_{organ}"] = dice
        out["sign_dice_mean"] = dice
        return out

    def main_metric(self) -> str:
        return "mae_mm"

    def evaluate(self, volume: EvalVolume) -> dict[str, float]:
        pred, truth = self._pair(volume)
        clip = float(self.params.clip_mm)
        out: dict[str, float] = {}
        total, count = 0.0, 0
        for c, organ in enumerate(self.organs()):
            p = self._distance_mm(pred[:, c])
            t = truth[:, c].astype(np.float64) * clip
            out[f"mae_mm_{organ}"] = band_mae_mm(p, t, np.abs(truth[:, c]) < 1.0)
            err = np.abs(p - t)
            total, count = total + float(err.sum()), count + err.size
            out[f"sign_dice_{organ}"] = sign_dice(p, t)
        out["mae_mm"] = _nanmean([out[f"mae_mm_{o}"] for o in self.organs()])
        out["mae_mm_all"] = total / count if count else float("nan")
        out["sign_dice_mean"] = _nanmean([out[f"sign_dice_{o}"] for o in self.organs()])
        return out

    def pictures(self, volume: EvalVolume, index: int) -> list[Picture]:
        """True and predicted distance (mm) of the slice: the minimum over the organ channels."""
        pred, truth = self._pair(volume)
        clip = float(self.params.clip_mm)
        t = (truth[index].min(axis=0) * clip).astype(np.float32)
        p = self._distance_mm(pred[index]).min(axis=0).astype(np.float32)
        return [Picture("signed distance (mm)", "signed", t, p, unit="mm")]

    def _distance_mm(self, output: np.ndarray) -> np.ndarray:
        """The predicted distance in mm: the output clipped to [-1, 1] (as the truth is) times clip_mm."""
        return np.clip(np.asarray(output, dtype=np.float64), -1.0, 1.0) * float(self.params.clip_mm)

    def _pair(self, volume: EvalVolume) -> tuple[np.ndarray, np.ndarray]:
        """(output, cached target), both (S, C, H, W), checked to match."""
        pred = np.asarray(volume.output)
        truth = np.asarray(volume.targets[TARGET])
        n = len(self.organs())
        if pred.ndim != 4 or pred.shape[1] != n or pred.shape != truth.shape:
            raise ValueError(
                f"patient {volume.patient}: sdm output {pred.shape} does not match the cached maps "
                f"{truth.shape} (S, {n}, H, W)"
            )
        return pred, truth
