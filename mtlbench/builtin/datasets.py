"""The built-in dataset sources: a CSV manifest, the VISCERAL Anatomy3 folder layout and the synthetic phantom.

SimpleITK and the IO modules are imported inside methods: this module is imported when the CLI starts.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from mtlbench import hookimpl
from mtlbench.api import DatasetSource, Params, Patient, SourceRequest
from mtlbench.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from mtlbench.api import Geometry, Landmark


@dataclass(frozen=True)
class MaskSpec:
    """Where one organ's mask comes from: a file, and the label to pick (None = any nonzero voxel)."""

    path: Path
    label: int | None = None

    def __str__(self) -> str:
        return f"{self.path}#{self.label}" if self.label is not None else str(self.path)


@dataclass(frozen=True)
class Entry:
    """One patient's files. ``landmark_labels`` maps configured landmark name -> label in the file.

    ``manifest`` is the CSV the entry came from: it is listed among the files so that
    a changed ``path#label`` selection changes the slice cache's key.
    """

    patient: str
    image: Path
    masks: dict[str, MaskSpec]
    landmarks: Path | None = None
    landmark_labels: dict[str, str] = field(default_factory=dict)
    manifest: Path | None = None

    def file_list(self) -> list[str]:
        paths = [self.image, *(m.path for m in self.masks.values())]
        if self.landmarks is not None:
            paths.append(self.landmarks)
        if self.manifest is not None:
            paths.append(self.manifest)
        return list(dict.fromkeys(str(p) for p in paths))

    def roles(self) -> dict[str, str]:
        roles = {"image": str(self.image)}
        roles.update({f"mask:{organ}": str(spec) for organ, spec in self.masks.items()})
        if self.landmarks is not None:
            roles["landmarks"] = str(self.landmarks)
        if self.manifest is not None:
            roles["manifest"] = str(self.manifest)
        return roles


class EntrySource(DatasetSource):
    """Shared logic of the file-based sources: subclasses list the patients' files, this class loads them.

    ``absent_label`` is what a ``file#label`` whose label does not occur in the file is: an
    "error" where the user named the label for this patient (a manifest), a "warning" where the
    labels come from one table for every case (a case may lack an organ).
    """

    _entries: dict[str, Entry] | None = None
    absent_label: Literal["error", "warning"] = "error"

    def read_entries(self) -> dict[str, Entry]:
        raise NotImplementedError

    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            self._entries = self.read_entries()
        return self._entries

    def entry(self, patient_id: str) -> Entry:
        try:
            return self.entries()[patient_id]
        except KeyError:
            raise DataError(f"data source {self.name!r}: unknown patient {patient_id!r}") from None

    def patient_ids(self) -> list[str]:
        return list(self.entries())

    def files(self, patient_id: str) -> list[str]:
        return self.entry(patient_id).file_list()

    def load(self, patient_id: str) -> Patient:
        return load_entry(self.entry(patient_id), self.request, absent_label=self.absent_label)


