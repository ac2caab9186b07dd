"""Tests for mtlbench.data.io: real NIfTI/NRRD volumes, atomic writes, grid checks and mask reading."""

from __future__ import annotations

import gzip
import json
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mtlbench.api import Geometry
from mtlbench.data.io import (
    check_same_grid,
    geometry_of,
    read_mask,
    read_volume,
    to_sitk,
    write_volume,
)
from mtlbench.errors import DataError

NIFTI_3D = [
    "totalsegmentator/example_ct.nii.gz",
    "totalsegmentator/example_ct_sm.nii.gz",
    "totalsegmentator/example_mr_sm.nii.gz",
    "totalsegmentator/example_seg.nii.gz",
    "totalsegmentator/example_seg_fast_force_split.nii.gz",
    "totalsegmentator/example_seg_fast_kidney_left.nii.gz",
    "totalsegmentator/example_seg_fast_kidney_right.nii.gz",
    "sts_ct/STS_001_CT_image.nii.gz",
    "sts_ct/STS_001_CT_mask.nii.gz",
    "verse/sub-verse004_seg-vert_msk.nii.gz",
    "nibabel/anatomical.nii",
]
NRRD = ["pyradiomics/brain1_image.nrrd", "pyradiomics/brain1_label.nrrd"]


# ----------------------------------------------------------------------------- independent header readers


def _quat_to_matrix(b: float, c: float, d: float) -> np.ndarray:
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c],
        ]
    )


def nifti_header_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(dims, spacing, origin LPS, direction LPS 3x3) parsed from the NIfTI-1 header bytes."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        h = fh.read(348)
    end = "<" if struct.unpack("<i", h[:4])[0] == 348 else ">"
    dims = struct.unpack(end + "8h", h[40:56])
    pixdim = struct.unpack(end + "8f", h[76:108])
    qcode, scode = struct.unpack(end + "2h", h[252:256])
    if scode > 0:
        srow = np.array(struct.unpack(end + "12f", h[280:328]), dtype=float).reshape(3, 4)
        m, origin = srow[:, :3], srow[:, 3]
        spacing = np.linalg.norm(m, axis=0)
        rot = m / spacing
    else:
        assert qcode > 0
        b, c, d, qx, qy, qz = struct.unpack(end + "6f", h[256:280])
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        rot = _quat_to_matrix(b, c, d) * np.array([1.0, 1.0, qfac])
        spacing = np.array(pixdim[1:4], dtype=float)
        origin = np.array([qx, qy, qz])
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    return tuple(dims[1 : dims[0] + 1]), spacing, ras_to_lps @ origin, ras_to_lps @ rot


