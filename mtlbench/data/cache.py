"""The HDF5 slice cache: its content key, building it once (atomically, under a lock) and reading it back.

Layout (format 4; docs/results.md describes it for users): file attrs
``format_version``, ``key``, ``organs``, ``landmarks``, ``settings``,
``targets`` (json: task label -> its declared ``Target`` fields),
``patients`` (json list of ids in source order), ``complete`` and
``attrs_sha256``; one group ``/patients/<id>`` per patient with datasets
``image`` (S, H, W) float32, ``labels`` (S, H, W) uint8, ``orig_labels``
(Z, Y, X) uint8 (all in the canonical orientation, ``preprocess.orientation``),
attrs ``index_to_physical``, ``geometry``, ``source_geometry`` (only when
reorienting changed the image's grid), ``landmark_names``, ``landmark_positions``, ``files``, ``attrs_sha256``, and
each task's targets under ``/patients/<id>/targets/<task label>/<target
name>`` (per-slice ones with the slice axis first, chunked one slice at a
time; gzip level 1 + shuffle + fletcher32).

Integrity (formats 3 and 4): every non-empty dataset carries HDF5's fletcher32
checksum per chunk, so any read of a damaged chunk fails instead of returning
wrong numbers; the file and every patient group carry ``attrs_sha256``, the
sha256 of their other attributes (h5py keeps string attributes in HDF5's
global heap, which has no checksum of its own); the file is written with
HDF5 >= 1.10 structures (``libver="v110"``), whose object headers are
checksummed. Deciding "valid or rebuild" (:func:`cache_problem`) reads every
dataset once (about 0.3 s for the 20-patient demo cache); readers in
a trial check the attribute digests of what they open and turn any read
failure into a one-line DataError naming the file and the patient.

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
needed. A damaged file at the cache's path is named in a warning and rebuilt
under the lock.

Storage failures: the builder writes through :class:`_GuardedFile` (h5py's
``fileobj`` driver) so that a failed write (disk full, quota, I/O error)
never reaches HDF5 itself, which segfaults on close after such a failure;
the build stops after the patient being written, the temporary file is
deleted, and the error is one line naming the cache (a StorageError).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mtlbench.api import CachedPatient, DatasetSource, Geometry, Landmark, Target, Task
from mtlbench.data.preprocess import preprocess_patient
from mtlbench.errors import DataError
from mtlbench.fsutil import atomic_path, storage_errors
from mtlbench.paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.config import Config

FORMAT_VERSION = 4  # 4: volumes reindexed to preprocess.orientation, source_geometry
_BLOCK = 1 << 20
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
_LIBVER = "v110"  # HDF5 >= 1.10 structures: checksummed object headers
_DATASETS = ("image", "labels", "orig_labels")
TARGETS = "targets"
ATTRS_DIGEST = "attrs_sha256"
_REBUILD = "run 'mtlbench data prepare CONFIG' to rebuild it"
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)  # what h5py raises on damaged files
LOG = logging.getLogger("mtlbench.data")

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

    A valid cache (see :func:`cache_problem`: complete, same key and format
    version, every patient and target present, every dataset and attribute
    digest readable and intact) is reused untouched. Anything else at that
    path is named in a warning, deleted and rebuilt under the lock. A
    DataError while loading a patient, or a StorageError while writing,
    stops the build and leaves no file behind.
    """
    from mtlbench.assemble import make_source, make_tasks

    source = make_source(cfg, manager)
    tasks = make_tasks(cfg, manager)
    ids = _checked_ids(source)
    key = cache_key(cfg, source, tasks, ids)
    path = cache_file(cfg, key)
    declared = {label: [t.name for t in task.targets()] for label, task in tasks.items()}
    if cache_problem(path, key, ids, declared) is None:
        return path
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path):
        problem = cache_problem(path, key, ids, declared)  # another process may have built it while we waited
        if problem is None:
            return path
        if problem != ABSENT:
            LOG.warning("%s: slice cache is damaged (%s); rebuilding it", path, problem)
        with storage_errors(path):
            path.unlink(missing_ok=True)
        # worker processes rebuild source and tasks from cfg: only possible with the installed plugins
        workers = build_workers(cfg, len(ids)) if manager is None else 0
        with atomic_path(path, suffix=".h5") as tmp:
            _write_cache(tmp, cfg, source, tasks, ids, key, progress, console, workers)
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
    with storage_errors(lock_path):
        fh = open(lock_path, "a")
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _open_read(path: str | Path, **options: Any) -> Any:
    """The file opened read-only without HDF5 file locking; ``options`` go to ``h5py.File`` (e.g. its chunk cache)."""
    import h5py

    return h5py.File(path, "r", locking=False, **options)


