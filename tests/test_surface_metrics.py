"""Surface-distance metrics (HD95 in both conventions, NSD) against independent computations, closed forms and MONAI.

The independent reference here shares no code with ``mtlbench.engine.metrics``: surfaces from explicit
6-neighbour tests on a padded array, distances from scipy's exact Euclidean distance transform over the
whole (uncropped) array, percentiles and counts written out. Real masks come from ../shared/realdata.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError
from scipy import ndimage
from scipy.spatial.distance import cdist

from mtlbench.api import CachedPatient, DatasetInfo, EvalVolume, Geometry, MetricInfo
from mtlbench.builtin.segmentation import Segmentation, SegmentationParams
from mtlbench.data.grid import cache_affine
from mtlbench.engine import metrics

# ----------------------------------------------------------------------------- the independent reference


def ref_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one of the 2 * ndim face neighbours outside the mask (or outside the array)."""
    m = np.pad(np.asarray(mask, dtype=bool), 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    out = np.zeros(mask.shape, dtype=bool)
    for axis in range(m.ndim):
        for step in (-1, 1):
            out |= ~np.roll(m, step, axis=axis)[inner]
    return np.asarray(mask, dtype=bool) & out


def ref_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each surface voxel of a to the nearest surface voxel of b: a distance transform of the whole array."""
    sb = ref_surface(b)
    if not sb.any():
        return np.full(int(ref_surface(a).sum()), np.inf)
    return ndimage.distance_transform_edt(~sb, sampling=spacing)[ref_surface(a)]


def ref_metrics(pred, ref, spacing, taus):
    """(pooled HD95, max-directed HD95, [NSD at each tau]) by the definitions in docs/results.md."""
    d_pr, d_rp = ref_directed(pred, ref, spacing), ref_directed(ref, pred, spacing)
    pooled = float(np.percentile(np.concatenate([d_pr, d_rp]), 95))
    directed = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    nsd = [float((np.sum(d_pr <= tau) + np.sum(d_rp <= tau)) / (d_pr.size + d_rp.size)) for tau in taus]
    return pooled, directed, nsd


# ----------------------------------------------------------------------------- real masks


def read_mask(path, label=None, margin=4):
    """A real mask cut to its bounding box plus ``margin`` voxels (keeps the reference transforms small), spacing (z, y, x)."""
    img = sitk.ReadImage(str(path))
    a = sitk.GetArrayFromImage(img)
    m = (a == label) if label is not None else (a > 0)
    box = ndimage.find_objects(m.astype(np.uint8))[0]
    m = np.pad(m[box], margin)
    return m, tuple(reversed(img.GetSpacing()))


def fake_prediction(ref: np.ndarray) -> np.ndarray:
    """A plausible error: the mask eroded by one voxel, shifted by one slice, plus a false-positive island beside it."""
    pred = np.roll(ndimage.binary_erosion(ref), 1, axis=0)
    top = np.argwhere(ref).max(axis=0)
    pred[tuple(slice(max(int(t) - 2, 0), int(t) + 2) for t in top)] = True
    return pred


@pytest.fixture(scope="module")
def kidney(realdata):
    """TotalSegmentator's right kidney (label 2), 3 mm isotropic CT grid, and a fake prediction of it."""
    ref, spacing = read_mask(realdata / "totalsegmentator" / "example_seg_fast_force_split.nii.gz", 2)
    return fake_prediction(ref), ref, spacing


@pytest.fixture(scope="module")
def sarcoma(realdata):
    """A soft-tissue sarcoma mask on a 0.98 x 0.98 x 3.27 mm CT grid (anisotropic)."""
    ref, spacing = read_mask(realdata / "sts_ct" / "STS_001_CT_mask.nii.gz")
    return fake_prediction(ref), ref, spacing


@pytest.fixture(scope="module")
def brain_tumour(realdata):
    """A brain tumour mask on a 0.78 x 0.78 x 6.5 mm MR grid (very anisotropic)."""
    ref, spacing = read_mask(realdata / "pyradiomics" / "brain1_label.nrrd")
    return fake_prediction(ref), ref, spacing


REAL = ["kidney", "sarcoma", "brain_tumour"]


@pytest.mark.parametrize("case", REAL)
def test_real_pairs_match_the_independent_reference(case, request):
    pred, ref, spacing = request.getfixturevalue(case)
    assert len(set(spacing)) > 1 or case == "kidney"
    d = metrics.surface_distances_of(pred, ref, spacing)
    taus = (1.0, 2.0, 3.0, 5.0)
    pooled, directed, nsd = ref_metrics(pred, ref, spacing, taus)
    for tau, value in zip(taus, nsd):
        assert d.nsd(tau) == pytest.approx(value, abs=1e-12)
    assert metrics.nsd(pred, ref, spacing, 2.0) == d.nsd(2.0)
    assert d.hd95() == pytest.approx(pooled, rel=1e-12)
    assert d.hd95("max_directed") == pytest.approx(directed, rel=1e-12)
    assert metrics.hd95(pred, ref, spacing) == d.hd95()
    assert metrics.hd95(pred, ref, spacing, "max_directed") == d.hd95("max_directed")
    # the two conventions are different numbers on these pairs; the directed maximum is never below the pool
    assert d.hd95("max_directed") > d.hd95()
    # swapping prediction and reference swaps the directions: HD95 and NSD are symmetric
    swapped = metrics.surface_distances_of(ref, pred, spacing)
    assert np.array_equal(swapped.pred_to_ref, d.ref_to_pred) and np.array_equal(swapped.ref_to_pred, d.pred_to_ref)


def test_real_pair_brute_force_point_sets(kidney):
    """Every pair of surface voxels of the real kidney pair, in mm: no distance transform, no tree."""
    pred, ref, spacing = kidney
    pa = np.argwhere(ref_surface(pred)) * np.asarray(spacing)
    pb = np.argwhere(ref_surface(ref)) * np.asarray(spacing)
    dist = cdist(pa, pb)
    d_pr, d_rp = dist.min(axis=1), dist.min(axis=0)
    d = metrics.surface_distances_of(pred, ref, spacing)
    assert np.allclose(np.sort(d.pred_to_ref), np.sort(d_pr), rtol=0, atol=1e-9)
    assert np.allclose(np.sort(d.ref_to_pred), np.sort(d_rp), rtol=0, atol=1e-9)
    assert d.nsd(4.0) == pytest.approx((np.sum(d_pr <= 4.0) + np.sum(d_rp <= 4.0)) / (d_pr.size + d_rp.size))


def test_real_kidney_inside_a_larger_array_with_an_outlier(kidney):
    """Cropping to the masks' box changes nothing: the kidney pair padded into a bigger grid, plus a far voxel."""
    pred, ref, spacing = kidney
    big_ref = np.pad(ref, ((5, 30), (0, 12), (7, 0)))
    big_pred = np.pad(pred, ((5, 30), (0, 12), (7, 0)))
    big_pred[-1, -1, 0] = True  # an outlier at the far corner, on the array border
    d = metrics.surface_distances_of(big_pred, big_ref, spacing)
    pooled, directed, nsd = ref_metrics(big_pred, big_ref, spacing, [3.0])
    assert (d.hd95(), d.hd95("max_directed"), d.nsd(3.0)) == pytest.approx((pooled, directed, nsd[0]), rel=1e-12)


# ----------------------------------------------------------------------------- MONAI, when installed


def monai_scores(pred, ref, spacing, taus):
    monai_metrics = pytest.importorskip(
        "monai.metrics", reason="monai is not installed (optional: pip install monai, or the dev extra)"
    )
    import torch

    p, r = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = monai_metrics.compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing)).item()
        nsd = [
            monai_metrics.compute_surface_dice(p, r, [tau], include_background=True, spacing=list(spacing)).item()
            for tau in taus
        ]
    return hd, nsd


