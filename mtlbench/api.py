"""The public plugin API: the data types and interfaces a plugin implements.

A plugin provides tasks, heads, strategies and dataset sources by calling the
``register`` callback of the matching hook (see ``mtlbench.hookspecs``) with a
*class* deriving from one of the bases below. mtlbench instantiates it with the
plugin's validated parameters (its ``Params`` pydantic model) when a run needs it.

Nothing here imports torch or anything of mtlbench's at module level, so
listing plugins stays cheap and every other module may import this one; torch
types appear only in annotations. docs/plugins.md describes every member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch
    from torch import nn



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


@dataclass(frozen=True)
class SourceRequest:
    """What a run asks of a dataset source: which organs and landmarks, and how strict to be.

    ``organs`` and ``landmarks`` are ``data.organs`` and ``data.landmarks``;
    ``mask_mismatch`` ("error" or "resample") and ``geometry_tolerance`` (mm)
    say what to do with a mask whose grid differs from its image's.
    """

    organs: tuple[str, ...]
    landmarks: tuple[str, ...] = ()
    mask_mismatch: Literal["error", "resample"] = "error"
    geometry_tolerance: float = 1e-3


class DatasetSource:
    """Reads patients from somewhere (files, a service, a generator).

    ``patient_ids`` must be cheap (no volume reads); ``load`` reads one patient;
    ``files`` lists every file that ``load`` would read, so the slice cache can
    be keyed by their content.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params, request: SourceRequest) -> None:
        self.params = params
        self.request = request

    def patient_ids(self) -> list[str]:
        raise NotImplementedError

    def load(self, patient_id: str) -> Patient:
        raise NotImplementedError

    def files(self, patient_id: str) -> list[str]:
        raise NotImplementedError


# --------------------------------------------------------------------------- targets


WARPS: tuple[str, ...] = ("nearest", "linear", "points", "none")


@dataclass(frozen=True)
class Target:
    """One array a task learns from, computed once per patient by ``Task.prepare``.

    ``name`` is unique within the task (``"labels"`` and ``"image"`` are the
    core's). A per-slice target (``per_slice`` True, the default) lives on the
    cache grid, one entry per slice, and is batched for training; its shape
    per patient depends on ``warp``, which also says how augmentation moves it:

    * ``"nearest"`` (discrete maps) and ``"linear"`` (continuous maps):
      (S, channels, H, W), resampled by the batch's affine with nearest or
      bilinear interpolation; pixels that come from outside the slice get
      ``fill``;
    * ``"points"``: (S, channels, 2) in-plane positions (row, col) in cache
      pixel units (continuous; pixel centres are integers); the affine is
      applied to the coordinates; NaN marks an absent point and stays NaN;
    * ``"none"``: (S, channels), per-slice values that an in-plane affine does
      not change (e.g. "the landmark is within 5 mm of this slice").

    A per-patient target (``per_slice`` False) may have any shape (e.g. a map
    on the original image grid, or 3-D positions); it is not batched or
    augmented and comes back only at evaluation, in ``EvalVolume.targets``.
    ``dtype`` is a numpy dtype name; the arrays are stored in that dtype.
    """

    name: str
    channels: int
    dtype: str = "float32"
    warp: Literal["nearest", "linear", "points", "none"] = "linear"
    fill: float = 0.0
    per_slice: bool = True

    def slice_shape(self, slice_size: tuple[int, int]) -> tuple[int, ...]:
        """The shape of one slice's entry (per-slice targets only)."""
        if self.warp in ("nearest", "linear"):
            return (self.channels, int(slice_size[0]), int(slice_size[1]))
        if self.warp == "points":
            return (self.channels, 2)
        return (self.channels,)


