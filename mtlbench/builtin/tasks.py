"""The built-in tasks ``segmentation`` and ``landmarks`` (losses, metrics, evaluation), registered through ``register_tasks``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from mtlbench import hookimpl
from mtlbench.api import DatasetInfo, EvalVolume, MetricInfo, Params, Task

if TYPE_CHECKING:  # pragma: no cover
    import torch

DETECT_RADII_MM: tuple[int, ...] = (2, 4, 10)


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ----------------------------------------------------------------------------- segmentation


class SegmentationParams(Params):
    dice_weight: float = Field(0.0, ge=0, description="weight of the soft Dice loss added to cross entropy")
    hd95: bool = Field(True, description="compute HD95 (mm) in the final evaluation")


class Segmentation(Task):
    """Organ segmentation: per-pixel classes 0 (background) and 1..n (``data.organs``).

    Loss: pixel-wise cross entropy (the study's), plus ``dice_weight`` times a
    soft Dice loss: 1 - mean over organs of (2 sum(p g) + 1) / (sum p + sum g + 1),
    sums over the whole batch, p the softmax probability and g the one-hot target.
    Evaluation during training (``final`` False): volumetric IoU and Dice per
    organ on the cache grid. Final evaluation: the output is resampled to the
    original grid (``engine.resample.labels_to_original``) and compared with the
    original label map: IoU, Dice and, with ``hd95``, HD95 in mm per organ
    (definitions in ``engine.metrics``). Both-empty organs give NaN and are left
    out of the means.
    """

    name = "segmentation"
    description = "organ segmentation: cross entropy (+ optional soft Dice); IoU, Dice, HD95 per organ"
    kind = "classification"
    target = "labels"
    head = "conv"
    Params = SegmentationParams

    def __init__(self, params: SegmentationParams, info: DatasetInfo) -> None:
        super().__init__(params, info)
        self.params: SegmentationParams = params

    def out_channels(self) -> int:
        return len(self.info.organs) + 1

    def loss(self, output: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        target = target.long()
        loss = F.cross_entropy(output, target)
        if self.params.dice_weight > 0:
            loss = loss + self.params.dice_weight * soft_dice_loss(output, target)
        return loss

    def metrics(self) -> dict[str, MetricInfo]:
        out: dict[str, MetricInfo] = {}
        kinds = ["iou", "dice"] + (["hd95"] if self.params.hd95 else [])
        for kind in kinds:
            info = MetricInfo(False, "mm") if kind == "hd95" else MetricInfo(True)
            for organ in self.info.organs:
                out[f"{kind}_{organ}"] = info
            out[f"{kind}_mean"] = info
        return out

    def main_metric(self) -> str:
        return "iou_mean"

    def evaluate(self, volume: EvalVolume) -> dict[str, float]:
        from mtlbench.engine import metrics

        output = np.asarray(volume.output)
        n = len(self.info.organs)
        if output.ndim != 4 or output.shape[1] != n + 1:
            raise ValueError(
                f"patient {volume.patient}: segmentation output must be (S, {n + 1}, H, W), got {output.shape}"
            )
        if not volume.final:
            pred = output.argmax(axis=1).astype(np.uint8)
            return self._scores(metrics.overlap(pred, volume.labels, n), {})
        from mtlbench.engine.resample import labels_to_original

        pred = labels_to_original(output, volume.geometry)
        ref = np.asarray(volume.orig_labels)
        if pred.shape != ref.shape:
            raise ValueError(
                f"patient {volume.patient}: original label map has shape {ref.shape}, geometry gives {pred.shape}"
            )
        hd: dict[int, float] = {}
        if self.params.hd95:
            spacing_zyx = tuple(reversed(volume.geometry.spacing))
            hd = {i: metrics.hd95(pred == i, ref == i, spacing_zyx) for i in range(1, n + 1)}
        return self._scores(metrics.overlap(pred, ref, n), hd)

    def export(self, volume: EvalVolume, out_dir: Path) -> list[Path]:
        """Write ``<patient>_labels.nii.gz``: the predicted label map on the original grid (uint8).

        It is the same map the final evaluation scores (``labels_to_original``).
        """
        from mtlbench.data.io import write_volume
        from mtlbench.engine.resample import labels_to_original

        path = Path(out_dir) / f"{volume.patient}_labels.nii.gz"
        write_volume(path, labels_to_original(np.asarray(volume.output), volume.geometry), volume.geometry, np.uint8)
        return [path]

    def _scores(self, ov: dict[int, tuple[float, float]], hd: dict[int, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, organ in enumerate(self.info.organs, start=1):
            out[f"iou_{organ}"], out[f"dice_{organ}"] = ov[i]
            if hd:
                out[f"hd95_{organ}"] = hd[i]
        for kind in ["iou", "dice"] + (["hd95"] if hd else []):
            out[f"{kind}_mean"] = _nanmean([out[f"{kind}_{o}"] for o in self.info.organs])
        return out


def soft_dice_loss(output: "torch.Tensor", target: "torch.Tensor", smooth: float = 1.0) -> "torch.Tensor":
    """1 - mean over organ classes 1..C-1 of the batch soft Dice (see :class:`Segmentation`)."""
    import torch
    import torch.nn.functional as F

    prob = torch.softmax(output, dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), output.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()


# ----------------------------------------------------------------------------- landmarks


class LandmarkParams(Params):
    loss: Literal["rmse", "mse"] = Field("rmse", description="rmse: sqrt of the batch mean squared error (the study's)")


class Landmarks(Task):
    """Landmark heatmap regression: one Gaussian map per channel (``preprocess.landmark_groups``).

    Loss: RMSE (sqrt of the mean squared error over the batch, the study's) or
    MSE. Metrics: ``rmse`` of the heatmaps over the patient's whole volume on
    the cache grid (the study's metric) at every evaluation; in the final
    evaluation also the localisation error in mm per landmark and its mean, and
    ``detect_<r>mm``, the fraction of the patient's landmarks found within r mm.

    Which channel holds which landmarks: the engine sets ``task.groups`` to the
    cache's ``heatmap_groups`` (list of name lists, one per channel) right after
    constructing the task; ``None`` means every landmark is in channel 0.
    Decoding (``engine.metrics.locate_landmarks``): in a channel with k of the
    patient's landmarks the k highest local maxima are kept with 15 mm
    non-maximum suppression, refined to sub-voxel precision and named by the
    assignment to the ground-truth positions with minimum total distance
    (Hungarian matching), so a left/right swap within one channel is not
    penalised. Ground-truth landmarks outside the cache grid cannot be
    localised and are left out (their error is NaN).
    """

    name = "landmarks"
    description = "landmark Gaussian heatmap regression: RMSE loss; heatmap RMSE, error in mm, detection rates"
    kind = "regression"
    target = "heatmaps"
    head = "conv"
    Params = LandmarkParams
    nms_radius_mm: float = 15.0

    def __init__(self, params: LandmarkParams, info: DatasetInfo) -> None:
        super().__init__(params, info)
        self.params: LandmarkParams = params
        self.groups: list[list[str]] | None = None

    def out_channels(self) -> int:
        return int(self.info.heatmap_channels)

    def loss(self, output: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        mse = F.mse_loss(output, target.to(output.dtype))
        if self.params.loss == "mse":
            return mse
        return mse.clamp_min(1e-12).sqrt()  # the clamp keeps the gradient finite at a perfect fit

    def metrics(self) -> dict[str, MetricInfo]:
        out = {"rmse": MetricInfo(False)}
        for name in self.info.landmarks:
            out[f"error_mm_{name}"] = MetricInfo(False, "mm")
        out["error_mm_mean"] = MetricInfo(False, "mm")
        for r in DETECT_RADII_MM:
            out[f"detect_{r}mm"] = MetricInfo(True)
        return out

    def main_metric(self) -> str:
        return "rmse"

    def channel_groups(self) -> list[list[str]]:
        """The landmark names of each output channel (``self.groups``, default all in channel 0)."""
        if self.groups is None:
            return [list(self.info.landmarks)]
        return [list(g) for g in self.groups]

    def evaluate(self, volume: EvalVolume) -> dict[str, float]:
        from mtlbench.engine import metrics

        pred = self._channels_first(volume)
        ref = np.asarray(volume.heatmaps)  # cache layout (C, S, H, W)
        if pred.shape != ref.shape:
            raise ValueError(
                f"patient {volume.patient}: landmark output {np.shape(volume.output)} (S, C, H, W) does not "
                f"match the cached heatmaps {ref.shape} (C, S, H, W)"
            )
        out = {"rmse": metrics.heatmap_rmse(pred, ref)}
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
        from mtlbench.engine import metrics

        pred = self._channels_first(volume)
        reference = self._reference(volume, pred.shape[1:])
        groups = self.channel_groups()
        found = metrics.locate_landmarks(pred, volume.index_to_physical, groups, reference, self.nms_radius_mm)
        rest = [[] if any(n in reference for n in g) else g for g in groups]
        found.update(metrics.locate_landmarks(pred, volume.index_to_physical, rest, None, self.nms_radius_mm))
        order = list(self.info.landmarks) + [n for n in found if n not in self.info.landmarks]
        points = [
            Landmark(n, tuple(float(v) for v in found[n])) for n in order if n in found and np.all(np.isfinite(found[n]))
        ]
        path = Path(out_dir) / f"{volume.patient}_landmarks.fcsv"
        write_fcsv(path, points)
        return [path]

    def _channels_first(self, volume: EvalVolume) -> np.ndarray:
        """The output as (C, S, H, W) (the cache's heatmap layout)."""
        output = np.asarray(volume.output)
        if output.ndim != 4:
            raise ValueError(f"patient {volume.patient}: landmark output must be (S, C, H, W), got {output.shape}")
        return np.moveaxis(output, 1, 0)

    def _reference(self, volume: EvalVolume, grid_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The patient's ground-truth positions of the landmarks in a channel that lie inside the cache grid."""
        known = {n for g in self.channel_groups() for n in g} & set(self.info.landmarks)
        return {
            lm.name: np.asarray(lm.position, dtype=np.float64)
            for lm in volume.landmarks
            if lm.name in known and _inside(lm.position, volume.index_to_physical, grid_shape)
        }

    def _localise(self, pred: np.ndarray, volume: EvalVolume) -> dict[str, float]:
        from mtlbench.engine import metrics

        reference = self._reference(volume, pred.shape[1:])
        found = metrics.locate_landmarks(
            pred, volume.index_to_physical, self.channel_groups(), reference, self.nms_radius_mm
        )
        errors = {
            name: float(np.linalg.norm(found[name] - pos)) if name in found else float("nan")
            for name, pos in reference.items()
        }
        out = {f"error_mm_{name}": errors.get(name, float("nan")) for name in self.info.landmarks}
        values = list(errors.values())
        out["error_mm_mean"] = _nanmean(values)
        for r in DETECT_RADII_MM:
            # a NaN error (no peak found) counts as a miss
            out[f"detect_{r}mm"] = (
                float(np.mean([not math.isnan(e) and e <= r for e in values])) if values else float("nan")
            )
        return out


def _inside(position, affine: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether an LPS point lies within the grid's extent (continuous index in [-0.5, n - 0.5])."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    idx = inv[:3, :3] @ np.asarray(position, dtype=np.float64) + inv[:3, 3]
    return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(shape[:3]) - 0.5))


@hookimpl
def register_tasks(register):
    register(Segmentation)
    register(Landmarks)


__all__ = ["Landmarks", "Segmentation", "soft_dice_loss"]
