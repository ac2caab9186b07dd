"""The HDF5 slice cache: its content key, building it once (atomically, under a lock) and reading it back.

Layout (see the project contract): file attrs ``format_version``, ``key``,
``organs``, ``landmarks``, ``heatmap_groups``, ``settings``, ``patients``
(json list of ids in source order) and ``complete``; one group
``/patients/<id>`` per patient with datasets ``image`` (S, H, W) float32,
``labels`` (S, H, W) uint8, ``heatmaps`` (C, S, H, W) float32 (chunked per
slice, gzip level 1 + shuffle), ``orig_labels`` (Z, Y, X) uint8 and attrs
``index_to_physical``, ``geometry``, ``landmark_names``,
``landmark_positions``, ``files``.

What invalidates a cache (changes its key, hence its file name): the format
version; any ``[preprocess]`` setting; ``data.organs``, ``data.landmarks``,
``data.mask_mismatch``, ``data.geometry_tolerance``; the resolved heatmap
groups; the dataset source's name and parameters; the patient ids and the
bytes of every file the source reads for them. Moving or renaming input files
with unchanged content does not. ``experiment.name`` only names the file.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mtlbench.api import DatasetInfo, DatasetSource, Geometry, Landmark
from mtlbench.data.preprocess import PreparedPatient, heatmap_groups, preprocess_patient
from mtlbench.errors import DataError
from mtlbench.fsutil import atomic_path
from mtlbench.paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.config import Config

FORMAT_VERSION = 1
_BLOCK = 1 << 20
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
_DATASETS = ("image", "labels", "heatmaps", "orig_labels")

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


def _settings(cfg: "Config") -> dict[str, Any]:
    """The configuration that determines the cache content."""
    return {
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "organs": list(cfg.data.organs),
        "landmarks": list(cfg.data.landmarks),
        "heatmap_groups": heatmap_groups(cfg),
        "mask_mismatch": cfg.data.mask_mismatch,
        "geometry_tolerance": cfg.data.geometry_tolerance,
    }


def _source_params(source: DatasetSource) -> Any:
    params = getattr(source, "params", None)
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    return params


def cache_key(cfg: "Config", source: DatasetSource, patient_ids: Sequence[str] | None = None) -> str:
    """sha256 hex of everything that determines the cache content (see the module docstring)."""
    ids = list(source.patient_ids()) if patient_ids is None else list(patient_ids)
    payload = {
        "format_version": FORMAT_VERSION,
        "settings": _settings(cfg),
        "source": {"name": getattr(source, "name", type(source).__name__), "params": _source_params(source)},
        "patients": [[pid, [file_digest(f) for f in source.files(pid)]] for pid in ids],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_file(cfg: "Config", source: DatasetSource, key: str | None = None) -> Path:
    """Where the cache for ``cfg`` and ``source`` lives: <cache_dir>/slices/<experiment>-<key[:16]>.h5."""
    key = key or cache_key(cfg, source)
    return cache_dir() / "slices" / f"{cfg.experiment.name}-{key[:16]}.h5"


# ----------------------------------------------------------------------------- building


def make_source(cfg: "Config", manager: Any = None) -> DatasetSource:
    """Instantiate the configured dataset source from the plugin registry."""
    from mtlbench.config import validate_params
    from mtlbench.plugins import get_manager

    manager = manager or get_manager()
    cls = manager.get("datasets", cfg.data.source).obj
    params = validate_params(cls.Params, cfg.source_params(), f"data.{cfg.data.source}")
    return cls(params, cfg)


def build_cache(cfg: "Config", manager: Any = None, progress: bool = False, console: Any = None) -> Path:
    """Return the path of a complete slice cache for ``cfg``, building it first if needed.

    A valid cache (``complete`` set, same key and format version, every patient
    present) is reused untouched. Anything else at that path is deleted and
    rebuilt. A DataError while loading a patient stops the build and leaves no
    file behind.
    """
    source = make_source(cfg, manager)
    ids = _checked_ids(source)
    key = cache_key(cfg, source, ids)
    path = cache_file(cfg, source, key)
    if _is_valid(path, key, ids):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path):
        if _is_valid(path, key, ids):  # another process built it while we waited
            return path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with atomic_path(path, suffix=".h5") as tmp:
            _write_cache(tmp, cfg, source, ids, key, progress, console)
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


def _is_valid(path: Path, key: str, ids: Sequence[str]) -> bool:
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
    except Exception:  # unreadable / truncated / not HDF5: rebuild
        return False
    return True


def _write_cache(
    tmp: Path, cfg: "Config", source: DatasetSource, ids: list[str], key: str, progress: bool, console: Any
) -> None:
    import h5py

    settings = _settings(cfg)
    with h5py.File(tmp, "w") as f, _progress(progress, console, len(ids)) as (show, done):
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["key"] = key
        f.attrs["organs"] = json.dumps(settings["organs"])
        f.attrs["landmarks"] = json.dumps(settings["landmarks"])
        f.attrs["heatmap_groups"] = json.dumps(settings["heatmap_groups"])
        f.attrs["settings"] = json.dumps(settings)
        f.attrs["patients"] = json.dumps(ids)
        f.attrs["complete"] = False
        root = f.create_group("patients")
        for pid in ids:
            show(pid)
            patient = source.load(pid)
            if patient.id != pid:
                raise DataError(f"dataset source returned patient {patient.id!r} when asked for {pid!r}")
            _write_patient(root.create_group(pid), preprocess_patient(patient, cfg))
            done()
        f.attrs["complete"] = True


def _write_patient(grp: Any, p: PreparedPatient) -> None:
    s, h, w = p.image.shape
    grp.create_dataset("image", data=p.image, chunks=(1, h, w), **_COMPRESSION)
    grp.create_dataset("labels", data=p.labels, chunks=(1, h, w), **_COMPRESSION)
    hm_chunks = (1, 1, h, w) if p.heatmaps.shape[0] > 0 else None
    hm_opts = _COMPRESSION if hm_chunks else {}
    grp.create_dataset("heatmaps", data=p.heatmaps, chunks=hm_chunks, **hm_opts)
    z, y, x = p.orig_labels.shape
    grp.create_dataset("orig_labels", data=p.orig_labels, chunks=(1, y, x), **_COMPRESSION)
    grp.attrs["index_to_physical"] = np.asarray(p.index_to_physical, dtype=np.float64)
    grp.attrs["geometry"] = json.dumps(p.geometry.to_dict())
    grp.attrs["landmark_names"] = json.dumps([lm.name for lm in p.landmarks])
    grp.attrs["landmark_positions"] = np.array([lm.position for lm in p.landmarks], dtype=np.float64).reshape(-1, 3)
    grp.attrs["files"] = json.dumps(p.files)


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
    groups: tuple[tuple[str, ...], ...]
    patients: tuple[str, ...]
    slice_size: tuple[int, int]
    heatmap_channels: int
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    def dataset_info(self) -> DatasetInfo:
        return DatasetInfo(
            organs=self.organs,
            landmarks=self.landmarks,
            heatmap_channels=self.heatmap_channels,
            slice_size=self.slice_size,
        )


@dataclass
class SliceData:
    """Slices of several patients stacked for training (channel axis after N for heatmaps)."""

    image: np.ndarray  # (N, H, W) float32
    labels: np.ndarray  # (N, H, W) uint8
    heatmaps: np.ndarray  # (N, C, H, W) float32
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
        groups = tuple(tuple(g) for g in json.loads(a["heatmap_groups"]))
        settings = json.loads(a["settings"])
        size = settings["preprocess"]["slice_size"]
        return CacheInfo(
            path=Path(path),
            key=str(a["key"]),
            organs=tuple(json.loads(a["organs"])),
            landmarks=tuple(json.loads(a["landmarks"])),
            groups=groups,
            patients=ids,
            slice_size=(int(size[0]), int(size[1])),
            heatmap_channels=len(groups),
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
    path: str | Path, patient_ids: Sequence[str], only_with_organs: bool = False, margin: int = 0
) -> SliceData:
    """Stack the slices of ``patient_ids`` (in that order) into training arrays.

    ``only_with_organs`` keeps only slices with any organ label (plus
    ``margin`` slices either side); the cache itself always holds every slice.
    """
    ids = list(patient_ids)
    with _open_complete(path) as f:
        groups = [_patient_group(f, path, pid) for pid in ids]
        keep = [selected_slices(g["labels"][...], only_with_organs, margin) for g in groups]
        total = int(sum(len(k) for k in keep))
        if groups:
            _, h, w = groups[0]["image"].shape
            c = groups[0]["heatmaps"].shape[0]
        else:
            h = w = c = 0
        out = SliceData(
            image=np.empty((total, h, w), dtype=np.float32),
            labels=np.empty((total, h, w), dtype=np.uint8),
            heatmaps=np.empty((total, c, h, w), dtype=np.float32),
            patient_index=np.empty(total, dtype=np.int32),
            slice_index=np.empty(total, dtype=np.int32),
            patients=ids,
        )
        start = 0
        for n, (grp, sel) in enumerate(zip(groups, keep)):
            stop = start + len(sel)
            full = len(sel) == grp["image"].shape[0]
            pick = (lambda a: a) if full else (lambda a: a[..., sel, :, :])
            out.image[start:stop] = pick(grp["image"][...])
            out.labels[start:stop] = pick(grp["labels"][...])
            out.heatmaps[start:stop] = np.moveaxis(pick(grp["heatmaps"][...]), 0, 1)
            out.patient_index[start:stop] = n
            out.slice_index[start:stop] = sel
            start = stop
    return out


def load_patient(path: str | Path, pid: str) -> PreparedPatient:
    """Everything the cache holds about patient ``pid`` (DataError if unknown)."""
    with _open_complete(path) as f:
        grp = _patient_group(f, path, pid)
        names = json.loads(grp.attrs["landmark_names"])
        positions = np.asarray(grp.attrs["landmark_positions"], dtype=np.float64).reshape(-1, 3)
        return PreparedPatient(
            id=pid,
            image=grp["image"][...],
            labels=grp["labels"][...],
            heatmaps=grp["heatmaps"][...],
            orig_labels=grp["orig_labels"][...],
            index_to_physical=np.asarray(grp.attrs["index_to_physical"], dtype=np.float64),
            geometry=Geometry.from_dict(json.loads(grp.attrs["geometry"])),
            landmarks=[Landmark(n, tuple(float(v) for v in pos)) for n, pos in zip(names, positions)],
            files=json.loads(grp.attrs["files"]),
        )
