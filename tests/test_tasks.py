"""Tests of the built-in tasks (segmentation, landmarks): registration, losses, metrics and evaluate()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlbench.api import CachedPatient, DatasetInfo, EvalVolume, Geometry, Landmark
from mtlbench.builtin.landmarks import LandmarkParams, Landmarks
from mtlbench.builtin.segmentation import Segmentation, SegmentationParams
from mtlbench.builtin import landmarks as lmk
from mtlbench.data.grid import cache_affine as grid_affine, index_to_physical
from mtlbench.engine import metrics
from mtlbench.plugins import get_manager, reset_manager

torch.set_num_threads(1)

ORGANS = ("kidney_right", "kidney_left")
INFO = DatasetInfo(organs=ORGANS, landmarks=("a", "b"), slice_size=(12, 20))
TWO = [["a"], ["b"]]


def test_registered_from_mtlbench_distribution():
    reset_manager()
    try:
        manager = get_manager()
        for kind, name, cls in [("tasks", "segmentation", Segmentation), ("tasks", "landmarks", Landmarks)]:
            item = manager.get(kind, name)
            assert item.obj is cls and item.distribution == "mtlbench"
        head = manager.get("heads", "conv")
        assert head.distribution == "mtlbench" and head.obj.__name__ == "ConvHead"
    finally:
        reset_manager()


def test_builtin_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, mtlbench.builtin.segmentation, mtlbench.builtin.landmarks, mtlbench.builtin.heads; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- losses


def test_segmentation_loss_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    out = torch.randn((2, 3, 6, 5), generator=g)
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    task = Segmentation(SegmentationParams(), INFO)
    assert task.out_channels() == 3
    assert torch.allclose(task.loss(out, {"labels": target}), F.cross_entropy(out, target))
    assert torch.allclose(task.loss(out, {"labels": target.to(torch.uint8)}), F.cross_entropy(out, target))


def manual_soft_dice(out: torch.Tensor, target: torch.Tensor) -> float:
    prob = torch.softmax(out, dim=1).numpy().astype(np.float64)
    t = target.numpy()
    scores = []
    for c in range(1, out.shape[1]):
        p, gt = prob[:, c], (t == c).astype(np.float64)
        scores.append((2 * (p * gt).sum() + 1.0) / (p.sum() + gt.sum() + 1.0))
    return 1.0 - float(np.mean(scores))


def test_segmentation_dice_term():
    g = torch.Generator().manual_seed(1)
    out = torch.randn((2, 3, 6, 5), generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    task = Segmentation(SegmentationParams(dice_weight=0.5), INFO)
    loss = task.loss(out, {"labels": target})
    expected = F.cross_entropy(out, target).item() + 0.5 * manual_soft_dice(out.detach(), target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(out.grad).all()
    perfect = 50.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert Segmentation(SegmentationParams(dice_weight=1.0), INFO).loss(perfect, {"labels": target}).item() < 1e-3
    with pytest.raises(Exception):
        SegmentationParams(dice_weight=-1)


def test_landmark_losses():
    g = torch.Generator().manual_seed(2)
    out = torch.rand((2, 2, 6, 5), generator=g, requires_grad=True)
    target = torch.rand((2, 2, 6, 5), generator=g)
    rmse = Landmarks(LandmarkParams(), INFO).loss(out, {"heatmaps": target})
    assert torch.allclose(rmse, torch.sqrt(F.mse_loss(out, target)))
    assert torch.allclose(Landmarks(LandmarkParams(loss="mse"), INFO).loss(out, {"heatmaps": target}), F.mse_loss(out, target))
    exact = target.clone().requires_grad_(True)
    Landmarks(LandmarkParams(), INFO).loss(exact, {"heatmaps": target}).backward()
    assert torch.isfinite(exact.grad).all()  # RMSE at a perfect fit keeps a finite gradient


# ----------------------------------------------------------------------------- metric declarations


def test_metric_declarations():
    seg = Segmentation(SegmentationParams(), INFO)
    m = seg.metrics()
    assert seg.main_metric() == "iou_mean" and m["iou_mean"].higher_is_better
    assert set(m) == {f"{k}_{o}" for k in ("iou", "dice", "hd95") for o in ORGANS + ("mean",)}
    assert not m["hd95_kidney_left"].higher_is_better and m["hd95_mean"].unit == "mm"
    assert "hd95_mean" not in Segmentation(SegmentationParams(hd95=False), INFO).metrics()
    lm = Landmarks(LandmarkParams(), INFO)
    m = lm.metrics()
    assert lm.main_metric() == "rmse" and not m["rmse"].higher_is_better
    assert set(m) == {"rmse", "error_mm_a", "error_mm_b", "error_mm_mean", "detect_2mm", "detect_4mm", "detect_10mm"}
    assert m["detect_4mm"].higher_is_better and m["error_mm_a"].unit == "mm"
    assert lm.out_channels() == 1  # default: every landmark in one channel
    two = Landmarks(LandmarkParams(groups=TWO), INFO)
    assert two.out_channels() == 2 and two.targets()[0].channels == 2 and two.targets()[0].warp == "linear"
    assert two.target_settings() == {"sigma_mm": 5.0, "truncate": 4.0, "groups": TWO}
    assert Landmarks(LandmarkParams(loss="mse"), INFO).target_settings() == lm.target_settings()


# ----------------------------------------------------------------------------- segmentation evaluate


def seg_volume(orig: np.ndarray, cache_pred: np.ndarray, final: bool, spacing=(0.7, 0.9, 2.5)) -> EvalVolume:
    """Original labels (Z, Y, X) in 2x2 blocks, the cache grid at half the in-plane size."""
    z, y, x = orig.shape
    cache_labels = orig[:, ::2, ::2].copy()  # block-aligned: equals the nearest-exact resize
    logits = 10.0 * np.moveaxis(np.eye(3, dtype=np.float32)[cache_pred], -1, 1)  # (S, C, H, W)
    geometry = Geometry(size=(x, y, z), spacing=spacing, origin=(0.0, 0.0, 0.0))
    rec = CachedPatient(
        id="p1",
        image=np.zeros(cache_labels.shape, np.float32),
        labels=cache_labels,
        orig_labels=orig,
        index_to_physical=grid_affine(geometry, cache_labels.shape[1:]),
        geometry=geometry,
    )
    return EvalVolume(rec, logits, {}, final)


def block_labels(shape=(5, 12, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = np.zeros(shape, dtype=np.uint8)
    small[1:4, 2:7, 3:9] = 1
    small[2:5, 5:10, 12:18] = 2
    small[rng.random(shape) < 0.05] = 0
    return small


def test_segmentation_evaluate_perfect():
    small = block_labels()
    orig = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)  # original grid 24 x 40
    task = Segmentation(SegmentationParams(), INFO)
    during = task.evaluate(seg_volume(orig, small, final=False))
    assert set(during) == {"iou_kidney_right", "iou_kidney_left", "dice_kidney_right", "dice_kidney_left", "iou_mean", "dice_mean"}
    assert all(v == 1.0 for v in during.values())
    final = task.evaluate(seg_volume(orig, small, final=True))
    assert final["iou_mean"] == 1.0 and final["dice_kidney_left"] == 1.0
    assert final["hd95_kidney_right"] == 0.0 and final["hd95_mean"] == 0.0


def test_segmentation_evaluate_final_imperfect_and_empty_organ():
    small = block_labels()
    small[small == 2] = 0  # kidney_left absent from reference and prediction
    orig = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    pred_small = np.roll(small, 1, axis=2)
    task = Segmentation(SegmentationParams(), INFO)
    res = task.evaluate(seg_volume(orig, pred_small, final=True))
    pred_orig = np.repeat(np.repeat(pred_small, 2, axis=1), 2, axis=2)
    p, r = pred_orig == 1, orig == 1
    inter, union = np.sum(p & r), np.sum(p | r)
    assert res["iou_kidney_right"] == pytest.approx(inter / union)
    assert res["dice_kidney_right"] == pytest.approx(2 * inter / (p.sum() + r.sum()))
    assert res["hd95_kidney_right"] == pytest.approx(metrics.hd95(p, r, (2.5, 0.9, 0.7)))
    assert res["hd95_kidney_right"] > 0
    assert math.isnan(res["iou_kidney_left"]) and math.isnan(res["hd95_kidney_left"])
    assert res["iou_mean"] == res["iou_kidney_right"]  # NaN left out of the mean
    no_hd = Segmentation(SegmentationParams(hd95=False), INFO).evaluate(seg_volume(orig, pred_small, final=True))
    assert not any(k.startswith("hd95") for k in no_hd)


def test_segmentation_evaluate_rejects_wrong_channels():
    small = block_labels()
    vol = seg_volume(np.repeat(np.repeat(small, 2, 1), 2, 2), small, final=False)
    vol.output = vol.output[:, :2]
    with pytest.raises(ValueError, match="p1"):
        Segmentation(SegmentationParams(), INFO).evaluate(vol)


# ----------------------------------------------------------------------------- landmarks evaluate


def cache_affine() -> np.ndarray:
    """Cache index (s, r, c) -> LPS: 3 mm slices, 1.5 x 1.25 mm pixels, a direction with flipped axes."""
    a = np.eye(4)
    a[:3, :3] = np.array([[0.0, 0.0, -1.25], [0.0, -1.5, 0.0], [3.0, 0.0, 0.0]])
    a[:3, 3] = (30.0, 20.0, -50.0)
    return a


def heat_channel(shape, affine, points, sigma_mm=5.0) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    phys = index_to_physical(idx, affine)
    out = np.zeros(len(idx))
    for p in points:
        out = np.maximum(out, np.exp(-np.sum((phys - p) ** 2, axis=1) / (2 * sigma_mm**2)))
    return out.reshape(shape).astype(np.float32)


def lm_volume(pred_points: dict[str, np.ndarray], truth: dict[str, np.ndarray], groups, final=True) -> EvalVolume:
    shape = (12, 24, 28)
    affine = cache_affine()
    ref = np.stack([heat_channel(shape, affine, [truth[n] for n in g if n in truth]) for g in groups])
    pred = np.stack([heat_channel(shape, affine, [pred_points[n] for n in g if n in pred_points]) for g in groups])
    rec = CachedPatient(
        id="p2",
        image=np.zeros(shape, np.float32),
        labels=np.zeros(shape, np.uint8),
        orig_labels=np.zeros(shape, np.uint8),
        index_to_physical=affine,
        geometry=Geometry(size=(28, 24, 12), spacing=(1.25, 1.5, 3.0), origin=(0.0, 0.0, 0.0)),
        landmarks=[Landmark(n, tuple(p)) for n, p in truth.items()],
        targets={"landmarks": {"heatmaps": np.ascontiguousarray(np.moveaxis(ref, 0, 1))}},
    )
    return EvalVolume(rec, np.ascontiguousarray(np.moveaxis(pred, 0, 1)), rec.targets["landmarks"], final)


def truth_points():
    aff = cache_affine()
    return {
        "a": index_to_physical([[4.3, 8.2, 7.6]], aff)[0],
        "b": index_to_physical([[7.8, 15.4, 20.3]], aff)[0],
    }


def test_landmarks_evaluate_perfect_two_channels():
    truth = truth_points()
    task = Landmarks(LandmarkParams(groups=TWO), INFO)
    vol = lm_volume(truth, truth, TWO)
    res = task.evaluate(vol)
    assert res["rmse"] == 0.0
    assert res["error_mm_a"] < 1.0 and res["error_mm_b"] < 1.0
    assert res["detect_2mm"] == 1.0 and res["detect_10mm"] == 1.0
    vol.final = False
    assert set(task.evaluate(vol)) == {"rmse"}


def test_landmarks_evaluate_one_channel_and_displaced():
    truth = truth_points()
    moved = dict(truth)
    moved["b"] = truth["b"] + 6.0 * np.array([0.6, 0.8, 0.0])  # 6 mm away
    task = Landmarks(LandmarkParams(), INFO)  # groups None: both landmarks in channel 0
    vol = lm_volume(moved, truth, [["a", "b"]])
    res = task.evaluate(vol)
    expected_rmse = np.sqrt(np.mean((vol.output.astype(np.float64) - vol.targets["heatmaps"]) ** 2))
    assert res["rmse"] == pytest.approx(expected_rmse, rel=1e-9)
    assert res["error_mm_a"] < 1.0
    assert res["error_mm_b"] == pytest.approx(6.0, abs=1.0)
    assert res["detect_2mm"] == 0.5 and res["detect_4mm"] == 0.5 and res["detect_10mm"] == 1.0
    assert res["error_mm_mean"] == pytest.approx((res["error_mm_a"] + res["error_mm_b"]) / 2)


def test_landmarks_outside_the_grid_are_left_out():
    truth = truth_points()
    outside = dict(truth)
    outside["b"] = truth["b"] + np.array([0.0, 0.0, 500.0])
    task = Landmarks(LandmarkParams(groups=TWO), INFO)
    res = task.evaluate(lm_volume({"a": truth["a"]}, outside, TWO))
    assert math.isnan(res["error_mm_b"])
    assert res["error_mm_a"] < 1.0 and res["detect_2mm"] == 1.0 and res["error_mm_mean"] == res["error_mm_a"]


def test_landmarks_evaluate_shape_mismatch():
    truth = truth_points()
    task = Landmarks(LandmarkParams(), INFO)
    vol = lm_volume(truth, truth, [["a"], ["b"]])
    vol.output = vol.output[:, :1]
    with pytest.raises(ValueError, match="p2"):
        task.evaluate(vol)


# ----------------------------------------------------------------------------- export (mtlbench predict)


def test_segmentation_export_writes_the_evaluated_map(tmp_path):
    from mtlbench.data.io import read_volume
    from mtlbench.engine.resample import labels_to_original

    small = block_labels()
    orig = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    vol = seg_volume(orig, np.roll(small, 1, axis=1), final=True)
    vol.record.geometry = Geometry(size=(40, 24, 5), spacing=(0.7, 0.9, 2.5), origin=(10.0, -5.0, 3.0),
                            direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    vol.record.index_to_physical = grid_affine(vol.record.geometry, small.shape[1:])
    (path,) = Segmentation(SegmentationParams(), INFO).export(vol, tmp_path)
    assert path.name == "p1_labels.nii.gz"
    array, geometry = read_volume(path)
    assert np.array_equal(array, labels_to_original(vol.output, vol.geometry, vol.index_to_physical))
    assert np.array_equal(array, labels_to_original(vol.output, vol.geometry))  # the whole slice resized
    assert geometry.size == vol.geometry.size
    assert np.allclose(geometry.index_to_physical(), vol.geometry.index_to_physical())


def test_landmarks_export_fcsv(tmp_path):
    from mtlbench.data.landmarks import read_fcsv

    truth = truth_points()
    task = Landmarks(LandmarkParams(groups=TWO), INFO)
    vol = lm_volume(truth, {"a": truth["a"]}, TWO)  # "b" has no ground truth: decoded without reference
    (path,) = task.export(vol, tmp_path)
    assert path.name == "p2_landmarks.fcsv"
    got = {lm.name: np.asarray(lm.position) for lm in read_fcsv(path)}
    assert set(got) == {"a", "b"}
    assert np.linalg.norm(got["a"] - truth["a"]) < 1.0 and np.linalg.norm(got["b"] - truth["b"]) < 1.0


def test_landmarks_reference_is_the_zero_map_and_the_mean_training_position():
    truth = truth_points()
    task = Landmarks(LandmarkParams(groups=TWO), INFO)
    vol = lm_volume(truth, truth, TWO)
    aff = cache_affine()
    shape = (12, 24, 28)

    def train_patient(pid, idx_a, idx_b, slices):
        a = index_to_physical([idx_a], aff)[0]
        b = index_to_physical([idx_b], aff)[0]
        return CachedPatient(pid, np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), np.uint8),
                             np.zeros((0, 0, 0), np.uint8), aff, vol.geometry,
                             [Landmark("a", tuple(a)), Landmark("b", tuple(b))], shape=(slices, 24, 28))

    # slice positions as a fraction of each patient's slice range: 0.25 and 0.75 of 11 -> a at slice 5.5
    train = [train_patient("t1", [2.75, 6.0, 6.0], [7.0, 14.0, 20.0], 12),
             train_patient("t2", [8.25, 10.0, 10.0], [9.0, 16.0, 22.0], 12)]
    ref = task.reference(vol, train)
    heat = vol.targets["heatmaps"].astype(np.float64)
    assert ref["rmse"] == pytest.approx(np.sqrt(np.mean(heat**2)))  # the all-zero map
    guess_a = index_to_physical([[5.5, 8.0, 8.0]], aff)[0]
    assert ref["error_mm_a"] == pytest.approx(np.linalg.norm(guess_a - truth["a"]))
    guess_b = index_to_physical([[8.0, 15.0, 21.0]], aff)[0]
    assert ref["error_mm_b"] == pytest.approx(np.linalg.norm(guess_b - truth["b"]))
    assert ref["error_mm_mean"] == pytest.approx((ref["error_mm_a"] + ref["error_mm_b"]) / 2)
    assert set(ref) == set(task.metrics())
    assert shape == tuple(vol.record.shape)
