"""Tests of the evaluation numerics (overlap, HD95, heatmap RMSE, landmark decoding) and the resampling helpers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from mtlbench.api import Geometry
from mtlbench.builtin import landmarks as lmk
from mtlbench.data.grid import index_to_physical
from mtlbench.engine import metrics
from mtlbench.engine.resample import labels_to_original, resize_to

RNG = np.random.default_rng(1234)


def blobs(shape, n_labels, seed, sigma=2.0, frac=0.25):
    """A label map of smooth random blobs (labels 1..n_labels, later labels painted over earlier ones)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.uint8)
    for label in range(1, n_labels + 1):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
        out[field > np.quantile(field, 1 - frac)] = label
    return out


# ----------------------------------------------------------------------------- overlap


def test_overlap_hand_computed():
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]], dtype=np.uint8)
    ref = np.array([[1, 1, 0, 1], [2, 0, 0, 2]], dtype=np.uint8)
    ov = metrics.overlap(pred, ref, 2)
    # label 1: pred 3 voxels, ref 3, intersection 2 -> IoU 2/4, Dice 4/6
    assert ov[1] == pytest.approx((0.5, 4 / 6))
    # label 2: pred 2, ref 2, intersection 1 -> IoU 1/3, Dice 2/4
    assert ov[2] == pytest.approx((1 / 3, 0.5))


def test_overlap_matches_simpleitk():
    pred = blobs((18, 20, 22), 2, seed=1)
    ref = blobs((18, 20, 22), 2, seed=2)
    ov = metrics.overlap(pred, ref, 2)
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(sitk.GetImageFromArray(pred), sitk.GetImageFromArray(ref))
    for label in (1, 2):
        assert ov[label][0] == pytest.approx(f.GetJaccardCoefficient(label), abs=1e-12)
        assert ov[label][1] == pytest.approx(f.GetDiceCoefficient(label), abs=1e-12)


def test_overlap_empty_rules():
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(ref)
    pred[0, 0, 0] = 2
    ref[1, 1, 1] = 3
    ov = metrics.overlap(pred, ref, 3)
    assert all(np.isnan(v) for v in ov[1])  # both empty
    assert ov[2] == (0.0, 0.0)  # reference empty, prediction not
    assert ov[3] == (0.0, 0.0)  # reference non-empty, prediction empty


def test_overlap_rejects_unknown_labels_and_shapes():
    with pytest.raises(ValueError, match="0..2"):
        metrics.overlap(np.array([0, 3]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="shape"):
        metrics.overlap(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), 1)


# ----------------------------------------------------------------------------- HD95


