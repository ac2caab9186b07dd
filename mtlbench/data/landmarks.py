"""Landmark files (3D Slicer .fcsv and .mrk.json) and landmark positions relative to an image grid.

Every landmark this module returns is in LPS millimetres (what SimpleITK uses); files in RAS
are converted on reading and writing (RAS = LPS with x and y negated).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mtlbench.api import Geometry, Landmark
from mtlbench.data.grid import physical_to_index
from mtlbench.errors import DataError
from mtlbench.fsutil import write_text

LOG = logging.getLogger("mtlbench.data")

#: Column order of Slicer 4.x+ .fcsv files that carry no ``# columns =`` line.
MODERN_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID")
#: Column order of Slicer 3 fiducial lists (unversioned files).
LEGACY_COLUMNS = ("label", "x", "y", "z", "sel", "vis")
FCSV_VERSION = "4.11"
MRK_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)

_HEADER = re.compile(r"^#\s*(?P<key>[^=]+?)\s*=\s*(?P<value>.*)$")
_LABEL_SEPARATORS = re.compile(r"[\s_\-]+")
_LEGACY_HEADER = re.compile(r"^#\s*label\s*,\s*x\s*,\s*y\s*,\s*z\b", re.IGNORECASE)


# ----------------------------------------------------------------------------- reading


def label_key(label: str) -> str:
    """What a label is matched by: case ignored, runs of spaces, '-' and '_' alike
    (``Renal Pelvis Right`` and ``renal_pelvis_right`` are one label)."""
    return _LABEL_SEPARATORS.sub("_", label.strip().casefold())


def check_unique_labels(path: Path, located: Iterable[tuple[int | str, Landmark]]) -> None:
    """DataError at the second landmark whose label matches an earlier one's (see :func:`label_key`).

    ``located`` gives each landmark with where it is in the file: a line number, or a
    description such as ``markups[0].controlPoints[2]``.
    """
    first: dict[str, tuple[str, int | str]] = {}
    for where, lm in located:
        key = label_key(lm.name)
        if key in first:
            name, there = first[key]
            head = f"{path}:{where}" if isinstance(where, int) else f"{path}: {where}"
            back = f"line {there}" if isinstance(there, int) else there
            same = "repeats" if name == lm.name else "is the same label as"
            raise DataError(
                f"{head}: landmark label {lm.name!r} {same} {name!r} of {back} "
                f"(labels match ignoring case, spaces, '-' and '_'); give each landmark its own label"
            )
        first[key] = (lm.name, where)


def read_landmarks(path: str | Path) -> list[Landmark]:
    """Read a landmark file: ``.fcsv``, ``.mrk.json`` or a ``.json`` holding Slicer markups.

    Two landmarks whose labels match (:func:`label_key`) are a DataError at the second one.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".fcsv"):
        return read_fcsv(path)
    if name.endswith(".json"):
        return read_mrk_json(path)
    raise DataError(f"{path}: unknown landmark file type; expected .fcsv, .mrk.json or .json")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _lines(text: str) -> list[str]:
    """Split into lines: LF or CRLF, old-Mac CR-only files, stray CRs removed."""
    if "\n" not in text and "\r" in text:
        return text.split("\r")
    return [line.replace("\r", "") for line in text.split("\n")]


def _header_value(raw: str) -> str:
    """A header value without spreadsheet damage (``LPS,,,,,`` -> ``LPS``)."""
    return raw.strip().rstrip(",").strip()


def parse_coordinate_system(value: str, where: str) -> str:
    """'RAS' or 'LPS' from an .fcsv / .mrk.json coordinate-system value (0 = RAS, 1 = LPS)."""
    v = value.strip().upper()
    if v in ("RAS", "0"):
        return "RAS"
    if v in ("LPS", "1"):
        return "LPS"
    raise DataError(f"{where}: unknown coordinate system {value!r}; expected RAS, LPS, 0 or 1")


def _to_lps(xyz: tuple[float, float, float], system: str) -> tuple[float, float, float]:
    x, y, z = xyz
    return (-x, -y, z) if system == "RAS" else (x, y, z)


