"""Bad input data is rejected with one line naming the file and the patient (issue 14, part 1).

Every input here is a real file on disk, written with SimpleITK (or taken from ../shared/realdata)
and then damaged the way files get damaged: cut short, bytes flipped, labels repeated or missing.
Each test says what happens: a one-line DataError (exit 1 from the CLI, no slice cache written)
or one warning line.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from mtlbench.api import Geometry, Landmark
from mtlbench.assemble import source_request
from mtlbench.builtin.datasets import ManifestSource, NnUNetSource
from mtlbench.cli import app
from mtlbench.config import validate_config
from mtlbench.data.cache import build_cache, load_patient
from mtlbench.data.io import check_complete, read_mask, read_volume, to_sitk, voxel_data, write_volume
from mtlbench.data.landmarks import MODERN_COLUMNS, read_fcsv, read_landmarks, write_fcsv, write_mrk_json
from mtlbench.errors import DataError

GEO = Geometry(size=(12, 10, 8), spacing=(1.5, 1.5, 3.0), origin=(-4.0, 2.0, 10.0))
SHAPE = (8, 10, 12)  # numpy order (z, y, x)
ORGANS = ["kidney_right", "kidney_left"]
PELVES = ["renal_pelvis_right", "renal_pelvis_left"]
INSIDE = {"renal_pelvis_right": (2.0, 8.0, 20.0), "renal_pelvis_left": (10.0, 8.0, 20.0)}  # LPS mm in GEO


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ----------------------------------------------------------------------------- files


def ct() -> np.ndarray:
    """A CT-like int16 volume whose bytes do not compress to nothing (a truncation then loses voxels)."""
    return np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.int16)


def label_map() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 3:7, 1:5] = 1
    labels[2:6, 3:7, 7:11] = 2
    return labels


def write_sitk(path: Path, array: np.ndarray, compress: bool) -> Path:
    """``array`` on GEO's grid written by SimpleITK itself, compressed or not."""
    sitk.WriteImage(to_sitk(array, GEO), str(path), useCompression=compress)
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut a file to ``fraction`` of its bytes, as an interrupted copy or download does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def landmark_file(path: Path, names=PELVES) -> Path:
    write_fcsv(path, [Landmark(n, INSIDE[n]) for n in names])
    return path


