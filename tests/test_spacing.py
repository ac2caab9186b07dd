"""A fixed in-plane spacing (``preprocess.spacing_mm``): cache slices of a set pixel size, centred on the image
slice and cropped or padded to ``slice_size``; the cache affine, resampling, the way back to the original grid
(``labels_to_original``) and preprocessing all agree on where every cache pixel is."""

from __future__ import annotations

import numpy as np
import pytest

from mtlbench.api import CacheGrid, Geometry, Landmark, Patient
from mtlbench.assemble import make_tasks
from mtlbench.config import Config
from mtlbench.data.grid import cache_affine, cache_plane, physical_to_index, plane_of, resize_slices
from mtlbench.data.preprocess import preprocess_patient
from mtlbench.engine.resample import labels_to_original
from mtlbench.errors import ConfigError

OBLIQUE = (0.9, -0.3, 0.3, 0.4, 0.8, -0.44, -0.1, 0.52, 0.85)


def geom(size=(60, 50, 4), spacing=(0.8, 1.2, 3.0), direction=None) -> Geometry:
    d = np.eye(3) if direction is None else np.linalg.qr(np.asarray(direction).reshape(3, 3))[0]
    return Geometry(size=size, spacing=spacing, origin=(-20.0, 35.0, 100.0), direction=tuple(d.ravel().tolist()))