@pytest.mark.parametrize("case", REAL)
def test_real_pairs_match_monai(case, request):
    """``max_directed`` is MONAI's HD95; NSD is MONAI's surface Dice with voxel-count surfaces (use_subvoxels=False)."""
    pred, ref, spacing = request.getfixturevalue(case)
    taus = (1.0, 2.0, 3.0, 5.0)
    hd, nsd = monai_scores(pred, ref, spacing, taus)
    d = metrics.surface_distances_of(pred, ref, spacing)
    assert d.hd95("max_directed") == pytest.approx(hd, rel=1e-5)  # MONAI works in float32
    assert d.hd95() != pytest.approx(hd, rel=1e-3)  # the default (pooled, medpy's) is not MONAI's number
    for tau, value in zip(taus, nsd):
        assert d.nsd(tau) == pytest.approx(value, abs=1e-6), tau


# ----------------------------------------------------------------------------- closed forms


def plate(shape, z):
    """A one-voxel-thick plate at slice z: every voxel of it is a surface voxel."""
    m = np.zeros(shape, dtype=bool)
    m[z, 3:-3, 4:-4] = True
    return m


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.9)])
def test_identical_masks(spacing, kidney):
    _, ref, _ = kidney
    d = metrics.surface_distances_of(ref, ref, spacing)
    assert d.nsd(0.0) == 1.0 and d.nsd(0.5) == 1.0
    assert d.hd95() == 0.0 and d.hd95("max_directed") == 0.0


