"""Reading and writing 3D medical volumes and masks with SimpleITK, and checking that grids match.

Arrays are numpy order (z, y, x); a :class:`~mtlbench.api.Geometry` describes the grid in ITK order
(x, y, z) with LPS physical coordinates, exactly as SimpleITK reports it.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

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


# ----------------------------------------------------------------------------- completeness of the voxel data
#
# SimpleITK reads a truncated .nii or .nii.gz without an error, the missing voxels zero-filled, and
# gives a misleading reason for a truncated .mha. So before reading, the header is parsed here for
# where the voxel bytes lie and how many it promises, and those bytes are counted: a raw file by
# its size, a compressed one by inflating it in chunks (nothing kept), which also checks the
# stream's end marker and, for gzip, its CRC and length.

_CHUNK = 1 << 20  # at most this many bytes are inflated at a time
_READ = 1 << 16  # compressed bytes read at a time (a mask inflates them a thousandfold)
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_LIMIT = 1 << 20  # a MetaImage / NRRD text header longer than this is not checked


class _CutHeader(Exception):
    """The file ends inside its header (a cut .nii.gz stream), so not even the promise can be read."""


@dataclass(frozen=True)
class VoxelData:
    """Where a volume file keeps its voxel bytes, as its header describes them.

    The bytes of ``file`` from offset ``start``, decoded by ``codec`` ("raw", "gzip" or "zlib"),
    are ``skip`` bytes (the rest of a NIfTI header inside a .nii.gz, a NRRD byte skip) and then
    the ``promised`` bytes of voxel data.
    """

    file: Path
    start: int
    codec: Literal["raw", "gzip", "zlib"]
    promised: int
    skip: int = 0


def voxel_data(path: str | Path) -> VoxelData | None:
    """Where the header of ``path`` says its voxel bytes are, or None for a layout not checked here.

    Understood: NIfTI-1/2 (.nii, .nii.gz), MetaImage (.mha, .mhd with one data file) and NRRD
    (.nrrd, .nhdr with one data file; raw or gzip encoding). Anything else, or a header that does
    not parse, is left to SimpleITK; a NIfTI file that ends inside its header raises ``_CutHeader``.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    try:
        if suffix in (".nii", ".nii.gz"):
            return _nifti_voxel_data(path, compressed=suffix == ".nii.gz")
        if suffix in (".mha", ".mhd"):
            return _metaimage_voxel_data(path)
        if suffix in (".nrrd", ".nhdr"):
            return _nrrd_voxel_data(path)
    except (OSError, EOFError, zlib.error, ValueError, struct.error):
        return None  # unreadable header: SimpleITK reports it
    return None


def check_complete(path: str | Path) -> None:
    """Raise a DataError when the file holds fewer voxel bytes than its header promises, or its
    compressed data is cut off or corrupt; files whose layout :func:`voxel_data` does not know pass."""
    try:
        layout = voxel_data(path)
    except _CutHeader:
        raise DataError(f"{path}: truncated or corrupt volume: the file ends inside its header") from None
    if layout is None:
        return
    decoded, problem = _decoded_size(layout)
    promise = f"{path}: truncated or corrupt volume: header promises {layout.promised} bytes of voxel data"
    if decoded is None:
        raise DataError(f"{promise}, but {problem}")
    held = max(0, decoded - layout.skip)
    if problem is None and held >= layout.promised:
        return
    holder = "file" if Path(layout.file) == Path(path) else f"data file {layout.file}"
    raise DataError(f"{promise}, {holder} holds {held}" + (f" ({problem})" if problem else ""))


def _decoded_size(layout: VoxelData) -> tuple[int | None, str | None]:
    """(bytes the data decodes to, what is wrong with it or None); the size is None when it cannot be told."""
    if not layout.file.is_file():
        return None, f"its data file {layout.file} is missing"
    if layout.codec == "raw":
        return max(0, layout.file.stat().st_size - layout.start), None
    with layout.file.open("rb") as fh:
        fh.seek(layout.start)
        return _inflated_size(fh, gzip_only=layout.codec == "gzip")


