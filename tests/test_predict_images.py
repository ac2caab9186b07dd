"""`mtlbench predict RUN -i IMAGES -o OUT`: the fold ensemble (or one trial) on new images, on their own grids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from mtlbench.cli import app
from mtlbench.testing import run_tiny_benchmark

SHARED = Path(__file__).resolve().parents[2] / "shared" / "realdata"
CTS = [SHARED / "totalsegmentator" / "example_ct_sm.nii.gz", SHARED / "sts_ct" / "STS_001_CT_image.nii.gz"]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return run_tiny_benchmark(root, tasks={"landmarks": {}}, strategies={"single": {}, "joint": {}},
                              overrides={"train": {"epochs": 1}})


@pytest.fixture
def images(tmp_path):
    if not all(p.is_file() for p in CTS):
        pytest.skip(f"needs the real CTs of {SHARED} (../shared is missing)")
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(CTS[0], folder / "abdomen_0000.nii.gz")  # nnU-Net's channel suffix is dropped from the id
    shutil.copy(CTS[1], folder / "sarcoma.nii.gz")
    return folder


def test_fold_ensemble_writes_maps_on_each_images_grid(tiny_run, images, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(tiny_run.run_dir), "-i", str(images), "-o", str(out), "--strategy", "joint"])
    assert r.exit_code == 0, r.output
    for case, src in (("abdomen", CTS[0]), ("sarcoma", CTS[1])):
        pred, ref = sitk.ReadImage(str(out / f"{case}_labels.nii.gz")), sitk.ReadImage(str(src))
        assert pred.GetSize() == ref.GetSize() and pred.GetDirection() == pytest.approx(ref.GetDirection())
        assert pred.GetSpacing() == pytest.approx(ref.GetSpacing()) and pred.GetOrigin() == pytest.approx(ref.GetOrigin())
        assert set(np.unique(sitk.GetArrayViewFromImage(pred))) <= {0, 1, 2}
        assert (out / f"{case}_landmarks.fcsv").is_file()
    labels = json.loads((out / "labels.json").read_text())
    assert labels["labels"] == {"0": "background", "1": "kidney_right", "2": "kidney_left"}
    joint = sorted(t["id"] for t in tiny_run.trials if t["strategy"] == "joint")
    assert sorted(labels["trials"]) == joint and len(joint) == 2 and labels["strategy"] == "joint"


def test_ensemble_is_the_mean_of_the_models_probabilities(tiny_run, images):
    """Segmentation.combine: softmax of its result equals the mean of the softmaxes."""
    from mtlbench.builtin.segmentation import Segmentation, SegmentationParams
    from mtlbench.api import DatasetInfo

    rng = np.random.default_rng(0)
    outs = [rng.normal(size=(3, 3, 4, 4)).astype(np.float32) * 4 for _ in range(3)]
    task = Segmentation(SegmentationParams(), DatasetInfo(organs=("a", "b"), landmarks=(), slice_size=(4, 4)))
    soft = lambda x: np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(soft(task.combine(outs)), np.mean([soft(o) for o in outs], axis=0), rtol=1e-5)


def test_one_trial_folder_and_bad_inputs(tiny_run, images, tmp_path):
    trial = next(tiny_run.run_dir / t["dir"] for t in tiny_run.trials if t["strategy"] == "single")
    r = runner.invoke(app, ["predict", str(trial), "-i", str(images / "sarcoma.nii.gz"), "-o", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "one" / "labels.json").read_text())["trials"] == [trial.name]
    assert not (tmp_path / "one" / "sarcoma_landmarks.fcsv").exists()  # the single-task row has no landmark tail
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"not a volume")
    r = runner.invoke(app, ["predict", str(tiny_run.run_dir), "-i", str(bad), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "broken.nii.gz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["predict", str(tiny_run.run_dir), "-i", str(images), "-o", str(tmp_path / "o3"),
                            "--strategy", "nope"])
    assert r.exit_code == 2 and "no leaderboard row 'nope'" in r.stderr
    r = runner.invoke(app, ["predict", str(tiny_run.run_dir), "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "o4")])
    assert r.exit_code == 1 and "no such file or folder" in r.stderr
