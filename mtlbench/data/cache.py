"""The HDF5 slice cache: its content key, building it once (atomically, under a lock) and reading it back.

Layout (format 2; docs/results.md describes it for users): file attrs
``format_version``, ``key``, ``organs``, ``landmarks``, ``settings``,
``targets`` (json: task label -> its declared ``Target`` fields),
``patients`` (json list of ids in source order) and ``complete``; one group
``/patients/<id>`` per patient with datasets ``image`` (S, H, W) float32,
``labels`` (S, H, W) uint8, ``orig_labels`` (Z, Y, X) uint8, attrs
``index_to_physical``, ``geometry``, ``landmark_names``,
``landmark_positions``, ``files``, and each task's targets under
``/patients/<id>/targets/<task label>/<target name>`` (per-slice ones with
the slice axis first, chunked one slice at a time; gzip level 1 + shuffle).

What invalidates a cache (changes its key, hence its file name): the format
version; any ``[preprocess]`` setting; ``data.organs``, ``data.landmarks``,
``data.mask_mismatch``, ``data.geometry_tolerance``; for every task that
declares targets, its label, plugin name, ``target_version``, declared
targets and ``target_settings()``; the dataset source's name and parameters;
the patient ids and the bytes of every file the source reads for them. Moving
or renaming input files with unchanged content does not, and neither does a
setting no cached array depends on (a learning rate, a loss weight).
``experiment.name`` only names the file.

Concurrency: the builder holds an exclusive ``fcntl.flock`` on
``<file>.lock`` and writes a temporary file beside the cache that is renamed
into place when complete, so a cache file is never modified after it appears.
Readers therefore open it read-only with HDF5 file locking switched off
(``locking=False``), which keeps parallel readers working on file systems
without POSIX locks (NFS, some container mounts); no environment variable is
needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mtlbench.api import CachedPatient, DatasetSource, Geometry, Landmark, Target, Task
from mtlbench.data.preprocess import preprocess_patient
from mtlbench.errors import DataError
from mtlbench.fsutil import atomic_path
from mtlbench.paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.config import Config

FORMAT_VERSION = 2
_BLOCK = 1 << 20
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
_DATASETS = ("image", "labels", "orig_labels")
TARGETS = "targets"

# (path, size, mtime_ns, inode) -> sha256: files are hashed once per process.
_HASH_MEMO: dict[tuple[str, int, int, int], str] = {}


# ----------------------------------------------------------------------------- key


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks), or of a folder's files in sorted order."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise DataError(f"{p}: cannot read input file ({exc.strerror or exc})") from None
    if p.is_dir():
        h = hashlib.sha256()
        for child in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(child.relative_to(p)).encode())
            h.update(file_digest(child).encode())
        return h.hexdigest()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo in _HASH_MEMO:
        return _HASH_MEMO[memo]
    h = hashlib.sha256()
    try:
        with p.open("rb") as fh:
            while block := fh.read(_BLOCK):
                h.update(block)
    except OSError as exc:
        raise DataError(f"{p}: cannot read input file ({exc.strerror or exc})") from None
    _HASH_MEMO[memo] = h.hexdigest()
    return _HASH_MEMO[memo]


def target_path(pid: str, label: str, name: str) -> str:
    """Where a task's target of one patient lives in the cache file."""
    return f"patients/{pid}/{TARGETS}/{label}/{name}"


def task_settings(tasks: Mapping[str, Task]) -> dict[str, Any]:
    """The part of the cache key that comes from the tasks: only those that declare targets."""
    out: dict[str, Any] = {}
    for label, task in tasks.items():
        declared = task.targets()
        if not declared:
            continue
        out[label] = {
            "task": getattr(task, "name", type(task).__name__),
            "class": f"{type(task).__module__}.{type(task).__qualname__}",
            "target_version": int(getattr(task, "target_version", 1)),
            "targets": [asdict(t) for t in declared],
            "settings": task.target_settings(),
        }
    return out


def _settings(cfg: "Config", tasks: Mapping[str, Task]) -> dict[str, Any]:
    """The configuration that determines the cache content."""
    return {
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "organs": list(cfg.data.organs),
        "landmarks": list(cfg.data.landmarks),
        "mask_mismatch": cfg.data.mask_mismatch,
        "geometry_tolerance": cfg.data.geometry_tolerance,
        "tasks": task_settings(tasks),
    }


def _source_params(source: DatasetSource) -> Any:
    params = getattr(source, "params", None)
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    return params


