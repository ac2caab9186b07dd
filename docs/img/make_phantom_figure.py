"""Draws docs/img/phantom.png: axial phantom slices at kidney level beside a real CT slice.

Run from the repository root: ``python docs/img/make_phantom_figure.py [--seed 0] [--out docs/img/phantom.png]``.
Three phantom patients (in memory, as ``mtlbench data phantom`` would write them) are shown at the
level of the right renal pelvis with their kidney mask contours and renal-pelvis landmarks, next to
the real TotalSegmentator example CT with its kidney labels (2 = right, 3 = left). All panels use
the same window (W 400 / L 40), millimetre axes and radiological convention (patient right on
image left, anterior up), whatever the images' direction cosines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtlbench.api import Geometry, Landmark  # noqa: E402
from mtlbench.builtin.phantom import patient_id, phantom_patient  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "realdata" / "totalsegmentator"
WINDOW = (40 - 200, 40 + 200)  # level 40, width 400
KIDNEY_COLOURS = {"kidney_right": "#ff5a36", "kidney_left": "#3cd070"}


def radiological(slice2d: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, list[float]]:
    """An axial slice (rows j, columns i) turned so that patient right is on the left and anterior
    is up, and its extent in LPS mm (x from left to right, y from top to bottom) for imshow."""
    d = np.asarray(geometry.direction).reshape(3, 3)
    if not np.allclose(np.abs(d), np.eye(3), atol=1e-6):
        raise ValueError("only axis-aligned directions are drawn")
    sx, sy = geometry.spacing[0] * d[0, 0], geometry.spacing[1] * d[1, 1]
    out = slice2d
    if sx < 0:  # i runs towards patient right: reverse the columns
        out = out[:, ::-1]
    if sy < 0:  # j runs anteriorly: reverse the rows so that anterior (small y) is at the top
        out = out[::-1, :]
    ox, oy = geometry.origin[0], geometry.origin[1]
    nx, ny = geometry.size[0], geometry.size[1]
    xs = sorted([ox - sx / 2, ox + sx * (nx - 0.5)])
    ys = sorted([oy - sy / 2, oy + sy * (ny - 0.5)])
    return out, [xs[0], xs[1], ys[1], ys[0]]


def slice_of(point: tuple[float, float, float], geometry: Geometry) -> int:
    k, _, _, _ = np.linalg.inv(geometry.index_to_physical()) @ np.r_[point, 1.0]
    return int(round(k))


def draw_panel(ax, image2d, extent, masks2d: dict[str, np.ndarray], title: str) -> None:
    ax.imshow(image2d, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], extent=extent, interpolation="bilinear")
    for name, m in masks2d.items():
        if m.any():
            ax.contour(m.astype(float), [0.5], colors=KIDNEY_COLOURS[name], linewidths=0.9, extent=extent,
                       origin="upper")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (LPS mm): patient right  \u2190  \u2192  left", fontsize=7)
    ax.tick_params(labelsize=6)


def phantom_panel(ax, seed: int, index: int) -> None:
    p = phantom_patient(np.random.default_rng([seed, index]), index)
    truth = {lm.name: lm for lm in p.info.true_landmarks}
    k = slice_of(truth["renal_pelvis_right"].position, p.geometry)
    image2d, extent = radiological(p.image[k], p.geometry)
    masks2d = {n: radiological(p.masks[n][k], p.geometry)[0] for n in KIDNEY_COLOURS}
    sx, _, sz = p.geometry.spacing
    direction = "diag(-1,-1,1)" if p.info.flipped else "identity"
    title = (f"phantom {patient_id(index)} (seed {seed})\n{sx:.2f} x {sx:.2f} x {sz:.1f} mm, direction {direction},\n"
             f"renal pelvis {'in' if p.info.pelvis_in_mask else 'not in'} the kidney masks")
    draw_panel(ax, image2d, extent, masks2d, title)
    zk = (p.geometry.index_to_physical() @ np.array([k, 0, 0, 1.0]))[2]
    for lm in p.landmarks:
        if not lm.name.startswith("renal_pelvis"):
            continue
        x, y, zl = lm.position
        in_slice = abs(zl - zk) <= sz / 2
        ax.plot(x, y, marker="+" if in_slice else "x", color="yellow", ms=9 if in_slice else 6, mew=1.5)
    for lm in p.landmarks:
        if lm.name in ("L1", "L2", "T12", "L3", "L4") and abs(lm.position[2] - zk) <= 0.6 * 35:
            ax.plot(lm.position[0], lm.position[1], marker="o", mfc="none", color="cyan", ms=6, mew=1)


def real_panel(ax) -> bool:
    import SimpleITK as sitk

    ct_path, seg_path = REAL / "example_ct.nii.gz", REAL / "example_seg_fast_force_split.nii.gz"
    if not ct_path.is_file():
        ax.text(0.5, 0.5, f"real CT not found:\n{ct_path}", ha="center", va="center", fontsize=7)
        ax.axis("off")
        return False
    ct = sitk.ReadImage(str(ct_path))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
    geo = Geometry(size=ct.GetSize(), spacing=ct.GetSpacing(), origin=ct.GetOrigin(), direction=ct.GetDirection())
    arr = sitk.GetArrayFromImage(ct)
    area = ((seg == 2) | (seg == 3)).sum(axis=(1, 2))
    k = int(np.argmax(area))
    image2d, extent = radiological(arr[k], geo)
    masks2d = {"kidney_right": radiological(seg[k] == 2, geo)[0], "kidney_left": radiological(seg[k] == 3, geo)[0]}
    sx, _, sz = geo.spacing
    draw_panel(ax, image2d, extent, masks2d,
               f"real CT: TotalSegmentator example\n{sx:.1f} x {sx:.1f} x {sz:.1f} mm, direction diag(-1,-1,1),\n"
               "labels 2 (right) and 3 (left) of its model output")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, nargs=3, default=[0, 2, 5], help="three 0-based patient indices")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "phantom.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 4, figsize=(17, 5.2), constrained_layout=True)
    for ax, index in zip(axes[:3], args.patients):
        phantom_panel(ax, args.seed, index)
    real_panel(axes[3])
    fig.suptitle("Axial slices at kidney level, W 400 / L 40, radiological view (patient right on image left, "
                 "anterior up). Red: right kidney mask, green: left; yellow +: renal pelvis landmark in this "
                 "slice (x: in another slice); cyan o: nearest vertebral-body landmark", fontsize=9)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