def patient_files(folder: Path, pid: str) -> dict[str, str]:
    """One patient's CT, label map and landmarks; the manifest cells that name them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_volume(folder / f"{pid}_ct.nii.gz", ct(), GEO)
    write_volume(folder / f"{pid}_seg.nii.gz", label_map(), GEO)
    landmark_file(folder / f"{pid}.fcsv")
    return {
        "patient": pid,
        "image": f"{pid}_ct.nii.gz",
        "landmarks": f"{pid}.fcsv",
        "mask:kidney_right": f"{pid}_seg.nii.gz#1",
        "mask:kidney_left": f"{pid}_seg.nii.gz#2",
    }


def write_manifest(folder: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["patient", "image", "landmarks", *(f"mask:{o}" for o in ORGANS)]
    lines = [",".join(columns)] + [",".join(row.get(c, "") for c in columns) for row in rows]
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder / "m.csv"


def data_config(manifest: Path, landmarks=PELVES) -> dict:
    return {
        "experiment": {"name": "bad"},
        "data": {"source": "manifest", "manifest": str(manifest), "organs": ORGANS, "landmarks": list(landmarks)},
        "preprocess": {"slice_size": [16, 16]},
    }


def manifest_source(manifest: Path, landmarks=PELVES) -> ManifestSource:
    cfg = validate_config(data_config(manifest, landmarks))
    return ManifestSource(ManifestSource.Params(**cfg.source_params()), source_request(cfg))


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A private, empty cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(folder))
    return folder


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """A two-patient manifest data set: (folder, manifest rows)."""
    folder = tmp_path / "data"
    rows = [patient_files(folder, "p1"), patient_files(folder, "p2")]
    write_manifest(folder, rows)
    return folder, rows


def assert_build_fails(manifest: Path, cache: Path, *words: str) -> str:
    """build_cache raises a one-line DataError holding ``words`` and leaves no .h5 file behind."""
    with pytest.raises(DataError) as exc:
        build_cache(validate_config(data_config(manifest)))
    message = one_line(exc)
    assert all(w in message for w in words), message
    assert not list(cache.rglob("*.h5"))
    return message


# ----------------------------------------------------------------------------- 1. truncated or corrupt volumes

FORMATS = [(".nii.gz", True), (".nii", False), (".mha", False), (".mha", True), (".nrrd", False), (".nrrd", True)]


@pytest.mark.parametrize(("suffix", "compress"), FORMATS, ids=[f"{s}-{'z' if c else 'raw'}" for s, c in FORMATS])
def test_half_truncated_image_is_rejected(tmp_path: Path, suffix: str, compress: bool) -> None:
    image = ct()
    path = truncate(write_sitk(tmp_path / f"ct{suffix}", image, compress))
    with pytest.raises(DataError) as exc:
        read_volume(path)
    message = one_line(exc)
    assert message.startswith(f"{path}: truncated or corrupt volume: header promises {image.nbytes} bytes")


@pytest.mark.parametrize(("suffix", "compress"), FORMATS, ids=[f"{s}-{'z' if c else 'raw'}" for s, c in FORMATS])
def test_complete_volumes_pass_the_check(tmp_path: Path, suffix: str, compress: bool) -> None:
    image = ct()
    path = write_sitk(tmp_path / f"ct{suffix}", image, compress)
    assert voxel_data(path).promised == image.nbytes
    np.testing.assert_array_equal(read_volume(path)[0], image)


def test_truncated_mask_is_rejected(tmp_path: Path) -> None:
    grid = Geometry(size=(64, 64, 16), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    mask = (np.random.default_rng(1).random((16, 64, 64)) < 0.3).astype(np.uint8)
    path = tmp_path / "mask.nii.gz"
    write_volume(path, mask, grid)
    truncate(path)
    with pytest.raises(DataError) as exc:
        read_mask(path, grid)
    assert one_line(exc).startswith(f"{path}: truncated or corrupt volume: header promises {mask.nbytes} bytes")


def test_mask_cut_inside_its_header_is_rejected(tmp_path: Path) -> None:
    """A mask compresses to little more than its header: half of the file is not even all of the header."""
    path = tmp_path / "mask.nii.gz"
    write_volume(path, label_map(), GEO)
    truncate(path)
    with pytest.raises(DataError) as exc:
        read_mask(path, GEO, label=1)
    assert one_line(exc) == f"{path}: truncated or corrupt volume: the file ends inside its header"


def test_truncated_real_mask_is_rejected(realdata: Path, tmp_path: Path) -> None:
    source = realdata / "totalsegmentator" / "example_seg_fast_kidney_right.nii.gz"
    _, geometry = read_volume(source)
    copy = truncate(Path(shutil.copy(source, tmp_path / source.name)))
    with pytest.raises(DataError) as exc:
        read_mask(copy, geometry)
    assert one_line(exc).startswith(f"{copy}: truncated or corrupt volume: header promises")


def test_gzip_cut_inside_its_trailer_is_rejected(tmp_path: Path) -> None:
    """Every voxel is there, but the stream's end (CRC and length) is not: the file was cut."""
    path = write_sitk(tmp_path / "ct.nii.gz", ct(), True)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DataError, match="truncated or corrupt volume.*end-of-stream marker"):
        read_volume(path)


def test_flipped_bytes_in_gzip_data_are_rejected(tmp_path: Path) -> None:
    path = write_sitk(tmp_path / "ct.nii.gz", ct(), True)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as exc:
        read_volume(path)
    assert one_line(exc).startswith(f"{path}: truncated or corrupt volume: header promises")
    assert "its compressed data is corrupt (" in str(exc.value)