def cache_key(
    cfg: "Config", source: DatasetSource, tasks: Mapping[str, Task], patient_ids: Sequence[str] | None = None
) -> str:
    """sha256 hex of everything that determines the cache content (see the module docstring)."""
    ids = list(source.patient_ids()) if patient_ids is None else list(patient_ids)
    payload = {
        "format_version": FORMAT_VERSION,
        "settings": _settings(cfg, tasks),
        "source": {"name": getattr(source, "name", type(source).__name__), "params": _source_params(source)},
        "patients": [[pid, [file_digest(f) for f in source.files(pid)]] for pid in ids],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_file(cfg: "Config", key: str) -> Path:
    """Where the cache with ``key`` lives: <cache_dir>/slices/<experiment>-<key[:16]>.h5."""
    return cache_dir() / "slices" / f"{cfg.experiment.name}-{key[:16]}.h5"


# ----------------------------------------------------------------------------- building


def build_cache(cfg: "Config", manager: Any = None, progress: bool = False, console: Any = None) -> Path:
    """Return the path of a complete slice cache for ``cfg``, building it first if needed.

    A valid cache (``complete`` set, same key and format version, every patient
    and target present) is reused untouched. Anything else at that path is
    deleted and rebuilt. A DataError while loading a patient stops the build
    and leaves no file behind.
    """
    from mtlbench.assemble import make_source, make_tasks

    source = make_source(cfg, manager)
    tasks = make_tasks(cfg, manager)
    ids = _checked_ids(source)
    key = cache_key(cfg, source, tasks, ids)
    path = cache_file(cfg, key)
    declared = {label: [t.name for t in task.targets()] for label, task in tasks.items()}
    if _is_valid(path, key, ids, declared):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path):
        if _is_valid(path, key, ids, declared):  # another process built it while we waited
            return path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with atomic_path(path, suffix=".h5") as tmp:
            _write_cache(tmp, cfg, source, tasks, ids, key, progress, console)
    return path