# ----------------------------------------------------------------------------- integrity

ABSENT = "no file"


def cache_problem(path: Path, key: str, ids: Sequence[str], declared: Mapping[str, Sequence[str]]) -> str | None:
    """Why the file at ``path`` is not a valid cache for ``key`` (None: it is valid).

    Checks, in order: the file exists (else :data:`ABSENT`), opens as HDF5,
    is complete, has this key and format version, holds every patient and
    declared target, every attribute digest matches, and every dataset reads
    back whole (which checks each chunk's fletcher32 checksum).
    """
    if not path.is_file():
        return ABSENT
    try:
        with _open_read(path) as f:
            return _header_problem(f, key) or _layout_problem(f, ids, declared) or _content_problem(f, ids)
    except _READ_ERRORS as exc:  # unreadable / truncated / not HDF5
        return f"unreadable: {_one_line(exc)}"


def _header_problem(f: Any, key: str | None = None) -> str | None:
    """Whether the file attributes say complete, this format and (unless None) this key (None: they do)."""
    if not bool(f.attrs.get("complete", False)):
        return "incomplete"
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        return f"format {version}, expected {FORMAT_VERSION}"
    if key is not None and f.attrs.get("key") != key:
        return "another key"
    return None


def _layout_problem(f: Any, ids: Sequence[str], declared: Mapping[str, Sequence[str]]) -> str | None:
    """The first patient, dataset or declared target missing from the file (None: all there)."""
    for pid in ids:
        grp = f.get(f"patients/{pid}")
        if grp is None:
            return f"no patient {pid!r}"
        missing = [name for name in _DATASETS if name not in grp]
        missing += [f"{TARGETS}/{label}/{n}" for label, names in declared.items() for n in names if f"{TARGETS}/{label}/{n}" not in grp]
        if missing:
            return f"patient {pid!r} has no {missing[0]}"
    return None


def _content_problem(f: Any, ids: Sequence[str]) -> str | None:
    """The first attribute digest that does not match or dataset that does not read back (None: all intact)."""
    if attrs_digest(f.attrs) != _stored_digest(f.attrs):
        return "file attributes do not match their checksum"
    for pid in ids:
        grp = f[f"patients/{pid}"]
        if attrs_digest(grp.attrs) != _stored_digest(grp.attrs):
            return f"patient {pid!r}: attributes do not match their checksum"
        for ds in _datasets(grp):
            try:
                ds[...]
            except _READ_ERRORS as exc:
                return f"{ds.name}: {_one_line(exc)}"
    return None


def _datasets(grp: Any) -> list[Any]:
    """Every dataset under ``grp``, at any depth."""
    import h5py

    found: list[Any] = []
    grp.visititems(lambda _name, node: found.append(node) if isinstance(node, h5py.Dataset) else None)
    return found


def attrs_digest(attrs: Any) -> str:
    """sha256 hex of an HDF5 object's attributes (names and values, sorted by name), without ``attrs_sha256`` itself."""
    h = hashlib.sha256()
    for name in sorted(attrs):
        if name == ATTRS_DIGEST:
            continue
        h.update(name.encode("utf-8") + b"\0")
        h.update(_attr_bytes(attrs[name]) + b"\0")
    return h.hexdigest()


def _attr_bytes(value: Any) -> bytes:
    """A canonical byte form of one attribute value as h5py reads it back."""
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if isinstance(value, bytes):
        return b"b" + value
    arr = np.asarray(value)
    return f"a{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()


def _stored_digest(attrs: Any) -> str | None:
    value = attrs.get(ATTRS_DIGEST)
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _seal(obj: Any) -> None:
    """Store the digest of ``obj``'s attributes as its ``attrs_sha256`` attribute (after all others are set)."""
    obj.attrs[ATTRS_DIGEST] = attrs_digest(obj.attrs)