def _inflated_size(fh: BinaryIO, gzip_only: bool) -> tuple[int | None, str | None]:
    """Inflate a zlib or gzip stream chunk by chunk, counting its bytes; concatenated gzip members count too.

    A stream that ends early gives the bytes it held and the problem; a corrupt one (bad data,
    CRC or length) gives None and the problem.
    """
    wbits = 31 if gzip_only else 47  # 31: gzip; 47: zlib or gzip, told apart by the header
    member, total = zlib.decompressobj(wbits), 0
    data = fh.read(_READ)
    while True:
        if not data:
            try:
                total += len(member.flush())
            except zlib.error:
                pass
            return total, "the compressed data ends before its end-of-stream marker"
        try:
            total += len(member.decompress(data, _CHUNK))
        except zlib.error as exc:
            return None, f"its compressed data is corrupt ({str(exc).rsplit(': ', 1)[-1]})"
        if member.eof:
            rest = member.unused_data + fh.read(_READ)
            if not rest.startswith(_GZIP_MAGIC):
                return total, None  # the end, or padding after it
            member, data = zlib.decompressobj(wbits), rest
        else:
            data = member.unconsumed_tail or fh.read(_READ)


# -- NIfTI

_NIFTI1 = {"size": 348, "dim": (40, "8h"), "bitpix": (72, "h"), "vox_offset": (108, "f"), "magic": (344, 4)}
_NIFTI2 = {"size": 540, "dim": (16, "8q"), "bitpix": (14, "h"), "vox_offset": (168, "q"), "magic": (4, 8)}
_SINGLE_FILE_MAGIC = (b"n+1\0", b"n+2\0\r\n\x1a\n")


def _nifti_voxel_data(path: Path, compressed: bool) -> VoxelData | None:
    """A single-file NIfTI-1 or NIfTI-2 header: voxel data at vox_offset, dim x bitpix bytes of it."""
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(_NIFTI2["size"])
    except EOFError:  # a gzip stream that starts well and ends early
        raise _CutHeader() from None
    parsed = _nifti_header(head)
    if parsed is None:
        return None
    offset, promised = parsed
    if compressed:
        return VoxelData(path, 0, "gzip", promised, skip=offset)
    return VoxelData(path, offset, "raw", promised)


def _nifti_header(head: bytes) -> tuple[int, int] | None:
    """(vox_offset, bytes of voxel data) from a NIfTI header's first bytes; None if it is not one."""
    for layout in (_NIFTI1, _NIFTI2):
        for order in "<>":
            if len(head) >= 4 and struct.unpack_from(order + "i", head)[0] == layout["size"]:
                if len(head) < layout["size"]:
                    raise _CutHeader()
                return _nifti_fields(head, order, layout)
    return None


def _nifti_fields(head: bytes, order: str, layout: dict) -> tuple[int, int] | None:
    """(vox_offset, bytes of voxel data) of a single-file header in byte ``order``; None for anything else."""
    at, length = layout["magic"]
    if head[at : at + length] not in _SINGLE_FILE_MAGIC:
        return None  # a .hdr/.img pair, or not NIfTI
    dim = struct.unpack_from(order + layout["dim"][1], head, layout["dim"][0])
    bitpix = struct.unpack_from(order + layout["bitpix"][1], head, layout["bitpix"][0])[0]
    vox_offset = struct.unpack_from(order + layout["vox_offset"][1], head, layout["vox_offset"][0])[0]
    if not 1 <= dim[0] <= 7 or any(d < 0 for d in dim[1 : dim[0] + 1]) or bitpix <= 0 or not math.isfinite(vox_offset):
        return None
    voxels = math.prod(dim[1 : dim[0] + 1])
    # the data never starts inside the header and its 4-byte extension flag
    return max(int(vox_offset), layout["size"] + 4), (voxels * bitpix + 7) // 8


# -- MetaImage

_MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


def _text_header(fh: BinaryIO, last: "re.Pattern[str]") -> tuple[list[str], int | None] | None:
    """A text header's lines up to the first that matches ``last`` (included) and the offset after it.

    The offset is None when the file ends first; None for a header longer than ``_HEADER_LIMIT``.
    """
    lines: list[str] = []
    while fh.tell() < _HEADER_LIMIT:
        raw = fh.readline(_HEADER_LIMIT)
        if not raw:
            return lines, None
        line = raw.decode("latin-1").rstrip("\r\n")
        lines.append(line)
        if last.match(line):
            return lines, fh.tell()
    return None


