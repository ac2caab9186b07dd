"""The phantom's anatomy, painted as tissue labels: body wall, couch, bowel, upper organs, kidneys,
back muscles, vessels, spine and ribs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtlbench.builtin.phantom.canvas import (
    Tissue,
    _Canvas,
    _column,
    _Ellipsoid,
    _paint_column,
    _paint_ellipsoid,
    _paint_tube,
    _rot,
    _tilted,
)

T = Tissue


_LEVELS = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
_L1 = _LEVELS.index("L1")

_CAVITY = (T.VISCERAL_FAT,)
_SOFT = (T.VISCERAL_FAT, T.BOWEL_WALL, T.BOWEL_FLUID, T.BOWEL_GAS, T.STOOL, T.LIVER, T.SPLEEN, T.GALLBLADDER)


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


def _mark_outside_fov(cv: _Canvas) -> None:
    """Voxels outside the scanner's circular reconstruction field (they will hold -2048)."""
    xx = cv.x[None, :] - (cv.x[0] + cv.x[-1]) / 2
    yy = cv.y[:, None] - (cv.y[0] + cv.y[-1]) / 2
    r = min(cv.x[-1] - cv.x[0], cv.y[-1] - cv.y[0]) / 2
    cv.lab[np.broadcast_to((xx**2 + yy**2 > r**2)[None], cv.lab.shape)] = T.OUTSIDE_FOV