def brute_surface(mask):
    """Independent surface: mask voxels with a 6-neighbour outside the mask (or outside the array)."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    inner = m[1:-1, 1:-1, 1:-1]
    all_in = np.ones_like(inner)
    for axis in range(3):
        for step in (-1, 1):
            all_in &= np.roll(m, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return inner & ~all_in


def brute_hd95(a, b, spacing):
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_hd95_matches_brute_force(seed):
    spacing = (2.5, 0.8, 1.1)
    a = blobs((14, 16, 12), 1, seed=seed, frac=0.3) == 1  # touches the array border: border counts as outside
    b = blobs((14, 16, 12), 1, seed=seed + 10, frac=0.3) == 1
    assert metrics.hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-9)
    assert metrics.hd95(b, a, spacing) == pytest.approx(metrics.hd95(a, b, spacing), rel=1e-12)


def test_hd95_cropping_is_exact_inside_a_larger_array():
    spacing = (1.5, 1.0, 0.7)
    a = np.zeros((30, 40, 40), dtype=bool)
    b = np.zeros_like(a)
    a[10:16, 12:20, 5:11] = True
    b[12:17, 14:22, 7:15] = True
    b[13, 15, 30] = True  # a far outlier voxel
    assert metrics.hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-9)


def test_hd95_identical_and_empty():
    a = np.zeros((6, 6, 6), dtype=bool)
    a[1:4, 2:5, 1:5] = True
    assert metrics.hd95(a, a, (1.0, 2.0, 3.0)) == 0.0
    assert np.isnan(metrics.hd95(a, np.zeros_like(a), (1, 1, 1)))
    assert np.isnan(metrics.hd95(np.zeros_like(a), a, (1, 1, 1)))


# ----------------------------------------------------------------------------- heatmaps and landmarks


def test_heatmap_rmse():
    a = RNG.random((2, 20, 8, 8)).astype(np.float32)
    b = RNG.random((2, 20, 8, 8)).astype(np.float32)
    expected = np.sqrt(np.mean((a.astype(np.float64) - b) ** 2))
    assert lmk.heatmap_rmse(a, b) == pytest.approx(expected, rel=1e-10)
    assert lmk.heatmap_rmse(a, a) == 0.0


def gaussian(shape, centre, sigma):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, sigma))
    return np.exp(-0.5 * r2).astype(np.float32)


def test_subvoxel_refinement_recovers_gaussian_centre():
    for centre, sigma in [((10.3, 7.6, 12.2), (2.0, 2.5, 1.5)), ((6.0, 8.45, 9.55), (1.2, 3.0, 2.0))]:
        vol = gaussian((20, 18, 24), centre, sigma)
        peaks = lmk.find_peaks_3d(vol, 1, np.eye(4))
        assert tuple(peaks[0]) == tuple(int(round(c)) for c in centre)
        refined = lmk.refine_subvoxel(vol, peaks)[0]
        assert np.all(np.abs(refined - np.asarray(centre)) < 0.1)


def test_refine_subvoxel_border_and_flat():
    vol = np.zeros((3, 3, 3), dtype=np.float32)
    vol[0, 1, 1] = 1.0
    assert np.allclose(lmk.refine_subvoxel(vol, [[0, 1, 1]]), [[0, 1, 1]])  # border axis untouched


def test_find_peaks_non_maximum_suppression_in_mm():
    spacing = np.diag([3.0, 1.0, 1.0, 1.0])  # 3 mm slices
    vol = gaussian((20, 30, 30), (5, 10, 10), (1.5, 3, 3)) + 0.8 * gaussian((20, 30, 30), (9, 10, 10), (1.5, 3, 3))
    peaks = lmk.find_peaks_3d(vol, 2, spacing, radius_mm=10.0)  # the blobs are 12 mm apart
    assert [tuple(p) for p in peaks] == [(5, 10, 10), (9, 10, 10)]
    peaks = lmk.find_peaks_3d(vol, 2, spacing, radius_mm=15.0)  # the second blob is suppressed
    assert tuple(peaks[0]) == (5, 10, 10)
    assert all(np.linalg.norm((p - [5, 10, 10]) * [3, 1, 1]) >= 15 for p in peaks[1:])


def oblique_affine(spacing=(2.0, 1.2, 1.0), origin=(-40.0, 25.0, 100.0)):
    """Cache index (s, r, c) -> LPS through a rotation about an oblique axis."""
    axis = np.array([1.0, 2.0, 0.5])
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(35.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


def physical_heatmap(shape, affine, points, sigma_mm=5.0):
    """Max-combined Gaussian blobs defined in physical space, sampled on the grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    phys = index_to_physical(idx, affine)
    out = np.zeros(len(idx))
    for p in points:
        out = np.maximum(out, np.exp(-np.sum((phys - p) ** 2, axis=1) / (2 * sigma_mm**2)))
    return out.reshape(shape).astype(np.float32)


def test_locate_landmarks_two_blobs_oblique():
    affine = oblique_affine()
    shape = (24, 40, 44)
    # continuous positions inside the grid, ~30 mm apart
    left = index_to_physical([[8.3, 14.6, 12.2]], affine)[0]
    right = index_to_physical([[14.7, 25.2, 30.4]], affine)[0]
    heat = physical_heatmap(shape, affine, [left, right])[None]  # one channel with both landmarks
    found = lmk.locate_landmarks(heat, affine, [["right", "left"]], {"right": right, "left": left})
    assert set(found) == {"left", "right"}
    assert np.linalg.norm(found["left"] - left) < 1.0
    assert np.linalg.norm(found["right"] - right) < 1.0
    # only one reference name: a single (highest) peak is decoded and named after it
    only = lmk.locate_landmarks(heat, affine, [["right", "left"]], {"left": left})
    assert set(only) == {"left"}