@dataclass(frozen=True)
class CacheGrid:
    """The slice grid of one patient's cache entry, handed to ``Task.prepare``.

    ``shape`` is (S, H, W): the original volume's slices (numpy axis 0),
    each resampled in-plane to ``preprocess.slice_size`` pixels.
    ``index_to_physical`` maps a cache index (slice, row, col, 1) to LPS mm;
    ``geometry`` is the original image grid. Pixel centres are aligned: by
    default the whole slice is resized and cache pixel (r, c) is centred on
    original continuous index j = (r + 0.5) * Y / H - 0.5,
    i = (c + 0.5) * X / W - 0.5; with ``preprocess.spacing_mm`` the cache
    pixels have that size and the cache slice is centred on the image's
    (cropping or padding it). Use ``to_index``/``to_physical`` and
    ``resample`` rather than these formulas: they hold in both cases.
    """

    shape: tuple[int, int, int]
    index_to_physical: np.ndarray
    geometry: Geometry

    def resample(
        self, volume: np.ndarray, mode: Literal["linear", "nearest"] = "linear", fill: float = 0.0
    ) -> np.ndarray:
        """A (Z, Y, X) array on the original grid -> (S, H, W) on the cache grid.

        ``"linear"``: antialiased bilinear, float32 (the image's own resize);
        ``"nearest"``: centre-aligned nearest neighbour, dtype kept (the labels').
        Cache pixels beyond the original slice (a fixed ``preprocess.spacing_mm``
        whose field of view is larger than the image's) get ``fill``.
        """
        from mtlbench.data.grid import plane_of, resize_slices

        expected = tuple(reversed(self.geometry.size))
        if tuple(np.shape(volume)) != expected:
            raise ValueError(f"resample expects a volume of shape {expected} (z, y, x), got {np.shape(volume)}")
        plane = plane_of(self.index_to_physical, self.geometry, self.shape[1:])
        return resize_slices(volume, self.shape[1:], "nearest-exact" if mode == "nearest" else "bilinear", plane, fill)

    def to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS points (mm) -> (N, 3) continuous cache indices (slice, row, col)."""
        from mtlbench.data.grid import physical_to_index

        return physical_to_index(points_lps, self.index_to_physical)

    def to_physical(self, indices: np.ndarray) -> np.ndarray:
        """(N, 3) continuous cache indices (slice, row, col) -> (N, 3) LPS points (mm)."""
        from mtlbench.data.grid import index_to_physical

        return index_to_physical(indices, self.index_to_physical)

    def spacing(self) -> tuple[float, float, float]:
        """The physical size (mm) of one cache step along slice, row and col."""
        lin = np.asarray(self.index_to_physical, dtype=np.float64)[:3, :3]
        return tuple(float(v) for v in np.linalg.norm(lin, axis=0))  # type: ignore[return-value]


@dataclass
class CachedPatient:
    """One patient as the slice cache holds it (``mtlbench.data.cache.load_patient``).

    ``image`` (S, H, W) float32 and ``labels`` (S, H, W) uint8 (0 background,
    i = ``organs[i - 1]``) are on the cache grid; ``orig_labels`` (Z, Y, X)
    uint8 on the original grid ``geometry`` (the image's voxels in the canonical
    orientation, ``preprocess.orientation``); ``source_geometry`` is the grid
    of the image file itself when reorienting changed it (else None, see
    :meth:`to_source`); ``index_to_physical`` maps cache
    indices to LPS mm; ``landmarks`` are the configured ones the patient has;
    ``targets`` maps task label -> target name -> the arrays its
    ``Task.prepare`` returned. ``shape`` is the cache grid's (S, H, W); a
    record read without its arrays (``load_patient(..., arrays=False)``, as
    ``Task.reference`` receives the training patients) has empty ``image``,
    ``labels``, ``orig_labels`` and ``targets`` but everything else.
    """

    id: str
    image: np.ndarray
    labels: np.ndarray
    orig_labels: np.ndarray
    index_to_physical: np.ndarray
    geometry: Geometry
    landmarks: list[Landmark] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    targets: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    shape: tuple[int, int, int] | None = None
    source_geometry: Geometry | None = None

    def __post_init__(self) -> None:
        if self.shape is None:
            self.shape = tuple(int(v) for v in np.shape(self.image))  # type: ignore[assignment]

    def grid(self) -> CacheGrid:
        return CacheGrid(tuple(self.shape), self.index_to_physical, self.geometry)  # type: ignore[arg-type]

    def to_source(self, array: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """A (Z, Y, X) array on the original grid ``geometry`` -> the same voxels on the image file's own
        grid, and that grid: what a task's ``export`` writes, so files line up voxel for voxel with the input."""
        if self.source_geometry is None:
            return np.asarray(array), self.geometry
        from mtlbench.data.orient import between

        return np.ascontiguousarray(between(self.source_geometry, self.geometry).invert(array)), self.source_geometry


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DatasetInfo:
    """What a task or head may need to know about the data: the configured organs and landmarks, the slice size."""

    organs: tuple[str, ...]
    landmarks: tuple[str, ...]
    slice_size: tuple[int, int]