def nrrd_header_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, spacing, origin, direction) parsed from an LPS NRRD header."""
    fields = {}
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            if ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip().lstrip("=").strip()
    assert fields["space"] == "left-posterior-superior"
    vectors = np.array(
        [[float(v) for v in vec.split(",")] for vec in re.findall(r"\(([^)]*)\)", fields["space directions"])]
    ).T  # columns = axes
    origin = np.array([float(v) for v in re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(",")])
    spacing = np.linalg.norm(vectors, axis=0)
    return tuple(int(v) for v in fields["sizes"].split()), spacing, origin, vectors / spacing


def _assert_geometry(geo: Geometry, dims, spacing, origin, direction) -> None:
    assert geo.size == tuple(dims)
    np.testing.assert_allclose(geo.spacing, spacing, rtol=1e-5)
    np.testing.assert_allclose(geo.origin, origin, atol=1e-3)
    np.testing.assert_allclose(np.reshape(geo.direction, (3, 3)), direction, atol=1e-4)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", NIFTI_3D)
def test_read_nifti_matches_header(realdata: Path, name: str) -> None:
    path = realdata / name
    array, geo = read_volume(path)
    _assert_geometry(geo, *nifti_header_geometry(path))
    assert array.shape == tuple(reversed(geo.size))
    reference = sitk.ReadImage(str(path))
    assert geo == geometry_of(reference)
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(reference))


@pytest.mark.parametrize("name", NRRD)
def test_read_nrrd_matches_header(realdata: Path, name: str) -> None:
    path = realdata / name
    array, geo = read_volume(path)
    _assert_geometry(geo, *nrrd_header_geometry(path))
    assert array.shape == tuple(reversed(geo.size))


def test_totalsegmentator_ct_geometry(realdata: Path) -> None:
    array, geo = read_volume(realdata / "totalsegmentator/example_ct.nii.gz")
    assert geo.size == (122, 101, 112)
    assert array.shape == (112, 101, 122)
    np.testing.assert_allclose(geo.spacing, (3.0, 3.0, 3.0))
    np.testing.assert_allclose(np.reshape(geo.direction, (3, 3)), np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
    # index_to_physical agrees with SimpleITK's own index -> point mapping
    image = sitk.ReadImage(str(realdata / "totalsegmentator/example_ct.nii.gz"))
    k, j, i = 7, 50, 100
    expected = image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
    np.testing.assert_allclose((geo.index_to_physical() @ [k, j, i, 1])[:3], expected, atol=1e-6)


def test_4d_volume_needs_flag(realdata: Path) -> None:
    path = realdata / "nibabel/example4d.nii.gz"
    with pytest.raises(DataError, match=re.escape(str(path))) as exc:
        read_volume(path)
    assert "4D" in str(exc.value) and "\n" not in str(exc.value)
    array, geo = read_volume(path, allow_4d_first=True)
    assert geo.size == (128, 96, 24)
    assert array.shape == (24, 96, 128)
    full = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(full)[0])
    dims, spacing, origin, direction = nifti_header_geometry(path)
    assert dims[:3] == geo.size
    _assert_geometry(geo, dims[:3], spacing, origin, direction)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):
        read_volume(missing)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a volume")
    with pytest.raises(DataError) as exc:
        read_volume(junk)
    assert str(junk) in str(exc.value) and "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- writing

OBLIQUE = Geometry(
    size=(5, 4, 3),
    spacing=(0.7, 1.1, 2.5),
    origin=(10.0, -20.0, 30.5),
    direction=tuple(
        np.array([[np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0], [0.0, 0.0, 1.0]]).ravel()
    ),
)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_read_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(3, 4, 5)).astype(np.int16)
    path = tmp_path / f"vol{suffix}"
    write_volume(path, array, OBLIQUE)
    back, geo = read_volume(path)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.int16
    assert geo.size == OBLIQUE.size
    np.testing.assert_allclose(geo.spacing, OBLIQUE.spacing, rtol=1e-6)
    np.testing.assert_allclose(geo.origin, OBLIQUE.origin, atol=1e-5)
    np.testing.assert_allclose(geo.direction, OBLIQUE.direction, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind


def test_write_dtype_and_bool(tmp_path: Path) -> None:
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    write_volume(tmp_path / "m.nii.gz", mask, OBLIQUE)
    back, _ = read_volume(tmp_path / "m.nii.gz")
    assert back.dtype == np.uint8 and back.sum() == 1 and back[1, 2, 3] == 1
    write_volume(tmp_path / "f.nrrd", mask, OBLIQUE, dtype=np.float32)
    back, _ = read_volume(tmp_path / "f.nrrd")
    assert back.dtype == np.float32


def test_write_rejects_detached_formats_and_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot write"):
        write_volume(tmp_path / "v.mhd", np.zeros((3, 4, 5)), OBLIQUE)
    with pytest.raises(ValueError, match="does not match"):
        write_volume(tmp_path / "v.nii.gz", np.zeros((5, 4, 3)), OBLIQUE)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- grids and masks


def test_check_same_grid() -> None:
    g = OBLIQUE
    assert check_same_grid(g, g, 1e-3) is None
    nudged = Geometry(g.size, g.spacing, (g.origin[0] + 1e-5, g.origin[1], g.origin[2]), g.direction)
    assert check_same_grid(g, nudged, 1e-3) is None
    cases = {
        "size": Geometry((5, 4, 4), g.spacing, g.origin, g.direction),
        "spacing": Geometry(g.size, (0.7, 1.2, 2.5), g.origin, g.direction),
        "origin": Geometry(g.size, g.spacing, (10.0, -20.0, 33.0), g.direction),
        "direction": Geometry(g.size, g.spacing, g.origin, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
    }
    for what, other in cases.items():
        message = check_same_grid(g, other, 1e-3)
        assert message is not None and message.startswith(what), (what, message)
    assert "33" in check_same_grid(g, cases["origin"], 1e-3)


def _shifted_copy(src: Path, dst: Path, shift_mm: float) -> None:
    array, geo = read_volume(src)
    origin = (geo.origin[0] + shift_mm, geo.origin[1], geo.origin[2])
    write_volume(dst, array, Geometry(geo.size, geo.spacing, origin, geo.direction))


def test_mask_geometry_mismatch_error(realdata: Path, tmp_path: Path) -> None:
    image_path = realdata / "totalsegmentator/example_ct_sm.nii.gz"
    _, geo = read_volume(image_path)
    shifted = tmp_path / "kidney_right_shifted.nii.gz"
    _shifted_copy(realdata / "totalsegmentator/example_seg_fast_kidney_right.nii.gz", shifted, 3.0)
    with pytest.raises(DataError) as exc:
        read_mask(shifted, geo, image_path=image_path)
    message = str(exc.value)
    assert str(shifted) in message and str(image_path) in message and "origin" in message
    assert "\n" not in message


def test_mask_geometry_mismatch_resample(realdata: Path, tmp_path: Path, caplog) -> None:
    image_path = realdata / "totalsegmentator/example_ct_sm.nii.gz"
    mask_path = realdata / "totalsegmentator/example_seg_fast_kidney_right.nii.gz"
    _, geo = read_volume(image_path)
    original = read_mask(mask_path, geo)
    assert original.dtype == bool and original.any()
    shifted = tmp_path / "kidney_right_shifted.nii.gz"
    _shifted_copy(mask_path, shifted, 3.0)  # +3 mm in LPS x = one voxel along -i (direction diag(-1,-1,1))
    with caplog.at_level(logging.WARNING, logger="mtlbench.data"):
        moved = read_mask(shifted, geo, on_mismatch="resample", image_path=image_path)
    assert moved.shape == original.shape and moved.dtype == bool
    # the mask voxel with index i+1 now lies at the image's index i
    np.testing.assert_array_equal(moved[:, :, :-1], original[:, :, 1:])
    assert not moved[:, :, -1].any()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and str(shifted) in lines[0] and str(image_path) in lines[0]


def test_binary_mask_matches_label_map(realdata: Path) -> None:
    """The binary TotalSegmentator kidney files equal labels 2 / 3 of the multi-label map on the same grid."""
    _, geo = read_volume(realdata / "totalsegmentator/example_ct_sm.nii.gz")
    seg = realdata / "totalsegmentator/example_seg.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    for label, name in ((2, "right"), (3, "left")):
        from_map = read_mask(seg, geo, label=label)
        np.testing.assert_array_equal(from_map, labels == label)
        binary = read_mask(realdata / f"totalsegmentator/example_seg_fast_kidney_{name}.nii.gz", geo)
        assert binary.any() and from_map.any()
        overlap = (binary & from_map).sum() / (binary | from_map).sum()
        assert overlap > 0.5, (name, overlap)


def test_float_label_map(realdata: Path, tmp_path: Path) -> None:
    path = realdata / "verse/sub-verse004_seg-vert_msk.nii.gz"
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert raw.dtype == np.float64
    assert set(np.unique(raw)) == {0.0, *map(float, range(16, 25))}
    _, geo = read_volume(path)
    for label in (16, 20, 24):
        mask = read_mask(path, geo, label=label)
        assert mask.dtype == bool and mask.sum() == (raw == label).sum() > 0
        np.testing.assert_array_equal(mask, raw == label)
    assert read_mask(path, geo).sum() == (raw != 0).sum()
    # a float label map with rounding noise around the integers still gives the label's voxels
    noisy_path = tmp_path / "noisy.nii.gz"
    write_volume(noisy_path, raw + np.where(raw > 0, 1e-4, 0.0) - np.where(raw == 20, 2e-4, 0.0), geo)
    np.testing.assert_array_equal(read_mask(noisy_path, geo, label=20), raw == 20)


def _axcodes(geo: Geometry) -> list[str]:
    """nibabel-style orientation codes (RAS letters) of the three ITK axes."""
    d = np.reshape(geo.direction, (3, 3)) * np.array([[-1.0], [-1.0], [1.0]])  # LPS -> RAS rows
    codes = []
    for n in range(3):
        a = int(np.argmax(np.abs(d[:, n])))
        codes.append(("LR", "PA", "IS")[a][int(d[a, n] > 0)])
    return codes


def test_verse_centroids_inside_their_vertebrae(realdata: Path) -> None:
    path = realdata / "verse/sub-verse004_seg-vert_msk.nii.gz"
    ctd = json.loads((realdata / "verse/sub-verse004_seg-subreg_ctd.json").read_text())
    ctd_codes = ctd[0]["direction"]
    _, geo = read_volume(path)
    img_codes = _axcodes(geo)
    pairs = ("LR", "PA", "IS")
    assert len(ctd) == 10
    for entry in ctd[1:]:
        values = (entry["X"], entry["Y"], entry["Z"])
        itk_index = [0.0, 0.0, 0.0]
        for axis, code in enumerate(ctd_codes):
            pair = next(p for p in pairs if code in p)
            n = next(n for n, c in enumerate(img_codes) if c in pair)
            itk_index[n] = values[axis] if img_codes[n] == code else geo.size[n] - 1 - values[axis]
        i, j, k = (int(round(v)) for v in itk_index)
        mask = read_mask(path, geo, label=entry["label"])
        assert mask[k, j, i], f"centroid of label {entry['label']} at (k, j, i) = {(k, j, i)} is outside it"


def test_to_sitk_places_array(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    image = to_sitk(array, OBLIQUE)
    assert image.GetSize() == OBLIQUE.size
    assert image.GetPixel(4, 3, 2) == array[2, 3, 4]
    np.testing.assert_allclose(
        image.TransformIndexToPhysicalPoint((4, 3, 2)), (OBLIQUE.index_to_physical() @ [2, 3, 4, 1])[:3]
    )