def test_locate_landmarks_without_reference_and_missing_peaks():
    affine = oblique_affine()
    shape = (16, 20, 20)
    p = index_to_physical([[8.0, 10.2, 9.7]], affine)[0]
    heat = np.stack([physical_heatmap(shape, affine, [p]), np.full(shape, np.nan, np.float32)])
    found = lmk.locate_landmarks(heat, affine, [["a"], ["b"]])
    assert np.linalg.norm(found["a"] - p) < 1.0
    assert np.all(np.isnan(found["b"]))  # no finite value: no peak
    with pytest.raises(ValueError, match="groups"):
        lmk.locate_landmarks(heat, affine, [["a"], ["b"], ["c"]])


def test_assign_peaks_minimum_total_distance():
    ref = {"a": [0.0, 0.0, 0.0], "b": [10.0, 0.0, 0.0]}
    peaks = np.array([[9.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    got = lmk.assign_peaks(peaks, ["a", "b"], ref)
    assert np.allclose(got["a"], [1, 0, 0]) and np.allclose(got["b"], [9, 0, 0])
    got = lmk.assign_peaks(peaks[:1], ["a", "b"], ref)
    assert np.allclose(got["b"], [9, 0, 0]) and np.all(np.isnan(got["a"]))


# ----------------------------------------------------------------------------- resampling


def test_labels_to_original_matches_scipy_zoom():
    s, c, h, w = 3, 3, 8, 10
    y, x = 13, 17
    logits = RNG.standard_normal((s, c, h, w)).astype(np.float32) * 3
    geometry = Geometry(size=(x, y, s), spacing=(0.8, 0.9, 2.0), origin=(0.0, 0.0, 0.0))
    got = labels_to_original(logits, geometry)
    assert got.dtype == np.uint8 and got.shape == (s, y, x)
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    # pixel-centre aligned bilinear, independently: scipy zoom in grid mode with edge replication
    zoomed = ndimage.zoom(prob, (1, 1, y / h, x / w), order=1, mode="nearest", grid_mode=True)
    expected = zoomed.argmax(axis=1)
    top2 = np.sort(zoomed, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-5  # ignore near ties
    assert np.array_equal(got[clear], expected[clear])


def test_labels_to_original_same_size_and_missing_slices():
    logits = RNG.standard_normal((4, 2, 6, 6)).astype(np.float32)
    geometry = Geometry(size=(6, 6, 4), spacing=(1, 1, 1), origin=(0, 0, 0))
    assert np.array_equal(labels_to_original(logits, geometry), logits.argmax(axis=1))
    with pytest.raises(ValueError, match="slices"):
        labels_to_original(logits[:3], geometry)


def test_resize_to_modes():
    labels = RNG.integers(0, 5, (2, 6, 9)).astype(np.uint8)
    out = resize_to(labels, (4, 13), "nearest-exact")
    rows = np.minimum(np.floor((np.arange(4) + 0.5) * 6 / 4).astype(int), 5)
    cols = np.minimum(np.floor((np.arange(13) + 0.5) * 9 / 13).astype(int), 8)
    assert out.dtype == np.uint8 and np.array_equal(out, labels[:, rows][:, :, cols])
    img = RNG.random((2, 3, 5, 7)).astype(np.float32)
    up = resize_to(img, (8, 11), "bilinear")
    assert up.shape == (2, 3, 8, 11) and up.dtype == np.float32
    assert np.allclose(up, ndimage.zoom(img, (1, 1, 8 / 5, 11 / 7), order=1, mode="nearest", grid_mode=True), atol=1e-5)
