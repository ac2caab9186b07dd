"""Tests for the built-in dataset sources: manifest (over real TotalSegmentator data), VISCERAL layout, phantom."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mtlbench.api import Geometry, Landmark
from mtlbench.assemble import source_request
from mtlbench.builtin.datasets import ManifestSource, PhantomSource, VisceralSource
from mtlbench.config import validate_config
from mtlbench.data.io import read_volume, write_volume
from mtlbench.data.landmarks import write_fcsv
from mtlbench.errors import DataError

KIDNEYS = ["kidney_right", "kidney_left"]
PELVES = ["renal_pelvis_right", "renal_pelvis_left"]


def make_source(cls, data: dict):
    cfg = validate_config({"data": data})
    return cls(cls.Params(**cfg.source_params()), source_request(cfg))


def centroid_lps(mask: np.ndarray, geo: Geometry) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return (geo.index_to_physical() @ np.append(idx, 1.0))[:3]


def test_sources_are_registered() -> None:
    from mtlbench.plugins import get_manager, reset_manager

    reset_manager()
    registry = get_manager().registry("datasets")
    for name, cls in (("manifest", ManifestSource), ("visceral", VisceralSource), ("phantom", PhantomSource)):
        item = registry.get(name)
        assert item.obj is cls and item.distribution == "mtlbench" and item.plugin == "builtin_datasets"
    reset_manager()


# ----------------------------------------------------------------------------- manifest over real data


def test_manifest_over_totalsegmentator(realdata: Path, tmp_path: Path, caplog) -> None:
    ts = realdata / "totalsegmentator"
    seg = ts / "example_seg_fast_force_split.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    _, geo = read_volume(ts / "example_ct.nii.gz")
    right_c, left_c = centroid_lps(labels == 2, geo), centroid_lps(labels == 3, geo)
    # landmarks at the kidney centroids, one configured landmark far outside, one unconfigured
    write_fcsv(
        tmp_path / "lm.fcsv",
        [
            Landmark("renal_pelvis_left", tuple(left_c)),
            Landmark("spine", (0.0, 0.0, 0.0)),
            Landmark("renal_pelvis_right", tuple(right_c)),
            Landmark("ureter", (0.0, 0.0, 5000.0)),
        ],
        coordinate_system="RAS",
    )
    rel = os.path.relpath(ts, tmp_path)  # relative paths resolve against the CSV's folder
    (tmp_path / "m.csv").write_text(
        "patient,image,landmarks,mask:kidney_right,mask:kidney_left\n"
        f"s01,{rel}/example_ct.nii.gz,lm.fcsv,{rel}/{seg.name}#2,{rel}/{seg.name}#3\n"
    )
    source = make_source(
        ManifestSource,
        {"source": "manifest", "manifest": str(tmp_path / "m.csv"), "organs": KIDNEYS,
         "landmarks": [*PELVES, "ureter", "not_in_file"]},
    )
    assert source.patient_ids() == ["s01"]
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        patient = source.load("s01")
    assert patient.id == "s01" and patient.geometry == geo
    assert patient.image.dtype == np.float32 and patient.image.shape == (112, 101, 122)
    np.testing.assert_array_equal(
        patient.image, sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_ct.nii.gz")))
    )
    assert list(patient.masks) == KIDNEYS
    np.testing.assert_array_equal(patient.masks["kidney_right"], labels == 2)
    np.testing.assert_array_equal(patient.masks["kidney_left"], labels == 3)
    right, left = patient.masks["kidney_right"], patient.masks["kidney_left"]
    assert right.sum() > 1000 and left.sum() > 1000 and not (right & left).any()
    # LPS +x is the patient's left: the right kidney lies at smaller x
    assert centroid_lps(right, geo)[0] < centroid_lps(left, geo)[0] - 50
    # landmarks: configured order, RAS file converted to LPS, the outside one dropped with a warning
    assert [lm.name for lm in patient.landmarks] == PELVES
    np.testing.assert_allclose(patient.landmarks[0].position, right_c)
    np.testing.assert_allclose(patient.landmarks[1].position, left_c)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # one warning for the configured landmark the file lacks, one for the point outside the image
    assert len(warnings) == 2 and all("s01" in w for w in warnings)
    assert "'not_in_file'" in warnings[0] and "'ureter'" in warnings[1]
    # files: every file once, labels kept in the roles
    assert source.files("s01") == [
        str(ts / "example_ct.nii.gz"), str(seg), str(tmp_path / "lm.fcsv"), str(tmp_path / "m.csv")
    ]
    assert patient.files["mask:kidney_right"] == f"{seg}#2"
    assert patient.files["landmarks"] == str(tmp_path / "lm.fcsv")


def test_manifest_relative_config_path_uses_cwd(realdata: Path, tmp_path: Path, monkeypatch) -> None:
    ts = realdata / "totalsegmentator"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.csv").write_text(
        f"patient,image,mask:kidney_right\np,{ts}/example_ct_sm.nii.gz,{ts}/example_seg_fast_kidney_right.nii.gz\n"
    )
    monkeypatch.chdir(tmp_path)
    source = make_source(ManifestSource, {"source": "manifest", "manifest": "sub/m.csv", "organs": ["kidney_right"]})
    monkeypatch.chdir("/")
    assert source.patient_ids() == ["p"]
    patient = source.load("p")
    assert patient.landmarks == [] and patient.masks["kidney_right"].any()


# ----------------------------------------------------------------------------- manifest errors (synthetic)

GEO = Geometry(size=(6, 5, 4), spacing=(1.5, 1.5, 3.0), origin=(-4.0, 2.0, 10.0))


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "img.nii.gz", rng.normal(size=(4, 5, 6)).astype(np.float32), GEO)
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[1:3, 1:3, 4:6] = 2
    write_volume(tmp_path / "labels.nii.gz", labels, GEO)
    return tmp_path


def _manifest(folder: Path, text: str, organs=("a", "b")):
    (folder / "m.csv").write_text(text)
    return make_source(ManifestSource, {"source": "manifest", "manifest": str(folder / "m.csv"), "organs": list(organs)})


def _error(source) -> str:
    with pytest.raises(DataError) as exc:
        source.patient_ids()
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_manifest_reads_synthetic(tiny: Path) -> None:
    source = _manifest(tiny, "patient,image,mask:a,mask:b\nx,img.nii.gz,labels.nii.gz#1,labels.nii.gz#2\n")
    patient = source.load("x")
    assert patient.masks["a"].sum() == 8 and patient.masks["b"].sum() == 8
    assert patient.masks["a"][1, 1, 1] and patient.masks["b"][1, 1, 4]
    with pytest.raises(DataError, match="unknown patient 'y'"):
        source.load("y")


def test_manifest_missing_column(tiny: Path) -> None:
    message = _error(_manifest(tiny, "patient,mask:a,mask:b\nx,labels.nii.gz#1,labels.nii.gz#2\n"))
    assert "missing column 'image'" in message and "m.csv" in message and "a, b" in message


def test_manifest_missing_organ_column(tiny: Path) -> None:
    message = _error(_manifest(tiny, "patient,image,mask:a\nx,img.nii.gz,labels.nii.gz#1\n"))
    assert "'mask:b'" in message and "configured organs: a, b" in message


def test_manifest_duplicate_patient(tiny: Path) -> None:
    row = "x,img.nii.gz,labels.nii.gz#1,labels.nii.gz#2\n"
    message = _error(_manifest(tiny, "patient,image,mask:a,mask:b\n" + row + row))
    assert "duplicate patient 'x'" in message and "m.csv:3" in message


def test_manifest_missing_file(tiny: Path) -> None:
    message = _error(_manifest(tiny, "patient,image,mask:a,mask:b\nx,img.nii.gz,labels.nii.gz#1,gone.nii.gz#2\n"))
    assert "patient 'x'" in message and str(tiny / "gone.nii.gz") in message


def test_manifest_csv_missing(tmp_path: Path) -> None:
    source = make_source(ManifestSource, {"source": "manifest", "manifest": str(tmp_path / "none.csv")})
    assert "none.csv: file not found" in _error(source)


def test_manifest_mask_mismatch_setting(tiny: Path, caplog) -> None:
    shifted = Geometry(GEO.size, GEO.spacing, (GEO.origin[0] + 1.5, GEO.origin[1], GEO.origin[2]))
    mask, _ = read_volume(tiny / "labels.nii.gz")
    write_volume(tiny / "moved.nii.gz", mask, shifted)
    text = "patient,image,mask:a\nx,img.nii.gz,moved.nii.gz#1\n"
    (tiny / "m.csv").write_text(text)
    strict = make_source(ManifestSource, {"source": "manifest", "manifest": str(tiny / "m.csv"), "organs": ["a"]})
    with pytest.raises(DataError, match="moved.nii.gz.*img.nii.gz.*origin"):
        strict.load("x")
    lenient = make_source(
        ManifestSource,
        {"source": "manifest", "manifest": str(tiny / "m.csv"), "organs": ["a"], "mask_mismatch": "resample"},
    )
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        patient = lenient.load("x")
    assert patient.masks["a"].sum() == 8 and patient.masks["a"][1, 1, 2] and not patient.masks["a"][1, 1, 1]
    assert "moved.nii.gz" in caplog.text


# ----------------------------------------------------------------------------- VISCERAL


def _visceral_tree(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    truth = {}
    for n, pid in enumerate(["10000100_1_CT_wb", "10000101_1_CT_wb"]):
        write_volume(root / "Volumes" / f"{pid}.nii.gz", rng.integers(-1000, 1000, (4, 5, 6)).astype(np.int16), GEO)
        for rid, lo in (("29662", 0), ("29663", 3)):
            mask = np.zeros((4, 5, 6), np.uint8)
            mask[1:3, n : n + 2, lo : lo + 2] = 1
            write_volume(root / "Segmentations" / f"{pid}_{rid}_1.nii.gz", mask, GEO)
            truth[f"{pid}/{rid}"] = mask.astype(bool)
        write_fcsv(
            root / "Landmarks" / f"{pid}.fcsv",
            [Landmark("Renal pelvis R", (0.5, 5.0, 15.0 + n)), Landmark("Renal pelvis L", (2.0, 5.0, 15.0))],
            coordinate_system="RAS",
        )
    # contrast-enhanced CT of another patient: not modality "CT"
    write_volume(root / "Volumes" / "10000102_1_CTce_ThAb.nii.gz", np.zeros((4, 5, 6), np.int16), GEO)
    return truth


def test_visceral_layout(tmp_path: Path) -> None:
    truth = _visceral_tree(tmp_path)
    source = make_source(
        VisceralSource,
        {"source": "visceral", "visceral": {"root": str(tmp_path), "landmark_ids": {
            "renal_pelvis_right": "Renal pelvis R", "renal_pelvis_left": "renal_pelvis_l"}}},
    )
    assert source.patient_ids() == ["10000100_1_CT_wb", "10000101_1_CT_wb"]
    for n, pid in enumerate(source.patient_ids()):
        patient = source.load(pid)
        assert list(patient.masks) == KIDNEYS
        np.testing.assert_array_equal(patient.masks["kidney_right"], truth[f"{pid}/29662"])
        np.testing.assert_array_equal(patient.masks["kidney_left"], truth[f"{pid}/29663"])
        assert patient.image.dtype == np.float32 and patient.geometry.size == GEO.size
        assert [lm.name for lm in patient.landmarks] == PELVES
        assert patient.landmarks[0].position == (0.5, 5.0, 15.0 + n)  # written as RAS, read back as LPS
        assert patient.landmarks[1].position == (2.0, 5.0, 15.0)
        assert source.files(pid) == [
            str(tmp_path / "Volumes" / f"{pid}.nii.gz"),
            str(tmp_path / "Segmentations" / f"{pid}_29662_1.nii.gz"),
            str(tmp_path / "Segmentations" / f"{pid}_29663_1.nii.gz"),
            str(tmp_path / "Landmarks" / f"{pid}.fcsv"),
        ]


def test_visceral_missing_segmentation(tmp_path: Path) -> None:
    _visceral_tree(tmp_path)
    (tmp_path / "Segmentations" / "10000101_1_CT_wb_29663_1.nii.gz").unlink()
    source = make_source(VisceralSource, {"source": "visceral", "visceral": {"root": str(tmp_path)}})
    with pytest.raises(DataError) as exc:
        source.patient_ids()
    message = str(exc.value)
    assert "'10000101_1_CT_wb'" in message and "'kidney_left'" in message and "29663" in message


def test_visceral_errors(tmp_path: Path) -> None:
    source = make_source(VisceralSource, {"source": "visceral", "visceral": {"root": str(tmp_path / "none")}})
    with pytest.raises(DataError, match="folder not found"):
        source.patient_ids()
    _visceral_tree(tmp_path)
    unknown = make_source(
        VisceralSource,
        {"source": "visceral", "organs": ["gallbladder"], "visceral": {"root": str(tmp_path)}},
    )
    with pytest.raises(DataError, match="no RadLex ID for organ 'gallbladder'"):
        unknown.patient_ids()


# ----------------------------------------------------------------------------- phantom


def test_phantom_source(tmp_path: Path) -> None:
    pytest.importorskip("mtlbench.builtin.phantom", reason="mtlbench/builtin/phantom/ is not written yet")
    from mtlbench.builtin.phantom import PHANTOM_VERSION
    from mtlbench.paths import cache_dir

    source = make_source(PhantomSource, {"source": "phantom", "phantom": {"patients": 2, "seed": 1}})
    assert source.folder() == cache_dir() / "phantom" / f"v{PHANTOM_VERSION}-n2-s1"
    ids = source.patient_ids()
    assert len(ids) == 2 and (source.folder() / "manifest.csv").is_file()
    patient = source.load(ids[0])
    assert list(patient.masks) == KIDNEYS
    for organ, mask in patient.masks.items():
        assert mask.shape == patient.image.shape and mask.any(), organ
    assert {lm.name for lm in patient.landmarks} <= set(PELVES)
    assert all(Path(f).is_file() for f in source.files(ids[0]))
    again = make_source(PhantomSource, {"source": "phantom", "phantom": {"patients": 2, "seed": 1, "dir": str(tmp_path)}})
    assert again.folder() == tmp_path.resolve()


def test_phantom_params_validated() -> None:
    from mtlbench.config import validate_params
    from mtlbench.errors import ConfigError

    with pytest.raises(ConfigError, match="data.phantom.patients"):
        validate_params(PhantomSource.Params, {"patients": 1}, "data.phantom")


def test_mask_values_are_checked_and_empty_organs_warned(tmp_path, caplog):
    """A binary mask with other values is a label map or a corrupt file: one-line error; an empty organ: a warning."""
    import logging

    from mtlbench.builtin.datasets import MaskSpec, checked_mask

    labels = np.zeros((2, 3, 3), dtype=np.int16)
    labels[0, 1, 1] = 2
    labels[1, 0, 0] = 7
    with pytest.raises(DataError, match=r"patient p1: mask .*seg.nii.gz of organ 'kidney_left' holds values other than 0 and 1 \(2, 7\)"):
        checked_mask("p1", "kidney_left", MaskSpec(tmp_path / "seg.nii.gz"), labels)
    assert checked_mask("p1", "kidney_left", MaskSpec(tmp_path / "seg.nii.gz", 2), labels).sum() == 1
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        assert not checked_mask("p1", "kidney_left", MaskSpec(tmp_path / "seg.nii.gz", 99), labels).any()
    assert "organ 'kidney_left' has no voxel (label 99 does not occur" in caplog.text


def test_nan_voxels_are_a_data_error(tmp_path):
    from mtlbench.builtin.datasets import Entry, MaskSpec, load_entry

    geom = Geometry(size=(4, 3, 2), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    image = np.zeros((2, 3, 4), np.float32)
    image[1, 2, 3] = np.nan
    write_volume(tmp_path / "ct.mha", image, geom)  # MHA keeps NaN (NIfTI through ITK does not)
    write_volume(tmp_path / "k.nii.gz", np.ones((2, 3, 4), np.uint8), geom)
    entry = Entry("p9", tmp_path / "ct.mha", {"kidney_right": MaskSpec(tmp_path / "k.nii.gz")})
    request = source_request(validate_config({"data": {"organs": ["kidney_right"]}}))
    with pytest.raises(DataError, match=r"patient p9: image .*ct.mha has 1 NaN or infinite voxels"):
        load_entry(entry, request)
