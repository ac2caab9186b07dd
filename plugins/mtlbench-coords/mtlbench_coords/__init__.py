"""mtlbench plugin: direct landmark coordinate regression (task ``landmark_coords``).

Instead of Gaussian heatmaps the tail predicts where each landmark is. For the
task's landmarks ``l = 0 .. L-1`` (``params.landmarks``, default all of
``data.landmarks``) the tail has ``2 L`` output channels:

* channel ``2 l``: a spatial logit map. Its softmax over the H x W pixels of a
  slice is a probability map whose expectation is the predicted in-plane
  position (row, col) of landmark l on that slice, in cache pixel units with
  pixel centres at integers, so in [0, H-1] x [0, W-1] (differentiable
  soft-argmax, as in DSNT, Nibali et al. 2018): :func:`soft_argmax`.
* channel ``2 l + 1``: a presence map. Its spatial mean is the logit that the
  landmark lies within ``radius_mm`` of this slice: :func:`presence_logits`.

Targets (made by ``prepare`` from the patient's LPS landmarks, l in task order):

* ``points`` (S, L, 2) float32, warp "points": the landmark's continuous cache
  index (row, col) from ``CacheGrid.to_index`` (the same on every slice: the
  slice coordinate is simply dropped); NaN for a landmark the patient lacks.
* ``near`` (S, L) float32, warp "none": 1 where the landmark's distance to the
  plane of slice s, ``|s - s_l| * dz`` with ``dz`` the distance between
  neighbouring slice planes (:func:`slice_plane_distance`, the slice spacing on
  an orthogonal grid), is <= ``radius_mm`` (relative tolerance 1e-9) and its
  in-plane position lies inside the slice (row in [-0.5, H-0.5], col in
  [-0.5, W-0.5]); 0 otherwise, and 0 for a landmark the patient lacks.
  A hard indicator, not a Gaussian.
* ``positions`` (L, 3) float64, per patient: LPS mm, NaN rows for absent landmarks.

Loss of a batch (B slices; after augmentation): with ``v[b,l]`` = the target
point is finite and inside the slice, ``w[b,l] = near[b,l] * v[b,l]``,

* coordinate term ``sum(w * d) / max(sum(w), 1e-12)`` where ``d`` is the L1
  distance in pixels ``|dr| + |dc|`` between soft-argmax and target point
  (``loss = "smooth_l1"``: the sum over row and col of smooth-L1 with beta = 1
  pixel). It is 0 (and still part of the graph) when no landmark is near.
* presence term ``presence_weight * mean(BCE-with-logits(presence, w))``: the
  presence target is ``near`` switched off where augmentation moved the point
  out of the slice.

Decoding (evaluation, export), per landmark: ``p_s = sigmoid(presence_s)``;
``k = floor(radius_mm / dz)`` (the half-width, in slices, of the ``near``
window); ``s*`` = the centre of the window of 2k+1 slices with the largest sum of
``p`` (first on ties); the estimate is the ``p``-weighted mean of the cache
index ``(s, row_s, col_s)`` over the slices of that window (``row_s, col_s``
the soft-argmax on slice s), mapped to LPS with ``index_to_physical``. When
those weights sum below 1e-6 the single slice of highest ``p`` is used. The
window makes one spurious slice far from the landmark harmless.

Metrics per test patient: ``error_mm_<name>`` = Euclidean distance (mm) between
estimate and truth, NaN for a landmark the patient lacks or whose truth lies
outside the cache grid (continuous index outside [-0.5, n-0.5] on any axis);
``error_mm_mean`` their mean over the finite ones; ``detect_<r>mm`` for r in
(2, 4, 10) the fraction of the evaluated landmarks with error <= r mm (NaN when
none is evaluated). The same metrics at final and non-final evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping

import numpy as np
from pydantic import Field, field_validator

from mtlbench import hookimpl
from mtlbench.api import CacheGrid, EvalVolume, Landmark, MetricInfo, Params, Patient, Picture, Target, Task
from mtlbench.builtin.landmarks import DETECT_RADII_MM
from mtlbench.data.grid import index_to_physical as index_to_physical_points
from mtlbench.data.grid import physical_to_index

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CoordParams",
    "LandmarkCoords",
    "decode_landmarks",
    "presence_logits",
    "slice_plane_distance",
    "soft_argmax",
    "soft_argmax_np",
]

#: Relative tolerance of the ``near`` test, so a landmark exactly radius_mm away is near despite rounding.
RADIUS_RTOL = 1e-9
#: Below this total presence weight the decoder falls back to the single most confident slice.
MIN_WEIGHT = 1e-6


# ----------------------------------------------------------------------------- geometry and soft-argmax


def slice_plane_distance(index_to_physical: np.ndarray) -> float:
    """Distance (mm) between the planes of neighbouring slices of a cache grid.

    The plane of slice s is spanned by the row and col axes; its unit normal is
    ``n = a_r x a_c / |a_r x a_c|`` (``a_*`` the affine's columns) and one slice
    step moves ``|n . a_s|`` mm along it. On an orthogonal grid this is the
    slice spacing; on a sheared one it is smaller than ``|a_s|``.
    """
    lin = np.asarray(index_to_physical, dtype=np.float64)[:3, :3]
    normal = np.cross(lin[:, 1], lin[:, 2])
    return abs(float(normal @ lin[:, 0])) / float(np.linalg.norm(normal))


def soft_argmax(logits: "torch.Tensor") -> "torch.Tensor":
    """(..., H, W) logit maps -> (..., 2) expected (row, col) of their spatial softmax, in pixels.

    Computed in float32 (or the input's wider float type); pixel centres are integers.
    """
    import torch

    h, w = logits.shape[-2:]
    x = logits if logits.dtype == torch.float64 else logits.float()
    prob = torch.softmax(x.reshape(*x.shape[:-2], h * w), dim=-1).reshape(x.shape)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    row = (prob.sum(dim=-1) * rows).sum(dim=-1)
    col = (prob.sum(dim=-2) * cols).sum(dim=-1)
    return torch.stack([row, col], dim=-1)


def soft_argmax_np(logits: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`soft_argmax` in float64: (..., H, W) -> (..., 2) (row, col)."""
    x = np.asarray(logits, dtype=np.float64)
    h, w = x.shape[-2:]
    flat = x.reshape(*x.shape[:-2], h * w)
    flat = flat - flat.max(axis=-1, keepdims=True)
    prob = np.exp(flat)
    prob /= prob.sum(axis=-1, keepdims=True)
    prob = prob.reshape(x.shape)
    row = prob.sum(axis=-1) @ np.arange(h, dtype=np.float64)
    col = prob.sum(axis=-2) @ np.arange(w, dtype=np.float64)
    return np.stack([row, col], axis=-1)


def presence_logits(output):
    """(B or S, 2L, H, W) output -> (B or S, L) presence logits: spatial mean of channels 1, 3, 5, ...

    Works on torch tensors and numpy arrays (numpy: float64).
    """
    maps = output[:, 1::2]
    if isinstance(maps, np.ndarray):
        return maps.astype(np.float64).mean(axis=(-2, -1))
    return maps.mean(dim=(-2, -1))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(np.asarray(z, dtype=np.float64))


def _inside(index: np.ndarray, shape) -> bool:
    """Whether a continuous index lies within the grid's extent ([-0.5, n - 0.5] on every axis)."""
    idx = np.asarray(index, dtype=np.float64)
    return bool(np.all(np.isfinite(idx)) and np.all(idx >= -0.5) and np.all(idx <= np.asarray(shape) - 0.5))


def decode_landmarks(output: np.ndarray, index_to_physical: np.ndarray, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Decode (S, 2L, H, W) raw output into ((L, 3) LPS mm, (L, 3) cache indices (s, row, col)).

    The algorithm is the module docstring's "Decoding".
    """
    out = np.asarray(output)
    if out.ndim != 4 or out.shape[1] % 2:
        raise ValueError(f"landmark_coords output must be (S, 2L, H, W), got shape {out.shape}")
    s_count, channels = out.shape[:2]
    n = channels // 2
    dz = slice_plane_distance(index_to_physical)
    k = int(math.floor(radius_mm / dz * (1.0 + RADIUS_RTOL))) if dz > 0 else 0
    presence = _sigmoid(presence_logits(out))  # (S, L)
    slices = np.arange(s_count, dtype=np.float64)
    indices = np.full((n, 3), np.nan)
    for lm in range(n):
        p = presence[:, lm]
        csum = np.concatenate([[0.0], np.cumsum(p)])
        lo = np.maximum(np.arange(s_count) - k, 0)
        hi = np.minimum(np.arange(s_count) + k + 1, s_count)
        centre = int(np.argmax(csum[hi] - csum[lo]))
        window = np.arange(lo[centre], hi[centre])
        weights = p[window]
        if not weights.sum() >= MIN_WEIGHT:  # also catches NaN
            window = np.array([int(np.nanargmax(p)) if np.isfinite(p).any() else 0])
            weights = np.ones(1)
        pos = soft_argmax_np(out[window, 2 * lm])  # (len(window), 2)
        weights = weights / weights.sum()
        indices[lm] = [weights @ slices[window], weights @ pos[:, 0], weights @ pos[:, 1]]
    return index_to_physical_points(indices, index_to_physical).reshape(-1, 3), indices


# ----------------------------------------------------------------------------- the task


class CoordParams(Params):
    radius_mm: float = Field(
        10.0, gt=0, allow_inf_nan=False,
        description="a landmark is 'near' a slice when its distance to the slice plane is <= radius_mm",
    )
    presence_weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="weight of the presence BCE term relative to the pixel-L1 term"
    )
    loss: Literal["l1", "smooth_l1"] = Field("l1", description="coordinate loss in pixels: l1 or smooth_l1 (beta 1 px)")
    landmarks: list[str] | None = Field(None, description="the landmarks to regress (default: all of data.landmarks)")

    @field_validator("landmarks")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one landmark (leave it out for all of data.landmarks)")
        twice = sorted({n for n in v if v.count(n) > 1})
        if twice:
            raise ValueError(f"landmark {twice[0]!r} is listed twice")
        return v


class LandmarkCoords(Task):
    """Landmark coordinate regression: soft-argmax positions and per-slice presence (module docstring)."""

    name = "landmark_coords"
    description = "direct landmark coordinate regression: soft-argmax + slice presence; error in mm, detection rates"
    kind = "regression"
    head = "conv"
    Params = CoordParams
    target_version = 1

    def __init__(self, params: CoordParams, info) -> None:
        super().__init__(params, info)
        self.params: CoordParams = params
        from mtlbench.errors import ConfigError

        known = list(info.landmarks)
        for name in params.landmarks or []:
            if name not in known:
                raise ConfigError(
                    f"params.landmarks: landmark {name!r} is not in data.landmarks ({', '.join(known) or 'none'})"
                )
        if not self.landmark_names():
            raise ConfigError("params.landmarks: no landmark to regress (data.landmarks is empty)")

    def landmark_names(self) -> list[str]:
        """The task's landmarks, in channel order."""
        return list(self.params.landmarks) if self.params.landmarks is not None else list(self.info.landmarks)

    # ------------------------------------------------------------------ targets

    def targets(self) -> list[Target]:
        n = len(self.landmark_names())
        return [
            Target("points", n, "float32", warp="points"),
            Target("near", n, "float32", warp="none"),
            Target("positions", n, "float64", warp="none", per_slice=False),
        ]

    def target_settings(self) -> dict:
        return {"radius_mm": self.params.radius_mm, "landmarks": self.landmark_names()}

    def prepare(self, patient: Patient, grid: CacheGrid) -> dict[str, np.ndarray]:
        names = self.landmark_names()
        s_count, h, w = (int(v) for v in grid.shape)
        present = {lm.name: lm.position for lm in patient.landmarks}
        positions = np.full((len(names), 3), np.nan)
        for i, name in enumerate(names):
            if name in present:
                positions[i] = present[name]
        index = grid.to_index(positions)  # (L, 3) (s, row, col); NaN rows stay NaN
        finite = np.isfinite(index).all(axis=1)
        safe = np.where(finite[:, None], index, 0.0)
        in_plane = finite & (safe[:, 1] >= -0.5) & (safe[:, 1] <= h - 0.5) & (safe[:, 2] >= -0.5) & (safe[:, 2] <= w - 0.5)
        dist = np.abs(np.arange(s_count, dtype=np.float64)[:, None] - safe[None, :, 0]) * slice_plane_distance(
            grid.index_to_physical
        )
        near = (dist <= self.params.radius_mm * (1.0 + RADIUS_RTOL)) & in_plane[None, :]
        points = np.broadcast_to(index[None, :, 1:], (s_count, len(names), 2))
        return {
            "points": np.ascontiguousarray(points, dtype=np.float32),
            "near": near.astype(np.float32),
            "positions": positions,
        }

    # ------------------------------------------------------------------ training

    def out_channels(self) -> int:
        return 2 * len(self.landmark_names())

    def loss(self, output: "torch.Tensor", batch: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        out = output.float()
        h, w = out.shape[-2:]
        pred = soft_argmax(out[:, 0::2])  # (B, L, 2)
        presence = presence_logits(out)  # (B, L)
        points = batch["points"].to(device=out.device, dtype=torch.float32)
        near = batch["near"].to(device=out.device, dtype=torch.float32)
        row, col = points[..., 0], points[..., 1]
        # NaN compares False, so absent points are never valid
        valid = (row >= -0.5) & (row <= h - 0.5) & (col >= -0.5) & (col <= w - 0.5)
        weight = torch.where(valid, near, torch.zeros_like(near))
        target = torch.where(valid[..., None], points, pred.detach())  # masked entries contribute exactly 0
        if self.params.loss == "l1":
            dist = (pred - target).abs().sum(dim=-1)
        else:
            dist = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).sum(dim=-1)
        coord = (weight * dist).sum() / weight.sum().clamp_min(1e-12)
        bce = F.binary_cross_entropy_with_logits(presence, weight)
        return coord + self.params.presence_weight * bce

    # ------------------------------------------------------------------ evaluation

    def metrics(self) -> dict[str, MetricInfo]:
        out = {f"error_mm_{name}": MetricInfo(False, "mm") for name in self.landmark_names()}
        out["error_mm_mean"] = MetricInfo(False, "mm")
        for r in DETECT_RADII_MM:
            out[f"detect_{r}mm"] = MetricInfo(True)
        return out

    def main_metric(self) -> str:
        return "error_mm_mean"

    def decode(self, volume: EvalVolume) -> np.ndarray:
        """(L, 3) LPS estimates of the task's landmarks for one patient."""
        output = np.asarray(volume.output)
        want = 2 * len(self.landmark_names())
        if output.ndim != 4 or output.shape[1] != want:
            raise ValueError(
                f"patient {volume.patient}: landmark_coords output must be (S, {want}, H, W), got {output.shape}"
            )
        return decode_landmarks(output, volume.index_to_physical, self.params.radius_mm)[0]

    def truth(self, volume: EvalVolume) -> np.ndarray:
        """(L, 3) LPS ground truth: the cached ``positions`` (else ``volume.landmarks``), NaN where absent."""
        if "positions" in volume.targets:
            return np.asarray(volume.targets["positions"], dtype=np.float64).reshape(-1, 3)
        present = {lm.name: lm.position for lm in volume.landmarks}
        return np.array([present.get(n, (np.nan,) * 3) for n in self.landmark_names()], dtype=np.float64).reshape(-1, 3)

    def evaluate(self, volume: EvalVolume) -> dict[str, float]:
        names = self.landmark_names()
        found = self.decode(volume)
        truth = self.truth(volume)
        shape = np.shape(volume.output)[:1] + np.shape(volume.output)[2:]
        errors: list[float] = []
        evaluated: list[float] = []  # the errors of the landmarks the patient has inside the grid
        for i in range(len(names)):
            ok = bool(np.all(np.isfinite(truth[i]))) and _inside(
                physical_to_index(truth[i], volume.index_to_physical)[0], shape
            )
            error = float(np.linalg.norm(found[i] - truth[i])) if ok else float("nan")
            errors.append(error)
            if ok:
                evaluated.append(error)
        out = {f"error_mm_{name}": e for name, e in zip(names, errors)}
        finite = [e for e in evaluated if not math.isnan(e)]
        out["error_mm_mean"] = float(np.mean(finite)) if finite else float("nan")
        for r in DETECT_RADII_MM:
            # an evaluated landmark with a NaN error (a NaN output) counts as a miss
            out[f"detect_{r}mm"] = (
                float(np.mean([not math.isnan(e) and e <= r for e in evaluated])) if evaluated else float("nan")
            )
        return out

    def export(self, volume: EvalVolume, out_dir: Path) -> list[Path]:
        """Write ``<patient>_landmark_coords.fcsv`` (LPS) with the decoded position of every task landmark."""
        from mtlbench.data.landmarks import write_fcsv

        found = self.decode(volume)
        points = [
            Landmark(name, tuple(float(v) for v in found[i]))
            for i, name in enumerate(self.landmark_names())
            if np.all(np.isfinite(found[i]))
        ]
        path = Path(out_dir) / f"{volume.patient}_landmark_coords.fcsv"
        write_fcsv(path, points)
        return [path]

    def pictures(self, volume: EvalVolume, index: int) -> list[Picture]:
        """(L, 2) (row, col): truth where the landmark is near the slice, prediction where presence > 0.5."""
        truth = None
        if "points" in volume.targets and "near" in volume.targets:
            pts = np.asarray(volume.targets["points"][index], dtype=np.float32)
            near = np.asarray(volume.targets["near"][index]) > 0
            truth = np.where(near[:, None], pts, np.float32(np.nan)).astype(np.float32)
        out = np.asarray(volume.output[index : index + 1])
        pos = soft_argmax_np(out[0, 0::2])  # (L, 2)
        shown = _sigmoid(presence_logits(out)[0]) > 0.5
        pred = np.where(shown[:, None], pos, np.nan).astype(np.float32)
        return [Picture("landmark positions", "points", truth, pred)]


@hookimpl
def register_tasks(register):
    register(LandmarkCoords)
