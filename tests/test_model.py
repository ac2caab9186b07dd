"""Tests of the U-Net trunk, the multi-task model, build_model and the built-in conv head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlbench.api import DatasetInfo
from mtlbench.builtin.heads import ConvHead, ConvHeadParams
from mtlbench.builtin.landmarks import LandmarkParams, Landmarks
from mtlbench.builtin.segmentation import Segmentation, SegmentationParams
from mtlbench.config import Config
from mtlbench.engine.model import MultiTaskModel, UNetTrunk, build_model
from mtlbench.errors import ConfigError

torch.set_num_threads(1)

INFO = DatasetInfo(organs=("kidney_right", "kidney_left"), landmarks=("a", "b"), slice_size=(32, 32))


def small_cfg(widths=(4, 8, 16), size=(32, 32)) -> Config:
    return Config.model_validate({"model": {"widths": list(widths)}, "preprocess": {"slice_size": list(size)}})


def tasks_and_heads(labels=("segmentation", "landmarks")):
    all_tasks = {
        "segmentation": Segmentation(SegmentationParams(), INFO),
        "landmarks": Landmarks(LandmarkParams(groups=[["a"], ["b"]]), INFO),
    }
    tasks = {k: all_tasks[k] for k in labels}
    heads = {k: ConvHead(ConvHeadParams(width=4)) for k in labels}
    return tasks, heads


def test_output_shapes_per_task():
    torch.manual_seed(0)
    model = build_model(small_cfg(), *tasks_and_heads())
    out = model(torch.randn(2, 1, 32, 32))
    assert set(out) == {"segmentation", "landmarks"}
    assert out["segmentation"].shape == (2, 3, 32, 32)
    assert out["landmarks"].shape == (2, 2, 32, 32)
    assert model.trunk.out_channels == 8
    assert model.trunk(torch.randn(1, 1, 32, 32)).shape == (1, 8, 32, 32)
    assert UNetTrunk(1, [4, 8])(torch.randn(1, 1, 8, 6)).shape == (1, 8, 8, 6)  # two levels, non-square


def test_forward_subset_of_tails():
    model = build_model(small_cfg(), *tasks_and_heads())
    out = model(torch.randn(1, 1, 32, 32), tasks=["landmarks"])
    assert list(out) == ["landmarks"]


def test_baseline_has_one_tail():
    model = build_model(small_cfg(), *tasks_and_heads(("segmentation",)))
    assert list(model.tails) == ["segmentation"]
    assert list(model.task_parameters()) == ["segmentation"]
    assert list(model(torch.randn(1, 1, 32, 32))) == ["segmentation"]


def test_parameter_groups_disjoint_and_complete():
    model = build_model(small_cfg(), *tasks_and_heads())
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {k: {id(p) for p in v} for k, v in model.task_parameters().items()}
    assert shared and all(per_task.values())
    assert not shared & per_task["segmentation"]
    assert not shared & per_task["landmarks"]
    assert not per_task["segmentation"] & per_task["landmarks"]
    assert shared | per_task["segmentation"] | per_task["landmarks"] == {id(p) for p in model.parameters()}


def test_every_parameter_gets_a_gradient():
    model = build_model(small_cfg(), *tasks_and_heads())
    out = model(torch.randn(2, 1, 32, 32))
    sum(o.square().mean() for o in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_protocol_levels_give_16x16_bottom_for_256():
    trunk = UNetTrunk(1, [2, 2, 2, 2, 2])  # 5 levels like the study's, tiny widths
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = tuple(output.shape)

    trunk.bottom.register_forward_hook(hook)
    with torch.no_grad():
        out = trunk.eval()(torch.randn(1, 1, 256, 256))
    assert seen["shape"] == (1, 2, 16, 16)
    assert out.shape == (1, 4, 256, 256)
    assert UNetTrunk(1, [64, 128, 256, 512, 1024]).bottom_size((256, 256)) == (16, 16)


def test_protocol_widths_structure():
    trunk = UNetTrunk(1, [64, 128, 256, 512, 1024])
    enc = [blk[0].out_channels for blk in trunk.encoders]
    assert enc == [64, 128, 256, 512]
    assert trunk.bottom[0].out_channels == 1024
    assert [up.out_channels for up in trunk.ups] == [512, 256, 128]
    assert [blk[0].in_channels for blk in trunk.decoders] == [1024, 512, 256]
    assert trunk.final_up.out_channels == 64 and trunk.out_channels == 128
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (3, 3) for m in convs)
    assert len(convs) == 2 * (4 + 1 + 3)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()) == len(convs)


def test_divisibility_error():
    with pytest.raises(ConfigError, match=r"preprocess\.slice_size.*model\.widths"):
        build_model(small_cfg(size=(34, 32)), *tasks_and_heads())
    trunk = UNetTrunk(1, [4, 8, 16])
    with pytest.raises(ConfigError, match=r"preprocess\.slice_size 30x32"):
        trunk(torch.randn(1, 1, 30, 32))


def test_initialisation_is_deterministic():
    torch.manual_seed(3)
    a = build_model(small_cfg(), *tasks_and_heads()).state_dict()
    torch.manual_seed(3)
    b = build_model(small_cfg(), *tasks_and_heads()).state_dict()
    torch.manual_seed(4)
    c = build_model(small_cfg(), *tasks_and_heads()).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_missing_head_and_bad_label():
    tasks, heads = tasks_and_heads()
    del heads["landmarks"]
    with pytest.raises(ConfigError, match="tasks.landmarks"):
        build_model(small_cfg(), tasks, heads)
    with pytest.raises(ConfigError, match="must not contain"):
        MultiTaskModel(UNetTrunk(1, [4, 8]), {"a.b": nn.Identity()})


def test_conv_head_structure():
    head = ConvHead(ConvHeadParams()).build(128, 3)
    convs = [m for m in head if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (128, 64, (3, 3)),
        (64, 64, (3, 3)),
        (64, 3, (1, 1)),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head) == 2
    bare = ConvHead(ConvHeadParams(convs=0)).build(8, 1)
    assert len(bare) == 1 and bare[0].kernel_size == (1, 1) and bare[0].in_channels == 8
    no_bn = ConvHead(ConvHeadParams(convs=1, width=5, batch_norm=False)).build(8, 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn)
    assert no_bn(torch.randn(1, 8, 4, 4)).shape == (1, 2, 4, 4)
    with pytest.raises(Exception):
        ConvHeadParams(convs=-1)


def test_coordinate_channels_break_translation_symmetry():
    import torch

    from mtlbench.engine.model import UNetTrunk, coordinate_channels

    c = coordinate_channels(torch.zeros(2, 1, 4, 6))
    assert c.shape == (2, 2, 4, 6)
    assert torch.allclose(c[0, 0, :, 0], torch.linspace(-1, 1, 4)) and torch.allclose(c[0, 1, 0], torch.linspace(-1, 1, 6))
    torch.manual_seed(0)
    trunk = UNetTrunk(1, [4, 8], coordinates=True).eval()
    assert trunk.encoders[0][0].in_channels == 3
    with torch.no_grad():
        out = trunk(torch.zeros(1, 1, 8, 8))
    # a constant image gives position-dependent features only because of the coordinates
    assert not torch.allclose(out[0, :, 2, 1], out[0, :, 2, 6])