def centres_mm(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    return (np.c_[idx, np.ones(len(idx))] @ affine.T)[:, :3].reshape(*shape, 3)


@pytest.mark.parametrize("direction", [None, OBLIQUE])
def test_cache_pixels_have_the_set_spacing_and_share_the_image_centre(direction):
    g = geom(direction=direction)
    aff = cache_affine(g, (32, 40), (2.0, 1.5))
    pts = centres_mm(aff, (4, 32, 40))
    assert np.linalg.norm(pts[0, 1, 0] - pts[0, 0, 0]) == pytest.approx(2.0)  # one row down
    assert np.linalg.norm(pts[0, 0, 1] - pts[0, 0, 0]) == pytest.approx(1.5)  # one column right
    assert np.linalg.norm(pts[1, 0, 0] - pts[0, 0, 0]) == pytest.approx(3.0)  # slices untouched
    # the centre of the cache slice is the centre of the image slice
    x, y, _ = g.size
    image_centre = (np.array([0.0, (y - 1) / 2, (x - 1) / 2, 1.0]) @ g.index_to_physical().T)[:3]
    cache_centre = (np.array([0.0, (32 - 1) / 2, (40 - 1) / 2, 1.0]) @ aff.T)[:3]
    np.testing.assert_allclose(cache_centre, image_centre, atol=1e-9)
    # and the axis maps read back from the affine are the ones that built it
    np.testing.assert_allclose(np.ravel(plane_of(aff, g, (32, 40))), np.ravel(cache_plane(g, (32, 40), (2.0, 1.5))))


def test_spacing_equal_to_the_image_and_its_size_is_the_identity():
    g = geom()
    vol = np.random.default_rng(0).normal(size=(4, 50, 60)).astype(np.float32)
    aff = cache_affine(g, (50, 60), (1.2, 0.8))  # (row, col) spacing = (y, x) of the image
    np.testing.assert_allclose(aff, g.index_to_physical(), atol=1e-12)
    grid = CacheGrid((4, 50, 60), aff, g)
    np.testing.assert_allclose(grid.resample(vol), vol, atol=1e-6)
    labels = (vol > 0).astype(np.uint8)
    np.testing.assert_array_equal(grid.resample(labels, "nearest"), labels)


def test_without_spacing_the_plain_resize_is_unchanged():
    g = geom()
    aff = cache_affine(g, (24, 30))
    np.testing.assert_array_equal(aff, cache_affine(g, (24, 30), None))
    assert plane_of(aff, g, (24, 30)) == ((50 / 24, 0.0), (60 / 30, 0.0))  # snapped to the exact plain map
    vol = np.random.default_rng(1).normal(size=(4, 50, 60)).astype(np.float32)
    np.testing.assert_array_equal(CacheGrid((4, 24, 30), aff, g).resample(vol), resize_slices(vol, (24, 30), "bilinear"))


def test_a_linear_ramp_is_sampled_at_each_cache_pixel_centre():
    """Crop (the cache's field of view is smaller) along rows, pad along columns; inside, the antialiased
    resample of a physical ramp equals the ramp at the cache pixel centres; the padding gets ``fill``."""
    g = geom(size=(20, 80, 3), spacing=(1.0, 1.0, 2.0))
    # ramp along physical position: value = 0.1 * x_mm + 0.05 * y_mm (LPS)
    phys = centres_mm(g.index_to_physical(), (3, 80, 20))
    ramp = (0.1 * phys[..., 0] + 0.05 * phys[..., 1]).astype(np.float32)
    size, spacing = (20, 16), (2.0, 2.0)  # rows: 40 mm of 80 (crop); cols: 32 mm of 20 (pad)
    grid = CacheGrid((3, *size), cache_affine(g, size, spacing), g)
    out = grid.resample(ramp, fill=-7.0)
    cache_phys = centres_mm(grid.index_to_physical, (3, *size))
    expect = 0.1 * cache_phys[..., 0] + 0.05 * cache_phys[..., 1]
    # the image's 20 mm are cache columns 3-12; 0-2 and 13-15 are centred beyond it; the filter of
    # columns 3 and 12 (two image pixels either side at this 2x shrink) is cut by the image's edge
    inside = slice(4, 12)
    np.testing.assert_allclose(out[:, 1:-1, inside], expect[:, 1:-1, inside], atol=1e-4)
    assert np.all(out[:, :, :3] == -7.0) and np.all(out[:, :, 13:] == -7.0)
    labels = np.ones((3, 80, 20), np.uint8)
    lab = grid.resample(labels, "nearest")
    assert lab.dtype == np.uint8 and np.all(lab[:, :, :3] == 0) and np.all(lab[:, :, 3:13] == 1)
    assert np.all(lab[:, :, 13:] == 0)


@pytest.mark.parametrize("direction", [None, OBLIQUE])
def test_labels_go_back_to_the_original_grid_and_the_cropped_rim_is_background(direction):
    """Cache at the image's own spacing but cropped: one-hot logits of the cached labels return the
    original labels exactly inside the cache's field of view, background outside."""
    g = geom(size=(40, 30, 2), spacing=(1.0, 1.0, 2.0), direction=direction)
    rng = np.random.default_rng(2)
    orig = rng.integers(0, 3, size=(2, 30, 40)).astype(np.uint8)
    size = (20, 24)
    aff = cache_affine(g, size, (1.0, 1.0))
    grid = CacheGrid((2, *size), aff, g)
    cached = grid.resample(orig, "nearest")
    logits = np.stack([(cached == c) * 10.0 for c in range(3)], axis=1).astype(np.float32)
    back = labels_to_original(logits, g, aff)
    rows = slice((30 - 20) // 2, (30 - 20) // 2 + 20)
    cols = slice((40 - 24) // 2, (40 - 24) // 2 + 24)
    np.testing.assert_array_equal(back[:, rows, cols], orig[:, rows, cols])
    rim = np.ones((30, 40), bool)
    rim[rows, cols] = False
    assert np.all(back[:, rim] == 0)
    # a coarser cache (2 mm) still puts every label back where it was, up to the boundary pixels
    aff2 = cache_affine(g, (16, 16), (2.0, 2.0))
    blob = np.zeros((2, 30, 40), np.uint8)
    blob[:, 10:20, 12:26] = 2
    cached2 = CacheGrid((2, 16, 16), aff2, g).resample(blob, "nearest")
    logits2 = np.stack([(cached2 == c) * 10.0 for c in range(3)], axis=1).astype(np.float32)
    back2 = labels_to_original(logits2, g, aff2)
    assert np.mean(back2 == blob) > 0.97 and np.all(back2[:, 12:18, 14:24] == 2)


def test_preprocess_with_a_spacing_gives_the_same_kidney_size_whatever_the_field_of_view():
    """Two scans of one phantom kidney, one with twice the field of view: resized to a pixel count the
    kidney covers different numbers of cache pixels; at a fixed spacing, the same number."""

    def patient(n: int) -> Patient:
        g = Geometry(size=(n, n, 3), spacing=(1.0, 1.0, 3.0), origin=(-n / 2, -n / 2, 0.0))
        image = np.full((3, n, n), -100.0, np.float32)
        mask = np.zeros((3, n, n), bool)
        c = n // 2
        mask[:, c - 10 : c + 10, c - 6 : c + 6] = True
        image[mask] = 30.0
        centre = (np.array([1.0, c, c, 1.0]) @ g.index_to_physical().T)[:3]
        return Patient(f"p{n}", image, g, {"kidney_right": mask}, [Landmark("renal_pelvis_right", tuple(centre))], {})

    def kidney_pixels(cfg: Config, n: int) -> int:
        return int((preprocess_patient(patient(n), cfg, make_tasks(cfg)).labels[1] == 1).sum())

    plain = Config(preprocess={"slice_size": (32, 32)})
    assert kidney_pixels(plain, 64) == 4 * kidney_pixels(plain, 128)
    fixed = Config(preprocess={"slice_size": (32, 32), "spacing_mm": (2.0, 2.0)})
    assert kidney_pixels(fixed, 64) == kidney_pixels(fixed, 128) == 10 * 6
    rec = preprocess_patient(patient(128), fixed, make_tasks(fixed))
    assert rec.image.shape == (3, 32, 32)
    # the landmark heatmap follows the cache affine: its peak is at the kidney's centre pixel
    heat = rec.targets["landmarks"]["heatmaps"][1, 0]
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    expect = physical_to_index(np.array(rec.landmarks[0].position), rec.index_to_physical)[0]
    assert abs(r - expect[1]) <= 0.5 and abs(c - expect[2]) <= 0.5
    # padding: a 40 mm image in a 64 mm cache slice gets the window's lowest value beyond the image
    small = preprocess_patient(patient(40), fixed, make_tasks(fixed))
    low = fixed.preprocess.clamp[0] / fixed.preprocess.scale
    assert np.all(small.image[:, :, :5] == np.float32(low)) and np.all(small.labels[:, :, :5] == 0)


@pytest.mark.parametrize("bad", [(0.0, 1.0), (-1.0, 1.0), (1.0,), ("a", 1.0)])
def test_bad_spacing_is_a_config_error(bad):
    with pytest.raises((ConfigError, ValueError)):
        Config(preprocess={"spacing_mm": bad})
