"""The embedded synthetic abdominal-CT phantom: anatomy, CT intensities, masks, landmarks and the files.

Each patient is built in physical millimetres (LPS: +x = patient left, +y = posterior,
+z = superior) as a volume of tissue labels painted structure by structure (body wall,
bowel, organs, retroperitoneum, vessels, spine, ribs); the labels become Hounsfield units
with per-patient tissue means and texture, then partial-volume blur and noise are added and
the values are rounded to int16 in [-2048, 2048] like the study's raw data.

:func:`phantom_patient` builds one patient in memory; :func:`generate_phantom` writes a data
set (``<pid>_ct.nii.gz``, ``<pid>_<organ>.nii.gz``, ``<pid>_landmarks.fcsv``, ``manifest.csv``,
``.complete``) into a temporary sibling folder and renames it into place;
:func:`ensure_phantom` reuses a complete set or generates one, safely under races.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from mtlbench.api import Geometry, Landmark
from mtlbench.errors import DataError

#: Bump whenever the generated files change for the same (patients, seed).
PHANTOM_VERSION: int = 1

ORGANS: tuple[str, ...] = ("kidney_right", "kidney_left", "liver", "spleen", "aorta")
LANDMARKS: tuple[str, ...] = ("renal_pelvis_right", "renal_pelvis_left", "T12", "L1", "L2", "L3", "L4")
MANIFEST_COLUMNS: tuple[str, ...] = ("patient", "image", "landmarks") + tuple(f"mask:{o}" for o in ORGANS)
MARKER = ".complete"
HU_RANGE = (-2048, 2048)

_LEVELS = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
_L1 = _LEVELS.index("L1")


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


T = Tissue

#: Per-tissue HU: a patient's mean is drawn uniformly from (low, high); ``texture`` is the sd (HU)
#: of voxel-wise variation added before the partial-volume blur.
TISSUE_HU: dict[Tissue, tuple[float, float, float]] = {
    T.AIR: (-1000, -1000, 0),
    T.SKIN: (20, 40, 5),
    T.FAT: (-110, -85, 8),
    T.MUSCLE: (40, 52, 5),
    T.VISCERAL_FAT: (-105, -80, 18),
    T.LIVER: (55, 65, 4),
    T.SPLEEN: (45, 50, 4),
    T.KIDNEY_R: (30, 40, 4),
    T.KIDNEY_L: (30, 40, 4),
    T.SINUS_R: (-100, -70, 15),
    T.SINUS_L: (-100, -70, 15),
    T.PELVIS_R: (0, 15, 3),
    T.PELVIS_L: (0, 15, 3),
    T.PERIRENAL_FAT: (-110, -90, 8),
    T.URETER: (15, 30, 3),
    T.AORTA: (38, 46, 3),
    T.VESSEL: (38, 46, 3),
    T.CALCIFICATION: (500, 900, 50),
    T.CORTICAL: (700, 1000, 40),
    T.TRABECULAR: (150, 300, 45),
    T.POSTERIOR_BONE: (400, 600, 60),
    T.RIB: (350, 550, 40),
    T.DISC: (70, 100, 8),
    T.CSF: (5, 15, 3),
    T.BOWEL_WALL: (30, 45, 5),
    T.BOWEL_FLUID: (0, 30, 6),
    T.BOWEL_GAS: (-1000, -980, 5),
    T.STOOL: (-20, 40, 90),
    T.LUNG: (-870, -820, 30),
    T.GALLBLADDER: (0, 15, 3),
    T.TABLE: (150, 300, 20),
    T.TABLE_FOAM: (-960, -900, 10),
    T.OUTSIDE_FOV: (-1000, -1000, 0),
}
_SAME_MEAN = {T.KIDNEY_L: T.KIDNEY_R, T.SINUS_L: T.SINUS_R, T.PELVIS_L: T.PELVIS_R, T.VESSEL: T.AORTA}
_CAVITY = (T.VISCERAL_FAT,)
_SOFT = (T.VISCERAL_FAT, T.BOWEL_WALL, T.BOWEL_FLUID, T.BOWEL_GAS, T.STOOL, T.LIVER, T.SPLEEN, T.GALLBLADDER)


@dataclass
class PhantomInfo:
    """What a test needs to know about a generated patient beyond its files."""

    pelvis_in_mask: bool
    true_landmarks: list[Landmark]
    misplaced: dict[str, float] = field(default_factory=dict)  # name -> offset (mm) of the written position
    flipped: bool = False  # stored with direction diag(-1, -1, 1)
    outside_fov: bool = False  # voxels outside the reconstruction circle hold -2048
    body_semi_axes_mm: tuple[float, float] = (0.0, 0.0)  # lateral, antero-posterior (at the reference level)
    noise_sd: float = 0.0
    rotation_deg: float = 0.0


class PhantomPatient(NamedTuple):
    """One in-memory phantom patient; arrays in numpy order (z, y, x) on ``geometry``'s grid."""

    image: np.ndarray  # int16 HU, exactly what is written
    masks: dict[str, np.ndarray]  # organ -> bool
    tissue: np.ndarray  # uint8 Tissue labels
    landmarks: list[Landmark]  # as written (some misplaced or far outside), LPS mm
    geometry: Geometry
    info: PhantomInfo


def patient_id(index: int) -> str:
    """The id of the 0-based ``index``-th patient: phantom001, phantom002, ..."""
    return f"phantom{index + 1:03d}"


# ----------------------------------------------------------------------------- painting


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


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _Spine:
    level_z: dict[str, float]
    period: float
    disc: float
    v0: float
    lordosis: float
    scoliosis: float
    a_vb: float
    b_vb: float

    def t(self, w):
        return (self.level_z["L1"] - np.asarray(w, float)) / (4 * self.period)

    def centre(self, w):
        t = self.t(w)
        return self.scoliosis * np.sin(1.5 * t), self.v0 - self.lordosis * t**2

    def semi(self, w):
        t = np.clip(self.t(w), -0.6, 1.2)
        return self.a_vb * (1 + 0.08 * t), self.b_vb * (1 + 0.05 * t)

    def front(self, w):
        """v of the anterior surface of the vertebral column at height w."""
        return self.centre(w)[1] - self.semi(w)[1]


