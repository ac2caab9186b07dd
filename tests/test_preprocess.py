"""Tests for the cache grid (mtlbench.data.grid), preprocessing (mtlbench.data.preprocess: intensity, label maps,
the tasks' prepare) and the landmarks task's Gaussian heatmaps (mtlbench.builtin.landmarks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtlbench.api import CacheGrid, Geometry, Landmark, Patient, Target, Task
from mtlbench.assemble import make_tasks
from mtlbench.builtin.landmarks import gaussian_box, gaussian_heatmaps
from mtlbench.config import Config
from mtlbench.data.grid import cache_affine, index_to_physical, physical_to_index, resize_slices
from mtlbench.data.preprocess import label_map, normalize, preprocess_patient
from mtlbench.errors import ConfigError, DataError, PluginError


def rotation(axis: int, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    a, b = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation(2, 25.0) @ rotation(0, 20.0),
}


def geometry(direction: np.ndarray, size=(40, 36, 12), spacing=(0.9, 1.1, 2.5)) -> Geometry:
    return Geometry(
        size=size, spacing=spacing, origin=(-103.3, 57.2, 311.7), direction=tuple(direction.ravel().tolist())
    )


def voxel_physical(geom_affine: np.ndarray, shape) -> np.ndarray:
    """Physical position of every voxel centre of a grid: (S, H, W, 3), by brute force."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    return idx @ geom_affine[:3, :3].T + geom_affine[:3, 3]


def brute_force(shape, affine, point, sigma) -> np.ndarray:
    d2 = ((voxel_physical(affine, shape) - np.asarray(point)) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


# ----------------------------------------------------------------------------- intensity / resize


def test_normalize_clamps_then_scales():
    hu = np.array([-3000, -1024, 0, 250, 1024, 2048], dtype=np.int16)
    out = normalize(hu, (-1024, 1024), 500)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-2.048, -2.048, 0.0, 0.5, 2.048, 2.048], rtol=1e-6)


def test_resize_bilinear_keeps_pixel_centres_of_a_ramp():
    y, x = 12, 20
    ramp = np.broadcast_to(np.arange(y, dtype=np.float32)[:, None], (2, y, x))
    up = resize_slices(ramp, (30, x), "bilinear")
    expected = np.clip((np.arange(30) + 0.5) * y / 30 - 0.5, 0, y - 1)
    np.testing.assert_allclose(up[0, :, 3], expected, atol=1e-5)
    down = resize_slices(ramp, (6, x), "bilinear")  # 2x shrink: exact for a linear ramp inside
    np.testing.assert_allclose(down[1, 1:-1, 0], (np.arange(6) + 0.5)[1:-1] * 2 - 0.5, atol=1e-5)


@pytest.mark.parametrize("src,dst", [((37, 53), (16, 24)), ((20, 30), (48, 41)), ((16, 16), (16, 8))])
def test_resize_matches_torch(src, dst):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(3,) + src).astype(np.float32)
    ref = f.interpolate(torch.from_numpy(vol)[:, None], size=dst, mode="bilinear", align_corners=False, antialias=True)
    np.testing.assert_allclose(resize_slices(vol, dst, "bilinear"), ref[:, 0].numpy(), atol=5e-5)
    lab = rng.integers(0, 4, size=(3,) + src).astype(np.uint8)
    ref = f.interpolate(torch.from_numpy(lab)[:, None].float(), size=dst, mode="nearest-exact")[:, 0].numpy()
    out = resize_slices(lab, dst, "nearest-exact")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref.astype(np.uint8))


def test_resize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        resize_slices(np.zeros((1, 4, 4)), (2, 2), "cubic")