def load_entry(
    entry: Entry,
    request: SourceRequest,
    volume: "tuple[np.ndarray, Geometry] | None" = None,
    absent_label: Literal["error", "warning"] = "error",
) -> Patient:
    """Read one patient's volume, the configured organs' masks and landmarks.

    ``volume`` is the image already read, (array, geometry), for sources that
    pick it out of a larger file (one channel of a 4D image); default: read ``entry.image``.
    ``absent_label``: see :class:`EntrySource`.
    """
    import numpy as np

    from mtlbench.data.io import mask_from_labels, read_label_image, read_volume

    with patient_context(entry.patient):
        image, geometry = volume if volume is not None else read_volume(entry.image)
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        if bad:
            raise DataError(f"patient {entry.patient}: image {entry.image} has {bad} NaN or infinite voxels")
        labels_by_file: dict[Path, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for organ in request.organs:
            spec = entry.masks[organ]
            if spec.path not in labels_by_file:  # a label map shared by several organs is read once
                labels_by_file[spec.path] = read_label_image(
                    spec.path,
                    geometry,
                    on_mismatch=request.mask_mismatch,
                    tol=request.geometry_tolerance,
                    image_path=entry.image,
                )
            masks[organ] = checked_mask(entry.patient, organ, spec, labels_by_file[spec.path], absent_label)
        return Patient(
            id=entry.patient,
            image=image.astype(np.float32, copy=False),
            geometry=geometry,
            masks=masks,
            landmarks=_entry_landmarks(entry, request, geometry),
            files=entry.roles(),
        )


@contextlib.contextmanager
def patient_context(patient: str) -> Iterator[None]:
    """Name the patient in every DataError raised while one patient's files are read
    (a file's own error, e.g. a truncated volume, names only the file)."""
    try:
        yield
    except DataError as exc:
        if str(exc).startswith(f"patient {patient}:"):
            raise
        raise DataError(f"patient {patient}: {exc}") from exc


def checked_mask(
    patient: str, organ: str, spec: MaskSpec, labels, absent_label: Literal["error", "warning"] = "warning"
) -> "np.ndarray":
    """The organ's bool mask from its file's values; wrong values are a DataError, an empty organ a warning.

    A binary mask (no ``#label``) may hold only 0 and 1 (anything else is a
    label map, or a corrupt file: name the label with ``file#label``). A
    ``#label`` that does not occur in the file is a DataError naming the labels
    that do with ``absent_label="error"``, else a warning like an all-empty mask.
    """
    import logging

    import numpy as np

    from mtlbench.data.io import mask_from_labels

    if spec.label is None:
        values = np.unique(labels)
        extra = [v for v in values.tolist() if v not in (0, 1)]
        if extra:
            raise DataError(
                f"patient {patient}: mask {spec.path} of organ {organ!r} holds values other than 0 and 1 "
                f"({_shown(extra)}); for one label of a label map write '{spec.path}#<label>'"
            )
    mask = mask_from_labels(labels, spec.label)
    if mask.any():
        return mask
    if spec.label is not None and absent_label == "error":
        raise DataError(
            f"patient {patient}: organ {organ!r}: label {spec.label} does not occur in {spec.path} "
            f"({_labels_present(labels)})"
        )
    where = f"label {spec.label} does not occur in {spec.path}" if spec.label is not None else f"{spec.path} is empty"
    logging.getLogger("mtlbench.data").warning("patient %s: organ %r has no voxel (%s)", patient, organ, where)
    return mask


def _shown(values: list, limit: int = 6) -> str:
    """Up to ``limit`` numbers, then '...'."""
    return ", ".join(f"{v:g}" for v in values[:limit]) + (" ..." if len(values) > limit else "")


def _labels_present(labels) -> str:
    """Which nonzero labels a label map holds (float maps rounded, as :func:`mask_from_labels` does)."""
    import numpy as np

    values = np.rint(labels) if np.issubdtype(labels.dtype, np.floating) else labels
    present = [v for v in np.unique(values).tolist() if v != 0]
    return f"labels there: {_shown(present, 12)}" if present else "it holds no label: every voxel is 0"


def _norm_label(label: str) -> str:
    """A label as it is matched: case, spaces, '-' and '_' ignored (one rule for landmarks and dataset.json)."""
    from mtlbench.data.landmarks import label_key

    return label_key(label)


def _entry_landmarks(entry: Entry, request: SourceRequest, geometry) -> list["Landmark"]:
    """The configured landmarks present in the patient's file, in configured order, inside the image.

    A configured landmark the file lacks (every one, when the patient has no file) is one
    warning line naming the patient and the landmarks; the patient has no position for them,
    which the slice cache records (its ``landmark_names`` list only the landmarks present).
    """
    from mtlbench.api import Landmark
    from mtlbench.data.landmarks import filter_inside, read_landmarks

    if not request.landmarks:
        return []
    if entry.landmarks is None:
        _warn_absent(entry.patient, list(request.landmarks), "the patient has no landmark file")
        return []
    in_file = {_norm_label(lm.name): lm for lm in read_landmarks(entry.landmarks)}  # labels are unique there
    found, absent = [], []
    for name in request.landmarks:
        lm = in_file.get(_norm_label(entry.landmark_labels.get(name, name)))
        if lm is None:
            absent.append(name)
        else:
            found.append(Landmark(name, lm.position))
    if absent:
        labels = ", ".join(lm.name for lm in list(in_file.values())[:8]) + (" ..." if len(in_file) > 8 else "")
        _warn_absent(entry.patient, absent, f"{entry.landmarks} holds {labels or 'no landmark'}")
    return filter_inside(found, geometry, entry.patient)


def _warn_absent(patient: str, names: list[str], why: str) -> None:
    """One warning line: configured landmarks the patient has no position for."""
    import logging

    shown = ", ".join(repr(n) for n in names)
    logging.getLogger("mtlbench.data").warning(
        "patient %s: configured landmarks absent: %s (%s); the patient has no position for them", patient, shown, why
    )


def _resolve(base: Path, cell: str) -> Path:
    return Path(os.path.abspath(base / Path(cell).expanduser()))  # absolute, '..' folded, links kept


_LABELLED = re.compile(r"^(?P<path>.+)#(?P<label>\d+)$")


def parse_mask_cell(base: Path, cell: str) -> MaskSpec:
    """A manifest mask cell: ``path`` (binary mask) or ``path#label`` (one label of a label map)."""
    m = _LABELLED.match(cell)
    if m:
        return MaskSpec(_resolve(base, m["path"].strip()), int(m["label"]))
    return MaskSpec(_resolve(base, cell))


def read_manifest(csv_path: Path, organs: list[str]) -> dict[str, Entry]:
    """Read a manifest CSV (columns patient, image, optional landmarks, mask:<organ> per organ)."""
    if csv_path.is_dir() and (csv_path / "dataset.json").is_file():
        raise DataError(
            f"manifest {csv_path} is a folder in nnU-Net layout; "
            f"use data.source = \"nnunet\" with data.nnunet.root = \"{csv_path}\""
        )
    if csv_path.is_dir():
        raise DataError(f"manifest {csv_path}: is a folder; expected a CSV file")
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path}: file not found")
    base = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        _check_columns(csv_path, header, organs)
        col = {name: i for i, name in reversed(list(enumerate(header)))}
        entries: dict[str, Entry] = {}
        for row in reader:
            cells = [c.strip() for c in row] + [""] * max(0, len(header) - len(row))
            if not any(cells):
                continue
            entry = _manifest_row(csv_path, reader.line_num, cells, col, base, organs)
            if entry.patient in entries:
                raise DataError(f"manifest {csv_path}:{reader.line_num}: duplicate patient {entry.patient!r}")
            entries[entry.patient] = entry
    if not entries:
        raise DataError(f"manifest {csv_path}: no patients")
    return entries