def test_truncated_detached_data_file_is_named(tmp_path: Path) -> None:
    """An .mhd header whose .raw data file was cut short: the error names the data file."""
    path = write_sitk(tmp_path / "ct.mhd", ct(), False)
    raw = tmp_path / "ct.raw"
    truncate(raw)
    with pytest.raises(DataError) as exc:
        read_volume(path)
    message = one_line(exc)
    assert message.startswith(f"{path}: truncated or corrupt volume") and f"data file {raw} holds" in message


REAL_VOLUMES = ["totalsegmentator/example_ct_sm.nii.gz", "nibabel/anatomical.nii", "pyradiomics/brain1_label.nrrd"]


@pytest.mark.parametrize("name", REAL_VOLUMES)
def test_truncated_real_volume_is_rejected(realdata: Path, tmp_path: Path, name: str) -> None:
    check_complete(realdata / name)  # the original is complete
    copy = truncate(Path(shutil.copy(realdata / name, tmp_path / Path(name).name)))
    with pytest.raises(DataError) as exc:
        read_volume(copy)
    assert one_line(exc).startswith(f"{copy}: truncated or corrupt volume: header promises")


def test_every_real_volume_passes_the_check(realdata: Path) -> None:
    files = sorted(p for p in realdata.glob("*/*") if p.name.endswith((".nii", ".nii.gz", ".nrrd")))
    assert len(files) >= 12
    for path in files:
        layout = voxel_data(path)
        assert layout is not None, path
        check_complete(path)


def test_truncated_image_stops_the_build(dataset, cache: Path) -> None:
    folder, _ = dataset
    image = truncate(folder / "p2_ct.nii.gz")
    message = assert_build_fails(folder / "m.csv", cache, "truncated or corrupt volume")
    assert message.startswith(f"patient p2: {image}: ")


def test_truncated_mask_stops_the_build(dataset, cache: Path) -> None:
    folder, _ = dataset
    mask = truncate(folder / "p1_seg.nii.gz", 0.6)
    message = assert_build_fails(folder / "m.csv", cache, "truncated or corrupt volume")
    assert message.startswith(f"patient p1: {mask}: ")


def test_data_prepare_on_a_truncated_volume_exits_1(dataset, cache: Path, tmp_path: Path) -> None:
    folder, _ = dataset
    image = truncate(folder / "p2_ct.nii.gz")
    cfg = data_config(folder / "m.csv")
    toml = tmp_path / "bench.toml"
    toml.write_text(
        f'[experiment]\nname = "bad"\n[data]\nsource = "manifest"\nmanifest = "{cfg["data"]["manifest"]}"\n'
        f"organs = {json.dumps(ORGANS)}\nlandmarks = {json.dumps(PELVES)}\n[preprocess]\nslice_size = [16, 16]\n"
    )
    r = CliRunner().invoke(app, ["data", "prepare", str(toml)])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: patient p2: {image}: truncated or corrupt volume") and "Traceback" not in r.stderr
    assert not list(cache.rglob("*.h5"))


# ----------------------------------------------------------------------------- 2. mask values


@pytest.mark.parametrize(
    ("values", "dtype", "shown"),
    [((0, 2, 7), np.int16, "(2, 7)"), ((-3, 0, 0.5), np.float32, "(-3, 0.5)")],
    ids=["0-2-7", "minus3-0.5"],
)
def test_binary_mask_with_other_values_is_rejected(dataset, values, dtype, shown) -> None:
    folder, rows = dataset
    mask = np.zeros(SHAPE, dtype)
    for i, v in enumerate(values):
        mask[i, 0, 0] = v
    write_volume(folder / "odd.nii.gz", mask, GEO)
    rows[0]["mask:kidney_right"] = "odd.nii.gz"
    with pytest.raises(DataError) as exc:
        manifest_source(write_manifest(folder, rows)).load("p1")
    message = one_line(exc)
    assert message.startswith("patient p1: mask ") and str(folder / "odd.nii.gz") in message
    assert f"holds values other than 0 and 1 {shown}" in message


