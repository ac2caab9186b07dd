"""Tests for the ``nnunet`` dataset source (nnU-Net v2 and Medical Segmentation Decathlon layouts), on real files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mtlbench.api import Geometry, Landmark
from mtlbench.assemble import source_request
from mtlbench.builtin.datasets import ManifestSource, NnUNetSource
from mtlbench.config import validate_config
from mtlbench.data.io import to_sitk, write_volume
from mtlbench.data.landmarks import write_fcsv, write_mrk_json
from mtlbench.errors import DataError

GEO = Geometry(size=(10, 9, 6), spacing=(1.5, 1.5, 3.0), origin=(-4.0, 2.0, 10.0))
SHAPE = (6, 9, 10)  # numpy order (z, y, x)
KIDNEYS = ["kidney_right", "kidney_left"]
V2_LABELS = {"background": 0, "Kidney Right": 1, "kidney-left": 2}


def make_source(data: dict) -> NnUNetSource:
    cfg = validate_config({"data": data})
    return NnUNetSource(NnUNetSource.Params(**cfg.source_params()), source_request(cfg))


def nnunet(root: Path, organs=KIDNEYS, **params) -> NnUNetSource:
    return make_source({"source": "nnunet", "organs": list(organs), "landmarks": [], "nnunet": {"root": str(root), **params}})


def volumes(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Case i's CT (float32) and label map (uint8 with labels 1 and 2, placed by i)."""
    image = np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) * 100
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:4, 2:5, 1 + i : 4 + i] = 1
    labels[2:5, 5:8, 6:9] = 2
    return image, labels


