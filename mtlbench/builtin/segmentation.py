"""The built-in ``segmentation`` task: organ label maps learned with cross entropy (+ soft Dice), scored by IoU, Dice, HD95 and NSD."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from mtlbench import hookimpl
from mtlbench.api import DatasetInfo, EvalVolume, MetricInfo, Params, Picture, Task

if TYPE_CHECKING:  # pragma: no cover
    import torch

def _nanmean(values: list[float]) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ----------------------------------------------------------------------------- segmentation


class SegmentationParams(Params):
    dice_weight: float = Field(0.0, ge=0, description="weight of the soft Dice loss added to cross entropy")
    hd95: bool = Field(True, description="compute HD95 (mm) in the final evaluation")
    hd95_convention: Literal["pooled", "max_directed"] = Field(
        "max_directed",
        description="HD95 as the larger of the two directed 95th percentiles (MONAI, Metrics Reloaded; the default) "
        "or of both directions' surface distances pooled (medpy)",
    )
    nsd_tolerance_mm: float | None = Field(
        None, gt=0, description="compute NSD (normalised surface Dice) at this tolerance in mm in the final evaluation; none = no NSD"
    )


class Segmentation(Task):
    """Organ segmentation: per-pixel classes 0 (background) and 1..n (``data.organs``).

    It learns the core's ``labels`` (every run has them), so it declares no
    target of its own. Loss: pixel-wise cross entropy (the study's), plus ``dice_weight`` times a
    soft Dice loss: 1 - mean over organs of (2 sum(p g) + 1) / (sum p + sum g + 1),
    sums over the whole batch, p the softmax probability and g the one-hot target.
    Evaluation during training (``final`` False): volumetric IoU and Dice per
    organ on the cache grid. Final evaluation: the output is resampled to the
    original grid (``engine.resample.labels_to_original``) and compared with the
    original label map: IoU, Dice and, with ``hd95``, HD95 in mm per organ
    (``hd95_convention``), with ``nsd_tolerance_mm``, NSD at that tolerance per
    organ (definitions in ``engine.metrics``; both read one surface-distance
    computation per organ). Both-empty organs give NaN and are left out of the
    means (HD95 also when only one mask is empty; NSD is then 0).
    """

    name = "segmentation"
    description = "organ segmentation: cross entropy (+ optional soft Dice); IoU, Dice, HD95 (+ optional NSD) per organ"
    kind = "classification"
    head = "conv"
    Params = SegmentationParams

    def __init__(self, params: SegmentationParams, info: DatasetInfo) -> None:
        super().__init__(params, info)
        self.params: SegmentationParams = params

    def out_channels(self) -> int:
        return len(self.info.organs) + 1

    def loss(self, output: "torch.Tensor", batch) -> "torch.Tensor":
        import torch.nn.functional as F

        target = batch["labels"].long()
        loss = F.cross_entropy(output, target)
        if self.params.dice_weight > 0:
            loss = loss + self.params.dice_weight * soft_dice_loss(output, target)
        return loss

    def metrics(self) -> dict[str, MetricInfo]:
        out: dict[str, MetricInfo] = {}
        for kind in ["iou", "dice"] + self._surface_kinds():
            info = MetricInfo(False, "mm", (0.0, None)) if kind == "hd95" else MetricInfo(True, "", (0.0, 1.0))
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

        pred = labels_to_original(output, volume.geometry, volume.index_to_physical)
        ref = np.asarray(volume.orig_labels)
        if pred.shape != ref.shape:
            raise ValueError(
                f"patient {volume.patient}: original label map has shape {ref.shape}, geometry gives {pred.shape}"
            )
        surface: dict[str, dict[int, float]] = {kind: {} for kind in self._surface_kinds()}
        if surface:
            spacing_zyx = tuple(reversed(volume.geometry.spacing))
            for i in range(1, n + 1):
                d = metrics.surface_distances_of(pred == i, ref == i, spacing_zyx)  # shared by HD95 and NSD
                if "hd95" in surface:
                    surface["hd95"][i] = d.hd95(self.params.hd95_convention)
                if "nsd" in surface:
                    surface["nsd"][i] = d.nsd(self.params.nsd_tolerance_mm)
        return self._scores(metrics.overlap(pred, ref, n), surface)

    def export(self, volume: EvalVolume, out_dir: Path) -> list[Path]:
        """Write ``<patient>_labels.nii.gz``: the predicted label map (uint8) on the image file's own grid.

        It is the map the final evaluation scores (``labels_to_original``), put back
        into the image's own index order (``EvalVolume.to_source``).
        """
        from mtlbench.data.io import write_volume
        from mtlbench.engine.resample import labels_to_original

        path = Path(out_dir) / f"{volume.patient}_labels.nii.gz"
        on_grid = labels_to_original(np.asarray(volume.output), volume.geometry, volume.index_to_physical)
        labels, geometry = volume.to_source(on_grid)
        write_volume(path, labels, geometry, np.uint8)
        return [path]

    def combine(self, outputs) -> np.ndarray:
        """The fold ensemble: log of the mean of the models' softmax probabilities (nnU-Net averages
        probabilities too); as logits, softmax gives back the mean probabilities."""
        probs = None
        for out in outputs:
            logits = np.asarray(out, dtype=np.float32)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            probs = p if probs is None else probs + p
        return np.log(np.maximum(probs / len(outputs), np.finfo(np.float32).tiny))

    def pictures(self, volume: EvalVolume, index: int) -> list[Picture]:
        """Ground-truth and predicted organ labels of the slice, drawn over the CT."""
        pred = np.asarray(volume.output[index]).argmax(axis=0).astype(np.uint8)
        return [Picture("organs", "labels", np.asarray(volume.labels[index], dtype=np.uint8), pred)]

    def _surface_kinds(self) -> list[str]:
        """The surface-distance metrics of the final evaluation: ``hd95`` and/or ``nsd``."""
        return (["hd95"] if self.params.hd95 else []) + (["nsd"] if self.params.nsd_tolerance_mm is not None else [])

    def _scores(self, ov: dict[int, tuple[float, float]], surface: dict[str, dict[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, organ in enumerate(self.info.organs, start=1):
            out[f"iou_{organ}"], out[f"dice_{organ}"] = ov[i]
            for kind, values in surface.items():
                out[f"{kind}_{organ}"] = values[i]
        for kind in ["iou", "dice"] + list(surface):
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


@hookimpl
def register_tasks(register):
    register(Segmentation)
