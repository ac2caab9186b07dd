"""Tests of the random affine augmentation: identity cases, known rotations/translations/scales, consistency, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlbench.config import AugmentConfig
from mtlbench.api import Target
from mtlbench.engine.augment import LABELS_RULE, affine_theta, draw_params, random_affine, warp_points

RULES = {"labels": LABELS_RULE, "heatmaps": Target("heatmaps", 1, warp="linear")}

torch.set_num_threads(1)


def fixed(rotation=0.0, scale=1.0, translation=0.0) -> AugmentConfig:
    return AugmentConfig(rotation_deg=(rotation, rotation), scale=(scale, scale), translation=(translation, translation))


def batch(b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((b, 1, h, w), generator=g)
    labels = torch.randint(0, 3, (b, h, w), generator=g)
    heatmaps = torch.rand((b, 2, h, w), generator=g)
    return image, {"labels": labels, "heatmaps": heatmaps}


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_disabled_is_identity():
    image, targets = batch()
    out, tout = random_affine(image, targets, RULES, AugmentConfig(enabled=False), gen())
    assert out is image
    assert all(tout[k] is targets[k] for k in targets)


def test_zero_ranges_are_identity():
    image, targets = batch(h=8, w=12)
    out, tout = random_affine(image, targets, RULES, fixed(), gen())
    assert torch.allclose(out, image, atol=1e-6, rtol=0)
    assert torch.equal(tout["labels"], targets["labels"])
    assert tout["labels"].dtype == targets["labels"].dtype
    assert torch.allclose(tout["heatmaps"], targets["heatmaps"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("angle,k", [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_quarter_turns_match_rot90(angle, k):
    """Positive angles turn content counter-clockwise as displayed (row 0 on top), like np.rot90(k=1)."""
    image, targets = batch(b=3, h=8, w=8)
    out, tout = random_affine(image, targets, RULES, fixed(rotation=angle), gen())
    for i in range(3):
        expected = np.rot90(targets["labels"][i].numpy(), k)
        assert np.array_equal(tout["labels"][i].numpy(), expected)
        assert np.allclose(out[i, 0].numpy(), np.rot90(image[i, 0].numpy(), k), atol=1e-5)
        assert np.allclose(tout["heatmaps"][i].numpy(), np.rot90(targets["heatmaps"][i].numpy(), k, axes=(1, 2)), atol=1e-5)


def test_non_square_rotation_has_no_shear():
    labels = torch.zeros((1, 6, 10), dtype=torch.int64)
    labels[0, 1:5, 3:7] = 1  # a 4x4 square centred on the 6x10 image
    _, tout = random_affine(torch.zeros((1, 1, 6, 10)), {"labels": labels}, RULES, fixed(rotation=90.0), gen())
    assert torch.equal(tout["labels"], labels)
    labels2 = torch.arange(60).reshape(1, 6, 10)
    _, t2 = random_affine(torch.zeros((1, 1, 6, 10)), {"labels": labels2}, RULES, fixed(rotation=180.0), gen())
    assert np.array_equal(t2["labels"][0].numpy(), np.rot90(labels2[0].numpy(), 2))


def shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moved by (+dy rows, +dx columns), zeros where nothing comes in."""
    out = np.zeros_like(a)
    h, w = a.shape[-2:]
    out[..., dy:, dx:] = a[..., : h - dy, : w - dx]
    return out


def test_translation_direction_and_padding():
    image, targets = batch(b=1, h=8, w=8)
    out, tout = random_affine(image, targets, RULES, fixed(translation=0.25), gen())  # +2 px on both axes
    assert np.array_equal(tout["labels"][0].numpy(), shift(targets["labels"][0].numpy(), 2, 2))
    assert np.allclose(tout["heatmaps"][0].numpy(), shift(targets["heatmaps"][0].numpy(), 2, 2), atol=1e-6)
    img = image[0, 0].numpy()
    assert np.allclose(out[0, 0, 2:, 2:].numpy(), img[:-2, :-2], atol=1e-6)
    # border padding repeats the edge: the vacated corner holds the original corner value
    assert np.allclose(out[0, 0, :2, :2].numpy(), img[0, 0], atol=1e-6)


def test_composition_order_rotation_then_translation():
    _, targets = batch(b=1, h=8, w=8)
    lab = targets["labels"][0].numpy()
    _, tout = random_affine(torch.zeros((1, 1, 8, 8)), targets, RULES, fixed(rotation=90.0, translation=0.25), gen())
    assert np.array_equal(tout["labels"][0].numpy(), shift(np.rot90(lab, 1), 2, 2))


def test_scale_enlarges_about_the_centre():
    labels = torch.zeros((1, 8, 8), dtype=torch.int64)
    labels[0, 2:6, 2:6] = 1
    _, tout = random_affine(torch.zeros((1, 1, 8, 8)), {"labels": labels}, RULES, fixed(scale=2.0), gen())
    assert bool((tout["labels"] == 1).all())
    _, small = random_affine(torch.zeros((1, 1, 8, 8)), {"labels": labels}, RULES, fixed(scale=0.5), gen())
    assert int(small["labels"].sum()) == 4 and bool(small["labels"][0, 3:5, 3:5].eq(1).all())


def test_image_equal_to_labels_moves_like_labels():
    _, targets = batch(b=4, h=8, w=8, seed=1)
    image = targets["labels"][:, None].float()
    out, tout = random_affine(image, targets, RULES, fixed(rotation=-90.0), gen())
    assert torch.allclose(out[:, 0], tout["labels"].float(), atol=1e-5)


