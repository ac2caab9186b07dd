"""The phantom's tissue-label volume and the shapes that paint tissues into it (ellipsoids, tubes,
z-varying columns) in the patient's rotated anatomical frame."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

import numpy as np


class Tissue(IntEnum):
    """Tissue labels of the phantom's internal label volume (0 = air outside the body)."""

    AIR = 0
    SKIN = 1
    FAT = 2  # subcutaneous
    MUSCLE = 3
    VISCERAL_FAT = 4
    LIVER = 5
    SPLEEN = 6
    KIDNEY_R = 7
    KIDNEY_L = 8
    SINUS_R = 9  # renal sinus fat
    SINUS_L = 10
    PELVIS_R = 11  # renal pelvis (urine)
    PELVIS_L = 12
    PERIRENAL_FAT = 13
    URETER = 14
    AORTA = 15
    VESSEL = 16  # IVC, iliac and renal vessels
    CALCIFICATION = 17
    CORTICAL = 18
    TRABECULAR = 19
    POSTERIOR_BONE = 20
    RIB = 21
    DISC = 22
    CSF = 23
    BOWEL_WALL = 24
    BOWEL_FLUID = 25
    BOWEL_GAS = 26
    STOOL = 27
    LUNG = 28
    GALLBLADDER = 29
    TABLE = 30
    TABLE_FOAM = 31
    OUTSIDE_FOV = 32


class _Canvas:
    """A label volume on an identity-direction grid, painted in rotated anatomical coordinates.

    Anatomical coordinates (u, v, w) are LPS millimetres relative to the body centre, rotated
    in-plane by the patient's rotation: u = patient left, v = posterior, w = z.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float], angle: float):
        self.x, self.y, self.z = x, y, z
        self.cx, self.cy = centre
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.lab = np.zeros((z.size, y.size, x.size), np.uint8)

    def to_physical(self, u: float, v: float, w: float) -> tuple[float, float, float]:
        return (self.cx + self.cos * u - self.sin * v, self.cy + self.sin * u + self.cos * v, w)

    def plane(self, sl: tuple[slice, slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Anatomical (u, v) of the in-plane voxels of a box, shapes (1, ny, nx)."""
        ys = self.y if sl is None else self.y[sl[1]]
        xs = self.x if sl is None else self.x[sl[2]]
        dx = (xs - self.cx)[None, None, :]
        dy = (ys - self.cy)[None, :, None]
        return self.cos * dx + self.sin * dy, -self.sin * dx + self.cos * dy

    def zs(self, sl: tuple[slice, slice, slice]) -> np.ndarray:
        return self.z[sl[0]][:, None, None]

    def box(self, u: float, v: float, w: float, ru: float, rv: float, rw: float) -> tuple[slice, slice, slice] | None:
        """Index box covering the axis-aligned (anatomical) ellipsoid-bounding box, or None if off-grid."""
        px, py, _ = self.to_physical(u, v, w)
        hx = math.sqrt((ru * self.cos) ** 2 + (rv * self.sin) ** 2)
        hy = math.sqrt((ru * self.sin) ** 2 + (rv * self.cos) ** 2)
        out = []
        for axis, c, h in ((self.z, w, rw), (self.y, py, hy), (self.x, px, hx)):
            step = axis[1] - axis[0]
            lo = max(0, int(math.ceil((c - h - axis[0]) / step)))
            hi = min(axis.size, int(math.floor((c + h - axis[0]) / step)) + 1)
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return out[0], out[1], out[2]

    def paint(self, sl, mask: np.ndarray, label: Tissue, over: tuple[Tissue, ...] | None = None,
              keep: tuple[Tissue, ...] | None = None) -> None:
        """Set ``label`` where ``mask``; only over labels in ``over`` / never over labels in ``keep``."""
        region = self.lab[sl]
        mask = np.broadcast_to(mask, region.shape)
        if over is not None:
            allowed = np.zeros(256, bool)
            allowed[list(over)] = True
            mask = mask & allowed[region]
        if keep is not None:
            blocked = np.zeros(256, bool)
            blocked[list(keep)] = True
            mask = mask & ~blocked[region]
        region[mask] = label


def _tilted(lateral: float, anterior: float, spin: float) -> np.ndarray:
    """Frame whose long (third) axis leans so that its lower end moves to patient right by
    ``lateral`` and anteriorly by ``anterior`` (radians), turned by ``spin`` about it."""
    r = np.array([math.sin(lateral), math.sin(anterior), 1.0])
    r /= np.linalg.norm(r)
    p = np.array([1.0, 0.0, 0.0]) - r[0] * r
    p /= np.linalg.norm(p)
    q = np.cross(r, p)
    c, s = math.cos(spin), math.sin(spin)
    return np.stack([c * p + s * q, -s * p + c * q, r])


