"""Canonical orientation (mtlbench.data.orient): agreement with SimpleITK's DICOMOrient, the round trip back to the
image's own grid, and that one anatomy stored in two index orders gives one cache record and one exported file."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from mtlbench.api import EvalVolume, Geometry, Landmark, Patient
from mtlbench.assemble import make_tasks
from mtlbench.config import Config, validate_config
from mtlbench.errors import ConfigError
from mtlbench.data.orient import between, check_code, orientation_of, reorientation
from mtlbench.data.preprocess import preprocess_patient


def _directions():
    """Every axis permutation and sign pattern, each also slightly rotated (an oblique acquisition)."""
    rng = np.random.default_rng(0)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1.0, -1.0], repeat=3):
            base = np.zeros((3, 3))
            for col, row in enumerate(perm):
                base[row, col] = signs[col]
            tilt, _ = np.linalg.qr(np.eye(3) + 0.15 * rng.normal(size=(3, 3)))
            yield base
            yield tilt @ base


def _image(direction: np.ndarray, arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(tuple(direction.reshape(-1)))
    return img


def _geometry(img: sitk.Image) -> Geometry:
    return Geometry(size=img.GetSize(), spacing=img.GetSpacing(), origin=img.GetOrigin(), direction=img.GetDirection())


@pytest.mark.parametrize("code", ["LPS", "RAS", "LPI", "ASL"])
def test_same_arrays_and_grid_as_sitk_dicomorient(code):
    arr = np.random.default_rng(1).integers(0, 1000, size=(5, 6, 7)).astype(np.int16)  # z, y, x: all sizes differ
    for d in _directions():
        img = _image(d, arr)
        ref = sitk.DICOMOrient(img, code)
        r = reorientation(_geometry(img), code)
        out = r.apply(arr)
        np.testing.assert_array_equal(out, sitk.GetArrayFromImage(ref))
        assert tuple(r.target.size) == ref.GetSize()
        np.testing.assert_allclose(r.target.spacing, ref.GetSpacing())
        np.testing.assert_allclose(r.target.origin, ref.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(r.target.direction, ref.GetDirection(), atol=1e-12)
        np.testing.assert_array_equal(r.invert(out), arr)  # back on the image's own grid
        back = between(r.source, r.target)  # what a cache record recomputes from its two geometries
        assert (back.order, back.flip) == (r.order, r.flip)
        if code == "LPS" and np.allclose(np.abs(d), np.round(np.abs(d))):
            assert orientation_of(r.target) == "LPS"


def test_native_and_aligned_are_the_identity():
    g = Geometry(size=(4, 5, 6), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    for code in ("native", "LPS"):
        r = reorientation(g, code)
        assert r.identity and r.target == g
    flipped = Geometry(size=(4, 5, 6), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                       direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    assert reorientation(flipped, "native").identity and not reorientation(flipped, "LPS").identity
    assert orientation_of(flipped) == "RAS"


def test_orientation_codes_are_checked():
    assert check_code("ras") == "RAS"
    for bad in ("LP", "LLS", "LPX", "LRS", "lpss"):
        with pytest.raises(ValueError, match="one each of L/R, P/A and S/I"):
            check_code(bad)
    assert validate_config({"preprocess": {"orientation": "ras"}}).preprocess.orientation == "RAS"
    with pytest.raises(ConfigError, match="preprocess.orientation"):
        validate_config({"preprocess": {"orientation": "XYZ"}})


def _patient(flipped: bool) -> Patient:
    """A small patient with a kidney, a landmark and a random image; ``flipped`` stores the same voxels with
    reversed x and y indices and direction diag(-1, -1, 1) (as a NIfTI written from RAS arrives)."""
    rng = np.random.default_rng(4)
    z, y, x = 6, 20, 24
    image = rng.uniform(-300, 300, size=(z, y, x)).astype(np.float32)
    kidney = np.zeros((z, y, x), bool)
    kidney[1:5, 3:9, 2:10] = True  # off-centre: a mirror would move it
    geom = Geometry(size=(x, y, z), spacing=(1.5, 1.5, 3.0), origin=(-10.0, 5.0, 40.0))
    landmark = Landmark("renal_pelvis_right", tuple(float(v) for v in geom.index_to_physical()[:3] @ [2, 6, 5, 1]))
    if flipped:
        far = geom.index_to_physical()[:3] @ [0, y - 1, x - 1, 1]
        geom = Geometry(size=geom.size, spacing=geom.spacing, origin=tuple(float(v) for v in far),
                        direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
        image, kidney = image[:, ::-1, ::-1], kidney[:, ::-1, ::-1]
    return Patient("p", image, geom, {"kidney_right": kidney}, [landmark], {"image": "p.nii.gz"})


def test_one_anatomy_in_two_index_orders_gives_one_cache_record():
    cfg = Config(preprocess={"slice_size": (20, 24)}, data={"organs": ["kidney_right"]})
    tasks = make_tasks(cfg)
    plain, flipped = (preprocess_patient(_patient(f), cfg, tasks) for f in (False, True))
    np.testing.assert_array_equal(plain.image, flipped.image)
    np.testing.assert_array_equal(plain.labels, flipped.labels)
    np.testing.assert_array_equal(plain.orig_labels, flipped.orig_labels)
    np.testing.assert_allclose(plain.index_to_physical, flipped.index_to_physical, atol=1e-9)
    np.testing.assert_array_equal(plain.targets["landmarks"]["heatmaps"], flipped.targets["landmarks"]["heatmaps"])
    assert plain.source_geometry is None and flipped.source_geometry == _patient(True).geometry

    native = Config(preprocess={"slice_size": (20, 24), "orientation": "native"}, data={"organs": ["kidney_right"]})
    mirrored = preprocess_patient(_patient(True), native, make_tasks(native))
    assert not np.array_equal(mirrored.labels, plain.labels)  # what reorienting prevents
    np.testing.assert_array_equal(mirrored.labels, plain.labels[:, ::-1, ::-1])


def test_exported_labels_lie_on_the_image_files_own_grid(tmp_path):
    """Segmentation's export maps the prediction back: the file has the input's grid and, voxel for voxel,
    the input's own mask (logits of the cache labels; cache size = image size, so no resampling)."""
    cfg = Config(preprocess={"slice_size": (20, 24)}, data={"organs": ["kidney_right"]})
    tasks = make_tasks(cfg)
    src = _patient(True)
    rec = preprocess_patient(src, cfg, tasks)
    logits = np.stack([rec.labels == 0, rec.labels == 1], axis=1).astype(np.float32)
    (path,) = tasks["segmentation"].export(EvalVolume(record=rec, output=logits, final=True), tmp_path)
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == src.geometry.size
    np.testing.assert_allclose(img.GetOrigin(), src.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), src.geometry.direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), src.masks["kidney_right"].astype(np.uint8))