def _metaimage_voxel_data(path: Path) -> VoxelData | None:
    """A MetaImage header: its data after ``ElementDataFile = LOCAL``, or in the one file it names."""
    with path.open("rb") as fh:
        header = _text_header(fh, re.compile(r"^\s*ElementDataFile\s*=", re.IGNORECASE))
    if header is None or header[1] is None:
        return None
    lines, end = header
    fields = {key.strip().lower(): value.strip() for key, sep, value in (ln.partition("=") for ln in lines) if sep}
    size = _MET_SIZES.get(fields.get("elementtype", "").upper().removesuffix("_ARRAY"))
    dims = fields.get("dimsize", "").split()
    if size is None or not dims or fields.get("binarydata", "true").lower() == "false":
        return None  # an unknown type, or voxels written as text
    promised = math.prod(int(d) for d in dims) * size * int(fields.get("elementnumberofchannels", "1"))
    codec: Literal["raw", "zlib"] = "zlib" if fields.get("compresseddata", "false").lower() == "true" else "raw"
    source = fields["elementdatafile"]
    if source.upper() == "LOCAL":
        return VoxelData(path, end, codec, promised)
    header_size = int(fields.get("headersize", "0"))
    if source.upper() == "LIST" or len(source.split()) > 1 or "%" in source or header_size < 0:
        return None  # several data files, or data at the end of its file: not checked
    return VoxelData(path.parent / source, header_size if codec == "raw" else 0, codec, promised)


# -- NRRD

_NRRD_SIZES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t",
        "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_TYPE_SIZE = {name: size for size, names in _NRRD_SIZES.items() for name in names}
_NRRD_CODECS = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}
_NRRD_FIELD = re.compile(r"^(?P<key>[^:#][^:]*): (?P<value>.*)$")  # "key:=value" pairs do not match


def _nrrd_voxel_data(path: Path) -> VoxelData | None:
    """A NRRD header: raw or gzip data after the blank line ending the header, or in the one file it names."""
    with path.open("rb") as fh:
        if fh.read(4) != b"NRRD":
            return None
        fh.seek(0)
        header = _text_header(fh, re.compile(r"^$"))
    if header is None:
        return None
    lines, end = header
    fields = {m["key"].strip().lower(): m["value"].strip() for m in map(_NRRD_FIELD.match, lines[1:]) if m}
    size = _NRRD_TYPE_SIZE.get(fields.get("type", "").lower())
    codec = _NRRD_CODECS.get(fields.get("encoding", "").lower())
    sizes = fields.get("sizes", "").split()
    skip = int(fields.get("byte skip", "0"))
    if size is None or codec is None or not sizes or int(fields.get("line skip", "0")) != 0 or skip < 0:
        return None  # an unknown type, text or bzip2 encoding, line skips, data at the end of its file
    promised = math.prod(int(n) for n in sizes) * size
    source = fields.get("data file", fields.get("datafile"))
    if source is None:
        file, start = path, end
    elif source.upper().startswith("LIST") or len(source.split()) > 1:
        return None  # several data files: not checked
    else:
        file, start = path.parent / source, 0
    if start is None:
        return None
    if codec == "raw":  # the byte skip counts raw bytes, or decoded ones for compressed data
        return VoxelData(file, start + skip, codec, promised)
    return VoxelData(file, start, codec, promised, skip=skip)


def read_image(path: str | Path, allow_4d_first: bool = False) -> sitk.Image:
    """Read a scalar 3D SimpleITK image; a 4D file gives its first volume when ``allow_4d_first``.

    A file holding fewer voxel bytes than its header promises is a DataError (:func:`check_complete`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    check_complete(path)
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
        # SimpleITK's NIfTI writer ignores a full disk (a 0-byte or cut file, no error):
        # read the written file's header and count its voxel bytes before it is published.
        try:
            if Path(tmp).stat().st_size == 0:
                raise DataError(f"{tmp}: empty")
            check_complete(tmp)
        except (DataError, OSError):
            from mtlbench.errors import StorageError

            raise StorageError(f"{path}: cannot write (the written file is incomplete: is the disk full?)") from None


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