def _check_columns(csv_path: Path, header: list[str], organs: list[str]) -> None:
    expected = "patient, image, optional landmarks, and mask:<organ> for each configured organ"
    for name in ("patient", "image"):
        if name not in header:
            raise DataError(
                f"manifest {csv_path}: missing column {name!r} (expected {expected}; "
                f"configured organs: {', '.join(organs)})"
            )
    for organ in organs:
        if f"mask:{organ}" not in header:
            raise DataError(
                f"manifest {csv_path}: no column 'mask:{organ}' for configured organ {organ!r} "
                f"(configured organs: {', '.join(organs)}; columns: {', '.join(h for h in header if h)})"
            )


def _manifest_row(csv_path: Path, line: int, cells: list[str], col: dict[str, int], base: Path, organs: list[str]) -> Entry:
    where = f"manifest {csv_path}:{line}"
    patient = cells[col["patient"]]
    if not patient:
        raise DataError(f"{where}: empty patient id")
    image_cell = cells[col["image"]]
    if not image_cell:
        raise DataError(f"{where}: patient {patient!r} has no image")
    masks = {}
    for organ in organs:
        cell = cells[col[f"mask:{organ}"]]
        if not cell:
            raise DataError(f"{where}: patient {patient!r} has no mask for organ {organ!r}")
        masks[organ] = parse_mask_cell(base, cell)
    lm_cell = cells[col["landmarks"]] if "landmarks" in col else ""
    landmarks = _resolve(base, lm_cell) if lm_cell else None
    entry = Entry(patient, _resolve(base, image_cell), masks, landmarks, manifest=csv_path)
    for path in entry.file_list():
        if not Path(path).is_file():
            raise DataError(f"{where}: patient {patient!r}: file not found: {path}")
    return entry