def test_labels_stay_in_label_set_and_batch_is_per_sample():
    g = torch.Generator().manual_seed(5)
    labels = torch.zeros((4, 16, 16), dtype=torch.uint8)
    labels[:, 4:12, 3:9] = 3
    labels[:, 6:10, 9:14] = 7
    image = torch.rand((4, 1, 16, 16), generator=g)
    cfg = AugmentConfig(rotation_deg=(-30, 30), scale=(0.8, 1.2), translation=(-0.1, 0.1))
    out, tout = random_affine(image, {"labels": labels}, RULES, cfg, gen(11))
    assert tout["labels"].dtype == torch.uint8
    assert set(torch.unique(tout["labels"]).tolist()) <= {0, 3, 7}
    assert not torch.equal(tout["labels"][0], tout["labels"][1])  # one transform per sample
    # the batched call equals each sample resampled alone with its own drawn parameters
    params = draw_params(4, cfg, gen(11))
    for i in range(4):
        theta = affine_theta(params[i : i + 1], 16, 16).float()
        grid = F.affine_grid(theta, [1, 1, 16, 16], align_corners=False)
        ref = F.grid_sample(labels[i : i + 1, None].float(), grid, mode="nearest", align_corners=False)
        assert torch.equal(ref[0, 0].round().to(torch.uint8), tout["labels"][i])
        ref_img = F.grid_sample(image[i : i + 1], grid, mode="bilinear", padding_mode="border", align_corners=False)
        assert torch.allclose(ref_img, out[i : i + 1], atol=1e-6)


def test_deterministic_with_same_generator_seed():
    image, targets = batch(b=3, h=16, w=16)
    cfg = AugmentConfig(rotation_deg=(-10, 10), scale=(0.9, 1.1), translation=(-0.05, 0.05))
    a = random_affine(image, targets, RULES, cfg, gen(7))
    b = random_affine(image, targets, RULES, cfg, gen(7))
    c = random_affine(image, targets, RULES, cfg, gen(8))
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in targets)
    assert not torch.equal(a[0], c[0])


def test_mismatched_target_shape_is_rejected():
    image, _ = batch(b=2, h=8, w=8)
    with pytest.raises(ValueError, match="labels"):
        random_affine(image, {"labels": torch.zeros((2, 8, 6), dtype=torch.int64)}, RULES, fixed(), gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_same_result_on_cuda():
    image, targets = batch(b=3, h=16, w=16)
    cfg = AugmentConfig(rotation_deg=(-10, 10), scale=(0.9, 1.1), translation=(-0.05, 0.05))
    cpu = random_affine(image, targets, RULES, cfg, gen(3))
    gpu = random_affine(image.cuda(), {k: v.cuda() for k, v in targets.items()}, RULES, cfg, gen(3))
    assert gpu[0].is_cuda
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-4)
    assert (cpu[1]["labels"] != gpu[1]["labels"].cpu()).float().mean() < 0.01  # ties may round differently
    assert torch.allclose(cpu[1]["heatmaps"], gpu[1]["heatmaps"].cpu(), atol=1e-4)


def test_fill_value_is_used_outside_the_slice():
    """A linear target with fill 1 gets 1 where the shifted slice samples outside; nearest keeps its values."""
    sdm = torch.zeros((1, 1, 8, 8))
    codes = torch.full((1, 1, 8, 8), 3, dtype=torch.int64)
    rules = {"sdm": Target("sdm", 1, warp="linear", fill=1.0), "codes": Target("codes", 1, "int64", "nearest", fill=7)}
    _, out = random_affine(torch.zeros((1, 1, 8, 8)), {"sdm": sdm, "codes": codes}, rules, fixed(translation=0.25), gen())
    # +2 px: rows/cols 0-1 come from outside
    assert torch.all(out["sdm"][0, 0, :2] == 1.0) and torch.all(out["sdm"][0, 0, 2:, 2:] == 0.0)
    assert set(out["codes"].unique().tolist()) == {3, 7} and torch.all(out["codes"][0, 0, :2] == 7)


def test_points_follow_the_content_they_mark():
    """The moved point lands where the warped image's blob is; NaN stays NaN; 'none' targets are untouched."""
    h, w = 40, 56
    rr, cc = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    pts = torch.tensor([[[12.3, 20.7], [float("nan"), float("nan")]], [[25.0, 30.0], [8.0, 44.0]]])
    image = torch.stack([torch.exp(-((rr - p[0, 0]) ** 2 + (cc - p[0, 1]) ** 2) / (2 * 1.5**2)) for p in pts])[:, None]
    near = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    rules = {"p": Target("p", 2, warp="points"), "near": Target("near", 2, warp="none")}
    cfg = AugmentConfig(rotation_deg=(-30.0, 30.0), scale=(0.8, 1.2), translation=(-0.1, 0.1))
    out, t = random_affine(image, {"p": pts, "near": near}, rules, cfg, gen(5))
    for i in range(2):
        m = out[i, 0]
        centroid = torch.stack([(m * rr).sum() / m.sum(), (m * cc).sum() / m.sum()])
        assert torch.allclose(t["p"][i, 0], centroid, atol=0.05), (t["p"][i, 0], centroid)
    assert torch.isnan(t["p"][0, 1]).all() and t["near"] is near
    # a quarter turn moves (row, col) exactly as np.rot90 moves a pixel
    theta = affine_theta(torch.tensor([[90.0, 1.0, 0.0, 0.0]], dtype=torch.float64), 8, 8)
    moved = warp_points(torch.tensor([[[1.0, 6.0]]]), theta, 8, 8)
    a = np.zeros((8, 8))
    a[1, 6] = 1
    assert np.argwhere(np.rot90(a, 1))[0].tolist() == moved[0, 0].round().int().tolist()