def _body(cv: _Canvas, rng: np.random.Generator, a: float, b_ant: float, b_post: float, fat: float,
          zscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Skin, subcutaneous fat, muscle wall and the abdominal cavity (visceral fat).

    Returns the in-plane angle (0 = posterior), the skin + fat and skin + fat + muscle thickness
    (mm, 2D) and the approximate depth below the skin (mm, 3D).
    """
    u, v = cv.plane()
    u, v = u[0], v[0]
    bb = np.where(v < 0, b_ant, b_post)
    # A flatter back: superellipse exponent 2 in front, ~2.6 behind.
    ex = np.where(v < 0, 2.0, 2.6)
    d2 = ((np.abs(u / a) ** ex + np.abs(v / bb) ** ex) ** (1.0 / ex)).astype(np.float32)  # 1 on the outline
    eps = 1e-6
    gu = np.abs(u / a) ** (ex - 1) / a
    gv = np.abs(v / bb) ** (ex - 1) / bb
    grad = np.maximum(np.hypot(gu, gv) / np.maximum(d2, eps) ** (ex - 1), eps).astype(np.float32)
    ang = np.arctan2(u, v)  # 0 = posterior, +-pi = anterior
    harmonics = sum(rng.uniform(-0.18, 0.18) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3, 4))
    t_skin = rng.uniform(1.5, 2.5)
    t_fat = (3 + 24 * fat) * (1 + 0.35 * np.cos(ang) ** 2 + harmonics)  # thicker at the back and front
    t_fat = np.maximum(t_fat, 2.0)
    t_mus = rng.uniform(9, 15) * (1 - 0.35 * np.abs(np.sin(ang)))  # thinner laterally
    depth = (zscale.astype(np.float32)[:, None, None] - d2[None]) / grad[None]  # mm inside the outline, approximately
    lab = cv.lab
    lab[depth > 0] = T.SKIN
    lab[depth > t_skin] = T.FAT
    lab[depth > (t_skin + t_fat)[None]] = T.MUSCLE
    lab[depth > (t_skin + t_fat + t_mus)[None]] = T.VISCERAL_FAT
    return ang, t_skin + t_fat, t_skin + t_fat + t_mus, depth


def _table(cv: _Canvas, y_top: float, rng: np.random.Generator) -> None:
    """The CT couch: a curved carbon shell with foam, fixed to the scanner (not rotated)."""
    x = cv.x[None, :] - cv.cx
    y = cv.y[:, None]
    top = y_top + 0.0009 * x**2
    thick = rng.uniform(2.0, 4.0)
    shell = ((y >= top) & (y < top + thick)) | ((y >= top + 35) & (y < top + 35 + thick))
    foam = (y >= top + thick) & (y < top + 35)
    width = np.abs(x) < rng.uniform(190, 230)
    plane = np.where(shell & width, T.TABLE, np.where(foam & width, T.TABLE_FOAM, 0)).astype(np.uint8)
    sel = (plane > 0)[None] & (cv.lab == T.AIR)
    cv.lab[sel] = np.broadcast_to(plane[None], cv.lab.shape)[sel]


def _spine(rng: np.random.Generator, z_l1: float, body_scale: float, v_back: float, fat_back: float) -> _Spine:
    period = rng.uniform(33, 38) * body_scale
    levels = {n: z_l1 + (_L1 - i) * period + rng.normal(0, 0.8) for i, n in enumerate(_LEVELS)}
    levels["L1"] = z_l1
    b_vb = rng.uniform(14, 17) * body_scale
    # Vertebral body centre: a little behind the body centre, leaving room behind it for the
    # canal, laminae, spinous process and back muscles.
    v0 = min(v_back * rng.uniform(0.15, 0.3), v_back - fat_back - rng.uniform(48, 56) * body_scale - b_vb)
    return _Spine(levels, period, rng.uniform(7, 10), v0, rng.uniform(4, 18), rng.uniform(-4, 4),
                  rng.uniform(19, 23) * body_scale, b_vb)


def _paint_spine(cv: _Canvas, sp: _Spine, rng: np.random.Generator) -> None:
    """Discs, vertebral bodies (cortex + trabecular bone), canal, arches and processes."""
    zmin, zmax = cv.z[0] - 50, cv.z[-1] + 50
    grow = lambda s: (lambda w: tuple(np.asarray(x) + s for x in sp.semi(w)))  # noqa: E731
    _paint_column(cv, T.DISC, zmin, zmax, sp.centre, grow(0.8))
    canal_u, canal_v = rng.uniform(9, 12), rng.uniform(7, 9)

    def canal_centre(w):
        cu, cvv = sp.centre(w)
        return cu, cvv + sp.semi(w)[1] + canal_v + 0.5

    for name, wc in sp.level_z.items():
        if wc < zmin - sp.period or wc > zmax + sp.period:
            continue
        h = (sp.period - sp.disc) / 2
        lumbar = name.startswith("L")
        # posterior arch (pedicles + laminae), spinous and transverse processes: slightly caudal
        _paint_column(cv, T.POSTERIOR_BONE, wc - 0.5 * sp.period, wc + 0.2 * sp.period, canal_centre,
                      lambda w: (canal_u + 6.5, canal_v + 6.5))
        _paint_column(cv, T.POSTERIOR_BONE, wc - 0.55 * sp.period, wc - 0.05 * sp.period,
                      lambda w: (canal_centre(w)[0], canal_centre(w)[1] + canal_v + 17), lambda w: (3.5, 15))
        tp = (rng.uniform(12, 16), 5.0) if lumbar else (8.0, 6.0)
        for side in (-1, 1):
            _paint_column(cv, T.POSTERIOR_BONE, wc - 0.14 * sp.period, wc + 0.14 * sp.period,
                          lambda w, s=side: (canal_centre(w)[0] + s * (canal_u + 4 + tp[0]), canal_centre(w)[1] - 2),
                          lambda w: tp)
        # vertebral body: rounded elliptic cylinder, 1.2-2 mm cortex
        sl, mask = _column(cv, wc - h, wc + h, sp.centre, sp.semi)
        if sl is not None:
            cv.paint(sl, mask, T.CORTICAL)
            cort = rng.uniform(1.2, 2.0)
            sl2, inner = _column(cv, wc - h + 1.2, wc + h - 1.2, sp.centre,
                                 lambda w: tuple(np.asarray(x) - cort for x in sp.semi(w)))
            if sl2 is not None:
                cv.paint(sl2, inner, T.TRABECULAR)
    _paint_column(cv, T.CSF, zmin, zmax, canal_centre, lambda w: (canal_u, canal_v))


def _paint_ribs(cv: _Canvas, sp: _Spine, ang: np.ndarray, wall: np.ndarray, depth: np.ndarray) -> None:
    """Lower ribs: slanted bone bars inside the muscle wall in the upper slices."""
    aa = np.abs(ang)
    ny_nx = ang.size
    flat_lab = cv.lab.reshape(cv.z.size, ny_nx)
    flat_depth = depth.reshape(cv.z.size, ny_nx)
    ok = np.zeros(256, bool)
    ok[[T.MUSCLE, T.VISCERAL_FAT, T.LIVER, T.SPLEEN, T.LUNG, T.FAT]] = True
    mid = len(cv.z) // 2
    near = np.abs(flat_depth[mid] - (wall.reshape(-1) + 1.0)) < 12  # candidate pixels (all slices)
    for name, max_ang in (("T9", 2.5), ("T10", 2.4), ("T11", 1.9), ("T12", 1.3)):
        z0 = sp.level_z[name]
        pix = np.flatnonzero(near & ((aa > 0.35) & (aa < max_ang)).reshape(-1))
        zr = z0 - 60.0 * (aa.reshape(-1)[pix] - 0.35)  # ribs run down as they go round
        k = np.nonzero((cv.z > zr.min() - 6) & (cv.z < z0 + 6))[0] if pix.size else []
        for kk in k:
            # oval cross-section: 11 mm high, 9 mm thick, centred 1 mm inside the muscle wall
            dz = (cv.z[kk] - zr) / 5.5
            dr = (flat_depth[kk, pix] - (wall.reshape(-1)[pix] + 1.0)) / 4.5
            hit = pix[(dz**2 + dr**2 <= 1) & ok[flat_lab[kk, pix]]]
            flat_lab[kk, hit] = T.RIB


def _kidney(cv: _Canvas, rng: np.random.Generator, side: int, centre: tuple[float, float, float],
            fat_margin: float) -> tuple[_Ellipsoid, _Ellipsoid]:
    """Paint one kidney (perirenal fat, parenchyma, sinus, pelvis, ureter); return (kidney, pelvis)."""
    ap, aq, ar = rng.uniform(24, 32), rng.uniform(17, 23), rng.uniform(48, 62)
    alpha = math.radians(rng.uniform(25, 45))  # hilum faces antero-medially
    beta = math.radians(rng.uniform(5, 18))  # upper pole medial
    gamma = math.radians(rng.uniform(5, 20))  # upper pole posterior
    # Local axes in (u, v, w): p lateral, q anterior, r superior (mirrored for the right side).
    base = np.array([[side, 0, 0], [0, -1, 0], [0, 0, 1]], float)
    frame = _kidney_frame(base, alpha, beta, gamma)
    kid = _Ellipsoid(centre, (ap, aq, ar), frame)
    sl = kid.box(cv, 1.2 * fat_margin + 16)
    if sl is None:
        return kid, kid
    p, q, r = kid.local(cv, sl)
    pn, qn, rn = p / ap, q / aq, r / ar
    # bean: lobulation and a slightly fuller lower pole
    k1, k2, k3 = rng.uniform(-0.08, 0.08, 3)
    cos_t = pn / np.sqrt(pn**2 + qn**2 + 1e-6)
    bulge = 1 + k1 * pn * rn + k2 * qn * rn**2 + k3 * (4 * cos_t**3 - 3 * cos_t)  # cos(3 theta)
    rho2 = pn**2 + qn**2 + rn**2
    fm = fat_margin
    fat = (p / (ap + fm)) ** 2 + (q / (aq + fm * 0.8)) ** 2 + (r / (ar + fm * 1.2)) ** 2 <= 1
    cv.paint(sl, fat, T.PERIRENAL_FAT, over=_SOFT)
    inside = rho2 <= bulge**2
    notch = ((p + ap) / (0.55 * ap)) ** 2 + (q / (0.4 * aq)) ** 2 + (r / (0.42 * ar)) ** 2 <= 1
    kl, sl_lab, pl = (T.KIDNEY_R, T.SINUS_R, T.PELVIS_R) if side < 0 else (T.KIDNEY_L, T.SINUS_L, T.PELVIS_L)
    soft = _SOFT + (T.PERIRENAL_FAT, T.MUSCLE)
    cv.paint(sl, inside & ~notch, kl, over=soft)
    cv.paint(sl, inside & notch, sl_lab, over=soft)
    # renal pelvis: fluid sac in the sinus, opening medially out of the hilum
    pc = (-0.72 * ap, rng.uniform(-0.1, 0.1) * aq, rng.uniform(-0.15, 0.0) * ar)
    psemi = (0.42 * ap * rng.uniform(0.8, 1.2), 0.3 * aq * rng.uniform(0.8, 1.2), 0.22 * ar * rng.uniform(0.8, 1.2))
    pel = ((p - pc[0]) / psemi[0]) ** 2 + ((q - pc[1]) / psemi[1]) ** 2 + ((r - pc[2]) / psemi[2]) ** 2 <= 1
    cv.paint(sl, pel, pl, over=soft + (sl_lab, kl, T.PERIRENAL_FAT))
    pel_centre = np.asarray(centre) + frame.T @ np.asarray(pc)
    pelvis = _Ellipsoid(tuple(pel_centre), psemi, frame)
    # ureter: from the pelvis down along the psoas
    start = np.asarray(centre) + frame.T @ np.array([pc[0] - psemi[0] * 0.8, pc[1], pc[2] - psemi[2] * 0.5])
    pts = [start]
    for step in range(1, 6):
        nxt = pts[-1] + np.array([-side * rng.uniform(0, 5), rng.uniform(-4, 2), -35.0])
        pts.append(nxt)
    _paint_tube(cv, np.array(pts), rng.uniform(2.0, 3.2), T.URETER, over=(T.PERIRENAL_FAT, T.VISCERAL_FAT))
    return kid, pelvis


def _kidney_frame(base: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Orthonormal local axes: rotate hilum antero-medially (alpha), tilt the long axis (beta, gamma)."""
    # Work in base coordinates (p0 lateral, q0 anterior, r0 superior) and map back with ``base``.
    p = np.array([math.cos(alpha), -math.sin(alpha), 0.0])  # medial side (-p) turns anteriorly
    q = np.array([math.sin(alpha), math.cos(alpha), 0.0])
    r = np.array([0.0, 0.0, 1.0])
    # upper pole medial: r leans towards -p0; upper pole posterior: r leans towards -q0
    r = r * math.cos(beta) * math.cos(gamma) + np.array([-math.sin(beta), -math.sin(gamma) * math.cos(beta), 0.0])
    r /= np.linalg.norm(r)
    p = p - (p @ r) * r
    p /= np.linalg.norm(p)
    q = np.cross(r, p)
    rows = np.stack([p, q, r])
    return rows @ base  # rows expressed in anatomical (u, v, w)


def _bowel(cv: _Canvas, rng: np.random.Generator, a_cav: float, b_cav: float, w_top: float, w_bot: float) -> None:
    """Colon (with stool and gas) and small-bowel loops (fluid, gas-fluid levels, collapsed)."""
    def loop(points: np.ndarray, radius: float, content: str) -> None:
        wall = rng.uniform(1.8, 3.0)
        _paint_tube(cv, points, radius, T.BOWEL_WALL, over=_CAVITY)
        inner = radius - wall
        if inner <= 0.5 or content == "collapsed":
            return
        fill = T.STOOL if content == "stool" else T.BOWEL_FLUID
        _paint_tube(cv, points, inner, fill, over=(T.BOWEL_WALL,) + _CAVITY)
        if content in ("gas", "level", "stool"):
            # gas rises anteriorly (patient supine: anterior = -v)
            lo, hi = points.min(0) - radius, points.max(0) + radius
            c, h = (lo + hi) / 2, (hi - lo) / 2
            sl = cv.box(*c, *h)
            if sl is None:
                return
            v = cv.plane(sl)[1]
            frac = {"gas": 0.9, "level": rng.uniform(0.2, 0.6), "stool": rng.uniform(0.1, 0.5)}[content]
            level = float(points[:, 1].mean()) - inner + 2 * inner * frac  # gas where v < level
            cv.paint(sl, v < level, T.BOWEL_GAS, over=(fill,))

    # colon: ascending (patient right), transverse (anterior), descending (left)
    w_hf = w_top - rng.uniform(60, 90)
    r_col = rng.uniform(16, 24)
    asc = np.array([[-0.72 * a_cav, 0.0, w_bot - 20], [-0.7 * a_cav, -0.15 * b_cav, (w_bot + w_hf) / 2],
                    [-0.62 * a_cav, -0.3 * b_cav, w_hf]])
    sag = rng.uniform(10, 60)
    trans = np.array([[-0.62 * a_cav, -0.3 * b_cav, w_hf], [-0.2 * a_cav, -0.62 * b_cav, w_hf - sag],
                      [0.3 * a_cav, -0.6 * b_cav, w_hf - sag * 0.7], [0.66 * a_cav, -0.2 * b_cav, w_top - 40]])
    desc = np.array([[0.66 * a_cav, -0.2 * b_cav, w_top - 40], [0.75 * a_cav, 0.1 * b_cav, (w_top + w_bot) / 2],
                     [0.72 * a_cav, 0.0, w_bot - 20]])
    for pts in (asc, trans, desc):
        loop(pts, r_col * rng.uniform(0.8, 1.1), "stool")
    # small bowel loops: anterior and central, mostly below the liver
    n = int(rng.integers(35, 60))
    kinds = rng.choice(["fluid", "level", "collapsed", "gas"], size=n, p=[0.45, 0.3, 0.17, 0.08])
    for i in range(n):
        c = np.array([rng.uniform(-0.6, 0.6) * a_cav, rng.uniform(-0.85, 0.15) * b_cav,
                      rng.uniform(w_bot, w_top - 60)])
        d = rng.normal(size=3)
        d[2] *= 0.6
        d /= np.linalg.norm(d)
        length = rng.uniform(15, 60)
        bend = rng.normal(size=3) * 10
        pts = np.array([c - d * length / 2, c + bend, c + d * length / 2])
        loop(pts, rng.uniform(8, 14), str(kinds[i]))


def _cavity_semi(a: float, b_ant: float, b_post: float, wall_mm: float) -> tuple[float, float]:
    return a - wall_mm, (b_ant + b_post) / 2 - wall_mm


# ----------------------------------------------------------------------------- one patient


def _paint_upper_organs(cv: _Canvas, rng: np.random.Generator, a_cav: float, b_cav: float,
                        lv: dict[str, float]) -> None:
    """Liver, gallbladder, stomach, spleen and lung bases (over the cavity's fat and bowel)."""
    # liver: right lobe (large), left lobe crossing the midline anteriorly
    liver_top = lv["T11"] + rng.uniform(0, 30)
    cav = _CAVITY + (T.BOWEL_WALL, T.BOWEL_FLUID, T.BOWEL_GAS, T.STOOL)
    # the right lobe's lower part lies antero-lateral (in front of the right kidney)
    right = _Ellipsoid((-0.42 * a_cav, -0.05 * b_cav, liver_top - rng.uniform(60, 75)),
                       (0.68 * a_cav, 0.85 * b_cav, rng.uniform(75, 105)),
                       _tilted(rng.uniform(0.15, 0.35), rng.uniform(0.3, 0.55), rng.uniform(-0.2, 0.2)))
    left = _Ellipsoid((0.02 * a_cav, -0.5 * b_cav, liver_top - rng.uniform(35, 50)),
                      (rng.uniform(0.3, 0.5) * a_cav, 0.32 * b_cav, rng.uniform(35, 55)))
    _paint_ellipsoid(cv, right, T.LIVER, over=cav)
    _paint_ellipsoid(cv, left, T.LIVER, over=cav)
    if rng.random() < 0.7:
        gb = _Ellipsoid((-0.3 * a_cav, -0.55 * b_cav, right.centre[2] - rng.uniform(20, 50)),
                        (rng.uniform(12, 18), rng.uniform(12, 18), rng.uniform(25, 40)))
        _paint_ellipsoid(cv, gb, T.GALLBLADDER, over=cav + (T.LIVER,))
    # stomach: left upper quadrant, anterior, food/fluid with a gas cap
    st = _Ellipsoid((0.3 * a_cav, -0.4 * b_cav, lv["T11"] - rng.uniform(0, 25)),
                    (rng.uniform(35, 50), rng.uniform(28, 40), rng.uniform(45, 65)), _rot(2, rng.uniform(-0.4, 0.2)))
    _paint_ellipsoid(cv, st, T.BOWEL_WALL, over=cav)
    _paint_ellipsoid(cv, st, T.BOWEL_FLUID, grow=-4, over=(T.BOWEL_WALL,))
    sl = st.box(cv)
    if sl is not None:
        cv.paint(sl, (cv.plane(sl)[1] < st.centre[1] - st.semi[1] * rng.uniform(0.2, 0.6)), T.BOWEL_GAS,
                 over=(T.BOWEL_FLUID,))

    # spleen: postero-lateral left, oblique
    spl = _Ellipsoid((0.62 * a_cav, 0.38 * b_cav, lv["T11"] - rng.uniform(0, 30)),
                     (rng.uniform(16, 24), rng.uniform(40, 60), rng.uniform(40, 60)), _rot(2, rng.uniform(0.5, 0.9)))
    _paint_ellipsoid(cv, spl, T.SPLEEN, over=cav)
    # lung bases: posterior costophrenic recesses in the top slices, above liver and spleen domes
    for side in (-1, 1):
        lung = _Ellipsoid((side * 0.5 * a_cav, 0.45 * b_cav, lv["T10"] + rng.uniform(10, 25)),
                          (0.42 * a_cav, 0.5 * b_cav, rng.uniform(45, 60)))
        _paint_ellipsoid(cv, lung, T.LUNG, over=cav + (T.LIVER, T.SPLEEN))


def _paint_kidneys(cv: _Canvas, rng: np.random.Generator, sp: _Spine, fat: float, scale: float
                   ) -> dict[int, tuple[_Ellipsoid, _Ellipsoid]]:
    """Both kidneys with perirenal fat (thin patients have little); side -1 = right, +1 = left."""
    fat_margin = 1.5 + 11.0 * fat + rng.uniform(0, 3)
    w_left = sp.level_z["L1"] - rng.uniform(0, 0.4) * sp.period
    w_right = w_left - rng.uniform(10, 25)
    kidneys: dict[int, tuple[_Ellipsoid, _Ellipsoid]] = {}
    for side, wc in ((-1, w_right), (1, w_left)):
        cu = sp.centre(wc)[0] + side * (sp.semi(wc)[0] + rng.uniform(30, 42) * scale)
        cvv = sp.centre(wc)[1] + rng.uniform(-5, 10)
        kidneys[side] = _kidney(cv, rng, side, (float(cu), float(cvv), float(wc)), fat_margin)
    return kidneys


def _paint_back_muscles(cv: _Canvas, rng: np.random.Generator, sp: _Spine, b_post: float, fat_back: float,
                        w_top: float, w_bot: float) -> None:
    """Psoas, quadratus lumborum and erector spinae on both sides (never over the kidneys)."""
    keep_k = (T.KIDNEY_R, T.KIDNEY_L, T.SINUS_R, T.SINUS_L, T.PELVIS_R, T.PELVIS_L)
    r_psoas = rng.uniform(0.8, 1.2)
    for side in (-1, 1):
        def ps_semi(w, k=r_psoas):
            grow = np.clip((sp.level_z["T12"] - w) / (3.5 * sp.period), 0, 1.0)
            return 4 + 17 * k * grow, 4 + 14 * k * grow

        def ps_centre(w, s=side):
            cu, cvv = sp.centre(w)
            su = ps_semi(w)[0]
            return cu + s * (sp.semi(w)[0] + su * 0.7), cvv - 0.1 * sp.semi(w)[1]

        _paint_column(cv, T.MUSCLE, w_bot - 10, sp.level_z["T12"], ps_centre, ps_semi, keep=keep_k)
        ql = rng.uniform(14, 20)
        _paint_column(cv, T.MUSCLE, w_bot - 10, sp.level_z["L1"] + 10,
                      lambda w, s=side: (sp.centre(w)[0] + s * (sp.semi(w)[0] + 42), sp.centre(w)[1] + 22),
                      lambda w, r=ql: (r, 9.0), keep=keep_k)
        # erector spinae: fills the room between the laminae and the back's fat
        front, back = sp.v0 + sp.b_vb + 12, b_post - fat_back
        _paint_column(cv, T.MUSCLE, w_bot - 10, w_top + 10,
                      lambda w, s=side: (sp.centre(w)[0] + s * 27, sp.centre(w)[1] - sp.v0 + (front + back) / 2),
                      lambda w: (26.0, (back - front) / 2 + 2), over=(T.FAT, T.VISCERAL_FAT, T.MUSCLE))


def _paint_vessels(cv: _Canvas, rng: np.random.Generator, sp: _Spine,
                   kidneys: dict[int, tuple[_Ellipsoid, _Ellipsoid]], w_top: float, w_bot: float) -> float:
    """Aorta (anterior-left of the spine, bifurcating near L4), iliacs, IVC, renal vessels and
    aortic wall calcifications; returns the height of the bifurcation."""
    r_ao = rng.uniform(9, 13)
    ao_du = rng.uniform(8, 18)
    w_bif = sp.level_z["L4"] + rng.uniform(-10, 15)

    ao_gap = rng.uniform(1, 4)
    ivc_du = rng.uniform(18, 28)

    def ao_centre(w):
        return sp.centre(w)[0] + ao_du, sp.front(w) - r_ao - ao_gap

    _paint_column(cv, T.AORTA, w_bif, w_top + 10, ao_centre, lambda w: (r_ao, r_ao))
    for side in (-1, 1):
        _paint_column(cv, T.VESSEL, w_bot - 10, w_bif,
                      lambda w, s=side: (ao_centre(w)[0] + s * 0.9 * (w_bif - w) * 0.5 + s * r_ao * 0.5,
                                         ao_centre(w)[1] + 0.2 * (w_bif - w)),
                      lambda w: (0.62 * r_ao, 0.62 * r_ao), keep=(T.AORTA,))
    ivc = (rng.uniform(13, 17), rng.uniform(8, 11))
    _paint_column(cv, T.VESSEL, w_bot - 10, w_top + 10,
                  lambda w: (sp.centre(w)[0] - ivc_du, sp.front(w) - ivc[1] - 3), lambda w: ivc, keep=(T.AORTA,))
    for side, (kid, pel) in kidneys.items():
        hilum = np.asarray(pel.centre) + np.array([-side * 8.0, -6.0, 4.0])
        target = (np.array([*ao_centre(hilum[2]), hilum[2]]) if side > 0
                  else np.array([sp.centre(hilum[2])[0] - ivc_du, sp.front(hilum[2]) - ivc[1] - 3, hilum[2]]))
        _paint_tube(cv, np.array([hilum, (hilum + target) / 2 + [0, -5, 3], target]), rng.uniform(3, 5), T.VESSEL,
                    over=(T.VISCERAL_FAT, T.PERIRENAL_FAT, T.SINUS_R, T.SINUS_L, T.BOWEL_WALL, T.BOWEL_FLUID))
    if rng.random() < 0.5:  # wall calcifications
        for _ in range(int(rng.integers(2, 9))):
            w = rng.uniform(w_bif, min(w_top, sp.level_z["T12"]))
            th = rng.uniform(0, 2 * np.pi)
            cu, cvv = ao_centre(np.array([w]))
            c = (float(cu[0]) + r_ao * math.cos(th), float(cvv[0]) + r_ao * math.sin(th), w)
            _paint_ellipsoid(cv, _Ellipsoid(c, (rng.uniform(1, 2.2),) * 2 + (rng.uniform(2, 6),)), T.CALCIFICATION)
    return w_bif


def phantom_patient(rng: np.random.Generator, index: int) -> PhantomPatient:
    """Build one phantom patient in memory.

    Every random choice comes from ``rng`` (``generate_phantom`` seeds it with ``[seed, index]``);
    the 0-based ``index`` only decides which patients get corrupted landmarks: one landmark
    10-30 mm off in patients 2, 7, 12, ... and one far outside the image in patients 4, 14, ...
    (1-based ids), i.e. 20% and 10% of a data set.
    """
    g = _draw_geometry(rng)
    cv = g.canvas
    a, b_ant, b_post, fat = g.a, g.b_ant, g.b_post, g.fat
    zscale = 1 + 0.04 * np.clip((g.z_l1 - cv.z) / 100, -1.5, 1.5) + 0.01 * np.sin(cv.z / 37)
    ang, skin_fat, wall, depth = _body(cv, rng, a, b_ant, b_post, fat, zscale)
    wall_mean = float(np.median(wall))
    a_cav, b_cav = _cavity_semi(a, b_ant, b_post, wall_mean)
    rows = np.nonzero((cv.lab != T.AIR).any(axis=(0, 2)))[0]
    _table(cv, float(cv.y[rows[-1]]) + rng.uniform(0.5, 4), rng)

    fat_back = float(np.median(skin_fat[np.abs(ang) < 0.3]))
    sp = _spine(rng, g.z_l1, g.scale, b_post, fat_back)
    lv = sp.level_z
    w_top, w_bot = float(cv.z[-1]), float(cv.z[0])

    _bowel(cv, rng, a_cav, b_cav, w_top, w_bot)
    _paint_upper_organs(cv, rng, a_cav, b_cav, lv)
    pelvis_in_mask = bool(rng.random() < 0.5)
    kidneys = _paint_kidneys(cv, rng, sp, fat, g.scale)
    _paint_back_muscles(cv, rng, sp, b_post, fat_back, w_top, w_bot)
    w_bif = _paint_vessels(cv, rng, sp, kidneys, w_top, w_bot)

    _paint_spine(cv, sp, rng)
    _paint_ribs(cv, sp, ang, wall, depth)

    outside_fov = bool(rng.random() < 0.4)
    if outside_fov:
        _mark_outside_fov(cv)
    image, noise_sd = _to_hu(cv.lab, rng, g.spacing)
    lab = cv.lab
    masks = _masks(lab, pelvis_in_mask, (cv.z >= w_bif)[:, None, None])
    truth = _true_landmarks(cv, sp, kidneys)
    geometry = g.geometry
    # Every 5th patient has one misplaced landmark, every 10th one far outside (never both).
    landmarks, misplaced = corrupt_landmarks(rng, truth, geometry, misplace=index % 5 == 1, far=index % 10 == 3)
    flipped = bool(rng.random() < 0.15)
    if flipped:
        image, lab, masks, geometry = _flip_xy(image, lab, masks, geometry)
    info = PhantomInfo(pelvis_in_mask, truth, misplaced, flipped, outside_fov, (a, (b_ant + b_post) / 2),
                       noise_sd, math.degrees(g.angle))
    return PhantomPatient(image, masks, lab, landmarks, geometry, info)


def _mark_outside_fov(cv: _Canvas) -> None:
    """Voxels outside the scanner's circular reconstruction field (they will hold -2048)."""
    xx = cv.x[None, :] - (cv.x[0] + cv.x[-1]) / 2
    yy = cv.y[:, None] - (cv.y[0] + cv.y[-1]) / 2
    r = min(cv.x[-1] - cv.x[0], cv.y[-1] - cv.y[0]) / 2
    cv.lab[np.broadcast_to((xx**2 + yy**2 > r**2)[None], cv.lab.shape)] = T.OUTSIDE_FOV


def _masks(lab: np.ndarray, pelvis_in_mask: bool, above_bifurcation: np.ndarray) -> dict[str, np.ndarray]:
    """Organ masks from the tissue labels; kidneys with or without sinus and pelvis."""
    return {
        "kidney_right": np.isin(lab, (T.KIDNEY_R, T.SINUS_R, T.PELVIS_R) if pelvis_in_mask else (T.KIDNEY_R,)),
        "kidney_left": np.isin(lab, (T.KIDNEY_L, T.SINUS_L, T.PELVIS_L) if pelvis_in_mask else (T.KIDNEY_L,)),
        "liver": lab == T.LIVER,
        "spleen": lab == T.SPLEEN,
        "aorta": np.isin(lab, (T.AORTA, T.CALCIFICATION)) & above_bifurcation,
    }


def _true_landmarks(cv: _Canvas, sp: _Spine, kidneys: dict[int, tuple[_Ellipsoid, _Ellipsoid]]) -> list[Landmark]:
    """Renal-pelvis centres and vertebral-body centres in LPS mm (rounded to 1 micrometre)."""
    lv = sp.level_z
    truth = [
        Landmark("renal_pelvis_right", cv.to_physical(*kidneys[-1][1].centre)),
        Landmark("renal_pelvis_left", cv.to_physical(*kidneys[1][1].centre)),
    ] + [Landmark(n, cv.to_physical(*(float(c) for c in sp.centre(lv[n])), lv[n])) for n in LANDMARKS[2:]]
    return [Landmark(lm.name, tuple(round(float(c), 3) for c in lm.position)) for lm in truth]


@dataclass
class _Draw:
    canvas: _Canvas
    geometry: Geometry
    spacing: tuple[float, float, float]
    a: float
    b_ant: float
    b_post: float
    fat: float
    scale: float
    z_l1: float
    angle: float


def _draw_geometry(rng: np.random.Generator) -> _Draw:
    """Body size, field of view, spacing, origin and rotation of one patient."""
    fat = float(rng.beta(2.0, 2.5))  # 0 = very lean, 1 = obese
    scale = rng.uniform(0.92, 1.08)
    a = rng.uniform(118, 138) * (0.9 + 0.2 * fat)
    b_ant = a * rng.uniform(0.68, 0.82)
    b_post = b_ant * rng.uniform(0.85, 1.0)
    sxy = round(rng.uniform(0.7, 0.9), 4)
    fov = 2 * a / rng.uniform(0.84, 0.94)
    n = int(np.clip(round(fov / sxy / 2) * 2, 320, 384))
    a = min(a, 0.47 * n * sxy)  # the body stays (mostly) in the field of view
    b_ant, b_post = min(b_ant, 0.9 * a), min(b_post, 0.9 * a)
    sz = float(rng.choice([2.5, 3.0, 3.0, 4.0, 5.0, 5.0]))
    nz = int(np.clip(round(rng.uniform(180, 220) / sz), 40, 72))
    period = 35.5 * scale
    z_l1 = round(rng.uniform(-700, 100), 2)
    z_top = z_l1 + rng.uniform(1.85, 2.3) * period  # between the T12 and T11 bodies
    z0 = round(z_top - (nz - 1) * sz, 3)
    ox, oy = round(rng.uniform(-180, -150), 3), round(rng.uniform(-180, -150), 3)
    x = ox + sxy * np.arange(n)
    y = oy + sxy * np.arange(n)
    z = z0 + sz * np.arange(nz)
    centre = (ox + sxy * (n - 1) / 2 + rng.uniform(-12, 12), oy + sxy * (n - 1) / 2 + rng.uniform(-18, 8))
    angle = math.radians(rng.uniform(-6, 6))
    canvas = _Canvas(x, y, z, centre, angle)
    geometry = Geometry(size=(n, n, nz), spacing=(sxy, sxy, sz), origin=(ox, oy, z0))
    return _Draw(canvas, geometry, (sxy, sxy, sz), a, b_ant, b_post, fat, scale, z_l1, angle)


def _to_hu(lab: np.ndarray, rng: np.random.Generator, spacing: tuple[float, float, float]) -> tuple[np.ndarray, float]:
    """Label volume -> int16 HU: tissue means + texture, partial-volume blur, correlated noise, clipping."""
    from scipy import ndimage

    means = np.zeros(256, np.float32)
    tex = np.zeros(256, np.float32)
    for t, (lo, hi, sd) in TISSUE_HU.items():
        means[t] = rng.uniform(lo, hi)
        tex[t] = sd
    for t, src in _SAME_MEAN.items():
        means[t] = means[src] + rng.uniform(-1, 1)
    noise_sd = float(rng.uniform(10, 20))
    sig_mm = rng.uniform(0.6, 0.9)
    sigma = (0.45, sig_mm / spacing[1], sig_mm / spacing[0])  # z (slice profile), y, x in voxels
    # White noise added before the blur comes out spatially correlated; scale it so the final
    # sd is noise_sd (the blur shrinks white noise by sqrt(sum of squared kernel weights)).
    # Texture and noise are independent Gaussians: one draw with the combined sd per tissue.
    sd = np.sqrt(tex**2 + np.float32(noise_sd / _noise_gain(sigma)) ** 2).astype(np.float32)
    hu = means[lab]
    hu += rng.standard_normal(lab.shape, dtype=np.float32) * sd[lab]
    stool = np.flatnonzero(lab == T.STOOL)
    hu.reshape(-1)[stool[rng.random(stool.size) < 0.12]] = -950  # gas bubbles in stool
    hu = ndimage.gaussian_filter(hu, sigma, mode="nearest", truncate=3.0)
    hu[lab == T.OUTSIDE_FOV] = HU_RANGE[0]
    np.clip(hu, *HU_RANGE, out=hu)
    return np.rint(hu).astype(np.int16), noise_sd


def _noise_gain(sigma: tuple[float, float, float]) -> float:
    """The sd of unit white noise after ``gaussian_filter(sigma, truncate=3)``."""
    from scipy import ndimage

    g = 1.0
    for s in sigma:
        d = np.zeros(41, np.float64)
        d[20] = 1.0
        k = ndimage.gaussian_filter1d(d, s, truncate=3.0)
        g *= float(np.sqrt((k**2).sum()))
    return g


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


def _flip_xy(image, lab, masks, geometry: Geometry):
    """Store a patient with direction diag(-1, -1, 1): same physical content, reversed x and y indices."""
    n = geometry.size
    sx, sy, _ = geometry.spacing
    ox, oy, oz = geometry.origin
    flip = lambda a: np.ascontiguousarray(a[:, ::-1, ::-1])  # noqa: E731
    origin = (round(ox + (n[0] - 1) * sx, 4), round(oy + (n[1] - 1) * sy, 4), oz)
    geo = Geometry(size=n, spacing=geometry.spacing, origin=origin, direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return flip(image), flip(lab), {k: flip(v) for k, v in masks.items()}, geo


# ----------------------------------------------------------------------------- files


def _write_patient(folder: Path, pid: str, p: PhantomPatient) -> dict[str, str]:
    from mtlbench.data.io import write_volume
    from mtlbench.data.landmarks import write_fcsv

    row = {"patient": pid, "image": f"{pid}_ct.nii.gz", "landmarks": f"{pid}_landmarks.fcsv"}
    write_volume(folder / row["image"], p.image, p.geometry, dtype=np.int16)
    for organ in ORGANS:
        name = f"{pid}_{organ}.nii.gz"
        write_volume(folder / name, p.masks[organ], p.geometry, dtype=np.uint8)
        row[f"mask:{organ}"] = name
    write_fcsv(folder / row["landmarks"], p.landmarks, coordinate_system="LPS")
    return row


def _marker(patients: int, seed: int) -> dict[str, object]:
    return {"generator": "mtlbench.phantom", "version": PHANTOM_VERSION, "patients": patients, "seed": seed}


def _check_args(patients: int, seed: int) -> None:
    if not isinstance(patients, int) or patients < 1:
        raise DataError(f"phantom: patients must be a positive integer, got {patients!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"phantom: seed must be a non-negative integer, got {seed!r}")


def _make_patient(folder: Path, seed: int, index: int) -> dict[str, str]:
    """Build and write patient ``index`` (runs in a worker process when generating in parallel)."""
    return _write_patient(folder, patient_id(index), phantom_patient(np.random.default_rng([seed, index]), index))


def default_workers(patients: int) -> int:
    """Worker processes for ``patients`` patients: one per available core (at most 4), and none
    (in-process) below 4 patients, where starting workers (~1.5 s each) does not pay."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    return 1 if patients < 4 else max(1, min(cores, 4, patients))


def _generate_into(folder: Path, patients: int, seed: int, progress: Callable[[int], None] | None,
                   workers: int | None = None) -> None:
    workers = default_workers(patients) if workers is None else max(1, min(int(workers), patients))
    rows: dict[int, dict[str, str]] = {}
    if workers == 1:
        for i in range(patients):
            rows[i] = _make_patient(folder, seed, i)
            if progress is not None:
                progress(len(rows))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the caller may hold threads (torch, ray) that fork would break
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(_make_patient, folder, seed, i): i for i in range(patients)}
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                if progress is not None:
                    progress(len(rows))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[i] for i in range(patients))
    (folder / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
    (folder / MARKER).write_text(json.dumps(_marker(patients, seed)) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _temp_sibling(out_dir: Path):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_phantom(out_dir: Path, patients: int, seed: int, progress: Callable[[int], None] | None = None,
                     workers: int | None = None) -> Path:
    """Write a phantom data set of ``patients`` patients to ``out_dir``; return its manifest.csv.

    The set is written into a temporary sibling folder and renamed to ``out_dir`` when complete.
    ``progress`` is called after each patient with the number of patients written so far.
    ``workers`` processes build patients in parallel (default: :func:`default_workers`); the files
    are the same whatever the number. An existing non-empty ``out_dir`` is a DataError.
    """
    out_dir = Path(out_dir)
    _check_args(patients, seed)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not empty; choose a new folder for the phantom")
    with _temp_sibling(out_dir) as tmp:
        _generate_into(tmp, patients, seed, progress, workers)
        _publishable(tmp)
        try:
            os.rename(tmp, out_dir)  # also replaces an empty directory
        except OSError:
            raise DataError(f"{out_dir}: appeared while the phantom was generated; not overwritten") from None
    return out_dir / "manifest.csv"


def _publishable(folder: Path) -> None:
    """Give the temporary folder (created 0700) the permissions a normal mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def phantom_complete(out_dir: Path, patients: int, seed: int) -> bool:
    """True when ``out_dir`` holds a complete phantom set of this version, size and seed."""
    try:
        marker = json.loads((Path(out_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == _marker(patients, seed) and (Path(out_dir) / "manifest.csv").is_file()


def ensure_phantom(out_dir: Path, patients: int, seed: int, workers: int | None = None) -> Path:
    """Return ``out_dir/manifest.csv``, generating the phantom there first unless a matching set exists.

    A phantom set of another version, size or seed is replaced; a folder that is not a phantom
    set is a DataError. Concurrent callers are safe: each generates into its own temporary folder
    and the first rename wins; the others use the winner's set.
    """
    out_dir = Path(out_dir)
    _check_args(patients, seed)
    manifest = out_dir / "manifest.csv"
    if phantom_complete(out_dir, patients, seed):
        return manifest
    _refuse_foreign(out_dir)
    with _temp_sibling(out_dir) as tmp:
        _generate_into(tmp, patients, seed, None, workers)
        _publishable(tmp)
        for _ in range(5):
            if phantom_complete(out_dir, patients, seed):
                return manifest
            try:
                os.rename(tmp, out_dir)
                return manifest
            except OSError:
                pass
            _refuse_foreign(out_dir)
            # a stale phantom set: move it aside (atomically), then retry the rename
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            try:
                os.rename(out_dir, trash / "set")
            except OSError:
                pass
            finally:
                shutil.rmtree(trash, ignore_errors=True)
    if phantom_complete(out_dir, patients, seed):
        return manifest
    raise DataError(f"{out_dir}: could not install the phantom set (another process keeps replacing it)")


def _refuse_foreign(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).is_file())):
        raise DataError(f"{out_dir}: exists and is not a phantom data set; not overwritten")
