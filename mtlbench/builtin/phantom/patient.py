"""One phantom patient in memory (:func:`phantom_patient`): its geometry, painted anatomy, HU image,
organ masks and landmarks.

Each patient is built in physical millimetres (LPS: +x = patient left, +y = posterior,
+z = superior) as a volume of tissue labels painted structure by structure (body wall,
bowel, organs, retroperitoneum, vessels, spine, ribs); the labels become Hounsfield units
with per-patient tissue means and texture, then partial-volume blur and noise are added and
the values are rounded to int16 in [-2048, 2048] like the study's raw data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from mtlbench.api import Geometry, Landmark
from mtlbench.builtin.phantom.anatomy import (
    _body,
    _bowel,
    _cavity_semi,
    _mark_outside_fov,
    _paint_back_muscles,
    _paint_kidneys,
    _paint_ribs,
    _paint_spine,
    _paint_upper_organs,
    _paint_vessels,
    _spine,
    _table,
)
from mtlbench.builtin.phantom.canvas import Tissue, _Canvas
from mtlbench.builtin.phantom.intensity import _to_hu
from mtlbench.builtin.phantom.landmarks import _true_landmarks, corrupt_landmarks

T = Tissue


ORGANS: tuple[str, ...] = ("kidney_right", "kidney_left", "liver", "spleen", "aorta")


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


def _masks(lab: np.ndarray, pelvis_in_mask: bool, above_bifurcation: np.ndarray) -> dict[str, np.ndarray]:
    """Organ masks from the tissue labels; kidneys with or without sinus and pelvis."""
    return {
        "kidney_right": np.isin(lab, (T.KIDNEY_R, T.SINUS_R, T.PELVIS_R) if pelvis_in_mask else (T.KIDNEY_R,)),
        "kidney_left": np.isin(lab, (T.KIDNEY_L, T.SINUS_L, T.PELVIS_L) if pelvis_in_mask else (T.KIDNEY_L,)),
        "liver": lab == T.LIVER,
        "spleen": lab == T.SPLEEN,
        "aorta": np.isin(lab, (T.AORTA, T.CALCIFICATION)) & above_bifurcation,
    }


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


def _flip_xy(image, lab, masks, geometry: Geometry):
    """Store a patient with direction diag(-1, -1, 1): same physical content, reversed x and y indices."""
    n = geometry.size
    sx, sy, _ = geometry.spacing
    ox, oy, oz = geometry.origin
    flip = lambda a: np.ascontiguousarray(a[:, ::-1, ::-1])  # noqa: E731
    origin = (round(ox + (n[0] - 1) * sx, 4), round(oy + (n[1] - 1) * sy, 4), oz)
    geo = Geometry(size=n, spacing=geometry.spacing, origin=origin, direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return flip(image), flip(lab), {k: flip(v) for k, v in masks.items()}, geo