@dataclass(frozen=True)
class MetricInfo:
    """How to read a metric: ``higher_is_better``, its unit ('' if none) and its range.

    ``bounds`` (low, high; None for unbounded) is the range of possible
    values, e.g. (0, 1) for an overlap: the leaderboard's confidence
    intervals are clipped to it.
    """

    higher_is_better: bool
    unit: str = ""
    bounds: tuple[float | None, float | None] = (None, None)


@dataclass
class EvalVolume:
    """One test patient and one task's output, handed to ``Task.evaluate``, ``export`` and ``pictures``.

    ``output`` is the task's raw network output over all slices, numpy
    (S, channels, H, W) float32; ``targets`` are the task's own cached
    targets (what its ``prepare`` returned, per-slice ones as (S, ...));
    ``record`` is the whole cached patient, whose fields are also reachable
    directly (``volume.labels``, ``volume.geometry`` ...). ``final`` asks for
    the expensive metrics (original-grid resampling, surface distances).
    """

    record: CachedPatient
    output: np.ndarray
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    final: bool = False

    @property
    def patient(self) -> str:
        return self.record.id

    @property
    def image(self) -> np.ndarray:
        return self.record.image

    @property
    def labels(self) -> np.ndarray:
        return self.record.labels

    @property
    def orig_labels(self) -> np.ndarray:
        return self.record.orig_labels

    @property
    def geometry(self) -> Geometry:
        return self.record.geometry

    @property
    def index_to_physical(self) -> np.ndarray:
        return self.record.index_to_physical

    def to_source(self, array: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """See :meth:`CachedPatient.to_source`: an original-grid array on the image file's own grid."""
        return self.record.to_source(array)

    @property
    def landmarks(self) -> list[Landmark]:
        return self.record.landmarks


@dataclass(frozen=True)
class Picture:
    """One element of a trial's example figure, drawn by the report on one test slice.

    ``style`` says how: ``"labels"`` draws integer maps (H, W) over the CT
    (truth green, prediction red, both yellow); ``"map"`` draws two panels
    (truth, prediction) of a non-negative float map on one colour scale;
    ``"signed"`` the same with a diverging scale centred on 0; ``"points"``
    draws (K, 2) in-plane positions (row, col) over the CT (NaN rows
    skipped). ``truth`` or ``pred`` may be None. ``unit`` labels a colour bar.
    """

    title: str
    style: Literal["labels", "map", "signed", "points"]
    truth: np.ndarray | None = None
    pred: np.ndarray | None = None
    unit: str = ""


class Task:
    """A learning objective: its targets, loss, metrics and pictures.

    ``kind`` tells loss-weighting strategies whether the loss is
    classification-like or regression-like (uncertainty weighting uses it).
    A task that needs more than the core's segmentation labels declares its
    arrays in ``targets`` and computes them in ``prepare``, once per patient
    when the slice cache is built.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kind: ClassVar[Literal["classification", "regression"]]
    head: ClassVar[str] = "conv"
    Params: ClassVar[type[Params]] = Params
    # Bump when ``prepare`` computes something different for the same settings:
    # it is part of the slice cache's key.
    target_version: ClassVar[int] = 1

    def __init__(self, params: Params, info: DatasetInfo) -> None:
        self.params = params
        self.info = info

    def targets(self) -> list[Target]:
        """The arrays ``prepare`` returns (default: none; the core's ``labels`` are always there)."""
        return []

    def target_settings(self) -> dict[str, Any]:
        """What determines ``prepare``'s output, for the cache key (default: all of ``params``)."""
        return self.params.model_dump(mode="json")

    def prepare(self, patient: Patient, grid: CacheGrid) -> dict[str, np.ndarray]:
        """This patient's targets: {target name: array} in each ``Target``'s shape and dtype."""
        return {}

    def out_channels(self) -> int:
        raise NotImplementedError

    def loss(self, output: "torch.Tensor", batch: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        """Scalar loss of one batch (already reduced).

        ``output`` is the tail's (B, channels, H, W); ``batch`` holds
        ``"labels"`` (B, H, W) int64 and this task's per-slice targets by
        name, augmented, as (B, ...) tensors on the training device.
        """
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

    def pictures(self, volume: EvalVolume, index: int) -> list[Picture]:
        """What the report shows of this task on slice ``index`` of a test patient (optional)."""
        return []

    def combine(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """One output from several models' outputs for the same volume, for ``predict``'s fold ensemble.

        Each is this task's raw model output over a patient's slices, (S, C, H, W).
        The default is the mean; a classification task averages probabilities
        instead (the built-in segmentation returns the log of the mean softmax,
        so whatever reads logits reads the ensemble unchanged).
        """
        return np.mean(np.stack([np.asarray(o, dtype=np.float32) for o in outputs]), axis=0)

    def reference(self, volume: EvalVolume, train: Sequence[CachedPatient]) -> dict[str, float]:
        """Metrics of a trivial predictor on this test patient, for the metrics it applies to (optional).

        Called in the final evaluation beside ``evaluate``, so every learned
        metric can be shown next to what no learning achieves (an all-zero
        map, the mean training position). ``train`` holds the trial's
        training patients without their arrays (``shape``, ``geometry``,
        ``index_to_physical`` and ``landmarks`` only), for data-derived guesses.
        """
        return {}


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
    from 0 across epochs, ``epoch`` from 0. ``features`` is the trunk's output
    for this batch (B, C, H, W), the shared representation every tail reads:
    Jacobian methods can differentiate the losses with respect to it instead
    of every trunk parameter (as torchjd's ``mtl_backward`` does).
    ``last_shared_parameters`` are the parameters of the trunk's last layers,
    the ones that produce ``features`` (GradNorm measures gradient norms
    there). ``loss_history`` holds one ``{task: mean training loss}`` per
    finished epoch, oldest first (DWA, early stopping).
    """

    step: int
    epoch: int
    shared_parameters: list["torch.nn.Parameter"]
    task_parameters: dict[str, list["torch.nn.Parameter"]]
    task_kinds: dict[str, str]
    features: "torch.Tensor | None" = None
    last_shared_parameters: list["torch.nn.Parameter"] = field(default_factory=list)
    loss_history: list[dict[str, float]] = field(default_factory=list)


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
    own group without weight decay (it may also return param-group dicts,
    ``{"params": [...], "lr": 0.05}``, for their own learning rate); ``state_dict`` / ``load_state_dict`` carry
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

    def parameters(self) -> list[Any]:
        return []

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, loss_history: list[dict[str, float]]) -> dict[str, Any]:
        """Called after every epoch with the finished epochs' mean training losses; returns what to log.

        For methods that decide per epoch (e.g. stopping an auxiliary task
        whose training loss has stopped improving).
        """
        return {}

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