# ----------------------------------------------------------------------------- manifest


class ManifestSource(EntrySource):
    name = "manifest"
    description = "patients listed in a CSV: patient, image, landmarks, mask:<organ> (a file or file#label)"

    class Params(Params):
        path: str

    def __init__(self, params, request) -> None:
        super().__init__(params, request)
        self.csv_path = Path(params.path).expanduser().resolve()

    def read_entries(self) -> dict[str, Entry]:
        return read_manifest(self.csv_path, list(self.request.organs))


# ----------------------------------------------------------------------------- VISCERAL

DEFAULT_ORGAN_IDS = {
    "kidney_right": "29662",
    "kidney_left": "29663",
    "liver": "58",
    "spleen": "86",
    "aorta": "480",
}
# The label each landmark carries in the landmark files; matching ignores case and
# treats spaces, '-' and '_' alike. Override when a release names them differently.
DEFAULT_LANDMARK_IDS = {
    "renal_pelvis_right": "renal_pelvis_right",
    "renal_pelvis_left": "renal_pelvis_left",
}


class VisceralSource(EntrySource):
    name = "visceral"
    description = "the VISCERAL Anatomy3 folders: Volumes, Segmentations (by RadLex ID), Landmarks (.fcsv)"

    class Params(Params):
        root: str
        volumes: str = "Volumes"
        segmentations: str = "Segmentations"
        landmarks: str = "Landmarks"
        modality: str = "CT"
        organ_ids: dict[str, str] = dict(DEFAULT_ORGAN_IDS)
        landmark_ids: dict[str, str] = dict(DEFAULT_LANDMARK_IDS)

    def __init__(self, params, request) -> None:
        super().__init__(params, request)
        self.root = Path(params.root).expanduser().resolve()

    def folder(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            raise DataError(f"visceral: folder not found: {path} (data.visceral.root = {self.root})")
        return path

    def read_entries(self) -> dict[str, Entry]:
        p = self.params
        organs = list(self.request.organs)
        for organ in organs:
            if organ not in p.organ_ids:
                raise DataError(
                    f"visceral: no RadLex ID for organ {organ!r}; set data.visceral.organ_ids "
                    f"(known: {', '.join(sorted(p.organ_ids))})"
                )
        volumes = self.folder(p.volumes)
        pattern = re.compile(rf"^(?P<pid>[^_]+_[^_]+_{re.escape(p.modality)}_.+?)\.nii(\.gz)?$")
        images = {m["pid"]: volumes / f.name for f in sorted(volumes.iterdir()) if (m := pattern.match(f.name))}
        if not images:
            raise DataError(f"visceral: no {p.modality} volumes (<id>_1_{p.modality}_<region>.nii.gz) in {volumes}")
        seg_names = sorted(f.name for f in self.folder(p.segmentations).iterdir())
        lm_dir = self.root / p.landmarks
        lm_names = sorted(f.name for f in lm_dir.iterdir()) if lm_dir.is_dir() else []
        labels = {name: p.landmark_ids.get(name, name) for name in self.request.landmarks}
        return {
            pid: Entry(pid, image, self._masks(pid, organs, seg_names), self._landmark_file(pid, lm_names), labels)
            for pid, image in images.items()
        }

    def _masks(self, pid: str, organs: list[str], seg_names: list[str]) -> dict[str, MaskSpec]:
        seg_dir = self.root / self.params.segmentations
        masks = {}
        for organ in organs:
            rid = self.params.organ_ids[organ]
            found = re.compile(rf"^{re.escape(pid)}_{re.escape(rid)}(_[^_.]+)?\.nii(\.gz)?$")
            match = next((n for n in seg_names if found.match(n)), None)
            if match is None:
                raise DataError(
                    f"visceral: patient {pid!r} has no segmentation of organ {organ!r} "
                    f"(RadLex {rid}: {pid}_{rid}_1.nii.gz) in {seg_dir}"
                )
            masks[organ] = MaskSpec(seg_dir / match)
        return masks

    def _landmark_file(self, pid: str, lm_names: list[str]) -> Path | None:
        for suffix in (".fcsv", ".mrk.json"):
            match = next(
                (n for n in lm_names if n == pid + suffix or (n.startswith(pid + "_") and n.endswith(suffix))), None
            )
            if match is not None:
                return self.root / self.params.landmarks / match
        return None


# ----------------------------------------------------------------------------- nnU-Net / Medical Segmentation Decathlon

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _label_value(value, key: str, where: str) -> int | list[int]:
    """A dataset.json label value: an int (a digit string is accepted), or a list of ints (a region)."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        return value
    elif isinstance(value, str) and value.strip().isdigit():
        return int(value)
    elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise DataError(f"{where}: labels[{key!r}] = {value!r} is neither a label value (int) nor a region (list of ints)")


def read_nnunet_labels(raw, where: str) -> dict[str, int | list[int]]:
    """dataset.json's ``labels`` as name -> value (int, or list of ints for an nnU-Net v2 region).

    nnU-Net v2 writes ``{"background": 0, "kidney": 1}``; the Decathlon (MSD) writes
    ``{"0": "background", "1": "kidney"}``: both are accepted.
    """
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{where}: 'labels' must be a non-empty table of label names and values")
    if all(str(k).strip().isdigit() for k in raw) and all(isinstance(v, str) for v in raw.values()):  # MSD
        return {str(name): int(value) for value, name in raw.items()}
    return {str(name): _label_value(value, str(name), where) for name, value in raw.items()}


class NnUNetSource(EntrySource):
    name = "nnunet"
    description = "an nnU-Net v2 / Decathlon folder: imagesTr/<case>_0000, labelsTr/<case> label maps, dataset.json"
    absent_label = "warning"  # dataset.json's labels are every case's: a case may lack an organ

    class Params(Params):
        root: str
        organ_labels: dict[str, str | int] = {}
        landmarks: str | None = None
        channel: Annotated[int, Field(ge=0, le=9999)] = 0

        @model_validator(mode="before")
        @classmethod
        def _path_is_root(cls, data):
            # ``[data] nnunet = "/data/Dataset003_Liver"`` arrives as {"path": ...}
            if isinstance(data, dict) and "path" in data and "root" not in data:
                data = {("root" if k == "path" else k): v for k, v in data.items()}
            return data

    def __init__(self, params, request) -> None:
        super().__init__(params, request)
        self.root = Path(params.root).expanduser().resolve()
        self._stacked: set[str] = set()  # cases whose image has no channel suffix (MSD: maybe 4D)

    # -- dataset.json

    def dataset_json(self) -> tuple[Path, dict]:
        import json

        path = self.root / "dataset.json"
        if not self.root.is_dir():
            raise DataError(f"nnunet: folder not found: {self.root} (data.nnunet.root)")
        if not path.is_file():
            inner = sorted(d.name for d in self.root.iterdir() if (d / "dataset.json").is_file())
            hint = f"; it holds the datasets {', '.join(inner[:8])}: set data.nnunet.root to one of them" if inner else ""
            raise DataError(f"nnunet: no dataset.json in {self.root} (data.nnunet.root){hint}")
        try:
            meta = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}: expected a JSON object")
        if "labels" not in meta:
            raise DataError(f"{path}: no 'labels' key (label name -> value)")
        return path, meta

    def organ_values(self, where: Path, labels: dict[str, int | list[int]]) -> dict[str, int]:
        """Each configured organ's label value, by ``organ_labels`` or by name."""
        by_norm: dict[str, str] = {}
        for name in labels:
            by_norm.setdefault(_norm_label(name), name)
        declared = {v for value in labels.values() for v in (value if isinstance(value, list) else [value])}
        names = ", ".join(labels)
        values = {}
        for organ in self.request.organs:
            wanted = self.params.organ_labels.get(organ, organ)
            key = f"data.nnunet.organ_labels.{organ}"
            if isinstance(wanted, str) and _norm_label(wanted) in by_norm:
                name = by_norm[_norm_label(wanted)]
                value = labels[name]
                if isinstance(value, list) and len(value) == 1:
                    value = value[0]
                if isinstance(value, list):
                    raise DataError(
                        f"nnunet: organ {organ!r} is the region label {name!r} = {value} of {where}; a region "
                        f"(several label values) cannot be one organ's mask: set {key} to one label value"
                    )
            elif isinstance(wanted, int) or (isinstance(wanted, str) and wanted.strip().isdigit()):
                value = int(wanted)
                if value not in declared:
                    raise DataError(
                        f"nnunet: {key} = {value} is not a label value of {where} "
                        f"(labels: {', '.join(f'{n} = {v}' for n, v in labels.items())})"
                    )
            elif organ in self.params.organ_labels:
                raise DataError(f"nnunet: {key} = {wanted!r} is not a label of {where} (labels: {names})")
            else:
                raise DataError(
                    f"nnunet: organ {organ!r} is not a label of {where} (labels: {names}); "
                    f"set {key} to a label name or value"
                )
            if value == 0:
                raise DataError(f"nnunet: organ {organ!r} would be label 0 (background) of {where}; set {key}")
            values[organ] = value
        return values

    # -- cases

    def read_entries(self) -> dict[str, Entry]:
        import logging

        where, meta = self.dataset_json()
        ending = meta.get("file_ending", ".nii.gz")
        if not isinstance(ending, str) or not ending.startswith("."):
            raise DataError(f"{where}: file_ending {ending!r} must be a suffix such as \".nii.gz\"")
        channels = meta.get("channel_names", meta.get("modality"))
        channel = self.params.channel
        if isinstance(channels, dict) and channels and str(channel) not in {str(k) for k in channels}:
            shown = ", ".join(f"{k} = {v}" for k, v in channels.items())
            raise DataError(f"nnunet: data.nnunet.channel = {channel} is not a channel of {where} ({shown})")
        values = self.organ_values(where, read_nnunet_labels(meta["labels"], str(where)))
        images_dir, labels_dir = self.root / "imagesTr", self.root / "labelsTr"
        for folder in (images_dir, labels_dir):
            if not folder.is_dir():
                raise DataError(f"nnunet: folder not found: {folder} (data.nnunet.root = {self.root})")

        def cases(folder: Path) -> dict[str, Path]:  # hidden files ('._x' from macOS archives) are skipped
            return {
                f.name[: -len(ending)]: f
                for f in sorted(folder.iterdir())
                if f.name.endswith(ending) and len(f.name) > len(ending) and not f.name.startswith(".")
            }

        labels, images = cases(labels_dir), cases(images_dir)
        if not labels:
            raise DataError(f"nnunet: no label maps (<case>{ending}) in {labels_dir}")
        for stem, path in images.items():
            m = _CHANNEL.match(stem)
            if stem not in labels and not (m and m["case"] in labels):
                case = m["case"] if m else stem
                raise DataError(f"nnunet: image {path} has no label map {labels_dir / (case + ending)}")
        lm_dir = None
        if self.params.landmarks is not None:
            lm_dir = self.root / Path(self.params.landmarks).expanduser()
            if not lm_dir.is_dir():
                raise DataError(f"nnunet: landmark folder not found: {lm_dir} (data.nnunet.landmarks)")
        entries = {}
        self._stacked = set()
        for case, label_path in labels.items():
            suffixed = f"{case}_{channel:04d}"
            if suffixed in images:
                image = images[suffixed]
            elif case in images:
                image = images[case]
                self._stacked.add(case)
            else:
                others = sorted(s for s in images if (m := _CHANNEL.match(s)) and m["case"] == case)
                found = ", ".join(images[s].name for s in others)
                found = f" (found {found}; data.nnunet.channel = {channel})" if others else ""
                raise DataError(
                    f"nnunet: label map {label_path} has no image {images_dir / (suffixed + ending)}{found}"
                )
            masks = {organ: MaskSpec(label_path, value) for organ, value in values.items()}
            entries[case] = Entry(case, image, masks, self._landmark_file(lm_dir, case), manifest=where)
        expected = meta.get("numTraining")
        if isinstance(expected, int) and not isinstance(expected, bool) and expected != len(entries):
            logging.getLogger("mtlbench.data").warning(
                "nnunet: %s says numTraining = %d, but %s holds %d labelled cases with images",
                where, expected, self.root, len(entries),
            )
        return entries

    @staticmethod
    def _landmark_file(lm_dir: Path | None, case: str) -> Path | None:
        if lm_dir is None:
            return None
        for suffix in (".fcsv", ".mrk.json"):
            if (lm_dir / (case + suffix)).is_file():
                return lm_dir / (case + suffix)
        return None

    def load(self, patient_id: str) -> Patient:
        entry = self.entry(patient_id)
        with patient_context(patient_id):
            volume = self._channel_volume(entry) if patient_id in self._stacked else None
        return load_entry(entry, self.request, volume, absent_label=self.absent_label)

    def _channel_volume(self, entry: Entry):
        """An image without a channel suffix (the Decathlon's form): 3D, or 4D with the channels last."""
        import SimpleITK as sitk

        from mtlbench.data.io import check_complete, geometry_of

        channel = self.params.channel
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(entry.image))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None  # not readable here: load_entry reports it
        if reader.GetDimension() != 4:
            if channel != 0:
                raise DataError(
                    f"nnunet: image {entry.image} is {reader.GetDimension()}D, so it has no channel {channel} "
                    f"(data.nnunet.channel)"
                )
            return None
        size = list(reader.GetSize())
        if channel >= size[3]:
            raise DataError(
                f"nnunet: image {entry.image} has {size[3]} channels, not channel {channel} (data.nnunet.channel)"
            )
        check_complete(entry.image)
        try:
            image = sitk.ReadImage(str(entry.image))
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or ["unknown error"])[-1][:300]
            raise DataError(f"{entry.image}: cannot read volume: {reason}") from None
        if image.GetNumberOfComponentsPerPixel() != 1:
            n = image.GetNumberOfComponentsPerPixel()
            raise DataError(f"{entry.image}: has {n} components per voxel; expected a scalar volume")
        volume = sitk.Extract(image, size[:3] + [0], [0, 0, 0, channel])
        return sitk.GetArrayFromImage(volume), geometry_of(volume)


