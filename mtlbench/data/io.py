"""Reading and writing 3D medical volumes and masks with SimpleITK, and checking that grids match.

Arrays are numpy order (z, y, x); a :class:`~mtlbench.api.Geometry` describes the grid in ITK order
(x, y, z) with LPS physical coordinates, exactly as SimpleITK reports it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from mtlbench.api import Geometry
from mtlbench.errors import DataError
from mtlbench.fsutil import atomic_path

LOG = logging.getLogger("mtlbench.data")

#: Suffixes SimpleITK reads as volumes (``.mhd`` / ``.nhdr`` keep their data in a second file).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Suffixes :func:`write_volume` writes: single-file formats only, so one rename publishes the file.
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def volume_suffix(path: str | Path) -> str:
    """The volume suffix of ``path`` ('.nii.gz', '.nrrd', ...), or '' when it has none of them."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def geometry_of(image: sitk.Image) -> Geometry:
    """The Geometry of a 3D SimpleITK image."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    return Geometry(
        size=tuple(int(v) for v in image.GetSize()),
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
    )


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image of a numpy-order (z, y, x) array placed on ``geometry``'s grid."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.shape != tuple(reversed(geometry.size)):
        raise ValueError(f"array shape {array.shape} does not match geometry size {geometry.size} (x, y, z)")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _short(exc: Exception) -> str:
    """The informative part of a (multi-line) SimpleITK error message, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or ["unknown error"]
    errors = [ln.split("ERROR:", 1)[1].strip() for ln in lines if "ERROR:" in ln]
    return (errors[-1] if errors else lines[-1])[:300]


def read_image(path: str | Path, allow_4d_first: bool = False) -> sitk.Image:
    """Read a scalar 3D SimpleITK image; a 4D file gives its first volume when ``allow_4d_first``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read volume: {_short(exc)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume")
    dim = image.GetDimension()
    if dim == 4 and allow_4d_first:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    elif dim != 3:
        raise DataError(f"{path}: is a {dim}D image (size {image.GetSize()}); expected a 3D volume")
    return image


def read_volume(path: str | Path, allow_4d_first: bool = False) -> tuple[np.ndarray, Geometry]:
    """Read a 3D volume (NIfTI, NRRD, MHA/MHD): its voxels in numpy order, in the stored type, and its grid."""
    image = read_image(path, allow_4d_first)
    return sitk.GetArrayFromImage(image), geometry_of(image)


def write_volume(path: str | Path, array: np.ndarray, geometry: Geometry, dtype: np.dtype | type | None = None) -> None:
    """Write ``array`` (numpy order) on ``geometry``'s grid to ``path`` atomically, compressed where the format allows."""
    suffix = volume_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise DataError(f"{path}: cannot write this format; use one of {', '.join(WRITE_SUFFIXES)}")
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    image = to_sitk(array, geometry)
    # The temporary name keeps the real suffix: SimpleITK picks the writer from it.
    with atomic_path(path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=suffix != ".nii")
        except RuntimeError as exc:
            raise DataError(f"{path}: cannot write volume: {_short(exc)}") from None


def check_same_grid(image_geometry: Geometry, mask_geometry: Geometry, tol: float = 1e-3) -> str | None:
    """Describe the first difference between two grids, or None when they match.

    Sizes must be equal; spacing and origin may differ by ``tol`` times the image's
    largest voxel spacing (mm); direction cosines by ``tol``.
    """
    a, b = image_geometry, mask_geometry
    if tuple(a.size) != tuple(b.size):
        return f"size differs: {tuple(a.size)} vs {tuple(b.size)}"
    mm = tol * max(max(a.spacing), 1e-12)
    for field, limit in (("spacing", mm), ("origin", mm), ("direction", tol)):
        va, vb = np.asarray(getattr(a, field), float), np.asarray(getattr(b, field), float)
        if va.shape != vb.shape or np.any(np.abs(va - vb) > limit):
            return f"{field} differs: {_fmt(va)} vs {_fmt(vb)}"
    return None


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def resample_nearest(image: sitk.Image, geometry: Geometry) -> sitk.Image:
    """Nearest-neighbour resampling of ``image`` onto ``geometry``'s grid (outside -> 0)."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in geometry.size])
    f.SetOutputSpacing(geometry.spacing)
    f.SetOutputOrigin(geometry.origin)
    f.SetOutputDirection(geometry.direction)
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    f.SetOutputPixelType(image.GetPixelID())
    f.SetTransform(sitk.Transform())
    return f.Execute(image)


def read_label_image(
    path: str | Path,
    image_geometry: Geometry,
    *,
    on_mismatch: Literal["error", "resample"] = "error",
    tol: float = 1e-3,
    image_path: str | Path | None = None,
) -> np.ndarray:
    """Read a mask or label map as an array on ``image_geometry``'s grid (stored type kept).

    A grid that differs beyond ``tol`` raises a DataError naming both files
    (``on_mismatch="error"``) or is resampled nearest-neighbour with a warning (``"resample"``).
    """
    image = read_image(path)
    diff = check_same_grid(image_geometry, geometry_of(image), tol)
    if diff is not None:
        image_name = str(image_path) if image_path is not None else "the image"
        if on_mismatch == "error":
            raise DataError(
                f"mask {path} is not on the grid of image {image_name}: {diff} "
                f"(set data.mask_mismatch = \"resample\" to resample masks onto the image grid)"
            )
        if on_mismatch != "resample":
            raise ValueError(f"on_mismatch must be 'error' or 'resample', not {on_mismatch!r}")
        LOG.warning("mask %s resampled (nearest neighbour) onto the grid of image %s: %s", path, image_name, diff)
        image = resample_nearest(image, image_geometry)
    return sitk.GetArrayFromImage(image)


def mask_from_labels(labels: np.ndarray, label: int | None = None) -> np.ndarray:
    """A bool mask: nonzero voxels (``label=None``) or the voxels equal to ``label`` (float maps rounded)."""
    if label is None:
        return labels != 0
    if np.issubdtype(labels.dtype, np.floating):
        return np.rint(labels) == label
    return labels == label


def read_mask(
    path: str | Path,
    image_geometry: Geometry,
    *,
    label: int | None = None,
    on_mismatch: Literal["error", "resample"] = "error",
    tol: float = 1e-3,
    image_path: str | Path | None = None,
) -> np.ndarray:
    """Read a binary mask (nonzero = inside) or one ``label`` of a label map, as bool on the image grid."""
    labels = read_label_image(path, image_geometry, on_mismatch=on_mismatch, tol=tol, image_path=image_path)
    return mask_from_labels(labels, label)