def test_label_map_later_organ_wins_and_empty_is_fine():
    a = np.zeros((2, 3, 3), bool)
    b = np.zeros((2, 3, 3), bool)
    a[0, :2, :2] = True
    b[0, 1:, 1:] = True
    out = label_map({"a": a, "b": b, "ignored": np.ones_like(a)}, ["a", "b"])
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 1 and out[0, 1, 1] == 2 and out[0, 2, 2] == 2 and out[1].max() == 0
    assert label_map({}, ["a"], shape=(2, 3, 3)).sum() == 0
    assert label_map({"b": np.zeros((1, 2, 2), bool)}, ["a", "b"]).sum() == 0
    with pytest.raises(DataError, match="'b'"):
        label_map({"a": a, "b": b[:1]}, ["a", "b"])


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_cache_affine_matches_pixel_centre_convention(name):
    geom = geometry(DIRECTIONS[name])
    x, y, _ = geom.size
    h, w = 24, 30
    aff = cache_affine(geom, (h, w))
    rng = np.random.default_rng(0)
    s, r, c = rng.uniform(0, 10, 5), rng.uniform(0, 23, 5), rng.uniform(0, 29, 5)
    k, j, i = s, (r + 0.5) * y / h - 0.5, (c + 0.5) * x / w - 0.5
    # independent ITK formula: p = origin + D @ (spacing * (i, j, k))
    d = np.asarray(geom.direction).reshape(3, 3)
    expect = (d @ (np.asarray(geom.spacing)[:, None] * np.stack([i, j, k]))).T + geom.origin
    got = np.stack([s, r, c, np.ones(5)], 1) @ aff.T
    np.testing.assert_allclose(got[:, :3], expect, atol=1e-9)
    np.testing.assert_allclose(physical_to_index(expect, aff), np.stack([s, r, c], 1), atol=1e-9)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_geometry_round_trip_heatmap_peaks_at_landmark(name):
    """Landmarks at known physical points peak within one cache voxel of where the inverse affine puts them."""
    geom = geometry(DIRECTIONS[name])
    x, y, z = geom.size
    h, w = 24, 30  # different in-plane size: shrink both axes
    orig_idx = np.array([[4.3, 10.7, 31.2], [7.0, 25.5, 8.25]])  # continuous (k, j, i) on the original grid
    points = (np.c_[orig_idx, np.ones(2)] @ geom.index_to_physical().T)[:, :3]
    aff = cache_affine(geom, (h, w))
    heat = gaussian_heatmaps((z, h, w), aff, points, [[0], [1]], sigma_mm=5.0, truncate=4.0)
    assert heat.shape == (2, z, h, w) and heat.dtype == np.float32
    expected = np.stack(
        [orig_idx[:, 0], (orig_idx[:, 1] + 0.5) * h / y - 0.5, (orig_idx[:, 2] + 0.5) * w / x - 0.5], 1
    )
    np.testing.assert_allclose(physical_to_index(points, aff), expected, atol=1e-9)
    for n in range(2):
        peak = np.unravel_index(np.argmax(heat[n]), heat[n].shape)
        assert heat[n][peak] >= 0.9
        assert np.all(np.abs(np.asarray(peak) - expected[n]) <= 1.0), (peak, expected[n])
        lo = np.maximum(np.asarray(peak) - 1, 0)
        hood = heat[n][lo[0] : peak[0] + 2, lo[1] : peak[1] + 2, lo[2] : peak[2] + 2]
        assert heat[n][peak] == hood.max()  # a local maximum


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_box_limited_equals_brute_force(name):
    geom = geometry(DIRECTIONS[name])
    aff = cache_affine(geom, (24, 30))
    shape = (12, 24, 30)
    point = (np.array([5.5, 12.2, 14.9, 1.0]) @ aff.T)[:3]
    sigma, trunc = 4.0, 1.5  # a small truncation so the box is well inside the grid
    heat = gaussian_heatmaps(shape, aff, point[None], [[0]], sigma, trunc)[0]
    ref = brute_force(shape, aff, point, sigma)
    box = gaussian_box(physical_to_index(point, aff)[0], aff, trunc * sigma, shape)
    assert box is not None
    inside = np.zeros(shape, bool)
    inside[box] = True
    assert inside.sum() < inside.size  # the box really limits the work here
    assert np.abs(heat[inside] - ref[inside]).max() < 1e-6
    assert np.all(heat[~inside] == 0)
    assert ref[~inside].max() <= math.exp(-(trunc**2) / 2) + 1e-12
    # the box holds the whole ball of radius truncate * sigma
    d = np.sqrt(((voxel_physical(aff, shape) - point) ** 2).sum(-1))
    assert np.all(inside[d <= trunc * sigma])


def test_gaussian_is_symmetric_in_physical_space():
    geom = Geometry(size=(31, 31, 15), spacing=(1.0, 1.5, 3.0), origin=(10.0, -20.0, 5.0))
    aff = geom.index_to_physical()
    center = np.array([7, 15, 15])  # (k, j, i): a voxel centre
    point = (np.r_[center, 1.0] @ aff.T)[:3]
    heat = gaussian_heatmaps((15, 31, 31), aff, point[None], [[0]], sigma_mm=5.0, truncate=4.0)[0]
    k, j, i = center
    assert heat[k, j, i] == pytest.approx(1.0)
    # 6 mm away along each axis: 2 slices, 4 rows, 6 columns
    vals = [
        heat[k + 2, j, i], heat[k - 2, j, i], heat[k, j + 4, i], heat[k, j - 4, i], heat[k, j, i + 6], heat[k, j, i - 6]
    ]
    np.testing.assert_allclose(vals, math.exp(-36 / 50), rtol=1e-6)


