"""Tests for mtlbench.data.landmarks: real .fcsv files, damaged variants, writers, image-extent checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mtlbench.api import Geometry, Landmark
from mtlbench.data.grid import physical_to_index
from mtlbench.data.landmarks import (
    filter_inside,
    outside_image,
    read_fcsv,
    read_landmarks,
    read_mrk_json,
    write_fcsv,
    write_mrk_json,
)
from mtlbench.errors import DataError

AFIDS = "afids_clinical"
HEADER_411 = (
    "# Markups fiducial file version = 4.11\n# CoordinateSystem = {cs}\n"
    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def _first_data_row(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            return line.split(",")
    raise AssertionError("no data row")


# ----------------------------------------------------------------------------- real files


def test_every_real_fcsv_parses(realdata: Path) -> None:
    files = sorted(realdata.glob("*/*.fcsv"))
    assert len(files) == 7
    counts = {f.name: len(read_landmarks(f)) for f in files}
    for name, n in counts.items():
        if name.startswith(("MNI152", "sub-087")):
            assert n == 32, name  # the 32 AFIDs
    assert counts["UsLandmarks_Atlas.fcsv"] == 54
    assert counts["EMSP.fcsv"] == 2


@pytest.mark.parametrize(
    "name",
    [
        "MNI152NLin2009bAsym_T1_AT_1_20181018.fcsv",  # 4.8, CoordinateSystem = 0, denormal junk
        "sub-087_FID32_T1w_MA_20181215.fcsv",  # 4.10, CoordinateSystem = 0
        "sub-087_FID32_T1w_AT_20181108.fcsv",  # 4.11, CoordinateSystem = 0
        "sub-087_FID32_T1w_mean.fcsv",  # 4.11, CoordinateSystem = RAS
    ],
)
def test_ras_files_are_flipped_to_lps(realdata: Path, name: str) -> None:
    path = realdata / AFIDS / name
    row = _first_data_row(path)
    x, y, z = (float(v) for v in row[1:4])
    first = read_fcsv(path)[0]
    assert first.position == (-x, -y, z)
    assert first.name == row[11].strip()


def test_mangled_header_read_as_declared(realdata: Path) -> None:
    path = realdata / AFIDS / "MNI152NLin2009bAsym_desc-raterstandard_afids.fcsv"
    assert "CoordinateSystem = LPS,," in path.read_text()
    landmarks = read_fcsv(path)
    assert landmarks[0] == Landmark("1", (-0.24818535, 2.461205, -4.919965))  # LPS: unchanged
    assert len({lm.name for lm in landmarks}) == 32


def test_slicerigt_atlas(realdata: Path) -> None:
    landmarks = read_landmarks(realdata / "slicerigt/UsLandmarks_Atlas.fcsv")
    assert len(landmarks) == 54
    assert landmarks[0] == Landmark("T01L", (31.8965, 50.4649, 588.08))
    assert landmarks[-1].name == "S01R"
    assert len({lm.name for lm in landmarks}) == 54


def test_slicer3_legacy_list(realdata: Path) -> None:
    landmarks = read_landmarks(realdata / "brainstools/EMSP.fcsv")
    assert [lm.name for lm in landmarks] == ["LE", "RE"]
    assert all(np.allclose(lm.position, 0.0) for lm in landmarks)


def test_legacy_list_label_first_and_ras(tmp_path: Path) -> None:
    path = _write(tmp_path / "old.fcsv", "#numPoints = 2\n#label,x,y,z,sel,vis\nA,1,2,3,1,1\nB,-4.5,5,6,1,1\n")
    assert read_fcsv(path) == [Landmark("A", (-1.0, -2.0, 3.0)), Landmark("B", (4.5, -5.0, 6.0))]
    bare = _write(tmp_path / "bare.fcsv", "A,1,2,3,1,1\n")  # unversioned, no header at all
    assert read_fcsv(bare) == [Landmark("A", (-1.0, -2.0, 3.0))]


# ----------------------------------------------------------------------------- damaged variants


@pytest.mark.parametrize("ending", ["\r\n", "\r\r\n", "\r"])
def test_line_endings(realdata: Path, tmp_path: Path, ending: str) -> None:
    src = realdata / AFIDS / "sub-087_FID32_T1w_mean.fcsv"
    expected = read_fcsv(src)
    text = src.read_text().replace("\n", ending)
    assert read_fcsv(_write(tmp_path / "crlf.fcsv", text)) == expected


def test_stray_carriage_returns_inside_lines(tmp_path: Path) -> None:
    text = HEADER_411.format(cs="LPS\r") + "1,1,2,3\r,0,0,0,1,1,1,0,A\r,,\n"
    assert read_fcsv(_write(tmp_path / "a.fcsv", text)) == [Landmark("A", (1.0, 2.0, 3.0))]


def test_extra_trailing_fields_and_junk_columns(tmp_path: Path) -> None:
    text = HEADER_411.format(cs="LPS") + (
        "1,1.5,2.5,3.5,junk,??,,nan,yes,no,maybe,A,some desc,node,extra1,extra2,\n"
        "2,4,5,6,0,0,0,1,1,1,1,  B  ,,,positionStatus=defined\n"
    )
    assert read_fcsv(_write(tmp_path / "a.fcsv", text)) == [
        Landmark("A", (1.5, 2.5, 3.5)),
        Landmark("B", (4.0, 5.0, 6.0)),
    ]


def test_columns_header_decides_positions(tmp_path: Path) -> None:
    text = "# Markups fiducial file version = 5.0\n# CoordinateSystem = LPS\n# columns = label,z,y,x,id\nP,3,2,1,7\n"
    assert read_fcsv(_write(tmp_path / "a.fcsv", text)) == [Landmark("P", (1.0, 2.0, 3.0))]


def test_coordinate_system_codes_and_default(tmp_path: Path) -> None:
    row = "1,1,2,3,0,0,0,1,1,1,0,A,,\n"
    ras = Landmark("A", (-1.0, -2.0, 3.0))
    lps = Landmark("A", (1.0, 2.0, 3.0))
    for cs, expected in (("0", ras), ("RAS", ras), ("1", lps), ("LPS", lps), ("LPS,,,,,", lps)):
        assert read_fcsv(_write(tmp_path / "a.fcsv", HEADER_411.format(cs=cs) + row)) == [expected], cs
    no_cs = "# Markups fiducial file version = 4.6\n" + row
    assert read_fcsv(_write(tmp_path / "b.fcsv", no_cs)) == [ras]  # absent -> RAS (Slicer's default)
    with pytest.raises(DataError, match="coordinate system 'IJK'"):
        read_fcsv(_write(tmp_path / "c.fcsv", HEADER_411.format(cs="IJK") + row))


def test_empty_labels_fall_back(tmp_path: Path) -> None:
    text = HEADER_411.format(cs="LPS") + "vtkNode_7,1,2,3,0,0,0,1,1,1,0,,,\n,4,5,6,0,0,0,1,1,1,0,  ,,\n"
    names = [lm.name for lm in read_fcsv(_write(tmp_path / "a.fcsv", text))]
    assert names == ["vtkNode_7", "F-2"]


def test_unparseable_row_names_file_and_line(tmp_path: Path) -> None:
    text = HEADER_411.format(cs="LPS") + "1,1,2,3,0,0,0,1,1,1,0,A,,\n\n2,1,two,3,0,0,0,1,1,1,0,B,,\n"
    path = _write(tmp_path / "bad.fcsv", text)
    with pytest.raises(DataError) as exc:
        read_fcsv(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:6:") and "'two'" in message and "\n" not in message
    short = _write(tmp_path / "short.fcsv", HEADER_411.format(cs="LPS") + "1,1,2\n")
    with pytest.raises(DataError, match=r"short.fcsv:4: .*no z"):
        read_fcsv(short)


def test_nan_positions_are_skipped(tmp_path: Path, caplog) -> None:
    text = HEADER_411.format(cs="LPS") + "1,nan,nan,nan,0,0,0,1,1,1,0,A,,\n2,1,2,3,0,0,0,1,1,1,0,B,,\n"
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        assert [lm.name for lm in read_fcsv(_write(tmp_path / "a.fcsv", text))] == ["B"]
    assert "'A'" in caplog.text


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.fcsv: file not found"):
        read_landmarks(tmp_path / "nope.fcsv")
    with pytest.raises(DataError, match="unknown landmark file type"):
        read_landmarks(tmp_path / "points.txt")


# ----------------------------------------------------------------------------- .mrk.json


def _mrk(cs: str, units: str = "mm", points=None) -> dict:
    return {
        "markups": [
            {"type": "Curve", "coordinateSystem": "LPS", "controlPoints": [{"label": "c", "position": [9, 9, 9]}]},
            {
                "type": "Fiducial",
                "coordinateSystem": cs,
                "coordinateUnits": units,
                "controlPoints": points
                or [
                    {"id": "1", "label": "A", "position": [1.0, 2.0, 3.0], "positionStatus": "defined"},
                    {"id": "2", "label": "B", "position": [0, 0, 0], "positionStatus": "undefined"},
                    {"id": "3", "label": "", "position": [4.0, 5.0, 6.0]},
                ],
            },
        ]
    }


def test_read_mrk_json(tmp_path: Path) -> None:
    lps = tmp_path / "a.mrk.json"
    lps.write_text(json.dumps(_mrk("LPS")))
    assert read_landmarks(lps) == [Landmark("A", (1.0, 2.0, 3.0)), Landmark("3", (4.0, 5.0, 6.0))]
    ras = tmp_path / "b.json"
    ras.write_text(json.dumps(_mrk("RAS")))
    assert read_landmarks(ras)[0] == Landmark("A", (-1.0, -2.0, 3.0))


def test_mrk_json_errors(tmp_path: Path) -> None:
    um = tmp_path / "um.mrk.json"
    um.write_text(json.dumps(_mrk("LPS", units="um")))
    with pytest.raises(DataError, match="coordinateUnits 'um'"):
        read_mrk_json(um)
    broken = tmp_path / "broken.mrk.json"
    broken.write_text("{\n  \"markups\": [\n")
    with pytest.raises(DataError, match="broken.mrk.json:.*not valid JSON"):
        read_mrk_json(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"points": []}))
    with pytest.raises(DataError, match="no 'markups'"):
        read_mrk_json(other)


# ----------------------------------------------------------------------------- writers

POINTS = [
    Landmark("renal_pelvis_right", (-61.25, 12.5, -1003.125)),
    Landmark("label, with comma", (0.1, -0.2, 0.30000000000000004)),
    Landmark("L", (1e-9, 123456.789, -7.0)),
]


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_fcsv_round_trip(tmp_path: Path, system: str) -> None:
    path = tmp_path / "out.fcsv"
    write_fcsv(path, POINTS, coordinate_system=system)
    assert read_fcsv(path) == POINTS
    text = path.read_text()
    assert text.startswith("# Markups fiducial file version = 4.11\n")
    assert f"# CoordinateSystem = {system}\n" in text
    x, y, z = (float(v) for v in _first_data_row(path)[1:4])
    sign = -1.0 if system == "RAS" else 1.0
    assert (x, y, z) == (sign * -61.25, sign * 12.5, -1003.125)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fcsv"]


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_mrk_json_round_trip(tmp_path: Path, system: str) -> None:
    path = tmp_path / "out.mrk.json"
    write_mrk_json(path, POINTS, coordinate_system=system)
    assert read_landmarks(path) == POINTS
    doc = json.loads(path.read_text())
    markup = doc["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == system
    sign = -1.0 if system == "RAS" else 1.0
    assert markup["controlPoints"][0]["position"] == [sign * -61.25, sign * 12.5, -1003.125]


def test_writer_rejects_unknown_system(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_fcsv(tmp_path / "a.fcsv", POINTS, coordinate_system="IJK")


# ----------------------------------------------------------------------------- geometry

BOX = Geometry(size=(10, 20, 30), spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0))
FLIPPED = Geometry(
    size=(10, 20, 30), spacing=(1.0, 2.0, 3.0), origin=(5.0, 6.0, 7.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)
)


@pytest.mark.parametrize("geo", [BOX, FLIPPED])
def test_physical_to_index_inverts_index_to_physical(geo: Geometry) -> None:
    rng = np.random.default_rng(1)
    idx = rng.uniform(-3, 25, size=(7, 3))
    phys = (geo.index_to_physical() @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    np.testing.assert_allclose(physical_to_index(phys, geo.index_to_physical()), idx, atol=1e-9)


def test_physical_to_index_oblique() -> None:
    angle = 0.4
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    geo = Geometry((8, 9, 10), (0.5, 0.8, 2.0), (1.0, -2.0, 3.0), tuple(rot.ravel()))
    point = np.array([[4.0, 1.0, -2.0]])
    k, j, i = physical_to_index(point, geo.index_to_physical())[0]
    # the same continuous index, computed from the ITK definition p = origin + D diag(spacing) (i, j, k)
    expected = np.linalg.solve(rot * np.array(geo.spacing), point[0] - np.array(geo.origin))
    np.testing.assert_allclose((i, j, k), expected)


def test_outside_image_distance() -> None:
    # BOX covers x in [-0.5, 9.5], y in [-1, 39], z in [-1.5, 88.5] mm
    inside = Landmark("in", (9.5, 39.0, 0.0))  # on the boundary counts as inside
    right = Landmark("x_out", (13.5, 10.0, 10.0))
    corner = Landmark("corner", (-3.5, -4.0, 10.0))
    far = Landmark("z_out", (0.0, 0.0, 100.0))
    result = dict((lm.name, d) for lm, d in outside_image([inside, right, corner, far], BOX))
    assert set(result) == {"x_out", "corner", "z_out"}
    assert result["x_out"] == pytest.approx(4.0)
    assert result["corner"] == pytest.approx(np.hypot(3.0, 3.0))
    assert result["z_out"] == pytest.approx(11.5)
    # flipped axes: x extent is [5 - 9.5, 5 + 0.5] = [-4.5, 5.5]
    assert [lm.name for lm, _ in outside_image([Landmark("a", (-4.0, 0.0, 10.0))], FLIPPED)] == []
    (lm, d), = outside_image([Landmark("b", (7.5, 0.0, 10.0))], FLIPPED)
    assert d == pytest.approx(2.0)
    assert outside_image([], BOX) == []


def test_filter_inside_warns_per_landmark(caplog) -> None:
    landmarks = [Landmark("keep", (1.0, 1.0, 1.0)), Landmark("gone", (13.5, 10.0, 10.0))]
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        kept = filter_inside(landmarks, BOX, "patient_7")
    assert kept == [landmarks[0]]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "patient_7" in lines[0] and "'gone'" in lines[0] and "4.0 mm" in lines[0]
