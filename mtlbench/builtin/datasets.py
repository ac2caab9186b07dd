"""The built-in dataset sources: a CSV manifest, the VISCERAL Anatomy3 folder layout and the synthetic phantom.

SimpleITK and the IO modules are imported inside methods: this module is imported when the CLI starts.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

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
    """Shared logic of the file-based sources: subclasses list the patients' files, this class loads them."""

    _entries: dict[str, Entry] | None = None

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
        return load_entry(self.entry(patient_id), self.request)


def load_entry(entry: Entry, request: SourceRequest, volume: "tuple[np.ndarray, Geometry] | None" = None) -> Patient:
    """Read one patient's volume, the configured organs' masks and landmarks.

    ``volume`` is the image already read, (array, geometry), for sources that
    pick it out of a larger file (one channel of a 4D image); default: read ``entry.image``.
    """
    import numpy as np

    from mtlbench.data.io import mask_from_labels, read_label_image, read_volume

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
        masks[organ] = checked_mask(entry.patient, organ, spec, labels_by_file[spec.path])
    return Patient(
        id=entry.patient,
        image=image.astype(np.float32, copy=False),
        geometry=geometry,
        masks=masks,
        landmarks=_entry_landmarks(entry, request, geometry),
        files=entry.roles(),
    )


def checked_mask(patient: str, organ: str, spec: MaskSpec, labels) -> "np.ndarray":
    """The organ's bool mask from its file's values; wrong values are a DataError, an empty organ a warning.

    A binary mask (no ``#label``) may hold only 0 and 1 (anything else is a
    label map, or a corrupt file: name the label with ``file#label``).
    """
    import logging

    import numpy as np

    from mtlbench.data.io import mask_from_labels

    if spec.label is None:
        values = np.unique(labels)
        extra = [v for v in values.tolist() if v not in (0, 1)]
        if extra:
            shown = ", ".join(f"{v:g}" for v in extra[:6]) + (" ..." if len(extra) > 6 else "")
            raise DataError(
                f"patient {patient}: mask {spec.path} of organ {organ!r} holds values other than 0 and 1 ({shown}); "
                f"for one label of a label map write '{spec.path}#<label>'"
            )
    mask = mask_from_labels(labels, spec.label)
    if not mask.any():
        where = f"label {spec.label} does not occur in {spec.path}" if spec.label is not None else f"{spec.path} is empty"
        logging.getLogger("mtlbench.data").warning("patient %s: organ %r has no voxel (%s)", patient, organ, where)
    return mask


def _norm_label(label: str) -> str:
    return re.sub(r"[\s_\-]+", "_", label.strip().casefold())


def _entry_landmarks(entry: Entry, request: SourceRequest, geometry) -> list["Landmark"]:
    """The configured landmarks present in the patient's file, in configured order, inside the image."""
    from mtlbench.api import Landmark
    from mtlbench.data.landmarks import filter_inside, read_landmarks

    if entry.landmarks is None or not request.landmarks:
        return []
    by_label: dict[str, Landmark] = {}
    for lm in read_landmarks(entry.landmarks):
        by_label.setdefault(_norm_label(lm.name), lm)
    found = []
    for name in request.landmarks:
        lm = by_label.get(_norm_label(entry.landmark_labels.get(name, name)))
        if lm is not None:
            found.append(Landmark(name, lm.position))
    return filter_inside(found, geometry, entry.patient)


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