def write_dataset(root: Path, cases=("case_000", "case_001", "case_002"), *, msd: bool = False, meta=None) -> Path:
    """A dataset folder: nnU-Net v2 (``<case>_0000`` images) or MSD (no channel suffix, int-string labels)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, case in enumerate(cases):
        image, labels = volumes(i)
        write_volume(root / "imagesTr" / (f"{case}.nii.gz" if msd else f"{case}_0000.nii.gz"), image, GEO)
        write_volume(root / "labelsTr" / f"{case}.nii.gz", labels, GEO)
    if msd:
        default = {
            "name": "Kidney",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "kidney_right", "2": "Kidney_Left"},
            "numTraining": len(cases),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        }
    else:
        default = {"channel_names": {"0": "CT"}, "labels": V2_LABELS, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta if meta is not None else default))
    return root


def error(source: NnUNetSource) -> str:
    with pytest.raises(DataError) as exc:
        source.patient_ids()
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture()
def v2(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "Dataset042_Kidney")


def test_registered() -> None:
    from mtlbench.plugins import get_manager, reset_manager

    reset_manager()
    item = get_manager().registry("datasets").get("nnunet")
    assert item.obj is NnUNetSource and item.plugin == "builtin_datasets"
    assert "\n" not in NnUNetSource.description
    reset_manager()


def test_v2_layout_by_label_name(v2: Path) -> None:
    source = nnunet(v2)
    assert source.patient_ids() == ["case_000", "case_001", "case_002"]
    assert source.files("case_001") == [
        str(v2 / "imagesTr" / "case_001_0000.nii.gz"), str(v2 / "labelsTr" / "case_001.nii.gz"), str(v2 / "dataset.json")
    ]
    for i, pid in enumerate(source.patient_ids()):
        image, labels = volumes(i)
        patient = source.load(pid)
        assert patient.id == pid and patient.geometry == GEO and patient.landmarks == []
        np.testing.assert_array_equal(patient.image, image)
        assert list(patient.masks) == KIDNEYS
        np.testing.assert_array_equal(patient.masks["kidney_right"], labels == 1)
        np.testing.assert_array_equal(patient.masks["kidney_left"], labels == 2)
        assert patient.files["mask:kidney_left"] == f"{v2 / 'labelsTr' / f'{pid}.nii.gz'}#2"
        assert patient.files["manifest"] == str(v2 / "dataset.json")


def test_organ_labels_by_name_and_value(tmp_path: Path) -> None:
    meta = {"labels": {"background": 0, "kidney": 1, "cyst": 2}, "file_ending": ".nii.gz"}
    root = write_dataset(tmp_path / "Dataset001_X", meta=meta)
    source = nnunet(root, ["right", "left"], organ_labels={"right": "Kidney", "left": 2})
    _, labels = volumes(0)
    patient = source.load("case_000")
    np.testing.assert_array_equal(patient.masks["right"], labels == 1)
    np.testing.assert_array_equal(patient.masks["left"], labels == 2)
    # a digit string is a value too; a value not declared in dataset.json is an error
    assert nnunet(root, ["left"], organ_labels={"left": "2"}).load("case_000").masks["left"].sum() == (labels == 2).sum()
    message = error(nnunet(root, ["left"], organ_labels={"left": 7}))
    assert "data.nnunet.organ_labels.left = 7" in message and "dataset.json" in message and "cyst = 2" in message
    message = error(nnunet(root, ["left"], organ_labels={"left": "kidneys"}))
    assert "'kidneys'" in message and "kidney, cyst" in message


def test_msd_layout(tmp_path: Path, caplog) -> None:
    root = write_dataset(tmp_path / "Task05_Kidney", ("kid_1", "kid_2"), msd=True)
    (root / "imagesTr" / "._kid_1.nii.gz").write_bytes(b"\0\5\26\7")  # macOS resource forks in the MSD archives
    (root / "labelsTr" / "._kid_1.nii.gz").write_bytes(b"\0\5\26\7")
    source = nnunet(root)
    assert source.patient_ids() == ["kid_1", "kid_2"]
    assert source.files("kid_2")[0] == str(root / "imagesTr" / "kid_2.nii.gz")
    image, labels = volumes(1)
    patient = source.load("kid_2")
    np.testing.assert_array_equal(patient.image, image)
    np.testing.assert_array_equal(patient.masks["kidney_right"], labels == 1)
    np.testing.assert_array_equal(patient.masks["kidney_left"], labels == 2)
    # numTraining that does not match: a warning, not an error
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 5}))
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        assert nnunet(root).patient_ids() == ["kid_1", "kid_2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "numTraining = 5" in warnings[0] and "2 labelled cases" in warnings[0]


def test_msd_4d_image_channel(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "Task01_Two", ("mr_1",), msd=True)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "modality": {"0": "T1", "1": "CT"}}))
    first, _ = volumes(0)
    second = first * -2 + 5
    four_d = sitk.JoinSeries([to_sitk(first, GEO), to_sitk(second, GEO)])
    four_d.SetOrigin((*GEO.origin, 0.0))
    four_d.SetSpacing((*GEO.spacing, 1.0))
    sitk.WriteImage(four_d, str(root / "imagesTr" / "mr_1.nii.gz"))
    patient = nnunet(root, channel=1).load("mr_1")
    np.testing.assert_allclose(patient.image, second)
    assert patient.geometry == GEO
    np.testing.assert_allclose(nnunet(root).load("mr_1").image, first)
    message = error(nnunet(root, channel=2))
    assert "data.nnunet.channel = 2" in message and "0 = T1, 1 = CT" in message
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"]}))  # channels not listed: found on load
    with pytest.raises(DataError, match=r"mr_1.nii.gz has 2 channels, not channel 2 \(data.nnunet.channel\)$"):
        nnunet(root, channel=2).load("mr_1")


def test_channel_suffix_files(v2: Path) -> None:
    meta = json.loads((v2 / "dataset.json").read_text())
    (v2 / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "MR", "1": "CT"}}))
    for case in ("case_000", "case_001", "case_002"):
        (v2 / "imagesTr" / f"{case}_0001.nii.gz").write_bytes((v2 / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    assert nnunet(v2, channel=1).files("case_000")[0] == str(v2 / "imagesTr" / "case_000_0001.nii.gz")
    (v2 / "imagesTr" / "case_002_0001.nii.gz").unlink()
    message = error(nnunet(v2, channel=1))
    assert str(v2 / "labelsTr" / "case_002.nii.gz") in message and str(v2 / "imagesTr" / "case_002_0001.nii.gz") in message
    assert "case_002_0000.nii.gz" in message


def test_other_file_ending(tmp_path: Path) -> None:
    root = tmp_path / "Dataset002_Nrrd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image, labels = volumes(0)
    write_volume(root / "imagesTr" / "a_0000.nrrd", image, GEO)
    write_volume(root / "labelsTr" / "a.nrrd", labels, GEO)
    write_volume(root / "labelsTr" / "ignored.nii.gz", labels, GEO)  # not the dataset's file ending
    (root / "dataset.json").write_text(json.dumps({"labels": V2_LABELS, "file_ending": ".nrrd", "numTraining": 1}))
    source = nnunet(root)
    assert source.patient_ids() == ["a"]
    np.testing.assert_array_equal(source.load("a").masks["kidney_left"], labels == 2)


def test_missing_organ(v2: Path) -> None:
    message = error(nnunet(v2, ["kidney_right", "spleen"]))
    assert "'spleen'" in message and str(v2 / "dataset.json") in message
    assert "background, Kidney Right, kidney-left" in message and "data.nnunet.organ_labels.spleen" in message


def test_label_without_image_and_image_without_label(v2: Path) -> None:
    (v2 / "imagesTr" / "case_001_0000.nii.gz").rename(v2 / "case_001_0000.nii.gz")
    message = error(nnunet(v2))
    assert str(v2 / "labelsTr" / "case_001.nii.gz") in message and str(v2 / "imagesTr" / "case_001_0000.nii.gz") in message
    (v2 / "case_001_0000.nii.gz").rename(v2 / "imagesTr" / "case_001_0000.nii.gz")
    (v2 / "labelsTr" / "case_002.nii.gz").unlink()
    message = error(nnunet(v2))
    assert str(v2 / "imagesTr" / "case_002_0000.nii.gz") in message and str(v2 / "labelsTr" / "case_002.nii.gz") in message


def test_region_labels(tmp_path: Path) -> None:
    labels = {"background": 0, "whole": [1, 2], "core": [2], "edema": 1}
    root = write_dataset(tmp_path / "Dataset003_Regions", meta={"labels": labels, "regions_class_order": [1, 2]})
    message = error(nnunet(root, ["whole"]))
    assert "'whole'" in message and "[1, 2]" in message and "data.nnunet.organ_labels.whole" in message
    _, lab = volumes(0)
    source = nnunet(root, ["whole", "core", "edema"], organ_labels={"whole": 2})  # mapped to one int: fine
    patient = source.load("case_000")
    np.testing.assert_array_equal(patient.masks["whole"], lab == 2)
    np.testing.assert_array_equal(patient.masks["core"], lab == 2)  # a one-value region is that value
    np.testing.assert_array_equal(patient.masks["edema"], lab == 1)


def test_dataset_json_errors(tmp_path: Path, v2: Path) -> None:
    assert "no dataset.json" in error(nnunet(tmp_path)) and "Dataset042_Kidney" in error(nnunet(tmp_path))
    assert "folder not found" in error(nnunet(tmp_path / "nope"))
    (v2 / "dataset.json").write_text('{"labels": {"background": 0,')
    assert "dataset.json: not valid JSON" in error(nnunet(v2))
    (v2 / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney_right": "one"}}))
    assert "labels['kidney_right']" in error(nnunet(v2))
    (v2 / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney_right": 1, "kidney_left": 2}}))
    message = error(nnunet(v2, ["kidney_right", "background"]))
    assert "'background'" in message and "label 0 (background)" in message


def test_manifest_pointing_at_the_folder(v2: Path) -> None:
    cfg = validate_config({"data": {"source": "manifest", "manifest": str(v2), "organs": KIDNEYS}})
    source = ManifestSource(ManifestSource.Params(**cfg.source_params()), source_request(cfg))
    with pytest.raises(DataError) as exc:
        source.patient_ids()
    assert str(exc.value) == (
        f'manifest {v2} is a folder in nnU-Net layout; use data.source = "nnunet" with data.nnunet.root = "{v2}"'
    )


def test_landmarks(v2: Path) -> None:
    lm_dir = v2 / "landmarks"
    lm_dir.mkdir()
    to_lps = GEO.index_to_physical()
    inside = tuple((to_lps @ np.array([4.0, 3.0, 2.0, 1.0]))[:3])  # (x, y, z) index
    write_fcsv(lm_dir / "case_000.fcsv", [Landmark("renal_pelvis_right", inside)])
    write_mrk_json(lm_dir / "case_001.mrk.json", [Landmark("Renal Pelvis Right", inside)])
    source = make_source({"source": "nnunet", "organs": KIDNEYS, "landmarks": ["renal_pelvis_right"],
                          "nnunet": {"root": str(v2), "landmarks": "landmarks"}})
    assert source.files("case_000")[2] == str(lm_dir / "case_000.fcsv")
    assert source.files("case_001")[2] == str(lm_dir / "case_001.mrk.json")
    assert len(source.files("case_002")) == 3  # no landmark file: image, labels, dataset.json
    for pid in ("case_000", "case_001"):
        (lm,) = source.load(pid).landmarks
        assert lm.name == "renal_pelvis_right"
        np.testing.assert_allclose(lm.position, inside, atol=1e-6)
    assert source.load("case_002").landmarks == []
    assert "landmark folder not found" in error(nnunet(v2, landmarks="marks"))


def test_slice_cache_from_nnunet(v2: Path, tmp_path: Path, monkeypatch) -> None:
    from mtlbench.data.cache import build_cache, open_cache

    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    raw = {
        "data": {"source": "nnunet", "organs": KIDNEYS, "landmarks": [], "nnunet": {"root": str(v2)}},
        "tasks": {"segmentation": {}},
        "preprocess": {"slice_size": [16, 16]},
    }
    path = build_cache(validate_config(raw))
    assert path.is_relative_to(tmp_path / "cache")
    info = open_cache(path)
    assert info.patients == ("case_000", "case_001", "case_002")
    assert info.organs == tuple(KIDNEYS) and info.slice_size == (16, 16)
    # a changed dataset.json (here: the label names swapped) is a new cache
    (v2 / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney_left": 1, "kidney_right": 2}}))
    assert build_cache(validate_config(raw)) != path