def _one_line(exc: BaseException) -> str:
    """An exception message on one line (h5py's may span several), at most 200 characters."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


# ----------------------------------------------------------------------------- writing


class _GuardedFile(io.RawIOBase):
    """The temporary cache file as h5py's ``fileobj`` driver sees it: the first failed write is kept, not reported.

    HDF5 crashes the process when it closes a file after a failed write (a
    full disk: a dozen ignored tracebacks, then a segfault), so a failed write or truncate
    is recorded in ``error`` and later ones are skipped while HDF5 is told
    they succeeded; :meth:`check` raises the recorded OSError once the
    builder is at a safe point, and the file is then deleted unread.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fh = open(path, "r+b", buffering=0)
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._fh.readinto(buffer) or 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                written = 0
                while written < len(view):
                    written += self._fh.write(view[written:]) or 0
            except OSError as exc:
                self.error = exc
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._fh.truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def flush(self) -> None:
        pass  # unbuffered: every write went to the file descriptor

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()

    def check(self) -> None:
        """Raise the first failed write's OSError, if any."""
        if self.error is not None:
            raise self.error


def _write_cache(
    tmp: Path,
    cfg: "Config",
    source: DatasetSource,
    tasks: Mapping[str, Task],
    ids: list[str],
    key: str,
    progress: bool,
    console: Any,
    workers: int = 0,
) -> None:
    """Write the whole cache into ``tmp``; the first failed write's OSError (once the file is closed) if any."""
    with _GuardedFile(tmp) as raw:
        try:
            _write_hdf5(raw, cfg, source, tasks, ids, key, progress, console, workers)
        except Exception:
            raw.check()  # a failed write is the cause of whatever HDF5 did after it
            raise
        raw.check()  # closing flushed the last chunks and metadata


def _write_hdf5(
    raw: "_GuardedFile",
    cfg: "Config",
    source: DatasetSource,
    tasks: Mapping[str, Task],
    ids: list[str],
    key: str,
    progress: bool,
    console: Any,
    workers: int = 0,
) -> None:
    """The HDF5 content: header, one group per patient (stopping at the first failed write), then ``complete``."""
    import h5py

    settings = _settings(cfg, tasks)
    with h5py.File(raw, "w", libver=_LIBVER) as f, _progress(progress, console, len(ids)) as (show, done):
        _write_header(f, settings, ids, key)
        root = f.create_group("patients")
        for pid, record in _prepared(cfg, source, tasks, ids, workers, show):
            _write_patient(root.create_group(pid), record, tasks)
            raw.check()
            done()
        f.attrs["complete"] = True
        _seal(f)


# ----------------------------------------------------------------------------- preparing patients


#: Patients per worker below which the default does not start one (a spawned worker costs 1-3 s to start).
PATIENTS_PER_WORKER = 4


def build_workers(cfg: "Config", patients: int) -> int:
    """Processes that load and preprocess patients while a cache is built: ``resources.cache_workers``, or
    by default the CPUs this process may use, at most 8 and at most one per 4 patients; 0 means in this process."""
    from mtlbench.devices import available_cpus

    wanted = cfg.resources.cache_workers
    if wanted is None:
        wanted = min(available_cpus(), 8, patients // PATIENTS_PER_WORKER)
    wanted = min(int(wanted), patients)
    return wanted if wanted > 1 else 0


def _prepare(source: DatasetSource, cfg: "Config", tasks: Mapping[str, Task], pid: str) -> CachedPatient:
    patient = source.load(pid)
    if patient.id != pid:
        raise DataError(f"dataset source returned patient {patient.id!r} when asked for {pid!r}")
    return preprocess_patient(patient, cfg, tasks)


def _prepared(
    cfg: "Config", source: DatasetSource, tasks: Mapping[str, Task], ids: list[str], workers: int, show: Any
) -> Iterator[tuple[str, CachedPatient]]:
    """(id, record) for every patient, in ``ids`` order: in this process, or from ``workers`` processes
    (spawned; each builds its own source and tasks from ``cfg``) with at most 2 records per worker in flight,
    so memory stays bounded. A worker's log records are re-emitted here, in patient order, and its first
    error (a DataError naming the patient) is raised here after the pending work is cancelled."""
    if not workers:
        for pid in ids:
            show(pid)
            yield pid, _prepare(source, cfg, tasks, pid)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    level = logging.getLogger().getEffectiveLevel()
    context = multiprocessing.get_context("spawn")  # the caller may hold threads (Ray's) a fork must not copy
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(cfg, level))
    pending: deque = deque()
    todo = iter(ids)
    try:
        for pid in todo:
            pending.append((pid, pool.submit(_worker_prepare, pid)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            pid, future = pending.popleft()
            show(pid)
            try:
                record, logs = future.result()
            except BrokenProcessPool:  # workers could not start (e.g. a script without a __main__ guard)
                LOG.warning("slice cache: worker processes failed to start; preparing the patients in this process")
                for rest in [pid] + [p for p, _ in pending] + list(todo):
                    show(rest)
                    yield rest, _prepare(source, cfg, tasks, rest)
                return
            for rec in logs:
                logger = logging.getLogger(rec.name)
                if logger.isEnabledFor(rec.levelno):
                    logger.handle(rec)
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_worker_prepare, nxt)))
            yield pid, record
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER: dict[str, Any] = {}