@pytest.mark.parametrize("spacing", [(0.8, 1.0, 1.0), (3.0, 0.7, 0.9)])
def test_thin_plate_shifted(spacing):
    shape = (14, 12, 15)
    a = plate(shape, 3)
    for k in (1, 2, 3):
        b = plate(shape, 3 + k)
        gap = round(k * spacing[0], 9)  # every surface voxel is exactly this far from the other plate
        d = metrics.surface_distances_of(a, b, spacing)
        assert d.hd95() == pytest.approx(gap) and d.hd95("max_directed") == pytest.approx(gap)
        assert d.nsd(gap * 0.99) == 0.0  # shifted by more than the tolerance: no surface voxel within it
        assert d.nsd(gap) == 1.0  # "<= tolerance" counts a distance equal to it, even 3 x 0.8 mm (2.4000000000000004 in floats)
        assert d.nsd(gap * 1.01) == 1.0


def ball(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (1.5, 0.6, 0.8)])
def test_concentric_spheres(spacing):
    """Surface voxels of a ball of radius r lie at radii in (r - h, r] (h the largest spacing), so two concentric
    balls whose radii differ by delta have every surface distance in [delta - h, delta + 2h]: NSD is exactly 1 when
    tau >= delta + 2h and exactly 0 when tau < delta - h."""
    h = max(spacing)
    shape = tuple(int(round(44 / s)) for s in spacing)
    centre = tuple(n * s / 2 for n, s in zip(shape, spacing))
    inner = ball(shape, centre, 12.0, spacing)
    for delta, tau, expected in [(0.4, 0.4 + 2 * h, 1.0), (1.0, 1.0 + 2 * h, 1.0), (4.0, 4.0 - h - 0.01, 0.0), (7.0, 2.0, 0.0)]:
        outer = ball(shape, centre, 12.0 + delta, spacing)
        d = metrics.surface_distances_of(inner, outer, spacing)
        assert d.nsd(tau) == expected, (delta, tau)
        assert delta - h <= d.hd95() <= delta + 2 * h
        assert delta - h <= d.hd95("max_directed") <= delta + 2 * h
    # in between, NSD grows with the tolerance from 0 to 1
    outer = ball(shape, centre, 14.0, spacing)
    d = metrics.surface_distances_of(inner, outer, spacing)
    values = [d.nsd(t) for t in np.linspace(0.0, 2.0 + 3 * h, 12)]
    assert values[0] == 0.0 and values[-1] == 1.0 and all(np.diff(values) >= 0)


def test_empty_rules():
    a = np.zeros((6, 7, 8), dtype=bool)
    a[2:4, 2:5, 3:6] = True
    empty = np.zeros_like(a)
    for p, r in [(a, empty), (empty, a)]:
        d = metrics.surface_distances_of(p, r, (1.0, 1.0, 1.0))
        assert d.nsd(2.0) == 0.0  # one mask empty: NSD 0, as IoU and Dice
        assert math.isnan(d.hd95()) and math.isnan(d.hd95("max_directed"))  # HD95: NaN, as before
    d = metrics.surface_distances_of(empty, empty, (1.0, 1.0, 1.0))
    assert math.isnan(d.nsd(2.0)) and math.isnan(d.hd95())