# ----------------------------------------------------------------------------- phantom


class PhantomSource(EntrySource):
    name = "phantom"
    description = "a synthetic abdominal CT phantom (generated once into the cache folder); the default"

    class Params(Params):
        patients: Annotated[int, Field(ge=2)] = 20
        seed: Annotated[int, Field(ge=0)] = 0
        dir: str | None = None

    def folder(self) -> Path:
        from mtlbench.builtin.phantom import PHANTOM_VERSION
        from mtlbench.paths import cache_dir

        p = self.params
        if p.dir is not None:
            return Path(p.dir).expanduser().resolve()
        return cache_dir() / "phantom" / f"v{PHANTOM_VERSION}-n{p.patients}-s{p.seed}"

    def read_entries(self) -> dict[str, Entry]:
        from mtlbench.builtin.phantom import ensure_phantom

        manifest = ensure_phantom(self.folder(), self.params.patients, self.params.seed)
        return read_manifest(Path(manifest).resolve(), list(self.request.organs))


@hookimpl
def register_datasets(register):
    register(ManifestSource)
    register(VisceralSource)
    register(NnUNetSource)
    register(PhantomSource)


def data_phantom(out: "Path", patients: int = 20, seed: int = 0) -> None:
    """Write the synthetic abdominal-CT phantom (NIfTI, .fcsv, manifest.csv) into OUT."""
    import typer
    from rich.progress import Progress

    from mtlbench.builtin.phantom import generate_phantom

    with Progress(transient=True) as bar:
        job = bar.add_task("phantom", total=patients)
        manifest = generate_phantom(out, patients, seed, progress=lambda i: bar.update(job, completed=i))
    typer.echo(str(manifest))


@hookimpl
def register_commands(app):
    """``mtlbench data phantom OUT``: the phantom source's files, without running a benchmark."""
    import typer

    from mtlbench.cli import data_app

    def phantom(
        out: Path = typer.Argument(..., help="Folder to create (must not exist or be empty)."),
        patients: int = typer.Option(20, "--patients", "-n", min=2, help="Number of patients."),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same bytes)."),
    ) -> None:
        """Write the synthetic abdominal-CT phantom (NIfTI, .fcsv, manifest.csv) into OUT."""
        data_phantom(out, patients, seed)

    data_app.command("phantom")(phantom)
