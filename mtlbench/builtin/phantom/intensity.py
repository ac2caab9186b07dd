"""CT intensities of the phantom: per-tissue Hounsfield units, and the conversion of a tissue-label
volume to int16 HU with texture, partial-volume blur, correlated noise and clipping."""

from __future__ import annotations

import numpy as np

from mtlbench.builtin.phantom.canvas import Tissue

T = Tissue


HU_RANGE = (-2048, 2048)

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
    T.KIDNEY_R: (10, 40, 4),
    T.KIDNEY_L: (10, 40, 4),
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