def _rot(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


@dataclass
class _Ellipsoid:
    """An ellipsoid in anatomical coordinates; ``frame`` rows are its local axes (unit vectors)."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    frame: np.ndarray = field(default_factory=lambda: np.eye(3))

    def local(self, cv: _Canvas, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, v = cv.plane(sl)
        du = (u - self.centre[0]).astype(np.float32)
        dv = (v - self.centre[1]).astype(np.float32)
        dw = (cv.zs(sl) - self.centre[2]).astype(np.float32)
        f = self.frame.astype(np.float32)
        return tuple(f[k, 0] * du + f[k, 1] * dv + f[k, 2] * dw for k in range(3))  # type: ignore[return-value]

    def box(self, cv: _Canvas, grow: float = 0.0):
        # exact half-extents of the rotated ellipsoid along u, v, w
        half = np.sqrt(((self.frame * (np.asarray(self.semi) + grow)[:, None]) ** 2).sum(axis=0))
        return cv.box(*self.centre, *(float(h) for h in half))

    def rho2(self, cv: _Canvas, sl, grow: float = 0.0) -> np.ndarray:
        p, q, r = self.local(cv, sl)
        a, b, c = (s + grow for s in self.semi)
        return (p / a) ** 2 + (q / b) ** 2 + (r / c) ** 2


def _paint_ellipsoid(cv: _Canvas, e: _Ellipsoid, label: Tissue, grow: float = 0.0, **kw) -> None:
    sl = e.box(cv, grow)
    if sl is not None:
        cv.paint(sl, e.rho2(cv, sl, grow) <= 1.0, label, **kw)


def _capsule(cv: _Canvas, a: np.ndarray, b: np.ndarray, radius: float):
    """(box, mask) of the voxels within ``radius`` of segment a-b (anatomical mm)."""
    lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
    c, h = (lo + hi) / 2, (hi - lo) / 2
    sl = cv.box(*c, *h)
    if sl is None:
        return None, None
    u, v = cv.plane(sl)
    w = cv.zs(sl)
    d = b - a
    t = ((u - a[0]) * d[0] + (v - a[1]) * d[1] + (w - a[2]) * d[2]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (u - a[0] - t * d[0]) ** 2 + (v - a[1] - t * d[1]) ** 2 + (w - a[2] - t * d[2]) ** 2
    return sl, dist2 <= radius**2


def _paint_tube(cv: _Canvas, points: np.ndarray, radius: float, label: Tissue, **kw) -> None:
    for a, b in zip(points[:-1], points[1:]):
        sl, mask = _capsule(cv, a, b, radius)
        if sl is not None:
            cv.paint(sl, mask, label, **kw)


def _column(cv: _Canvas, w_lo: float, w_hi: float, centre: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
            semi: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """(box, mask) of an elliptic cylinder along z whose centre and semi-axes vary with z."""
    k = np.nonzero((cv.z >= w_lo) & (cv.z <= w_hi))[0]
    if k.size == 0:
        return None, None
    w = cv.z[k]
    cu, cvv = (np.broadcast_to(np.asarray(a, float), w.shape) for a in centre(w))
    su, sv = (np.broadcast_to(np.asarray(a, float), w.shape) for a in semi(w))
    r = float(max(su.max(), sv.max()))
    u0, u1, v0, v1 = cu.min() - r, cu.max() + r, cvv.min() - r, cvv.max() + r
    sl = cv.box((u0 + u1) / 2, (v0 + v1) / 2, float(w.mean()), (u1 - u0) / 2, (v1 - v0) / 2, 1e9)
    if sl is None:
        return None, None
    sl = (slice(int(k[0]), int(k[-1]) + 1), sl[1], sl[2])
    u, v = cv.plane(sl)
    mask = ((u - cu[:, None, None]) / su[:, None, None]) ** 2 + ((v - cvv[:, None, None]) / sv[:, None, None]) ** 2 <= 1
    return sl, mask


def _paint_column(cv: _Canvas, label: Tissue, w_lo, w_hi, centre, semi, **kw) -> None:
    sl, mask = _column(cv, w_lo, w_hi, centre, semi)
    if sl is not None:
        cv.paint(sl, mask, label, **kw)