def read_fcsv(path: str | Path) -> list[Landmark]:
    """Read a 3D Slicer .fcsv file of any version (Slicer 3 lists included); positions in LPS.

    Without a ``# columns`` line the columns are Slicer 4's or Slicer 3's (:func:`_implied_columns`);
    a label that repeats an earlier one is a DataError naming its line.
    """
    path = Path(path)
    headers: dict[str, str] = {}
    columns: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for lineno, line in enumerate(_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            if _LEGACY_HEADER.match(line.strip()):
                columns = [c.strip() for c in line.strip().lstrip("#").split(",")]
                continue
            m = _HEADER.match(line.strip())
            if m:
                key = m["key"].strip().lower()
                headers[key] = _header_value(m["value"])
                if key == "columns":
                    columns = [c.strip() for c in headers[key].split(",")]
            continue
        fields = next(csv.reader([line], skipinitialspace=False))
        if not any(f.strip() for f in fields):
            continue  # a row of empty cells (spreadsheet export)
        rows.append((lineno, fields))
    if columns is None:
        columns = _implied_columns(headers, rows)
    system = parse_coordinate_system(headers.get("coordinatesystem", "RAS"), str(path))
    found = [(n, _fcsv_row(path, n, i, fields, columns, system)) for i, (n, fields) in enumerate(rows, 1)]
    placed = [(n, lm) for n, lm in found if lm is not None]
    check_unique_labels(path, placed)
    return [lm for _, lm in placed]


def _implied_columns(headers: dict[str, str], rows: list[tuple[int, list[str]]]) -> list[str]:
    """The columns of a file without a ``# columns`` line: Slicer 4's when it says its version or
    every row is as long as Slicer 4's up to the label (a header-less export), else Slicer 3's."""
    versioned = any(k.startswith("markups fiducial file version") for k in headers)
    modern_rows = bool(rows) and all(len(fields) > MODERN_COLUMNS.index("label") for _, fields in rows)
    return list(MODERN_COLUMNS if versioned or modern_rows else LEGACY_COLUMNS)


def _column_index(columns: list[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(columns):
        index.setdefault(name.strip().lower(), i)
    return index


def _fcsv_row(path: Path, lineno: int, n: int, fields: list[str], columns: list[str], system: str) -> Landmark | None:
    """One landmark from one row; None for a point Slicer marks as not placed (NaN position)."""
    col = _column_index(columns)
    for axis in ("x", "y", "z"):
        if axis not in col:
            raise DataError(f"{path}: the columns header has no {axis!r} column")
    xyz = []
    for axis in ("x", "y", "z"):
        i = col[axis]
        if i >= len(fields):
            raise DataError(f"{path}:{lineno}: row has {len(fields)} fields, no {axis} coordinate")
        try:
            xyz.append(float(fields[i].strip()))
        except ValueError:
            raise DataError(f"{path}:{lineno}: {axis} coordinate {fields[i].strip()!r} is not a number") from None
    label = _field(fields, col.get("label")) or _field(fields, col.get("id")) or f"F-{n}"
    if not all(math.isfinite(v) for v in xyz):
        LOG.warning("%s:%d: landmark %r has no position (%s); skipped", path, lineno, label, xyz)
        return None
    return Landmark(label, _to_lps((xyz[0], xyz[1], xyz[2]), system))


def _field(fields: list[str], index: int | None) -> str:
    if index is None or index >= len(fields):
        return ""
    return fields[index].strip()


def read_mrk_json(path: str | Path) -> list[Landmark]:
    """Read the fiducial (point list) markups of a Slicer .mrk.json file; positions in LPS."""
    path = Path(path)
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list):
        raise DataError(f"{path}: no 'markups' list; not a Slicer markups file")
    out: list[tuple[int | str, Landmark]] = []
    for k, markup in enumerate(markups):
        if isinstance(markup, dict) and str(markup.get("type", "")).lower() == "fiducial":
            out.extend(_markup_points(path, k, markup, len(out)))
    check_unique_labels(path, out)
    return [lm for _, lm in out]


def _markup_points(path: Path, k: int, markup: dict[str, Any], start: int) -> list[tuple[int | str, Landmark]]:
    """The defined control points of one fiducial markup, each with where it is in the file."""
    where = f"{path}: markups[{k}]"
    system = parse_coordinate_system(str(markup.get("coordinateSystem", "LPS")), where)
    units = str(markup.get("coordinateUnits", "mm"))
    if units != "mm":
        raise DataError(f"{where}: coordinateUnits {units!r} is not supported; expected 'mm'")
    out: list[tuple[int | str, Landmark]] = []
    for j, point in enumerate(markup.get("controlPoints") or []):
        status = str(point.get("positionStatus", "defined")).lower()
        pos = point.get("position")
        if status != "defined" or pos is None:
            continue
        try:
            xyz = tuple(float(v) for v in pos)
        except (TypeError, ValueError):
            raise DataError(f"{where}.controlPoints[{j}]: position {pos!r} is not three numbers") from None
        if len(xyz) != 3:
            raise DataError(f"{where}.controlPoints[{j}]: position {pos!r} is not three numbers")
        label = str(point.get("label") or "").strip() or str(point.get("id") or "").strip() or f"F-{start + len(out) + 1}"
        out.append((f"markups[{k}].controlPoints[{j}]", Landmark(label, _to_lps(xyz, system))))  # type: ignore[arg-type]
    return out


# ----------------------------------------------------------------------------- writing


def _check_system(coordinate_system: str) -> str:
    system = coordinate_system.upper()
    if system not in ("LPS", "RAS"):
        raise ValueError(f"coordinate_system must be 'LPS' or 'RAS', not {coordinate_system!r}")
    return system


def _from_lps(position: Iterable[float], system: str) -> list[float]:
    x, y, z = (float(v) for v in position)
    return [-x, -y, z] if system == "RAS" else [x, y, z]


def write_fcsv(path: str | Path, landmarks: list[Landmark], coordinate_system: str = "LPS") -> None:
    """Write landmarks as a Slicer 4.11-style .fcsv in ``coordinate_system`` (atomically)."""
    system = _check_system(coordinate_system)
    buf = io.StringIO()
    buf.write(f"# Markups fiducial file version = {FCSV_VERSION}\n")
    buf.write(f"# CoordinateSystem = {system}\n")
    buf.write(f"# columns = {','.join(MODERN_COLUMNS)}\n")
    writer = csv.writer(buf, lineterminator="\n")
    for i, lm in enumerate(landmarks, start=1):
        x, y, z = _from_lps(lm.position, system)
        writer.writerow([i, repr(x), repr(y), repr(z), 0, 0, 0, 1, 1, 1, 0, lm.name, "", ""])
    write_text(path, buf.getvalue())


def write_mrk_json(path: str | Path, landmarks: list[Landmark], coordinate_system: str = "LPS") -> None:
    """Write landmarks as a Slicer .mrk.json point list in ``coordinate_system`` (atomically)."""
    system = _check_system(coordinate_system)
    points = [
        {"id": str(i), "label": lm.name, "position": _from_lps(lm.position, system), "positionStatus": "defined"}
        for i, lm in enumerate(landmarks, start=1)
    ]
    doc = {
        "@schema": MRK_SCHEMA,
        "markups": [
            {"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm", "controlPoints": points}
        ],
    }
    write_text(path, json.dumps(doc, indent=2) + "\n")


# ----------------------------------------------------------------------------- geometry


def outside_image(landmarks: list[Landmark], geometry: Geometry) -> list[tuple[Landmark, float]]:
    """Landmarks outside the image's voxel extent ([-0.5, size - 0.5] per axis), with their distance (mm) from it."""
    if not landmarks:
        return []
    idx = physical_to_index(np.array([lm.position for lm in landmarks]), geometry.index_to_physical())
    upper = np.asarray(geometry.size[::-1], dtype=float) - 0.5
    nearest = np.clip(idx, -0.5, upper)
    linear = geometry.index_to_physical()[:3, :3]
    dist = np.linalg.norm((idx - nearest) @ linear.T, axis=1)
    outside = np.any(idx != nearest, axis=1)
    return [(lm, float(d)) for lm, d, out in zip(landmarks, dist, outside) if out]


def filter_inside(landmarks: list[Landmark], geometry: Geometry, patient: str) -> list[Landmark]:
    """Drop landmarks outside the image, logging one warning line per dropped landmark."""
    dropped = outside_image(landmarks, geometry)
    for lm, dist in dropped:
        LOG.warning("patient %s: landmark %r lies %.1f mm outside the image; dropped", patient, lm.name, dist)
    gone = {id(lm) for lm, _ in dropped}
    return [lm for lm in landmarks if id(lm) not in gone]