def test_real_ct_reaches_the_cache_in_radiological_view(realdata):
    """The real TotalSegmentator CT is stored with direction diag(-1, -1, 1): the cache holds SimpleITK's
    DICOMOrient 'LPS' voxels, and its right kidney lies on the image's left (lower column) as radiologists see it."""
    from mtlbench.data.io import read_volume

    path = realdata / "totalsegmentator" / "example_ct.nii.gz"
    image, geom = read_volume(path)
    assert orientation_of(geom) == "RAS"  # the point of the test: a file not stored LPS
    ref = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))
    z, y, x = ref.shape
    cfg = Config(preprocess={"slice_size": (y, x), "clamp": (-5000.0, 5000.0), "scale": 1.0},
                 data={"organs": ["kidney_right", "kidney_left"]}, tasks={"segmentation": {}})
    seg, _ = read_volume(realdata / "totalsegmentator" / "example_seg_fast_force_split.nii.gz")
    masks = {"kidney_right": seg == 2, "kidney_left": seg == 3}
    rec = preprocess_patient(Patient("ct", image.astype(np.float32), geom, masks), cfg, make_tasks(cfg))
    assert orientation_of(rec.geometry) == "LPS" and rec.source_geometry == geom
    np.testing.assert_allclose(rec.image, ref.astype(np.float32), atol=1e-3)  # a same-size resize is exact
    cols = {organ: np.nonzero(rec.orig_labels == i)[2].mean() for i, organ in enumerate(cfg.data.organs, start=1)}
    assert cols["kidney_right"] < cols["kidney_left"]
    before = {o: np.nonzero(m)[2].mean() for o, m in masks.items()}  # in the file's own order: mirrored
    assert before["kidney_right"] > before["kidney_left"]