def test_empty_binary_mask_is_a_warning(dataset, caplog) -> None:
    folder, rows = dataset
    write_volume(folder / "empty.nii.gz", np.zeros(SHAPE, np.uint8), GEO)
    rows[0]["mask:kidney_left"] = "empty.nii.gz"
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        patient = manifest_source(write_manifest(folder, rows)).load("p1")
    assert not patient.masks["kidney_left"].any()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"patient p1: organ 'kidney_left' has no voxel ({folder / 'empty.nii.gz'} is empty)"]


# ----------------------------------------------------------------------------- 3. referenced labels


def test_manifest_label_absent_from_its_map_is_rejected(dataset, cache: Path) -> None:
    folder, rows = dataset
    rows[1]["mask:kidney_left"] = "p2_seg.nii.gz#99"
    manifest = write_manifest(folder, rows)
    with pytest.raises(DataError) as exc:
        manifest_source(manifest).load("p2")
    message = one_line(exc)
    assert message == (
        f"patient p2: organ 'kidney_left': label 99 does not occur in {folder / 'p2_seg.nii.gz'} (labels there: 1, 2)"
    )
    assert_build_fails(manifest, cache, "patient p2", "label 99")


def test_nnunet_case_without_an_organ_is_a_warning(tmp_path: Path, caplog) -> None:
    root = tmp_path / "Dataset001_Kidney"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = label_map()
    labels[labels == 2] = 0  # this case has no left kidney
    write_volume(root / "imagesTr" / "case_0_0000.nii.gz", ct(), GEO)
    write_volume(root / "labelsTr" / "case_0.nii.gz", labels, GEO)
    meta = {"labels": {"background": 0, "kidney_right": 1, "kidney_left": 2}, "channel_names": {"0": "CT"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    cfg = validate_config({"data": {"source": "nnunet", "organs": ORGANS, "landmarks": [], "nnunet": {"root": str(root)}}})
    source = NnUNetSource(NnUNetSource.Params(**cfg.source_params()), source_request(cfg))
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        patient = source.load("case_0")
    assert patient.masks["kidney_right"].any() and not patient.masks["kidney_left"].any()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("patient case_0: organ 'kidney_left' has no voxel (label 2")


# ----------------------------------------------------------------------------- 4. landmark files


def line_of(path: Path, label: str, occurrence: int) -> int:
    """The line number of the ``occurrence``-th row whose label cell is ``label``."""
    label_at = MODERN_COLUMNS.index("label")
    lines = enumerate(path.read_text().splitlines(), 1)
    hits = [n for n, line in lines if not line.startswith("#") and line.split(",")[label_at] == label]
    return hits[occurrence - 1]


@pytest.mark.parametrize(
    "second",
    ["renal_pelvis_right", "Renal Pelvis Right", "renal-pelvis-RIGHT", "renal__pelvis right"],
    ids=["same", "spaces-case", "hyphens-case", "mixed-separators"],
)
def test_duplicate_landmark_label_names_file_and_line(tmp_path: Path, second: str) -> None:
    path = tmp_path / "lm.fcsv"
    write_fcsv(path, [Landmark("renal_pelvis_right", (1, 2, 3)), Landmark("spine", (0, 0, 0)), Landmark(second, (4, 5, 6))])
    line = line_of(path, second, 2 if second == "renal_pelvis_right" else 1)
    with pytest.raises(DataError) as exc:
        read_landmarks(path)
    message = one_line(exc)
    assert message.startswith(f"{path}:{line}: landmark label {second!r}") and "'renal_pelvis_right'" in message
    assert f"line {line_of(path, 'renal_pelvis_right', 1)}" in message


def test_duplicate_label_in_mrk_json_names_the_point(tmp_path: Path) -> None:
    path = tmp_path / "lm.mrk.json"
    write_mrk_json(path, [Landmark("A", (1, 2, 3)), Landmark("B", (0, 0, 0)), Landmark("a", (4, 5, 6))])
    with pytest.raises(DataError) as exc:
        read_landmarks(path)
    assert one_line(exc).startswith(f"{path}: markups[0].controlPoints[2]: landmark label 'a'")


def test_duplicate_landmark_stops_the_build(dataset, cache: Path) -> None:
    folder, _ = dataset
    path = folder / "p2.fcsv"
    write_fcsv(path, [Landmark(n, INSIDE[n]) for n in PELVES] + [Landmark("Renal Pelvis Left", INSIDE[PELVES[1]])])
    message = assert_build_fails(folder / "m.csv", cache)
    assert message.startswith(f"patient p2: {path}:{line_of(path, 'Renal Pelvis Left', 1)}: landmark label")


def test_headerless_fcsv_is_read_with_slicer4_columns(tmp_path: Path) -> None:
    written = tmp_path / "full.fcsv"
    write_fcsv(written, [Landmark(n, INSIDE[n]) for n in PELVES], coordinate_system="RAS")  # a bare file is RAS
    bare = tmp_path / "bare.fcsv"
    bare.write_text("".join(ln + "\n" for ln in written.read_text().splitlines() if not ln.startswith("#")))
    assert read_fcsv(bare) == read_fcsv(written)
    assert [lm.name for lm in read_fcsv(bare)] == PELVES


def test_headerless_fcsv_that_does_not_parse_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bare.fcsv"
    path.write_text("1,2.5\n")
    with pytest.raises(DataError) as exc:
        read_fcsv(path)
    assert one_line(exc).startswith(f"{path}:1: ")


def test_absent_landmarks_are_warned_and_recorded_in_the_cache(dataset, cache: Path, caplog) -> None:
    """p1's header-less file holds other labels, p2 has no landmark file: warnings, and the cache tells
    absent landmarks from present ones."""
    folder, rows = dataset
    (folder / "p1.fcsv").write_text("1,-2,-8,20,0,0,0,1,1,1,0,Renal Pelvis Right,,\n2,-10,-8,20,0,0,0,1,1,1,0,ureter,,\n")
    rows[1]["landmarks"] = ""
    manifest = write_manifest(folder, rows)
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        path = build_cache(validate_config(data_config(manifest)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("patient p1: configured landmarks absent: 'renal_pelvis_left' (")
    assert "ureter" in warnings[0] and str(folder / "p1.fcsv") in warnings[0]
    assert warnings[1].startswith("patient p2: configured landmarks absent: 'renal_pelvis_right', 'renal_pelvis_left'")
    p1, p2 = load_patient(path, "p1", arrays=False), load_patient(path, "p2", arrays=False)
    assert [lm.name for lm in p1.landmarks] == ["renal_pelvis_right"]
    np.testing.assert_allclose(p1.landmarks[0].position, INSIDE["renal_pelvis_right"])  # header-less: RAS
    assert p2.landmarks == []


# ----------------------------------------------------------------------------- 5. NaN and infinite voxels


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_voxels_are_rejected(dataset, bad: float) -> None:
    folder, rows = dataset
    image = ct().astype(np.float32)
    image[3, 4, 5] = bad
    write_volume(folder / "p1_ct.mha", image, GEO)  # MHA keeps NaN (NIfTI through ITK does not)
    assert np.isnan(read_volume(folder / "p1_ct.mha")[0]).sum() == int(np.isnan(bad))
    rows[0]["image"] = "p1_ct.mha"
    with pytest.raises(DataError) as exc:
        manifest_source(write_manifest(folder, rows)).load("p1")
    assert one_line(exc) == f"patient p1: image {folder / 'p1_ct.mha'} has 1 NaN or infinite voxels"
