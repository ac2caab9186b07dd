"""The training engine end to end without Ray: learning, determinism, and metric honesty.

One small phantom (4 patients, 2 folds) is shared by the module. A trial trained
for about a minute must segment kidneys far better than a trivial guess; the
files `mtlbench predict` writes must give exactly the IoU/Dice the trial
reported (SimpleITK's own overlap filter) and an HD95 that an independent
computation confirms within one voxel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import cKDTree

from mtlbench.assemble import make_source, resolve_plugins
from mtlbench.config import validate_config
from mtlbench.data.cache import build_cache, open_cache
from mtlbench.data.folds import make_folds
from mtlbench.engine.predict import predict_trial
from mtlbench.engine.train import run_trial
from mtlbench.engine.trialspec import TrialSpec

BASE = {  # the kidney benchmark's cpu recipe, on fewer patients
    "experiment": {"name": "engine", "folds": 2},
    "data": {"phantom": {"patients": 6, "seed": 5}},
    "preprocess": {"slice_size": [48, 48], "clamp": [-250.0, 250.0], "scale": 125.0},
    "model": {"widths": [8, 16, 32, 64], "coordinates": True},
    "tasks": {
        "segmentation": {"params": {"dice_weight": 1.0}, "head_params": {"width": 8, "convs": 1}},
        "landmarks": {"head_params": {"width": 8, "convs": 1}},
    },
    "train": {"epochs": 8, "batch_size": 8, "slices_per_epoch": 256, "lr": 3e-3, "lr_decay_epoch": 7,
              "foreground_fraction": 0.5},
    "strategies": {"single": {}, "joint": {"params": {"weights": {"landmarks": 1.0}}}},
}


@pytest.fixture(scope="module")
def setup():
    cfg = validate_config(BASE)
    resolve_plugins(cfg)
    cache = build_cache(cfg)
    folds = make_folds(list(open_cache(cache).patients), 2, 0)
    return cfg, cache, folds


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    cfg, cache, folds = setup
    out = tmp_path_factory.mktemp("trial")
    record = run_trial(cfg, TrialSpec(fold=0, strategy="joint", params={"weights": {"landmarks": 1.0}}), cache, folds,
                       out, cpus=1)
    return record, out


def test_learns_far_above_trivial(trained):
    record, out = trained
    assert record["status"] == "completed"
    iou = record["metrics"]["segmentation/iou_mean"]
    # all background scores IoU 0; all foreground scores each kidney's share of the volume
    from mtlbench.data.cache import load_patient

    trivial = max(
        float((load_patient(record["cache"], p).orig_labels == i).mean())
        for p in record["test_patients"] for i in (1, 2)
    )
    assert trivial < 0.02
    assert iou > 0.25 and iou > 10 * trivial, record["metrics"]
    curve = [h["metrics"]["segmentation/iou_mean"] for h in record["history"] if "metrics" in h]
    assert len(curve) == 8 and curve[-1] > curve[0]
    saved = json.loads((out / "result.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == list(range(1, 9))
    # the trivial reference on the same patients: the all-zero heatmap's RMSE, recomputed from the cache
    heat = [load_patient(record["cache"], p).targets["landmarks"]["heatmaps"].astype(np.float64) for p in record["test_patients"]]
    zero = np.mean([np.sqrt(np.mean(h**2)) for h in heat])
    assert record["reference"]["landmarks/rmse"] == pytest.approx(zero, rel=1e-6)
    assert all("landmarks/error_mm_mean" in p["reference"] for p in record["per_patient"])
    # per-task gradient norms on the trunk, sampled every train.grad_norm_every steps
    assert all(h["train"]["grad_norm/segmentation"] > 0 and h["train"]["grad_norm/landmarks"] > 0 for h in saved["history"])
    assert saved["history"][0]["train"]["loss/segmentation"] > saved["history"][-1]["train"]["loss/segmentation"]


def _surface_points(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Physical (LPS) points of a mask's boundary voxels, via SimpleITK's contour filter."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(image)
    contour = sitk.GetArrayFromImage(sitk.BinaryContour(img, fullyConnected=False))
    idx = np.argwhere(contour > 0)[:, ::-1]  # (i, j, k)
    return np.array([image.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in idx])


def test_predicted_files_measure_what_was_reported(setup, trained, tmp_path):
    cfg, cache, folds = setup
    record, out = trained
    files = predict_trial(out, tmp_path / "pred")
    assert sorted(p.name for p in files) == sorted(
        [f"{p}_labels.nii.gz" for p in folds[0]["test"]] + [f"{p}_landmarks.fcsv" for p in folds[0]["test"]]
    )
    source = make_source(cfg)
    per_patient = {r["patient"]: r for r in record["per_patient"]}
    checked = 0
    for pid in folds[0]["test"]:
        pred = sitk.ReadImage(str(tmp_path / "pred" / f"{pid}_labels.nii.gz"))
        patient = source.load(pid)
        ref_arr = np.zeros(patient.image.shape, np.uint8)
        for i, organ in enumerate(cfg.data.organs, start=1):
            ref_arr[patient.masks[organ]] = i
        ref = sitk.GetImageFromArray(ref_arr)
        ref.SetSpacing(patient.geometry.spacing)
        ref.SetOrigin(patient.geometry.origin)
        ref.SetDirection(patient.geometry.direction)
        # the prediction lies on the patient's original grid
        assert pred.GetSize() == ref.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-9)
        pred = sitk.Cast(pred, sitk.sitkUInt8)
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(ref, pred)
        pred_arr = sitk.GetArrayFromImage(pred)
        for i, organ in enumerate(cfg.data.organs, start=1):
            if not (ref_arr == i).any() or not (pred_arr == i).any():
                continue
            reported = per_patient[pid]
            assert reported[f"segmentation/iou_{organ}"] == pytest.approx(f.GetJaccardCoefficient(i), abs=1e-6)
            assert reported[f"segmentation/dice_{organ}"] == pytest.approx(f.GetDiceCoefficient(i), abs=1e-6)
            # HD95 (the default, MONAI's convention): the larger of the two directed 95th percentiles,
            # computed independently
            a, b = _surface_points(pred_arr == i, ref), _surface_points(ref_arr == i, ref)
            hd = max(np.percentile(cKDTree(b).query(a)[0], 95), np.percentile(cKDTree(a).query(b)[0], 95))
            assert reported[f"segmentation/hd95_{organ}"] == pytest.approx(hd, abs=max(ref.GetSpacing()))
            checked += 1
    assert checked >= 2, "too few organs predicted to check the metrics"


def test_determinism_on_cpu(setup, tmp_path):
    cfg, cache, folds = setup
    cfg = validate_config({**BASE, "train": {**BASE["train"], "epochs": 1, "slices_per_epoch": 48}})
    spec = TrialSpec(fold=1, strategy="joint", params={"weights": {"landmarks": 3.0}}, seed=7)
    a = run_trial(cfg, spec, cache, folds, tmp_path / "a", cpus=1)
    b = run_trial(cfg, spec, cache, folds, tmp_path / "b", cpus=1)
    same = lambda x, y: x.keys() == y.keys() and all(x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]) for k in x)  # noqa: E731
    assert same(a["metrics"], b["metrics"]) and a["history"][0]["train"] == b["history"][0]["train"]
    assert same(a["per_patient"][0], b["per_patient"][0])
    c = run_trial(cfg, TrialSpec(fold=1, strategy="joint", params=spec.params, seed=8), cache, folds, tmp_path / "c", cpus=1)
    assert c["history"][0]["train"] != a["history"][0]["train"]


def test_single_trains_only_the_segmentation_tail(setup, tmp_path):
    cfg, cache, folds = setup
    cfg = validate_config({**BASE, "train": {**BASE["train"], "epochs": 1, "slices_per_epoch": 16}})
    rec = run_trial(cfg, TrialSpec(fold=0, strategy="single"), cache, folds, tmp_path, cpus=1)
    assert set(k.split("/")[0] for k in rec["metrics"]) == {"segmentation"}
    import torch

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("tails.landmarks") for k in state["model"])


def test_unknown_fold_is_a_config_error(setup, tmp_path):
    from mtlbench.errors import ConfigError

    cfg, cache, folds = setup
    with pytest.raises(ConfigError, match="fold 5 does not exist"):
        run_trial(cfg, TrialSpec(fold=5, strategy="single"), cache, folds, tmp_path)


def test_train_and_predict_cli(setup, tmp_path):
    from typer.testing import CliRunner

    from mtlbench.cli import app

    cfgfile = tmp_path / "b.toml"
    import tomli_w

    small = {**BASE, "train": {**BASE["train"], "epochs": 1, "slices_per_epoch": 16}}
    cfgfile.write_text(tomli_w.dumps(small))
    r = CliRunner().invoke(app, ["train", str(cfgfile), "--strategy", "single", "--fold", "1", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "t" / "result.json")
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "t"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert all(Path(line).is_file() for line in r.stdout.split())
    r = CliRunner().invoke(app, ["train", str(cfgfile), "--strategy", "nope"])
    assert r.exit_code == 2 and "nope" in r.stderr
    r = CliRunner().invoke(app, ["predict", str(tmp_path), "--out", str(tmp_path / "q")])
    assert r.exit_code == 1 and "result.json" in r.stderr
