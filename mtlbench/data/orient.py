"""Canonical orientation: the axis permutation and flips that bring a volume to one orientation, and back.

Scanners and converters store the same anatomy in different index orders
(a NIfTI written from RAS, a DICOM series stacked feet-first, a sagittal
acquisition). Fed in its own index order, such a volume reaches the network
mirrored or turned, so "left kidney" is on a different side of the slice from
one patient to the next. Preprocessing therefore reorders every volume's axes,
without resampling, so that its index axes point as close as possible to the
directions of one orientation code (``preprocess.orientation``), like MONAI's
``Orientation`` and SimpleITK's ``DICOMOrient``; predictions are mapped back to
the image's own grid with :meth:`Reorientation.invert`.

An orientation code names, in ITK axis order (i, j, k) = (x, y, z), the
direction each index axis increases towards (DICOM convention, as
``sitk.DICOMOrient`` reads it): ``"LPS"`` is i to the patient's left, j to
posterior, k to superior, so numpy slices [k] are axial and show the patient
as radiologists do (patient's right on the image's left, anterior at the top).

numpy only; nothing of mtlbench is imported, so ``mtlbench.api`` may use it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.api import Geometry

#: Letter -> (physical LPS axis, sign): L/R along x, P/A along y, S/I along z.
LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
#: No reordering: every volume in its own index order (mtlbench before orientation existed).
NATIVE = "native"


def check_code(code: str) -> str:
    """``code`` upper-cased if it names an orientation ("LPS", "RAS", ...; or "native"), else ValueError."""
    if code == NATIVE:
        return code
    up = str(code).upper()
    axes = [LETTERS[c][0] for c in up if c in LETTERS]
    if len(up) != 3 or len(axes) != 3 or sorted(axes) != [0, 1, 2]:
        raise ValueError(
            f"orientation {code!r}: expected {NATIVE!r} or three letters, one each of L/R, P/A and S/I (e.g. 'LPS')"
        )
    return up


def orientation_of(geometry: "Geometry") -> str:
    """The orientation code closest to a geometry's direction cosines (e.g. 'LPS', 'RAS', 'LPI')."""
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    names = ("LR", "PA", "SI")
    out = []
    for axis in range(3):
        p = int(np.argmax(np.abs(d[:, axis])))
        out.append(names[p][0] if d[p, axis] > 0 else names[p][1])
    return "".join(out)


@dataclass(frozen=True)
class Reorientation:
    """How a volume on ``source`` is reindexed onto ``target`` (the same voxels, reordered).

    ``order[n]`` is the source ITK axis that becomes target axis ``n``;
    ``flip[n]`` reverses target axis ``n``. :meth:`apply` and :meth:`invert`
    take and return numpy-order (z, y, x) arrays (views; no copy).
    """

    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    source: "Geometry"
    target: "Geometry"

    @property
    def identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flip)

    def _axes(self) -> list[int]:
        # target numpy axis m is target ITK axis 2 - m, i.e. source ITK axis order[2 - m], numpy axis 2 - that
        return [2 - self.order[2 - m] for m in range(3)]

    def _flipped(self) -> tuple[int, ...]:
        return tuple(m for m in range(3) if self.flip[2 - m])

    def apply(self, array: np.ndarray) -> np.ndarray:
        """A (z, y, x) array on ``source`` -> the same voxels on ``target``."""
        out = np.transpose(np.asarray(array), self._axes())
        return np.flip(out, self._flipped()) if self._flipped() else out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """A (z, y, x) array on ``target`` -> the same voxels on ``source`` (the image's own grid)."""
        a = np.asarray(array)
        a = np.flip(a, self._flipped()) if self._flipped() else a
        return np.transpose(a, np.argsort(self._axes()))


def reorientation(geometry: "Geometry", code: str) -> Reorientation:
    """The reordering of ``geometry``'s axes that points them closest to orientation ``code``.

    Among the 6 axis permutations the one whose axes have the largest summed
    |cosine| with the code's directions wins (the identity on ties), then every
    axis that points against its letter is flipped. ``"native"`` is the identity.
    """
    code = check_code(code)
    if code == NATIVE:
        return Reorientation((0, 1, 2), (False, False, False), geometry, geometry)
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)  # rows: physical x, y, z; columns: i, j, k
    want = [LETTERS[c] for c in code]
    order = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[want[n][0], p[n]]) for n in range(3)))
    flip = tuple(bool(np.sign(d[want[n][0], order[n]]) != want[n][1]) for n in range(3))
    if order == (0, 1, 2) and not any(flip):
        return Reorientation(order, flip, geometry, geometry)  # type: ignore[arg-type]
    size = np.asarray(geometry.size)
    spacing = np.asarray(geometry.spacing, dtype=float)
    origin = np.asarray(geometry.origin, dtype=float)
    for n in range(3):  # the new first voxel: the far end of every flipped axis
        if flip[n]:
            a = order[n]
            origin = origin + d[:, a] * spacing[a] * (size[a] - 1)
    direction = np.stack([d[:, order[n]] * (-1.0 if flip[n] else 1.0) for n in range(3)], axis=1)
    target = type(geometry)(  # mtlbench.api.Geometry, without importing it (api imports this module)
        size=tuple(int(size[a]) for a in order),  # type: ignore[arg-type]
        spacing=tuple(float(spacing[a]) for a in order),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )
    return Reorientation(order, flip, geometry, target)  # type: ignore[arg-type]


def between(source: "Geometry", target: "Geometry") -> Reorientation:
    """The reordering that took ``source`` to ``target`` (two geometries of the same voxels, as a cache records them)."""
    ds = np.asarray(source.direction, dtype=float).reshape(3, 3)
    dt = np.asarray(target.direction, dtype=float).reshape(3, 3)
    cos = dt.T @ ds  # [n, a]: cosine between target axis n and source axis a
    order = tuple(int(np.argmax(np.abs(cos[n]))) for n in range(3))
    flip = tuple(bool(cos[n, order[n]] < 0) for n in range(3))
    if sorted(order) != [0, 1, 2]:
        raise ValueError("between: the two geometries are not reorderings of one grid")
    return Reorientation(order, flip, source, target)  # type: ignore[arg-type]