def test_rejects_bad_arguments():
    a = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="convention"):
        metrics.hd95(a, a, (1, 1, 1), "mean")
    with pytest.raises(ValueError, match="tolerance"):
        metrics.nsd(a, a, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="spacing"):
        metrics.nsd(a, a, (1, 1), 1.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.hd95(a, a[:2], (1, 1, 1))


def test_two_dimensional_masks_brute_force():
    rng = np.random.default_rng(7)
    a = ndimage.gaussian_filter(rng.standard_normal((30, 26)), 2.0) > 0.1
    b = ndimage.gaussian_filter(rng.standard_normal((30, 26)), 2.0) > 0.1
    spacing = (1.7, 0.6)
    pooled, directed, nsd = ref_metrics(a, b, spacing, [1.5])
    d = metrics.surface_distances_of(a, b, spacing)
    assert (d.hd95(), d.hd95("max_directed"), d.nsd(1.5)) == pytest.approx((pooled, directed, nsd[0]), rel=1e-12)


# ----------------------------------------------------------------------------- the segmentation task


ORGANS = ("kidney_right", "kidney_left")
INFO = DatasetInfo(organs=ORGANS, landmarks=(), slice_size=(12, 20))


def final_volume(orig: np.ndarray, pred: np.ndarray, spacing_xyz=(0.7, 0.9, 2.5)) -> EvalVolume:
    """An EvalVolume whose output resamples (same size) exactly to ``pred`` on the original grid."""
    z, y, x = orig.shape
    logits = 10.0 * np.moveaxis(np.eye(3, dtype=np.float32)[pred], -1, 1)
    geometry = Geometry(size=(x, y, z), spacing=spacing_xyz, origin=(0.0, 0.0, 0.0))
    rec = CachedPatient(
        id="p1",
        image=np.zeros(orig.shape, np.float32),
        labels=orig,
        orig_labels=orig,
        index_to_physical=cache_affine(geometry, orig.shape[1:]),
        geometry=geometry,
    )
    return EvalVolume(rec, logits, {}, True)


def test_segmentation_task_params_and_metric_keys():
    default = SegmentationParams()
    assert default.hd95_convention == "max_directed" and default.nsd_tolerance_mm is None  # the field's HD95; NSD opt-in
    m = Segmentation(SegmentationParams(nsd_tolerance_mm=2.0), INFO).metrics()
    assert {f"nsd_{o}" for o in ORGANS + ("mean",)} <= set(m)
    assert m["nsd_mean"] == MetricInfo(True, "", (0.0, 1.0)) and m["nsd_kidney_left"].higher_is_better
    only_nsd = Segmentation(SegmentationParams(hd95=False, nsd_tolerance_mm=1.0), INFO).metrics()
    assert "nsd_mean" in only_nsd and not any(k.startswith("hd95") for k in only_nsd)
    for bad in ({"nsd_tolerance_mm": 0.0}, {"nsd_tolerance_mm": -1.0}, {"hd95_convention": "monai"}):
        with pytest.raises(ValidationError):
            SegmentationParams(**bad)


def test_segmentation_task_reports_nsd_and_the_chosen_hd95(kidney):
    _, kid, _ = kidney
    box = ndimage.find_objects(kid.astype(np.uint8))[0]
    orig = np.zeros((box[0].stop - box[0].start + 4, box[1].stop - box[1].start + 4, 60), dtype=np.uint8)
    sub = kid[box]
    orig[2 : 2 + sub.shape[0], 2 : 2 + sub.shape[1], 2 : 2 + sub.shape[2]][sub] = 1  # right kidney
    orig[:, :, 30:][orig[:, :, :30] == 1] = 2  # its mirror copy as the left kidney
    pred = np.where(fake_prediction(orig == 1), 1, 0).astype(np.uint8)
    pred[(orig == 2) & ~(pred == 1)] = 2  # left kidney perfect
    spacing_xyz = (0.7, 0.9, 2.5)
    spacing_zyx = tuple(reversed(spacing_xyz))
    vol = final_volume(orig, pred, spacing_xyz)
    res = Segmentation(SegmentationParams(nsd_tolerance_mm=2.0), INFO).evaluate(vol)
    d = metrics.surface_distances_of(pred == 1, orig == 1, spacing_zyx)
    assert res["nsd_kidney_right"] == d.nsd(2.0) and 0 < res["nsd_kidney_right"] < 1
    assert res["nsd_kidney_left"] == 1.0
    assert res["nsd_mean"] == pytest.approx((res["nsd_kidney_right"] + 1.0) / 2)
    assert res["hd95_kidney_right"] == d.hd95("max_directed")
    pooled = Segmentation(SegmentationParams(hd95_convention="pooled"), INFO).evaluate(vol)
    assert pooled["hd95_kidney_right"] == d.hd95("pooled") < res["hd95_kidney_right"]
    assert not any(k.startswith("nsd") for k in pooled)
    # an organ missing from the prediction: NSD 0 (counted in the mean), HD95 NaN (left out)
    pred2 = pred.copy()
    pred2[pred2 == 2] = 0
    res2 = Segmentation(SegmentationParams(nsd_tolerance_mm=2.0), INFO).evaluate(final_volume(orig, pred2, spacing_xyz))
    assert res2["nsd_kidney_left"] == 0.0 and math.isnan(res2["hd95_kidney_left"])
    assert res2["nsd_mean"] == pytest.approx(res["nsd_kidney_right"] / 2)
    assert res2["hd95_mean"] == res2["hd95_kidney_right"]


def test_segmentation_params_are_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert "`[tasks.segmentation] params`" in doc
    for key in SegmentationParams.model_fields:
        assert f"| `{key}` |" in doc, f"tasks.segmentation.params.{key} undocumented in docs/config.md"
