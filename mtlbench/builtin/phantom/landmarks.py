"""The phantom's landmarks: the true renal-pelvis and vertebral-body centres, and their corruption
like real annotations (one misplaced, or one far outside the image)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mtlbench.api import Geometry, Landmark

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.builtin.phantom.anatomy import _Spine
    from mtlbench.builtin.phantom.canvas import _Canvas, _Ellipsoid


LANDMARKS: tuple[str, ...] = ("renal_pelvis_right", "renal_pelvis_left", "T12", "L1", "L2", "L3", "L4")


def _true_landmarks(cv: _Canvas, sp: _Spine, kidneys: dict[int, tuple[_Ellipsoid, _Ellipsoid]]) -> list[Landmark]:
    """Renal-pelvis centres and vertebral-body centres in LPS mm (rounded to 1 micrometre)."""
    lv = sp.level_z
    truth = [
        Landmark("renal_pelvis_right", cv.to_physical(*kidneys[-1][1].centre)),
        Landmark("renal_pelvis_left", cv.to_physical(*kidneys[1][1].centre)),
    ] + [Landmark(n, cv.to_physical(*(float(c) for c in sp.centre(lv[n])), lv[n])) for n in LANDMARKS[2:]]
    return [Landmark(lm.name, tuple(round(float(c), 3) for c in lm.position)) for lm in truth]


def corrupt_landmarks(rng: np.random.Generator, truth: list[Landmark], geometry: Geometry, misplace: bool,
                      far: bool) -> tuple[list[Landmark], dict[str, float]]:
    """Like real annotations: with ``misplace`` one random landmark is moved 10-30 mm, with ``far``
    one lies far outside the image (100-400 mm beyond its extent along one axis). Returns the
    written landmarks and {name: offset in mm} of the changed ones."""
    out = list(truth)
    misplaced: dict[str, float] = {}
    if misplace:
        i = int(rng.integers(len(out)))
        d = rng.normal(size=3)
        d *= rng.uniform(10, 30) / np.linalg.norm(d)
        out[i] = Landmark(out[i].name, tuple(round(float(c), 3) for c in np.add(out[i].position, d)))
        misplaced[out[i].name] = float(np.linalg.norm(d))
    if far:
        i = int(rng.integers(len(out)))
        extent = np.asarray(geometry.size) * np.asarray(geometry.spacing)
        d = np.zeros(3)
        axis = int(rng.integers(3))
        d[axis] = rng.choice([-1, 1]) * (extent[axis] + rng.uniform(100, 400))
        out[i] = Landmark(out[i].name, tuple(round(float(c), 3) for c in np.add(out[i].position, d)))
        misplaced[out[i].name] = float(np.linalg.norm(d))
    return out, misplaced
