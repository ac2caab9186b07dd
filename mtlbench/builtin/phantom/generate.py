"""Phantom data sets on disk: each patient's NIfTI and .fcsv files, the manifest and the .complete
marker, parallel generation and atomic publishing of the folder.

:func:`generate_phantom` writes a data set (``<pid>_ct.nii.gz``, ``<pid>_<organ>.nii.gz``,
``<pid>_landmarks.fcsv``, ``manifest.csv``, ``.complete``) into a temporary sibling folder and
renames it into place; :func:`ensure_phantom` reuses a complete set or generates one, safely
under races.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from mtlbench.builtin.phantom.patient import ORGANS, PhantomPatient, patient_id, phantom_patient
from mtlbench.errors import DataError


#: Bump whenever the generated files change for the same (patients, seed).
PHANTOM_VERSION: int = 2

MANIFEST_COLUMNS: tuple[str, ...] = ("patient", "image", "landmarks") + tuple(f"mask:{o}" for o in ORGANS)
MARKER = ".complete"


def _write_patient(folder: Path, pid: str, p: PhantomPatient) -> dict[str, str]:
    from mtlbench.data.io import write_volume
    from mtlbench.data.landmarks import write_fcsv

    row = {"patient": pid, "image": f"{pid}_ct.nii.gz", "landmarks": f"{pid}_landmarks.fcsv"}
    write_volume(folder / row["image"], p.image, p.geometry, dtype=np.int16)
    for organ in ORGANS:
        name = f"{pid}_{organ}.nii.gz"
        write_volume(folder / name, p.masks[organ], p.geometry, dtype=np.uint8)
        row[f"mask:{organ}"] = name
    write_fcsv(folder / row["landmarks"], p.landmarks, coordinate_system="LPS")
    return row


def _marker(patients: int, seed: int) -> dict[str, object]:
    return {"generator": "mtlbench.phantom", "version": PHANTOM_VERSION, "patients": patients, "seed": seed}


def _check_args(patients: int, seed: int) -> None:
    if not isinstance(patients, int) or patients < 1:
        raise DataError(f"phantom: patients must be a positive integer, got {patients!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"phantom: seed must be a non-negative integer, got {seed!r}")


def _make_patient(folder: Path, seed: int, index: int) -> dict[str, str]:
    """Build and write patient ``index`` (runs in a worker process when generating in parallel)."""
    return _write_patient(folder, patient_id(index), phantom_patient(np.random.default_rng([seed, index]), index))


def default_workers(patients: int) -> int:
    """Worker processes for ``patients`` patients: one per available core (at most 4), and none
    (in-process) below 4 patients, where starting workers (~1.5 s each) does not pay."""
    from mtlbench.devices import available_cpus

    return 1 if patients < 4 else max(1, min(available_cpus(), 4, patients))


def _generate_into(folder: Path, patients: int, seed: int, progress: Callable[[int], None] | None,
                   workers: int | None = None) -> None:
    workers = default_workers(patients) if workers is None else max(1, min(int(workers), patients))
    rows: dict[int, dict[str, str]] = {}
    if workers == 1:
        for i in range(patients):
            rows[i] = _make_patient(folder, seed, i)
            if progress is not None:
                progress(len(rows))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the caller may hold threads (torch, ray) that fork would break
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(_make_patient, folder, seed, i): i for i in range(patients)}
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                if progress is not None:
                    progress(len(rows))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[i] for i in range(patients))
    (folder / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
    (folder / MARKER).write_text(json.dumps(_marker(patients, seed)) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _temp_sibling(out_dir: Path):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_phantom(out_dir: Path, patients: int, seed: int, progress: Callable[[int], None] | None = None,
                     workers: int | None = None) -> Path:
    """Write a phantom data set of ``patients`` patients to ``out_dir``; return its manifest.csv.

    The set is written into a temporary sibling folder and renamed to ``out_dir`` when complete.
    ``progress`` is called after each patient with the number of patients written so far.
    ``workers`` processes build patients in parallel (default: :func:`default_workers`); the files
    are the same whatever the number. An existing non-empty ``out_dir`` is a DataError.
    """
    out_dir = Path(out_dir)
    _check_args(patients, seed)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not empty; choose a new folder for the phantom")
    with _temp_sibling(out_dir) as tmp:
        _generate_into(tmp, patients, seed, progress, workers)
        _publishable(tmp)
        try:
            os.rename(tmp, out_dir)  # also replaces an empty directory
        except OSError:
            raise DataError(f"{out_dir}: appeared while the phantom was generated; not overwritten") from None
    return out_dir / "manifest.csv"


def _publishable(folder: Path) -> None:
    """Give the temporary folder (created 0700) the permissions a normal mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def phantom_complete(out_dir: Path, patients: int, seed: int) -> bool:
    """True when ``out_dir`` holds a complete phantom set of this version, size and seed."""
    try:
        marker = json.loads((Path(out_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == _marker(patients, seed) and (Path(out_dir) / "manifest.csv").is_file()


def ensure_phantom(out_dir: Path, patients: int, seed: int, workers: int | None = None) -> Path:
    """Return ``out_dir/manifest.csv``, generating the phantom there first unless a matching set exists.

    A phantom set of another version, size or seed is replaced; a folder that is not a phantom
    set is a DataError. Concurrent callers are safe: each generates into its own temporary folder
    and the first rename wins; the others use the winner's set.
    """
    out_dir = Path(out_dir)
    _check_args(patients, seed)
    manifest = out_dir / "manifest.csv"
    if phantom_complete(out_dir, patients, seed):
        return manifest
    _refuse_foreign(out_dir)
    with _temp_sibling(out_dir) as tmp:
        _generate_into(tmp, patients, seed, None, workers)
        _publishable(tmp)
        for _ in range(5):
            if phantom_complete(out_dir, patients, seed):
                return manifest
            try:
                os.rename(tmp, out_dir)
                return manifest
            except OSError:
                pass
            _refuse_foreign(out_dir)
            # a stale phantom set: move it aside (atomically), then retry the rename
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            try:
                os.rename(out_dir, trash / "set")
            except OSError:
                pass
            finally:
                shutil.rmtree(trash, ignore_errors=True)
    if phantom_complete(out_dir, patients, seed):
        return manifest
    raise DataError(f"{out_dir}: could not install the phantom set (another process keeps replacing it)")


def _refuse_foreign(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).is_file())):
        raise DataError(f"{out_dir}: exists and is not a phantom data set; not overwritten")
