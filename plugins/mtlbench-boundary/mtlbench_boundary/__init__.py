"""mtlbench plugin: organ-boundary detection as an auxiliary task.

The target is derived from the core's segmentation labels per batch, so the
task declares no cached target of its own: a pixel is on
the boundary when a (2 * thickness + 1)^2 neighbourhood holds both foreground
(any organ) and background. Loss: binary cross-entropy with logits (positive
pixels weighted by ``pos_weight``, since boundaries are rare). Metric: the
boundary F1 score over the patient's whole volume.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mtlbench import hookimpl
from mtlbench.api import EvalVolume, MetricInfo, Params, Task


class BoundaryParams(Params):
    thickness: Annotated[int, Field(ge=1, le=5)] = 1
    pos_weight: Annotated[float, Field(gt=0)] = 5.0


def boundary_map(labels, thickness: int):
    """Boolean boundary map of ``labels > 0``; labels is a torch tensor (B, H, W)."""
    import torch.nn.functional as F

    fg = (labels > 0).float().unsqueeze(1)
    k = 2 * thickness + 1
    dilated = F.max_pool2d(fg, k, stride=1, padding=thickness)
    eroded = -F.max_pool2d(-fg, k, stride=1, padding=thickness)
    return (dilated - eroded).squeeze(1) > 0


class BoundaryTask(Task):
    name = "boundary"
    description = "organ-boundary detection from the segmentation labels (auxiliary)"
    kind = "classification"
    head = "conv"
    Params = BoundaryParams

    def out_channels(self) -> int:
        return 1

    def loss(self, output, batch):
        import torch
        import torch.nn.functional as F

        edge = boundary_map(batch["labels"], self.params.thickness).float()
        weight = torch.tensor(self.params.pos_weight, device=output.device)
        return F.binary_cross_entropy_with_logits(output[:, 0], edge, pos_weight=weight)

    def metrics(self) -> dict[str, MetricInfo]:
        return {"f1": MetricInfo(higher_is_better=True)}

    def main_metric(self) -> str:
        return "f1"

    def evaluate(self, volume: EvalVolume) -> dict[str, float]:
        import torch

        edge = boundary_map(torch.from_numpy(volume.labels.astype("int64")), self.params.thickness).numpy()
        pred = volume.output[:, 0] > 0.0  # logit > 0 <=> probability > 0.5
        tp = float((pred & edge).sum())
        denom = float(pred.sum() + edge.sum())
        return {"f1": 2 * tp / denom if denom else float("nan")}


@hookimpl
def register_tasks(register):
    register(BoundaryTask)
