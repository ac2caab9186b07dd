"""landmark_coords against independent hand computations: soft-argmax, targets, loss, decoding, metrics."""

from __future__ import annotations

import importlib.metadata as md
import math

import numpy as np
import pytest
import torch

from mtlbench.api import CachedPatient, CacheGrid, DatasetInfo, EvalVolume, Geometry, Landmark, Patient
from mtlbench.data.grid import cache_affine
from mtlbench.errors import ConfigError
from mtlbench_coords import (
    CoordParams,
    LandmarkCoords,
    decode_landmarks,
    slice_plane_distance,
    soft_argmax,
    soft_argmax_np,
)

# Original grid (x, y, z) = (20, 16, 12) voxels of 0.8 x 0.7 x 2.5 mm, x and y flipped;
# cache slices (H, W) = (8, 10), so cache row r <-> y index j = 2 r + 0.5, col c <-> i = 2 c + 0.5,
# and a cache pixel is 1.4 mm (rows) by 1.6 mm (cols).
GEOM = Geometry(size=(20, 16, 12), spacing=(0.8, 0.7, 2.5), origin=(10.0, -20.0, 30.0),
                direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
S, H, W = 12, 8, 10
ROW_MM, COL_MM, SLICE_MM = 1.4, 1.6, 2.5
NAMES = ("a", "b", "c", "far")
INFO = DatasetInfo(organs=("kidney",), landmarks=NAMES, slice_size=(H, W))


def lps(s: float, r: float, c: float) -> tuple[float, float, float]:
    """Cache index -> LPS by hand (not through the library's affine)."""
    i, j, k = 2 * c + 0.5, 2 * r + 0.5, s
    return (10.0 - 0.8 * i, -20.0 - 0.7 * j, 30.0 + 2.5 * k)


def grid() -> CacheGrid:
    return CacheGrid((S, H, W), cache_affine(GEOM, (H, W)), GEOM)


def task(**params) -> LandmarkCoords:
    return LandmarkCoords(CoordParams(**params), INFO)


def patient(landmarks: dict[str, tuple[float, float, float]]) -> Patient:
    return Patient(
        id="p1", image=np.zeros((S, 16, 20), np.float32), geometry=GEOM, masks={},
        landmarks=[Landmark(n, lps(*idx)) for n, idx in landmarks.items()],
    )


# landmark "far" is 20 rows down: outside the slice in-plane, but within radius of slice 5
TRUTH = {"a": (5.0, 3.0, 4.0), "c": (7.0, 6.0, 2.0), "far": (5.0, 20.0, 3.0)}


def volume(t: LandmarkCoords, output: np.ndarray, truth=TRUTH) -> EvalVolume:
    p = patient(truth)
    g = grid()
    targets = t.prepare(p, g)
    rec = CachedPatient(
        id="p1", image=np.zeros((S, H, W), np.float32), labels=np.zeros((S, H, W), np.uint8),
        orig_labels=np.zeros((S, 16, 20), np.uint8), index_to_physical=g.index_to_physical, geometry=GEOM,
        landmarks=p.landmarks, targets={"landmark_coords": targets},
    )
    return EvalVolume(rec, output.astype(np.float32), targets, final=False)


def make_output(peaks: dict[str, tuple[int, int, int]], shift=(0, 0), slice_shift=0, k=2, spurious=None) -> np.ndarray:
    """(S, 2L, H, W): logit 50 at the peak pixel on the 2k+1 slices around the landmark, presence +-20."""
    out = np.zeros((S, 2 * len(NAMES), H, W), np.float32)
    out[:, 1::2] = -20.0
    for name, (s, r, c) in peaks.items():
        l = NAMES.index(name)
        for t in range(s + slice_shift - k, s + slice_shift + k + 1):
            out[t, 2 * l, r + shift[0], c + shift[1]] = 50.0
            out[t, 2 * l + 1] = 20.0
    if spurious is not None:  # one confident slice far away, pointing elsewhere
        name, s = spurious
        l = NAMES.index(name)
        out[s, 2 * l] = 0.0
        out[s, 2 * l, 0, 0] = 50.0
        out[s, 2 * l + 1] = 20.0
    return out


INT_PEAKS = {n: tuple(int(v) for v in TRUTH[n]) for n in ("a", "c")}


# ----------------------------------------------------------------------------- soft-argmax


def test_soft_argmax_one_hot_and_blob():
    logits = torch.full((2, 3, 7, 9), -1e4)
    logits[0, 0, 2, 5] = 0.0
    logits[0, 1, 6, 0] = 0.0
    logits[0, 2, 0, 8] = 0.0
    logits[1, 0, 3:5, 4] = 0.0  # two equal pixels: the midpoint
    logits[1, 1, 2:5, 3:6] = 1.0  # a symmetric 3 x 3 blob
    logits[1, 1, 3, 4] = 3.0
    logits[1, 2] = 0.0  # uniform: the centre of the slice
    pos = soft_argmax(logits)
    expected = torch.tensor([[[2, 5], [6, 0], [0, 8]], [[3.5, 4], [3, 4], [3, 4]]], dtype=torch.float32)
    assert pos.shape == (2, 3, 2)
    torch.testing.assert_close(pos, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(soft_argmax_np(logits.numpy()), expected.numpy(), atol=1e-4)


def test_soft_argmax_gradient_flows():
    logits = torch.randn(1, 1, 5, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pos = soft_argmax(logits)
    (pos[..., 0] + 2 * pos[..., 1]).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # raising a pixel's logit pulls the position towards it: d row / d logit(r, c) = p (r - row)
    g = logits.grad[0, 0]
    p = torch.softmax(logits.detach().flatten(), 0).reshape(5, 6)
    rows = torch.arange(5.0)[:, None].expand(5, 6)
    cols = torch.arange(6.0)[None, :].expand(5, 6)
    want = p * (rows - pos[0, 0, 0].detach()) + 2 * p * (cols - pos[0, 0, 1].detach())
    torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)


def test_slice_plane_distance():
    assert slice_plane_distance(cache_affine(GEOM, (H, W))) == pytest.approx(SLICE_MM)
    sheared = np.eye(4)
    # rows run along y, cols along z, so the normal is x: a slice step of 3 mm along x, 1 mm in-plane
    sheared[:3, 0] = [3.0, 1.0, 0.0]
    assert slice_plane_distance(sheared) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- targets


def test_prepare_points_near_and_absent():
    g = grid()
    t = task(radius_mm=5.0)
    marks = {"a": (5.0, 3.0, 4.0), "c": (5.3, 6.25, 1.5), "far": (5.0, 20.0, 3.0)}
    out = t.prepare(patient(marks), g)
    assert set(out) == {"points", "near", "positions"}
    assert out["points"].shape == (S, 4, 2) and out["points"].dtype == np.float32
    assert out["near"].shape == (S, 4) and out["near"].dtype == np.float32
    assert out["positions"].shape == (4, 3) and out["positions"].dtype == np.float64
    for l, name in enumerate(NAMES):
        if name == "b":
            assert np.isnan(out["points"][:, l]).all() and np.isnan(out["positions"][l]).all()
            assert (out["near"][:, l] == 0).all()
            continue
        np.testing.assert_allclose(out["positions"][l], lps(*marks[name]), atol=1e-9)
        want = g.to_index(np.array([lps(*marks[name])]))[0, 1:]
        np.testing.assert_allclose(want, marks[name][1:], atol=1e-9)  # the library agrees with the hand map
        np.testing.assert_allclose(out["points"][:, l], np.broadcast_to(want, (S, 2)), atol=1e-5)
    # |s - s_l| * 2.5 mm <= 5 mm, edges included
    near = {name: sorted(np.flatnonzero(out["near"][:, NAMES.index(name)]).tolist()) for name in NAMES}
    assert near["a"] == [3, 4, 5, 6, 7]
    assert near["c"] == [4, 5, 6, 7]  # |s - 5.3| <= 2
    assert near["b"] == [] and near["far"] == []  # absent / outside the slice in-plane
    assert set(np.unique(out["near"])) <= {0.0, 1.0}
    # a slightly smaller radius loses the edge slices (|s - 5| <= 1.96)
    out = task(radius_mm=4.9).prepare(patient(marks), g)
    assert np.flatnonzero(out["near"][:, 0]).tolist() == [4, 5, 6]


def test_prepare_passes_the_core_target_check():
    from mtlbench.data.preprocess import check_targets

    t = task()
    g = grid()
    out = check_targets("landmark_coords", t, t.targets(), t.prepare(patient(TRUTH), g), g, "p1")
    assert out["points"].shape == (S, 4, 2)


def test_landmark_subset_and_settings():
    t = task(landmarks=["c", "a"], radius_mm=7.5, presence_weight=3.0)
    assert t.landmark_names() == ["c", "a"] and t.out_channels() == 4
    assert t.target_settings() == {"radius_mm": 7.5, "landmarks": ["c", "a"]}
    out = t.prepare(patient(TRUTH), grid())
    np.testing.assert_allclose(out["points"][0], [TRUTH["c"][1:], TRUTH["a"][1:]], atol=1e-5)
    assert [tg.name for tg in t.targets()] == ["points", "near", "positions"]
    assert [tg.warp for tg in t.targets()] == ["points", "none", "none"]
    assert [tg.per_slice for tg in t.targets()] == [True, True, False]
    assert task().target_settings() == {"radius_mm": 10.0, "landmarks": list(NAMES)}


# ----------------------------------------------------------------------------- loss


def _hand_loss(out: np.ndarray, points: np.ndarray, near: np.ndarray, kind: str, pw: float) -> float:
    b, c, h, w = out.shape
    total_w, total = 0.0, 0.0
    bce = []
    for i in range(b):
        for l in range(c // 2):
            logit = out[i, 2 * l].astype(np.float64)
            p = np.exp(logit - logit.max())
            p /= p.sum()
            pr = sum(p[r, cc] * r for r in range(h) for cc in range(w))
            pc = sum(p[r, cc] * cc for r in range(h) for cc in range(w))
            r, cc = points[i, l]
            valid = math.isfinite(r) and math.isfinite(cc) and -0.5 <= r <= h - 0.5 and -0.5 <= cc <= w - 0.5
            wt = near[i, l] if valid else 0.0
            if wt > 0:
                d = [pr - r, pc - cc]
                if kind == "l1":
                    dist = abs(d[0]) + abs(d[1])
                else:
                    dist = sum(0.5 * x * x if abs(x) < 1 else abs(x) - 0.5 for x in d)
                total += wt * dist
                total_w += wt
            z = out[i, 2 * l + 1].astype(np.float64).mean()
            bce.append(-(wt * math.log(1 / (1 + math.exp(-z))) + (1 - wt) * math.log(1 - 1 / (1 + math.exp(-z)))))
    coord = total / total_w if total_w > 0 else 0.0
    return coord + pw * float(np.mean(bce))


@pytest.mark.parametrize("kind,pw", [("l1", 1.0), ("smooth_l1", 0.5), ("l1", 0.0)])
def test_loss_matches_hand_computation(kind, pw):
    t = LandmarkCoords(CoordParams(loss=kind, presence_weight=pw, landmarks=["a", "b", "c"]), INFO)
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(2, 6, 5, 4, generator=gen) * 2
    points = torch.tensor(
        [[[1.0, 2.0], [float("nan"), float("nan")], [3.2, 0.4]],
         [[-3.0, 1.0], [4.4, 3.5], [2.0, 2.0]]]  # (1, 0) moved off the slice by augmentation
    )
    near = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out.requires_grad_(True)
    loss = t.loss(out, {"points": points, "near": near, "labels": torch.zeros(2, 5, 4, dtype=torch.int64)})
    assert loss.dim() == 0
    want = _hand_loss(out.detach().numpy(), points.numpy(), near.numpy(), kind, pw)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    loss.backward()
    assert torch.isfinite(out.grad).all()


def test_loss_without_near_landmarks_is_finite_and_connected():
    t = task(presence_weight=2.0)
    out = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    points = torch.full((3, 4, 2), float("nan"))
    points[:, 0] = 2.0  # finite but not near
    near = torch.zeros(3, 4)
    loss = t.loss(out, {"points": points, "near": near})
    assert loss.requires_grad and torch.isfinite(loss)
    z = out.detach()[:, 1::2].mean(dim=(-2, -1))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.zeros_like(z))
    assert loss.item() == pytest.approx(2.0 * bce.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(out.grad).all()
    assert out.grad[:, 0::2].abs().max() == 0  # no coordinate signal at all
    # presence_weight 0 and nothing near: exactly 0, still backward-able
    loss0 = task(presence_weight=0.0).loss(out, {"points": points, "near": near})
    assert loss0.item() == 0.0 and loss0.requires_grad
    loss0.backward()


def test_loss_is_zero_for_a_perfect_prediction():
    t = task(landmarks=["a"], presence_weight=0.0)
    out = torch.full((1, 2, 8, 10), -1e4)
    out[0, 0, 3, 4] = 0.0
    loss = t.loss(out, {"points": torch.tensor([[[3.0, 4.0]]]), "near": torch.ones(1, 1)})
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_exact_peaks_give_zero_error():
    t = task(radius_mm=5.0)
    vol = volume(t, make_output(INT_PEAKS))
    m = t.evaluate(vol)
    assert set(m) == set(t.metrics())
    assert m["error_mm_a"] == pytest.approx(0.0, abs=1e-6)
    assert m["error_mm_c"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(m["error_mm_b"])  # absent
    assert math.isnan(m["error_mm_far"])  # outside the cache grid: not evaluated
    assert m["error_mm_mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["detect_2mm"] == m["detect_4mm"] == m["detect_10mm"] == 1.0
    assert t.main_metric() == "error_mm_mean"
    # the same at the final evaluation
    vol.final = True
    assert t.evaluate(vol)["error_mm_a"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("shift,mm", [((0, 2), 2 * COL_MM), ((1, 0), ROW_MM), ((-2, 1), math.hypot(2 * ROW_MM, COL_MM))])
def test_evaluate_in_plane_shift_is_k_pixels_of_spacing(shift, mm):
    t = task(radius_mm=5.0)
    m = t.evaluate(volume(t, make_output(INT_PEAKS, shift=shift)))
    assert m["error_mm_a"] == pytest.approx(mm, abs=1e-5)
    assert m["error_mm_c"] == pytest.approx(mm, abs=1e-5)
    assert m["error_mm_mean"] == pytest.approx(mm, abs=1e-5)
    for r in (2, 4, 10):
        assert m[f"detect_{r}mm"] == (1.0 if mm <= r else 0.0)


def test_evaluate_slice_shift_and_detect_rates():
    t = task(radius_mm=5.0)
    out = make_output({"a": INT_PEAKS["a"]}, slice_shift=1)  # one slice off: 2.5 mm
    out = np.maximum(out, make_output({"c": INT_PEAKS["c"]}, shift=(0, 3)))  # 4.8 mm
    m = t.evaluate(volume(t, out))
    assert m["error_mm_a"] == pytest.approx(SLICE_MM, abs=1e-5)
    assert m["error_mm_c"] == pytest.approx(3 * COL_MM, abs=1e-5)
    assert m["error_mm_mean"] == pytest.approx((SLICE_MM + 3 * COL_MM) / 2, abs=1e-5)
    assert (m["detect_2mm"], m["detect_4mm"], m["detect_10mm"]) == (0.0, 0.5, 1.0)


def test_evaluate_ignores_an_isolated_confident_slice():
    t = task(radius_mm=5.0)
    m = t.evaluate(volume(t, make_output(INT_PEAKS, spurious=("a", 11))))
    assert m["error_mm_a"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_falls_back_to_the_most_confident_slice():
    t = task(radius_mm=5.0)
    out = make_output(INT_PEAKS)
    out[:, 1::2] = -60.0  # every presence tiny ...
    for name, (s, _, _) in INT_PEAKS.items():
        out[s, 2 * NAMES.index(name) + 1] = -40.0  # ... the true slice the least so
    m = t.evaluate(volume(t, out))
    assert m["error_mm_a"] == pytest.approx(0.0, abs=1e-6)
    assert m["error_mm_c"] == pytest.approx(0.0, abs=1e-6)


def test_decode_weighted_mean_over_the_window():
    affine = cache_affine(GEOM, (H, W))
    out = np.zeros((S, 2, H, W), np.float32)
    out[:, 0, 2, 3] = 50.0
    out[:, 1] = -30.0
    out[4, 1], out[5, 1], out[6, 1] = 0.0, 30.0, 30.0  # weights 0.5, 1, 1 -> s = (2 + 5 + 6) / 2.5
    lps_pos, index = decode_landmarks(out, affine, radius_mm=5.0)
    np.testing.assert_allclose(index[0], [(0.5 * 4 + 5 + 6) / 2.5, 2, 3], atol=1e-6)
    np.testing.assert_allclose(lps_pos[0], lps(*index[0]), atol=1e-6)


def test_evaluate_patient_without_landmarks_is_nan():
    t = task()
    m = t.evaluate(volume(t, make_output({}), truth={}))
    assert all(math.isnan(v) for v in m.values())


def test_evaluate_rejects_a_wrong_output_shape():
    t = task()
    with pytest.raises(ValueError, match=r"\(S, 8, H, W\)"):
        t.evaluate(volume(t, np.zeros((S, 6, H, W))))


def test_metrics_declared():
    m = task(landmarks=["a", "c"]).metrics()
    assert list(m) == ["error_mm_a", "error_mm_c", "error_mm_mean", "detect_2mm", "detect_4mm", "detect_10mm"]
    assert m["error_mm_mean"].higher_is_better is False and m["error_mm_mean"].unit == "mm"
    assert m["detect_4mm"].higher_is_better is True
    assert task().kind == "regression" and task().head == "conv"


def test_export_writes_decoded_positions(tmp_path):
    from mtlbench.data.landmarks import read_fcsv

    t = task(radius_mm=5.0)
    vol = volume(t, make_output(INT_PEAKS))
    paths = t.export(vol, tmp_path)
    assert [p.name for p in paths] == ["p1_landmark_coords.fcsv"]
    got = {lm.name: lm.position for lm in read_fcsv(paths[0])}
    assert list(got) == list(NAMES)  # every landmark gets an estimate
    for name in ("a", "c"):
        np.testing.assert_allclose(got[name], lps(*TRUTH[name]), atol=1e-5)


def test_pictures_truth_near_and_confident_predictions():
    t = task(radius_mm=5.0)
    vol = volume(t, make_output(INT_PEAKS, shift=(1, 0)))
    (pic,) = t.pictures(vol, 4)  # a (slice 5) is near slices 3..7, c (slice 7) only 5..9
    assert pic.style == "points" and pic.title == "landmark positions"
    assert pic.truth.shape == pic.pred.shape == (4, 2)
    np.testing.assert_allclose(pic.truth[0], TRUTH["a"][1:], atol=1e-5)
    assert np.isnan(pic.truth[1:]).all()  # b absent, c (slices 5..9) and far not near slice 4
    np.testing.assert_allclose(pic.pred[0], [TRUTH["a"][1] + 1, TRUTH["a"][2]], atol=1e-4)
    assert np.isnan(pic.pred[1:]).all()  # presence logits -20 there
    (pic,) = t.pictures(vol, 6)
    np.testing.assert_allclose(pic.truth[2], TRUTH["c"][1:], atol=1e-5)
    np.testing.assert_allclose(pic.pred[2], [TRUTH["c"][1] + 1, TRUTH["c"][2]], atol=1e-4)


# ----------------------------------------------------------------------------- parameters and registration


@pytest.mark.parametrize(
    "params,key",
    [
        ({"radius_mm": 0}, "radius_mm"),
        ({"radius_mm": "inf"}, "radius_mm"),
        ({"presence_weight": -1}, "presence_weight"),
        ({"loss": "l2"}, "loss"),
        ({"landmarks": []}, "landmarks"),
        ({"landmarks": ["a", "a"]}, "landmarks"),
        ({"radius": 3}, "radius"),
    ],
)
def test_params_errors_are_one_line(params, key):
    from mtlbench.config import validate_params

    with pytest.raises(ConfigError) as exc:
        validate_params(CoordParams, params, "tasks.landmark_coords.params")
    msg = str(exc.value)
    assert "\n" not in msg and f"tasks.landmark_coords.params.{key}" in msg


def test_unknown_landmark_is_a_config_error():
    with pytest.raises(ConfigError) as exc:
        task(landmarks=["a", "nope"])
    assert "\n" not in str(exc.value) and "params.landmarks" in str(exc.value) and "'nope'" in str(exc.value)
    with pytest.raises(ConfigError, match="params.landmarks"):
        LandmarkCoords(CoordParams(), DatasetInfo(("kidney",), (), (H, W)))


def test_registered_through_the_entry_point():
    try:
        md.distribution("mtlbench-coords")
    except md.PackageNotFoundError:
        pytest.skip("mtlbench-coords is not installed")
    from mtlbench.plugins import new_manager

    item = new_manager().get("tasks", "landmark_coords")
    assert item.distribution == "mtlbench-coords"
    assert item.obj is LandmarkCoords


# ----------------------------------------------------------------------------- with the core's augmentation


def test_points_follow_the_content_under_the_core_augmentation():
    """The soft-argmax of an augmented blob lands where the core moves the ``points`` target."""
    from mtlbench.config import AugmentConfig
    from mtlbench.engine.augment import random_affine

    t = task(landmarks=["a"])
    rules = {tg.name: tg for tg in t.targets() if tg.per_slice}
    b, h, w = 6, 32, 32
    centre = torch.tensor([12.3, 17.6])
    rows = torch.arange(h, dtype=torch.float32)[:, None]
    cols = torch.arange(w, dtype=torch.float32)[None, :]
    blob = torch.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * 2.0**2))
    image = blob.expand(b, 1, h, w).clone()
    targets = {"points": centre.expand(b, 1, 2).clone(), "near": torch.ones(b, 1)}
    cfg = AugmentConfig(rotation_deg=(-30.0, 30.0), scale=(0.8, 1.2), translation=(-0.1, 0.1))
    out_image, out_targets = random_affine(image, targets, rules, cfg, torch.Generator().manual_seed(4))
    moved = out_targets["points"][:, 0]
    assert (moved - centre).abs().max() > 1.0  # the augmentation did move the points
    torch.testing.assert_close(out_targets["near"], targets["near"])  # "none" is left alone
    found = soft_argmax(torch.log(out_image[:, 0].clamp_min(1e-30)))  # softmax(log g) = g / sum g: the centroid
    torch.testing.assert_close(found, moved, atol=0.1, rtol=0)


def test_built_from_a_config_through_the_core():
    try:
        md.distribution("mtlbench-coords")
    except md.PackageNotFoundError:
        pytest.skip("mtlbench-coords is not installed")
    from mtlbench.assemble import make_task
    from mtlbench.config import validate_config

    raw = {"tasks": {"segmentation": {}, "coords": {"use": "landmark_coords", "params": {"radius_mm": 6.0}}}}
    t = make_task(validate_config(raw), "coords")
    assert isinstance(t, LandmarkCoords) and t.params.radius_mm == 6.0
    assert t.landmark_names() == ["renal_pelvis_right", "renal_pelvis_left"]  # data.landmarks' default
    raw["tasks"]["coords"]["params"] = {"landmarks": ["renal_pelvis_right", "spleen_tip"]}
    with pytest.raises(ConfigError) as exc:
        make_task(validate_config(raw), "coords")
    assert str(exc.value).startswith("tasks.coords.params.landmarks: landmark 'spleen_tip'") and "\n" not in str(exc.value)