def test_gaussian_is_symmetric_on_an_oblique_grid():
    geom = geometry(DIRECTIONS["oblique"])
    aff = cache_affine(geom, (24, 30))
    shape = (12, 24, 30)
    point = (np.array([6.0, 12.0, 15.0, 1.0]) @ aff.T)[:3]
    heat = gaussian_heatmaps(shape, aff, point[None], [[0]], 5.0, 4.0)[0]
    d = np.sqrt(((voxel_physical(aff, shape) - point) ** 2).sum(-1))
    mask = heat > 1e-3
    np.testing.assert_allclose(heat[mask], np.exp(-d[mask] ** 2 / 50), rtol=1e-5)


def test_blobs_combine_by_maximum_and_groups_pick_landmarks():
    geom = Geometry(size=(30, 30, 10), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    aff = geom.index_to_physical()
    pts = np.array([[10.0, 15.0, 10.0], [14.0, 15.0, 10.0], [25.0, 5.0, 2.0]])  # first two overlap
    heat = gaussian_heatmaps((10, 30, 30), aff, pts, [[0, 1], [2], [0, 2]], 3.0, 4.0)
    singles = [gaussian_heatmaps((10, 30, 30), aff, pts[n : n + 1], [[0]], 3.0, 4.0)[0] for n in range(3)]
    np.testing.assert_array_equal(heat[0], np.maximum(singles[0], singles[1]))
    np.testing.assert_array_equal(heat[1], singles[2])
    np.testing.assert_array_equal(heat[2], np.maximum(singles[0], singles[2]))
    assert heat[0].max() == pytest.approx(1.0)  # overlapping blobs do not stack
    assert heat[0][5, 15, 12] == pytest.approx(math.exp(-4 / 18), rel=1e-6)  # midway: one blob's value


def test_landmark_outside_grid_contributes_where_box_overlaps():
    geom = Geometry(size=(20, 20, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    aff = geom.index_to_physical()
    heat = gaussian_heatmaps((10, 20, 20), aff, np.array([[-4.0, 10.0, 5.0]]), [[0]], 2.0, 4.0)[0]
    assert heat[5, 10, 0] == pytest.approx(math.exp(-16 / 8), rel=1e-6)
    far = gaussian_heatmaps((10, 20, 20), aff, np.array([[-100.0, 10.0, 5.0], [np.nan, 0, 0]]), [[0, 1]], 2.0, 4.0)
    assert far.max() == 0


# ----------------------------------------------------------------------------- patients


def make_patient(landmarks) -> Patient:
    geom = geometry(DIRECTIONS["oblique"])
    x, y, z = geom.size
    rng = np.random.default_rng(3)
    image = rng.uniform(-2000, 2000, size=(z, y, x)).astype(np.float32)
    right = np.zeros((z, y, x), bool)
    right[3:6, 5:15, 5:15] = True
    return Patient("p1", image, geom, {"kidney_right": right}, landmarks, {"image": "img.nii.gz"})


def prepare(patient, cfg):
    return preprocess_patient(patient, cfg, make_tasks(cfg))


def test_preprocess_patient_shapes_and_groups():
    geom = geometry(DIRECTIONS["oblique"])
    lm_pos = tuple((np.array([6.0, 18.0, 20.0, 1.0]) @ geom.index_to_physical().T)[:3])
    patient = make_patient([Landmark("renal_pelvis_right", lm_pos), Landmark("other", (0.0, 0.0, 0.0))])
    cfg = Config(preprocess={"slice_size": (24, 30)})
    prep = prepare(patient, cfg)
    assert prep.image.shape == (12, 24, 30) and prep.image.dtype == np.float32
    assert prep.labels.shape == (12, 24, 30) and prep.labels.dtype == np.uint8
    assert prep.orig_labels.shape == (12, 36, 40) and set(np.unique(prep.orig_labels)) == {0, 1}
    heat = prep.targets["landmarks"]["heatmaps"]
    assert heat.shape == (12, 1, 24, 30) and heat.dtype == np.float32
    assert list(prep.targets) == ["landmarks"]
    assert [lm.name for lm in prep.landmarks] == ["renal_pelvis_right"]  # "other" is not configured; left one missing
    assert prep.image.min() >= -2.048 and prep.image.max() <= 2.048
    np.testing.assert_allclose(prep.index_to_physical, cache_affine(geom, (24, 30)))
    assert heat.max() > 0.9
    # the peak sits at the landmark's cache index
    s, r, c = np.unravel_index(np.argmax(heat[:, 0]), heat[:, 0].shape)
    expect = physical_to_index(lm_pos, prep.index_to_physical)[0]
    assert np.allclose([s, r, c], np.round(expect), atol=1)

    grouped = Config(
        preprocess={"slice_size": (24, 30)},
        tasks={"segmentation": {}, "landmarks": {"params": {"groups": [["renal_pelvis_right"], ["renal_pelvis_left"]]}}},
    )
    heat = prepare(patient, grouped).targets["landmarks"]["heatmaps"]
    assert heat.shape[1] == 2 and heat[:, 1].max() == 0 and heat[:, 0].max() > 0.9

    bad = Config(tasks={"segmentation": {}, "landmarks": {"params": {"groups": [["nope"]]}}})
    with pytest.raises(ConfigError, match="tasks.landmarks.params.groups.*nope"):
        make_tasks(bad)


def test_old_preprocess_keys_name_their_new_home():
    from mtlbench.config import validate_config

    for old, new in [("sigma_mm", "tasks.landmarks.params.sigma_mm"), ("landmark_groups", "tasks.landmarks.params.groups")]:
        with pytest.raises(ConfigError, match=rf"preprocess\.{old} has moved.*{new}"):
            validate_config({"preprocess": {old: 3}}, "k.toml")


def test_preprocess_patient_rejects_bad_input():
    patient = make_patient([Landmark("renal_pelvis_left", (0.0, 0.0, 0.0))] * 2)
    with pytest.raises(DataError, match="p1.*twice"):
        prepare(patient, Config(preprocess={"slice_size": (8, 8)}))
    patient = make_patient([])
    patient.image = patient.image[:, :, :-1]
    with pytest.raises(DataError, match="p1.*shape"):
        prepare(patient, Config(preprocess={"slice_size": (8, 8)}))


class _Ramp(Task):
    """A task whose targets exercise every shape rule: a map, points, per-slice values, a per-patient array."""

    name = "ramp"
    kind = "regression"
    bad: str = ""

    def targets(self):
        return [
            Target("map", 2, "float32", "linear"),
            Target("pts", 1, "float32", "points"),
            Target("flag", 1, "uint8", "none"),
            Target("whole", 1, "float64", per_slice=False),
        ]

    def prepare(self, patient, grid: CacheGrid):
        s, h, w = grid.shape
        out = {
            "map": np.stack([grid.resample(patient.image), grid.resample(patient.image) * 0 + 1], axis=1),
            "pts": np.zeros((s, 1, 2)),
            "flag": np.ones((s, 1), dtype=np.int64),
            "whole": grid.to_physical(np.array([[0.0, 0.0, 0.0]])),
        }
        if self.bad == "shape":
            out["map"] = out["map"][:, :1]
        if self.bad == "missing":
            del out["pts"]
        return out


def test_prepare_output_is_checked_and_cast():
    cfg = Config(preprocess={"slice_size": (24, 30)})
    patient = make_patient([])
    task = _Ramp(_Ramp.Params(), None)
    rec = preprocess_patient(patient, cfg, {"r": task})
    t = rec.targets["r"]
    assert t["map"].shape == (12, 2, 24, 30) and t["map"].dtype == np.float32
    assert t["pts"].shape == (12, 1, 2) and t["pts"].dtype == np.float32
    assert t["flag"].dtype == np.uint8 and t["whole"].shape == (1, 3)
    np.testing.assert_allclose(t["whole"][0], index_to_physical([[0, 0, 0]], rec.index_to_physical)[0])
    # CacheGrid.resample is the image's own resize
    np.testing.assert_allclose(t["map"][:, 0], resize_slices(patient.image, (24, 30), "bilinear"))
    for bad, match in (("shape", "target 'map' has shape"), ("missing", "declares targets")):
        task.bad = bad
        with pytest.raises(PluginError, match=f"task 'r'.*patient p1.*{match}"):
            preprocess_patient(patient, cfg, {"r": task})


def test_cache_grid_maps_points_and_spacing():
    geom = geometry(DIRECTIONS["oblique"])
    aff = cache_affine(geom, (18, 20))
    grid = CacheGrid((12, 18, 20), aff, geom)
    idx = np.array([[0.0, 0.0, 0.0], [3.5, 7.25, 19.0]])
    np.testing.assert_allclose(grid.to_index(grid.to_physical(idx)), idx, atol=1e-9)
    # cache pixels are (Y / H, X / W) original pixels wide; slices keep the slice spacing
    np.testing.assert_allclose(grid.spacing(), (2.5, 1.1 * 36 / 18, 0.9 * 40 / 20))
    with pytest.raises(ValueError, match="shape"):
        grid.resample(np.zeros((12, 18, 20)))