def _worker_start(cfg: "Config", level: int) -> None:
    """In a cache-build worker: the source and tasks of ``cfg``, and logging collected for the parent."""
    from mtlbench.assemble import make_source, make_tasks

    root = logging.getLogger()
    root.handlers[:] = [_Collect()]
    root.setLevel(level)
    _WORKER.update(cfg=cfg, source=make_source(cfg), tasks=make_tasks(cfg))


def _worker_prepare(pid: str) -> tuple[CachedPatient, list[logging.LogRecord]]:
    collect = logging.getLogger().handlers[0]
    collect.records = []
    record = _prepare(_WORKER["source"], _WORKER["cfg"], _WORKER["tasks"], pid)
    return record, collect.records


class _Collect(logging.Handler):
    """Keeps a worker's log records (message formatted, so they pickle) for the parent to emit."""

    records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None
        record.exc_info = record.exc_text = None
        self.records.append(record)


def _write_header(f: Any, settings: dict[str, Any], ids: list[str], key: str) -> None:
    """The file attributes, ``complete`` still false."""
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["key"] = key
    f.attrs["organs"] = json.dumps(settings["organs"])
    f.attrs["landmarks"] = json.dumps(settings["landmarks"])
    f.attrs["settings"] = json.dumps(settings)
    f.attrs["targets"] = json.dumps({label: v["targets"] for label, v in settings["tasks"].items()})
    f.attrs["patients"] = json.dumps(ids)
    f.attrs["complete"] = False


