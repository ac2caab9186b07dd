"""Training batches streamed from the HDF5 slice cache: the surface of ``SliceData`` without holding the slices.

:func:`open_stream` reads only the small per-slice index of the chosen
patients (patient and slice number of every slice, and whether it has any
organ label, computed one patient at a time) and returns a
:class:`StreamingSlices`. Its :meth:`~StreamingSlices.batches` yields exactly
what :meth:`mtlbench.data.cache.SliceData.batches` yields for the same cache
and patients (rows in the order of ``np.sort(idx)``), reading each batch from
the file when it is needed, so a trial can train on more slices than fit in
memory.

Reading: one ``h5py.File`` per StreamingSlices and process, opened on first
use (so the object can be built in one process, pickled, and used in
another; after a fork the child opens its own). A batch's sorted, de-duplicated
indices are grouped by patient into runs of consecutive slices and each
dataset is read with one slicing read per run straight into the batch's
preallocated arrays; duplicates are expanded afterwards. Not one HDF5 fancy
read per patient: with the cache's one-slice chunks, HDF5 maps a selection of
scattered slices chunk by chunk over the whole span between them, which
measured 1.2x slower at 48 x 48 and 5x slower at 256 x 256 than reading the
slices one by one (8 random slices of a 300-slice patient: 60 ms against
11 ms), while h5py's simple-slice reader has the lowest overhead per read.

Read-ahead: a background thread reads up to ``read_ahead`` batches ahead into
a ``queue.Queue(maxsize=read_ahead)``; the consumer gets them in order. A
read failure in the thread is raised in the consumer, when it reaches that
batch, as the same one-line DataError naming the cache and the patient. When
the consumer stops early (the generator is closed or garbage collected) or
:meth:`StreamingSlices.close` is called, the thread stops within one batch
read and is joined. h5py holds the GIL while it reads, but torch's kernels
release it, so reading overlaps the forward and backward passes.
``read_ahead=0`` reads in the consumer's thread.

Memory: at most ``read_ahead + 2`` batches (queued, being read, being used)
plus the chunk cache, whatever the number of patients; besides that, a few
bytes per slice for the index and an HDF5 handle per opened dataset. HDF5's
raw-data chunk cache belongs to each open dataset, so ``chunk_cache_mb`` is
shared out: every one of the (patients x datasets) datasets gets
``chunk_cache_mb / count`` (``rdcc_nbytes``), a prime number of hash slots about
ten times the number of label chunks that fit (``rdcc_nslots``) and
``rdcc_w0 = 0.75``. Every read covers whole chunks, so eviction is least
recently used; the cache pays off only for slices read again while still
cached (foreground oversampling re-reads organ slices).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mtlbench.data.cache import (
    TARGETS,
    _array,
    _dataset,
    _open_complete,
    _patient_group,
    _reading,
    batch_keys,
    open_cache,
    sorted_batches,
)
from mtlbench.errors import DataError

_POLL_S = 0.05  # how often a waiting producer or consumer looks whether the other side stopped
_JOIN_S = 10.0  # how long a stopped generator waits for its reader to finish the batch it reads
_W0 = 0.75


class StreamingSlices:
    """The slices of several patients in a slice cache, read batch by batch (see the module docstring).

    Made by :func:`open_stream`. ``patients``, ``patient_index``,
    ``slice_index``, ``foreground`` and ``targets_available`` mean what they
    mean on ``SliceData``; ``len()`` is the number of slices. Use it as a
    context manager or call :meth:`close` to stop its readers and close the file.
    """

    def __init__(
        self,
        path: Path,
        key: str,
        patients: list[str],
        patient_index: np.ndarray,
        slice_index: np.ndarray,
        foreground: np.ndarray,
        targets: dict[str, tuple[str, tuple[int, ...]]],
        slice_size: tuple[int, int],
        read_ahead: int,
        chunk_cache_mb: float,
    ) -> None:
        self.path = path
        self.key = key
        self.patients = patients
        self.patient_index = patient_index
        self.slice_index = slice_index
        self.foreground = foreground
        self.slice_size = slice_size
        self.read_ahead = read_ahead
        self.chunk_cache_mb = chunk_cache_mb
        self._targets = targets  # "<task>/<target>" -> (dtype, shape of one slice's entry)
        self._init_handles()

    def _init_handles(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a generator finalized by the GC under it takes it again
        self._stack: contextlib.ExitStack | None = None
        self._file: Any = None
        self._pid: int | None = None
        self._datasets: dict[str, dict[str, Any]] = {}
        self._running: set[tuple[threading.Event, threading.Thread]] = set()

    # ------------------------------------------------------------------ surface

    def __len__(self) -> int:
        return int(self.patient_index.shape[0])

    def __repr__(self) -> str:
        return (f"StreamingSlices({str(self.path)!r}, {len(self)} slices of {len(self.patients)} patients, "
                f"read_ahead={self.read_ahead}, chunk_cache_mb={self.chunk_cache_mb})")

    @property
    def targets_available(self) -> set[str]:
        """The ``"<task label>/<target name>"`` keys :meth:`batches` can return."""
        return set(self._targets)

    def batches(self, batches: Sequence[np.ndarray], keys: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """One dict per index array, as ``SliceData.batches`` gives it: rows in the order of ``np.sort(idx)``.

        ``image`` (B, H, W) float32, ``labels`` (B, H, W) uint8 and the
        per-slice targets named in ``keys``, read from the cache up to
        ``read_ahead`` batches ahead. Bad indices (IndexError) and unknown
        keys (ValueError) are found before the first batch; a damaged cache
        is a DataError naming the file and the patient when the consumer
        reaches the batch that needed it.
        """
        plan = sorted_batches(batches, len(self))
        wanted = batch_keys(keys, self.targets_available)
        return self._stream(plan, wanted)

    def close(self) -> None:
        """Stop every read-ahead thread of this object (they finish the batch they read) and close the file.

        Using it again opens the file again.
        """
        with self._lock:
            running = list(self._running)
        for stop, _ in running:
            stop.set()
        for _, thread in running:
            if thread is not threading.current_thread():
                thread.join()
        with self._lock:
            self._release()

    def __enter__(self) -> "StreamingSlices":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """The index only: the copy opens the file itself where it is used."""
        state = dict(self.__dict__)
        for name in ("_lock", "_stack", "_file", "_pid", "_datasets", "_running"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_handles()

    # ------------------------------------------------------------------ read-ahead

    def _stream(self, plan: list[np.ndarray], keys: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """The batches of ``plan`` in order, read by a background thread (in this thread when ``read_ahead`` is 0)."""
        if self.read_ahead == 0:
            for idx in plan:
                yield self._read(idx, keys)
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.read_ahead)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._produce, args=(plan, keys, q, stop), name=f"mtlbench-stream:{self.path.name}", daemon=True
        )
        entry = (stop, thread)
        with self._lock:
            self._running.add(entry)
        thread.start()
        try:
            for _ in plan:
                item = self._next(q, thread)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            if thread is not threading.current_thread():  # the cyclic GC may finalize a generator in any thread:
                thread.join(_JOIN_S)  # bounded, in case that thread holds the lock the reader waits for
            with self._lock:
                self._running.discard(entry)

    def _produce(self, plan: list[np.ndarray], keys: list[str], q: queue.Queue[Any], stop: threading.Event) -> None:
        """The read-ahead thread: read each batch and queue it (or the exception that stopped it, then end)."""
        for idx in plan:
            if stop.is_set():
                return
            item: Any
            try:
                item = self._read(idx, keys)
            except BaseException as exc:  # raised in the consumer, in order
                item = exc
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _next(self, q: queue.Queue[Any], thread: threading.Thread) -> Any:
        """The next queued item; a ValueError if the thread was stopped (by :meth:`close`) before queuing it."""
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise ValueError(f"{self.path}: the slice stream was closed while its batches were read") from None

    # ------------------------------------------------------------------ reading

    def _read(self, idx: np.ndarray, keys: list[str]) -> dict[str, np.ndarray]:
        """One batch: the slices ``idx`` (sorted) of image, labels and ``keys``, one read per run of consecutive slices."""
        uniq, inverse = np.unique(idx, return_inverse=True)
        h, w = self.slice_size
        out = {
            "image": np.empty((len(uniq), h, w), dtype=np.float32),
            "labels": np.empty((len(uniq), h, w), dtype=np.uint8),
        }
        for key in keys:
            dtype, shape = self._targets[key]
            out[key] = np.empty((len(uniq),) + shape, dtype=dtype)
        for start, stop in _runs(uniq, self.patient_index):
            pid = self.patients[int(self.patient_index[uniq[start]])]
            first = int(self.slice_index[uniq[start]])
            datasets = self._patient_datasets(pid)
            with _reading(self.path, pid):
                for name, arr in out.items():
                    if arr.size:
                        arr[start:stop] = datasets[name][first : first + stop - start]
        if len(uniq) < len(idx):
            out = {name: arr[inverse] for name, arr in out.items()}
        return out

    def _patient_datasets(self, pid: str) -> dict[str, Any]:
        """Patient ``pid``'s datasets keyed like a batch (opened once, the group's attribute digest checked)."""
        with self._lock:
            f = self._handle()  # first: after a fork the parent's datasets are forgotten
            found = self._datasets.get(pid)
            if found is None:
                grp = _patient_group(f, self.path, pid)
                with _reading(self.path, pid):
                    found = {"image": grp["image"], "labels": grp["labels"]}
                    found.update({key: grp[f"{TARGETS}/{key}"] for key in self._targets})
                self._datasets[pid] = found
            return found

    def _handle(self) -> Any:
        """The open cache file of this process (caller holds the lock): opened, checked and its chunk cache set once."""
        if self._file is not None and self._pid == os.getpid():
            return self._file
        self._forget()  # never opened, closed, or inherited through a fork: h5py objects do not cross processes
        stack = contextlib.ExitStack()
        try:
            f = stack.enter_context(_open_complete(self.path, **self._chunk_cache()))
            if f.attrs.get("key") != self.key:
                raise DataError(
                    f"{self.path}: the slice cache was rebuilt with other content since the stream was opened; open it again"
                )
        except BaseException:
            stack.close()
            raise
        self._stack, self._file, self._pid = stack, f, os.getpid()
        return f

    def _chunk_cache(self) -> dict[str, Any]:
        """h5py's ``rdcc_*`` options: ``chunk_cache_mb`` shared out over every dataset this stream may open."""
        count = max(1, len(set(self.patients)) * (2 + len(self._targets)))
        share = int(self.chunk_cache_mb * 2**20) // count
        smallest = max(1, self.slice_size[0] * self.slice_size[1])  # one label chunk (uint8)
        return {"rdcc_nbytes": share, "rdcc_nslots": _prime_at_least(10 * max(1, share // smallest)), "rdcc_w0": _W0}

    def _release(self) -> None:
        """Close the file (caller holds the lock)."""
        stack = self._stack if self._pid == os.getpid() else None
        self._forget()
        if stack is not None:
            stack.close()

    def _forget(self) -> None:
        self._datasets = {}
        self._stack, self._file, self._pid = None, None, None


def open_stream(
    path: str | Path,
    patient_ids: Sequence[str],
    tasks: Sequence[str] | None = None,
    read_ahead: int = 4,
    chunk_cache_mb: float = 16,
) -> StreamingSlices:
    """The slices of ``patient_ids`` (in that order) as a :class:`StreamingSlices` over the cache at ``path``.

    ``tasks`` limits the per-slice targets to those task labels (default: all
    in the cache), as in ``load_slices``. Reads every patient's labels once,
    one patient at a time, to know which slices have an organ; a missing,
    incomplete or damaged cache, patient or target is a one-line DataError
    naming the file (and the patient).
    """
    if read_ahead < 0:
        raise ValueError(f"read_ahead must be >= 0, not {read_ahead}")
    if chunk_cache_mb < 0:
        raise ValueError(f"chunk_cache_mb must be >= 0, not {chunk_cache_mb}")
    ids = [str(p) for p in patient_ids]
    info = open_cache(path)
    wanted = [(label, t) for label, t in info.slice_targets() if tasks is None or label in tasks]
    targets = {f"{label}/{t.name}": (t.dtype, t.slice_shape(info.slice_size)) for label, t in wanted}
    counts: list[int] = []
    foreground: list[np.ndarray] = []
    with _open_complete(path) as f:
        for pid in ids:
            grp = _patient_group(f, path, pid)
            counts.append(_checked_slices(grp, path, pid, info.slice_size, wanted, targets))
            labels = _array(grp, "labels", path, pid)
            foreground.append(labels.reshape(len(labels), -1).any(axis=1) if labels.size else np.zeros(len(labels), bool))
    return StreamingSlices(
        path=Path(path),
        key=info.key,
        patients=ids,
        patient_index=np.repeat(np.arange(len(ids), dtype=np.int32), counts),
        slice_index=np.concatenate([np.arange(n, dtype=np.int32) for n in counts] or [np.zeros(0, np.int32)]),
        foreground=np.concatenate(foreground or [np.zeros(0, bool)]),
        targets=targets,
        slice_size=info.slice_size,
        read_ahead=int(read_ahead),
        chunk_cache_mb=chunk_cache_mb,
    )


def _checked_slices(
    grp: Any, path: str | Path, pid: str, size: tuple[int, int], wanted: Sequence[tuple[str, Any]],
    targets: dict[str, tuple[str, tuple[int, ...]]],
) -> int:
    """Patient ``pid``'s number of slices, after checking its datasets have the shapes the cache declares."""
    with _reading(path, pid):
        n = int(grp["image"].shape[0])
        expected = {"image": (n, *size), "labels": (n, *size)}
        shapes = {"image": tuple(grp["image"].shape), "labels": tuple(grp["labels"].shape)}
    for label, t in wanted:
        node = _dataset(grp, path, label, t.name)  # a clear error when the target is missing
        with _reading(path, pid):
            shapes[f"{label}/{t.name}"] = tuple(node.shape)
        expected[f"{label}/{t.name}"] = (n, *targets[f"{label}/{t.name}"][1])
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise DataError(f"{path}: patient {pid!r}: {name} has shape {shape}, expected {expected[name]}; prepare the cache again")
    return n


def _runs(uniq: np.ndarray, patient_index: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` positions in the sorted unique indices ``uniq`` of runs of consecutive slices of one patient."""
    if len(uniq) == 0:
        return []
    breaks = np.flatnonzero((np.diff(uniq) != 1) | (np.diff(patient_index[uniq]) != 0)) + 1
    edges = [0, *breaks.tolist(), len(uniq)]
    return list(zip(edges[:-1], edges[1:]))


def _prime_at_least(n: int) -> int:
    """The smallest prime >= ``n`` (at least 2)."""
    n = max(2, n)
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n
