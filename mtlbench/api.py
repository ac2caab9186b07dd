"""The public plugin API: the data types and interfaces a plugin implements.

A plugin provides tasks, heads, strategies and dataset sources by calling the
``register`` callback of the matching hook (see ``mtlbench.hookspecs``) with a
*class* deriving from one of the bases below. mtlbench instantiates it with the
plugin's validated parameters (its ``Params`` pydantic model) when a run needs it.

Nothing here imports torch at module level, so listing plugins stays cheap;
torch types appear only in annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch
    from torch import nn

    from mtlbench.config import Config


class Params(BaseModel):
    """Base for a plugin's parameters: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in physical (LPS, mm) space, as SimpleITK sees it.

    ``size``, ``spacing`` and ``origin`` are in ITK index order (x, y, z);
    ``direction`` is the row-major 3x3 matrix of direction cosines.
    Arrays that go with a Geometry are in numpy order (z, y, x).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def index_to_physical(self) -> np.ndarray:
        """4x4 affine from numpy indices (k=z, j=y, i=x) to LPS millimetres."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        m = d * np.asarray(self.spacing, dtype=float)[None, :]  # columns: i, j, k
        a = np.eye(4)
        a[:3, 0] = m[:, 2]  # k (z)
        a[:3, 1] = m[:, 1]  # j (y)
        a[:3, 2] = m[:, 0]  # i (x)
        a[:3, 3] = self.origin
        return a

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        return cls(
            size=tuple(int(v) for v in d["size"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )


@dataclass(frozen=True)
class Landmark:
    """A named point in LPS physical coordinates (mm)."""

    name: str
    position: tuple[float, float, float]


@dataclass
class Patient:
    """One patient as a dataset source yields it, before preprocessing.

    ``image`` is float32 HU in numpy order (z, y, x) on ``geometry``'s grid;
    ``masks`` maps organ name -> bool array on the same grid (an organ absent
    from the data is absent from the dict); ``landmarks`` are LPS; ``files``
    names the files it came from (for error messages and cache keys).
    """

    id: str
    image: np.ndarray
    geometry: Geometry
    masks: dict[str, np.ndarray]
    landmarks: list[Landmark] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


class DatasetSource:
    """Reads patients from somewhere (files, a service, a generator).

    ``patient_ids`` must be cheap (no volume reads); ``load`` reads one patient;
    ``files`` lists every file that ``load`` would read, so the slice cache can
    be keyed by their content.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params, config: "Config") -> None:
        self.params = params
        self.config = config

    def patient_ids(self) -> list[str]:
        raise NotImplementedError

    def load(self, patient_id: str) -> Patient:
        raise NotImplementedError

    def files(self, patient_id: str) -> list[str]:
        raise NotImplementedError


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DatasetInfo:
    """What a task or head may need to know about the prepared data."""

    organs: tuple[str, ...]
    landmarks: tuple[str, ...]
    heatmap_channels: int
    slice_size: tuple[int, int]


@dataclass(frozen=True)
class MetricInfo:
    """How to read a metric: ``higher_is_better`` and its unit ('' if none)."""

    higher_is_better: bool
    unit: str = ""


@dataclass
class EvalVolume:
    """One test patient, handed to ``Task.evaluate``.

    ``output`` is the task's raw network output over all slices, numpy
    (slices, channels, H, W), float32. ``cache`` gives the patient's cached
    arrays (``labels``, ``heatmaps``), ``index_to_physical`` (4x4, cache index
    (slice, row, col) -> LPS mm), ``geometry`` (the original image grid),
    ``orig_labels`` (ground-truth label map on the original grid, numpy order)
    and ``landmarks`` (the patient's LPS landmarks).
    """

    patient: str
    output: np.ndarray
    labels: np.ndarray
    heatmaps: np.ndarray
    index_to_physical: np.ndarray
    geometry: Geometry
    orig_labels: np.ndarray
    landmarks: list[Landmark]
    organs: tuple[str, ...]
    final: bool = False


class Task:
    """A learning objective: targets, loss, metrics.

    ``target`` is the key of the batch tensor the task learns
    (``"labels"``: (B, H, W) int64, or ``"heatmaps"``: (B, C, H, W) float32).
    ``kind`` tells loss-weighting strategies whether the loss is
    classification-like or regression-like (uncertainty weighting uses it).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kind: ClassVar[Literal["classification", "regression"]]
    target: ClassVar[str]
    head: ClassVar[str] = "conv"
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params, info: DatasetInfo) -> None:
        self.params = params
        self.info = info

    def out_channels(self) -> int:
        raise NotImplementedError

    def loss(self, output: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        """Scalar loss of one batch (already reduced)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, MetricInfo]:
        """The metrics ``evaluate`` returns (aggregate names), with their direction."""
        raise NotImplementedError

    def main_metric(self) -> str:
        raise NotImplementedError

    def evaluate(self, volume: EvalVolume) -> dict[str, float]:
        """Metrics of one patient. ``volume.final`` asks for the expensive ones."""
        raise NotImplementedError

    def export(self, volume: EvalVolume, out_dir: "Path") -> list["Path"]:
        """Write this task's prediction for one patient as files a user opens (optional).

        ``mtlbench predict`` calls it with ``volume.final`` set; the built-in
        segmentation task writes ``<patient>_labels.nii.gz`` on the original
        grid, the landmark task ``<patient>_landmarks.fcsv``.
        """
        return []


class Head:
    """Builds a task's tail on top of the shared trunk's features."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params) -> None:
        self.params = params

    def build(self, in_channels: int, out_channels: int) -> "nn.Module":
        raise NotImplementedError


@dataclass
class StepContext:
    """What a strategy may use to turn one step's losses into gradients.

    ``shared_parameters`` are the trunk's parameters (for per-task gradient
    methods), ``task_parameters`` each tail's. ``step`` counts optimizer steps
    from 0 across epochs.
    """

    step: int
    epoch: int
    shared_parameters: list["torch.nn.Parameter"]
    task_parameters: dict[str, list["torch.nn.Parameter"]]
    task_kinds: dict[str, str]


class Strategy:
    """Turns the per-task losses of one step into parameter gradients.

    Per step the trainer asks ``tasks_for_step`` which losses to compute, runs
    the model, computes those losses and calls ``backward``. ``backward``
    must leave the gradients in ``.grad`` of the parameters to update (it may
    call ``loss.backward()``, or ``torch.autograd.grad`` per task and combine
    them, as PCGrad or GradNorm do) and returns what it logs for this step
    (weights used, which task, learned values) as floats / strings.
    The trainer then steps the optimizer. Parameters returned by
    ``parameters`` (e.g. learned log-variances) join the optimizer in their
    own group without weight decay; ``state_dict`` / ``load_state_dict`` carry
    any other state across checkpoints.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params, tasks: list[str], main_task: str) -> None:
        self.params = params
        self.all_tasks = list(tasks)
        self.main_task = main_task

    def model_tasks(self) -> list[str]:
        """The tasks whose tails the model needs (default: all)."""
        return list(self.all_tasks)

    def tasks_for_step(self, step: int) -> list[str]:
        """The tasks whose loss is computed this step (default: all model tasks)."""
        return self.model_tasks()

    def parameters(self) -> list["torch.nn.Parameter"]:
        return []

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


PLUGIN_KINDS: tuple[str, ...] = ("tasks", "heads", "strategies", "datasets")
BASES: dict[str, type] = {
    "tasks": Task,
    "heads": Head,
    "strategies": Strategy,
    "datasets": DatasetSource,
}