def _write_patient(grp: Any, p: CachedPatient, tasks: Mapping[str, Task]) -> None:
    """One patient's group: arrays (checksummed chunks), attributes, targets, then the attribute digest."""
    s, h, w = p.image.shape
    grp.create_dataset("image", data=p.image, chunks=(1, h, w), **_COMPRESSION)
    grp.create_dataset("labels", data=p.labels, chunks=(1, h, w), **_COMPRESSION)
    z, y, x = p.orig_labels.shape
    grp.create_dataset("orig_labels", data=p.orig_labels, chunks=(1, y, x), **_COMPRESSION)
    grp.attrs["index_to_physical"] = np.asarray(p.index_to_physical, dtype=np.float64)
    grp.attrs["geometry"] = json.dumps(p.geometry.to_dict())
    if p.source_geometry is not None:  # the image file's own grid, when reorienting changed it
        grp.attrs["source_geometry"] = json.dumps(p.source_geometry.to_dict())
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
    _seal(grp)


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
    targets stacked the same way (N, ...). :meth:`batches` is the trainer's
    way in; :class:`mtlbench.data.stream.StreamingSlices` offers the same
    surface reading from the cache file instead of memory.
    """

    image: np.ndarray  # (N, H, W) float32
    labels: np.ndarray  # (N, H, W) uint8
    targets: dict[str, np.ndarray]
    patient_index: np.ndarray  # (N,) int32 index into ``patients``
    slice_index: np.ndarray  # (N,) int32 slice number within the patient
    patients: list[str]

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @functools.cached_property
    def foreground(self) -> np.ndarray:
        """(N,) bool: the slice has any label > 0 (computed on first use; the cached copy pickles with the rest)."""
        return np.asarray(self.labels.any(axis=tuple(range(1, self.labels.ndim))), dtype=bool)

    @property
    def targets_available(self) -> set[str]:
        """The ``"<task label>/<target name>"`` keys :meth:`batches` can return."""
        return set(self.targets)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-slice arrays (image, labels, targets): what :func:`stacked_nbytes` predicts."""
        return int(self.image.nbytes + self.labels.nbytes + sum(a.nbytes for a in self.targets.values()))

    def batches(self, batches: Sequence[np.ndarray], keys: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """One dict per index array of ``batches``: ``image``, ``labels`` and the targets named in ``keys``.

        The indices are global slice numbers into this data. The rows come in
        the order of ``np.sort(idx)`` (duplicates kept), not in the order
        given: sorted gathers are faster and the order inside a batch does
        not matter to training. Arrays are copies. Bad indices (IndexError)
        and unknown keys (ValueError) are found before the first batch.
        """
        plan = sorted_batches(batches, len(self))
        wanted = batch_keys(keys, self.targets_available)
        return self._gather(plan, wanted)

    def _gather(self, plan: list[np.ndarray], keys: list[str]) -> Iterator[dict[str, np.ndarray]]:
        for idx in plan:
            out = {"image": self.image[idx], "labels": self.labels[idx]}
            out.update({key: self.targets[key][idx] for key in keys})
            yield out


def sorted_batches(batches: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """Each index array sorted (int64), after checking every index lies in ``[0, n)`` (else IndexError)."""
    plan = []
    for b, idx in enumerate(batches):
        arr = np.sort(np.asarray(idx, dtype=np.int64).reshape(-1))
        if arr.size and (arr[0] < 0 or arr[-1] >= n):
            bad = arr[0] if arr[0] < 0 else arr[-1]
            raise IndexError(f"batch {b}: slice index {int(bad)} is out of range for {n} slices")
        plan.append(arr)
    return plan


def batch_keys(keys: Sequence[str], available: set[str]) -> list[str]:
    """The per-slice target keys among ``keys`` (``image`` and ``labels`` always come), once each, in the given order.

    A key that is not available is a ValueError listing those that are.
    """
    wanted = list(dict.fromkeys(k for k in keys if k not in ("image", "labels")))
    missing = [k for k in wanted if k not in available]
    if missing:
        have = ", ".join(sorted(available)) or "none"
        raise ValueError(f"no per-slice target {', '.join(missing)} in the slice data (it has: {have})")
    return wanted


@contextlib.contextmanager
def _open_complete(path: str | Path, **options: Any) -> Iterator[Any]:
    """The open cache file, after checking it is complete, of this format and its attributes intact (else DataError).

    ``options`` go to ``h5py.File`` (the streaming reader sets the chunk cache).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: slice cache not found (run 'mtlbench data prepare CONFIG')")
    try:
        f = _open_read(p, **options)
    except OSError as exc:
        raise DataError(f"{p}: not a readable HDF5 slice cache ({_one_line(exc)}); {_REBUILD}") from None
    with f:
        try:
            problem = _header_problem(f)
            intact = problem is not None or attrs_digest(f.attrs) == _stored_digest(f.attrs)
        except _READ_ERRORS as exc:
            raise DataError(f"{p}: slice cache is damaged ({_one_line(exc)}); {_REBUILD}") from None
        if problem == "incomplete":
            raise DataError(f"{p}: slice cache is incomplete (run 'mtlbench data prepare CONFIG')")
        if problem is not None:
            raise DataError(f"{p}: slice cache {problem}; prepare it again")
        if not intact:
            raise DataError(f"{p}: slice cache is damaged (file attributes do not match their checksum); {_REBUILD}")
        yield f


def open_cache(path: str | Path) -> CacheInfo:
    """Read a complete cache's metadata (DataError if missing, incomplete, damaged or of another format)."""
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


@contextlib.contextmanager
def _reading(path: str | Path, pid: str) -> Iterator[None]:
    """Turn h5py's failure to read patient ``pid`` into a one-line DataError naming the cache and the patient.

    A chunk failing its fletcher32 check, damaged metadata or a truncated
    file make h5py raise OSError (sometimes KeyError, RuntimeError, ...).
    """
    try:
        yield
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: patient {pid!r}: slice cache is damaged ({_one_line(exc)}); {_REBUILD}") from None


def _patient_group(f: Any, path: str | Path, pid: str) -> Any:
    """Patient ``pid``'s group, after checking its attributes against their digest (DataError if absent or damaged)."""
    grp = f.get(f"patients/{pid}") if pid and "/" not in pid else None
    if grp is None:
        raise DataError(f"{path}: no patient {pid!r} in the slice cache")
    with _reading(path, pid):
        intact = attrs_digest(grp.attrs) == _stored_digest(grp.attrs)
    if not intact:
        raise DataError(f"{path}: patient {pid!r}: slice cache is damaged (attributes do not match their checksum); {_REBUILD}")
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
    A damaged cache is a DataError naming the file and the patient.
    """
    ids = list(patient_ids)
    info = open_cache(path)
    wanted = [(label, t) for label, t in info.slice_targets() if tasks is None or label in tasks]
    with _open_complete(path) as f:
        groups = [_patient_group(f, path, pid) for pid in ids]
        keep = [selected_slices(_array(g, "labels", path, pid), only_with_organs, margin) for g, pid in zip(groups, ids)]
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
        for n, (pid, grp, sel) in enumerate(zip(ids, groups, keep)):
            stop = start + len(sel)
            for key, arr in _slice_arrays(grp, path, pid, wanted).items():
                target = getattr(out, key) if key in ("image", "labels") else out.targets[key]
                target[start:stop] = arr if len(sel) == arr.shape[0] else arr[sel]
            out.patient_index[start:stop] = n
            out.slice_index[start:stop] = sel
            start = stop
    return out


def _slice_arrays(grp: Any, path: str | Path, pid: str, wanted: Sequence[tuple[str, Target]]) -> dict[str, np.ndarray]:
    """One patient's ``image``, ``labels`` and wanted per-slice targets (keyed ``<label>/<name>``), read whole."""
    arrays = {"image": _array(grp, "image", path, pid), "labels": _array(grp, "labels", path, pid)}
    for label, t in wanted:
        _dataset(grp, path, label, t.name)  # a clear error when the target is missing
        arrays[f"{label}/{t.name}"] = _array(grp, f"{TARGETS}/{label}/{t.name}", path, pid)
    return arrays


def _array(grp: Any, name: str, path: str | Path, pid: str) -> np.ndarray:
    """The whole dataset ``name`` of patient ``pid``'s group (a read failure is a DataError naming file and patient)."""
    with _reading(path, pid):
        return grp[name][...]


def _dataset(grp: Any, path: str | Path, label: str, name: str) -> Any:
    node = grp.get(f"{TARGETS}/{label}/{name}")
    if node is None:
        raise DataError(f"{path}: patient {grp.name.rsplit('/', 1)[-1]!r} has no target {label}/{name}; prepare the cache again")
    return node


def load_patient(path: str | Path, pid: str, arrays: bool = True) -> CachedPatient:
    """Everything the cache holds about patient ``pid`` (DataError if unknown, or naming the file and patient if damaged).

    ``arrays=False`` reads only the metadata (grid, geometry, landmarks): the
    image, label maps and targets come back empty.
    """
    with _open_complete(path) as f:
        grp = _patient_group(f, path, pid)
        with _reading(path, pid):
            attrs = {name: grp.attrs[name] for name in grp.attrs}
            shape = tuple(int(v) for v in grp["image"].shape)
            names = {label: list(tgrp) for label, tgrp in grp[TARGETS].items()} if arrays and TARGETS in grp else {}
        targets = {label: {n: _array(grp, f"{TARGETS}/{label}/{n}", path, pid) for n in ns} for label, ns in names.items()}
        empty = np.zeros((0, 0, 0), dtype=np.float32)
        positions = np.asarray(attrs["landmark_positions"], dtype=np.float64).reshape(-1, 3)
        return CachedPatient(
            id=pid,
            shape=shape,  # type: ignore[arg-type]
            image=_array(grp, "image", path, pid) if arrays else empty,
            labels=_array(grp, "labels", path, pid) if arrays else empty.astype(np.uint8),
            orig_labels=_array(grp, "orig_labels", path, pid) if arrays else empty.astype(np.uint8),
            index_to_physical=np.asarray(attrs["index_to_physical"], dtype=np.float64),
            geometry=Geometry.from_dict(json.loads(attrs["geometry"])),
            landmarks=[Landmark(n, tuple(float(v) for v in pos)) for n, pos in zip(json.loads(attrs["landmark_names"]), positions)],
            files=json.loads(attrs["files"]),
            targets=targets,
            source_geometry=Geometry.from_dict(json.loads(attrs["source_geometry"])) if "source_geometry" in attrs else None,
        )


def stacked_nbytes(path: str | Path, patient_ids: Sequence[str], tasks: Sequence[str] | None = None) -> int:
    """Bytes that :func:`load_slices` of ``patient_ids`` would hold (image, labels, per-slice targets); shapes only."""
    info = open_cache(path)
    wanted = [(label, t) for label, t in info.slice_targets() if tasks is None or label in tasks]
    h, w = info.slice_size
    per_slice = h * w * (np.dtype(np.float32).itemsize + np.dtype(np.uint8).itemsize)
    per_slice += sum(int(np.prod(t.slice_shape((h, w)))) * np.dtype(t.dtype).itemsize for _, t in wanted)
    with _open_complete(path) as f:
        slices = 0
        for pid in patient_ids:
            with _reading(path, pid):
                slices += int(_patient_group(f, path, pid)["image"].shape[0])
    return int(slices * per_slice)