def _checked_ids(source: DatasetSource) -> list[str]:
    ids = [str(p) for p in source.patient_ids()]
    name = getattr(source, "name", type(source).__name__)
    if not ids:
        raise DataError(f"dataset source {name!r} has no patients")
    seen: set[str] = set()
    for pid in ids:
        if pid in seen:
            raise DataError(f"dataset source {name!r}: patient id {pid!r} appears twice")
        if not pid or "/" in pid or pid in (".", ".."):
            raise DataError(f"dataset source {name!r}: patient id {pid!r} is not usable (empty, '.', '..' or with '/')")
        seen.add(pid)
    return ids


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` (blocks while another process builds)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _open_read(path: str | Path) -> Any:
    import h5py

    return h5py.File(path, "r", locking=False)


def _is_valid(path: Path, key: str, ids: Sequence[str], declared: Mapping[str, Sequence[str]]) -> bool:
    if not path.is_file():
        return False
    try:
        with _open_read(path) as f:
            if not bool(f.attrs.get("complete", False)):
                return False
            if f.attrs.get("key") != key or int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                return False
            for pid in ids:
                grp = f.get(f"patients/{pid}")
                if grp is None or any(name not in grp for name in _DATASETS):
                    return False
                for label, names in declared.items():
                    if any(f"{TARGETS}/{label}/{n}" not in grp for n in names):
                        return False
    except Exception:  # unreadable / truncated / not HDF5: rebuild
        return False
    return True


def _write_cache(
    tmp: Path,
    cfg: "Config",
    source: DatasetSource,
    tasks: Mapping[str, Task],
    ids: list[str],
    key: str,
    progress: bool,
    console: Any,
) -> None:
    import h5py

    settings = _settings(cfg, tasks)
    with h5py.File(tmp, "w") as f, _progress(progress, console, len(ids)) as (show, done):
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["key"] = key
        f.attrs["organs"] = json.dumps(settings["organs"])
        f.attrs["landmarks"] = json.dumps(settings["landmarks"])
        f.attrs["settings"] = json.dumps(settings)
        f.attrs["targets"] = json.dumps({label: v["targets"] for label, v in settings["tasks"].items()})
        f.attrs["patients"] = json.dumps(ids)
        f.attrs["complete"] = False
        root = f.create_group("patients")
        for pid in ids:
            show(pid)
            patient = source.load(pid)
            if patient.id != pid:
                raise DataError(f"dataset source returned patient {patient.id!r} when asked for {pid!r}")
            _write_patient(root.create_group(pid), preprocess_patient(patient, cfg, tasks), tasks)
            done()
        f.attrs["complete"] = True


def _write_patient(grp: Any, p: CachedPatient, tasks: Mapping[str, Task]) -> None:
    s, h, w = p.image.shape
    grp.create_dataset("image", data=p.image, chunks=(1, h, w), **_COMPRESSION)
    grp.create_dataset("labels", data=p.labels, chunks=(1, h, w), **_COMPRESSION)
    z, y, x = p.orig_labels.shape
    grp.create_dataset("orig_labels", data=p.orig_labels, chunks=(1, y, x), **_COMPRESSION)
    grp.attrs["index_to_physical"] = np.asarray(p.index_to_physical, dtype=np.float64)
    grp.attrs["geometry"] = json.dumps(p.geometry.to_dict())
    grp.attrs["landmark_names"] = json.dumps([lm.name for lm in p.landmarks])
    grp.attrs["landmark_positions"] = np.array([lm.position for lm in p.landmarks], dtype=np.float64).reshape(-1, 3)
    grp.attrs["files"] = json.dumps(p.files)
    for label, arrays in p.targets.items():
        tgrp = grp.create_group(f"{TARGETS}/{label}")
        for t in tasks[label].targets():
            arr = arrays[t.name]
            if arr.size == 0:
                tgrp.create_dataset(t.name, data=arr)
            elif t.per_slice:
                tgrp.create_dataset(t.name, data=arr, chunks=(1,) + arr.shape[1:], **_COMPRESSION)
            else:
                tgrp.create_dataset(t.name, data=arr, **_COMPRESSION)


@contextlib.contextmanager
def _progress(enabled: bool, console: Any, total: int) -> Iterator[tuple[Any, Any]]:
    """Yields ``(show, done)``: ``show(pid)`` before a patient, ``done()`` after it."""
    if not enabled:
        yield (lambda pid: None), (lambda: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]preparing slices"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[patient]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("prepare", total=total, patient="")
        yield (lambda pid: bar.update(task, patient=pid)), (lambda: bar.advance(task))


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CacheInfo:
    """What a cache file holds (read from its attributes only)."""

    path: Path
    key: str
    organs: tuple[str, ...]
    landmarks: tuple[str, ...]
    patients: tuple[str, ...]
    slice_size: tuple[int, int]
    targets: dict[str, tuple[Target, ...]] = field(default_factory=dict, compare=False)
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    def slice_targets(self) -> list[tuple[str, Target]]:
        """(task label, target) of every per-slice target, in config order."""
        return [(label, t) for label, ts in self.targets.items() for t in ts if t.per_slice]


@dataclass
class SliceData:
    """Slices of several patients stacked for training.

    ``targets`` maps ``"<task label>/<target name>"`` to the per-slice
    targets stacked the same way (N, ...).
    """

    image: np.ndarray  # (N, H, W) float32
    labels: np.ndarray  # (N, H, W) uint8
    targets: dict[str, np.ndarray]
    patient_index: np.ndarray  # (N,) int32 index into ``patients``
    slice_index: np.ndarray  # (N,) int32 slice number within the patient
    patients: list[str]

    def __len__(self) -> int:
        return int(self.image.shape[0])


@contextlib.contextmanager
def _open_complete(path: str | Path) -> Iterator[Any]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: slice cache not found (run 'mtlbench data prepare CONFIG')")
    try:
        f = _open_read(p)
    except OSError as exc:
        raise DataError(f"{p}: not a readable HDF5 slice cache ({exc})") from None
    with f:
        if not bool(f.attrs.get("complete", False)):
            raise DataError(f"{p}: slice cache is incomplete (run 'mtlbench data prepare CONFIG')")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise DataError(f"{p}: slice cache format {version}, expected {FORMAT_VERSION}; prepare it again")
        yield f


def open_cache(path: str | Path) -> CacheInfo:
    """Read a complete cache's metadata (DataError if missing, incomplete or of another format)."""
    with _open_complete(path) as f:
        a = f.attrs
        ids = tuple(json.loads(a["patients"])) if "patients" in a else tuple(f["patients"].keys())
        settings = json.loads(a["settings"])
        size = settings["preprocess"]["slice_size"]
        targets = {
            label: tuple(Target(**{**t, "channels": int(t["channels"])}) for t in ts)
            for label, ts in json.loads(a["targets"]).items()
        }
        return CacheInfo(
            path=Path(path),
            key=str(a["key"]),
            organs=tuple(json.loads(a["organs"])),
            landmarks=tuple(json.loads(a["landmarks"])),
            patients=ids,
            slice_size=(int(size[0]), int(size[1])),
            targets=targets,
            settings=settings,
        )


def _patient_group(f: Any, path: str | Path, pid: str) -> Any:
    grp = f.get(f"patients/{pid}") if pid and "/" not in pid else None
    if grp is None:
        raise DataError(f"{path}: no patient {pid!r} in the slice cache")
    return grp


def selected_slices(labels: np.ndarray, only_with_organs: bool, margin: int) -> np.ndarray:
    """Slice numbers to use: all, or those with any organ label plus ``margin`` slices either side."""
    n = labels.shape[0]
    if not only_with_organs:
        return np.arange(n)
    has = labels.reshape(n, -1).any(axis=1)
    if margin > 0 and has.any():
        from scipy.ndimage import binary_dilation

        has = binary_dilation(has, iterations=margin)
    return np.flatnonzero(has)


def load_slices(
    path: str | Path,
    patient_ids: Sequence[str],
    only_with_organs: bool = False,
    margin: int = 0,
    tasks: Sequence[str] | None = None,
) -> SliceData:
    """Stack the slices of ``patient_ids`` (in that order) into training arrays.

    ``tasks`` limits the per-slice targets to those task labels (default: all
    in the cache). ``only_with_organs`` keeps only slices with any organ label
    (plus ``margin`` slices either side); the cache itself always holds every slice.
    """
    ids = list(patient_ids)
    info = open_cache(path)
    wanted = [(label, t) for label, t in info.slice_targets() if tasks is None or label in tasks]
    with _open_complete(path) as f:
        groups = [_patient_group(f, path, pid) for pid in ids]
        keep = [selected_slices(g["labels"][...], only_with_organs, margin) for g in groups]
        total = int(sum(len(k) for k in keep))
        h, w = info.slice_size
        out = SliceData(
            image=np.empty((total, h, w), dtype=np.float32),
            labels=np.empty((total, h, w), dtype=np.uint8),
            targets={
                f"{label}/{t.name}": np.empty((total,) + t.slice_shape((h, w)), dtype=t.dtype) for label, t in wanted
            },
            patient_index=np.empty(total, dtype=np.int32),
            slice_index=np.empty(total, dtype=np.int32),
            patients=ids,
        )
        start = 0
        for n, (grp, sel) in enumerate(zip(groups, keep)):
            stop = start + len(sel)
            full = len(sel) == grp["image"].shape[0]
            pick = (lambda a: a) if full else (lambda a: a[sel])
            out.image[start:stop] = pick(grp["image"][...])
            out.labels[start:stop] = pick(grp["labels"][...])
            for label, t in wanted:
                out.targets[f"{label}/{t.name}"][start:stop] = pick(_dataset(grp, path, label, t.name)[...])
            out.patient_index[start:stop] = n
            out.slice_index[start:stop] = sel
            start = stop
    return out


def _dataset(grp: Any, path: str | Path, label: str, name: str) -> Any:
    node = grp.get(f"{TARGETS}/{label}/{name}")
    if node is None:
        raise DataError(f"{path}: patient {grp.name.rsplit('/', 1)[-1]!r} has no target {label}/{name}; prepare the cache again")
    return node


def load_patient(path: str | Path, pid: str, arrays: bool = True) -> CachedPatient:
    """Everything the cache holds about patient ``pid`` (DataError if unknown).

    ``arrays=False`` reads only the metadata (grid, geometry, landmarks): the
    image, label maps and targets come back empty.
    """
    with _open_complete(path) as f:
        grp = _patient_group(f, path, pid)
        names = json.loads(grp.attrs["landmark_names"])
        positions = np.asarray(grp.attrs["landmark_positions"], dtype=np.float64).reshape(-1, 3)
        targets: dict[str, dict[str, np.ndarray]] = {}
        if arrays and TARGETS in grp:
            for label, tgrp in grp[TARGETS].items():
                targets[label] = {name: ds[...] for name, ds in tgrp.items()}
        empty = np.zeros((0, 0, 0), dtype=np.float32)
        return CachedPatient(
            id=pid,
            shape=tuple(int(v) for v in grp["image"].shape),  # type: ignore[arg-type]
            image=grp["image"][...] if arrays else empty,
            labels=grp["labels"][...] if arrays else empty.astype(np.uint8),
            orig_labels=grp["orig_labels"][...] if arrays else empty.astype(np.uint8),
            index_to_physical=np.asarray(grp.attrs["index_to_physical"], dtype=np.float64),
            geometry=Geometry.from_dict(json.loads(grp.attrs["geometry"])),
            landmarks=[Landmark(n, tuple(float(v) for v in pos)) for n, pos in zip(names, positions)],
            files=json.loads(grp.attrs["files"]),
            targets=targets,
        )
