"""Tests for mtlbench.data.stream: streamed batches equal in-memory ones, threads stop, damage is one line, pickling.

The cache is tiny (4 patients of 5-8 slices, 16 x 12) and holds every kind
of per-slice target: the landmark heatmaps and a probe task's map, points
(with NaN) and per-slice uint8 values, plus a per-patient array that is
never batched.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import pickle
import re
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from mtlbench import hookimpl
from mtlbench.api import Target, Task
from mtlbench.config import Config
from mtlbench.data.cache import build_cache, load_slices
from mtlbench.data.stream import StreamingSlices, open_stream
from mtlbench.errors import DataError
from mtlbench.plugins import new_manager
from test_cache import PLUGIN, write_patient
from test_integrity import damage_chunk

IDS = ["p1", "p2", "p3", "p4"]
ORDER = ["p3", "p1", "p4", "p2"]  # not the file's order
THREAD = "mtlbench-stream"


class _Probe(Task):
    """A task whose targets cover every per-slice shape and a per-patient array."""

    name = "probe"
    kind = "regression"

    def targets(self) -> list[Target]:
        return [
            Target("map", 2, "float32", "linear"),
            Target("pts", 1, "float32", "points"),
            Target("flag", 3, "uint8", "none"),
            Target("whole", 1, "float64", per_slice=False),
        ]

    def prepare(self, patient, grid):
        s, h, w = grid.shape
        ramp = np.arange(s, dtype=np.float32)[:, None, None, None]
        pts = np.stack([ramp[:, :, 0, 0], -ramp[:, :, 0, 0]], axis=-1)
        pts[::2] = np.nan  # absent points in every other slice
        return {
            "map": np.concatenate([ramp + np.zeros((s, 1, h, w)), grid.resample(patient.image)[:, None]], axis=1),
            "pts": pts,
            "flag": (np.arange(s * 3).reshape(s, 3) % 7).astype(np.uint8),
            "whole": np.ones((2, 3)),
        }


PROBE = types.SimpleNamespace(register_tasks=hookimpl(lambda register: register(_Probe)))


def config(root: Path) -> Config:
    return Config(
        experiment={"name": "s"},
        data={"source": "testnpz", "testnpz": {"root": str(root)}},
        preprocess={"slice_size": (16, 12)},
        tasks={"segmentation": {}, "landmarks": {"params": {"sigma_mm": 3.0}}, "probe": {}},
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for n, pid in enumerate(IDS):
        write_patient(root, pid, n, slices=5 + n)
    manager = new_manager(extra_plugins=[(PLUGIN, "testsrc"), (PROBE, "probe")])
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: set up before conftest's per-test cache folder
        patch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return build_cache(config(root), manager=manager)


@pytest.fixture
def own_copy(cache: Path, tmp_path: Path) -> Path:
    """A copy of the cache this test may damage."""
    path = tmp_path / cache.name
    path.write_bytes(cache.read_bytes())
    return path


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD)]


def random_batches(n: int, count: int, seed: int) -> list[np.ndarray]:
    """Index arrays of 1-12 slices (duplicates allowed, unsorted), one empty, one of every slice reversed."""
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, n, size=int(rng.integers(1, 13))) for _ in range(count)]
    return out + [np.zeros(0, dtype=np.int64), np.arange(n)[::-1]]


def assert_same_batches(left: list[dict[str, np.ndarray]], right: list[dict[str, np.ndarray]]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # NaN == NaN here


@pytest.mark.parametrize("read_ahead", [0, 1, 4])
def test_streamed_batches_equal_in_memory_ones(cache, read_ahead):
    data = load_slices(cache, ORDER)
    keys = ["labels", "landmarks/heatmaps", "probe/map", "probe/pts", "probe/flag"]
    batches = random_batches(len(data), 30, seed=read_ahead)
    with open_stream(cache, ORDER, read_ahead=read_ahead, chunk_cache_mb=0.01) as stream:
        assert len(stream) == len(data) == 26 and stream.patients == data.patients == ORDER
        np.testing.assert_array_equal(stream.patient_index, data.patient_index)
        np.testing.assert_array_equal(stream.slice_index, data.slice_index)
        assert stream.targets_available == data.targets_available == set(keys) - {"labels"}
        streamed = list(stream.batches(batches, keys))
    expected = list(data.batches(batches, keys))
    assert_same_batches(streamed, expected)
    assert {len(np.unique(data.patient_index[b])) for b in batches} >= {3, 4}  # batches span several patients
    for b, got in zip(batches, expected):  # the documented order: np.sort(idx), duplicates kept
        np.testing.assert_array_equal(got["image"], data.image[np.sort(b)])
        assert list(got) == ["image", "labels", *keys[1:]]
    assert not stream_threads()


def test_foreground_and_task_subset(cache):
    data = load_slices(cache, ORDER, tasks=["probe"])
    stream = open_stream(cache, ORDER, tasks=["probe"])
    expected = np.array([lab.any() for lab in data.labels])
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(stream.foreground, expected)
    np.testing.assert_array_equal(data.foreground, expected)
    assert stream.foreground.dtype == data.foreground.dtype == bool
    assert stream.targets_available == data.targets_available == {"probe/map", "probe/pts", "probe/flag"}
    batches = random_batches(len(data), 5, seed=9)
    assert_same_batches(list(stream.batches(batches, ["probe/flag"])), list(data.batches(batches, ["probe/flag"])))
    stream.close()
    restored = pickle.loads(pickle.dumps(data))  # the cached foreground travels with SliceData
    np.testing.assert_array_equal(restored.foreground, expected)


def test_bad_keys_and_indices_fail_before_reading(cache):
    data = load_slices(cache, IDS)
    with open_stream(cache, IDS) as stream:
        for source in (data, stream):
            with pytest.raises(ValueError, match="no per-slice target landmarks/nope.*landmarks/heatmaps"):
                source.batches([np.arange(3)], ["landmarks/nope"])
            with pytest.raises(IndexError, match="batch 1: slice index 26 is out of range for 26 slices"):
                source.batches([np.arange(3), np.array([0, 26])], [])
            with pytest.raises(IndexError, match="-1"):
                source.batches([np.array([-1])], [])
        assert not stream_threads() and stream._file is None  # nothing started, nothing opened


def test_early_stop_leaves_no_thread(cache):
    batches = [np.arange(i % 20, i % 20 + 4) for i in range(200)]
    stream = open_stream(cache, IDS, read_ahead=2)
    gen = stream.batches(batches, ["landmarks/heatmaps"])
    assert not stream_threads()  # the thread starts with the first batch
    next(gen)
    assert len(stream_threads()) == 1
    gen.close()
    assert not stream_threads()

    gen = stream.batches(batches, [])
    next(gen)
    del gen  # dropped without closing
    gc.collect()
    assert not stream_threads()

    gen = stream.batches(batches, [])
    next(gen)
    stream.close()  # stops the reader under a suspended consumer
    assert not stream_threads() and stream._file is None
    with pytest.raises(ValueError, match="closed"):
        for _ in gen:
            pass
    assert len(list(stream.batches(batches[:3], []))) == 3  # opens the file again
    stream.close()
    assert not stream_threads()


def test_damaged_chunk_is_one_line_in_the_consumer(own_copy):
    data = load_slices(own_copy, ["p1"])
    stream = open_stream(own_copy, IDS)
    p2 = int(np.flatnonzero(stream.patient_index == 1)[0])
    damage_chunk(own_copy, "patients/p2/image", chunk=1, count=32)
    batches = [np.arange(3), np.array([0, p2 + 1, p2 + 3]), np.arange(4)]
    gen = stream.batches(batches, [])
    np.testing.assert_array_equal(next(gen)["image"], data.image[:3])  # batches before the damage arrive
    with pytest.raises(DataError) as exc:
        next(gen)
    msg = str(exc.value)
    assert str(own_copy) in msg and "patient 'p2'" in msg and "damaged" in msg and "\n" not in msg
    assert not stream_threads()
    with pytest.raises(DataError, match="'p2'.*damaged"):
        load_slices(own_copy, ["p2"])  # the in-memory reader says the same
    stream.close()


def test_damaged_labels_fail_at_open(own_copy):
    damage_chunk(own_copy, "patients/p3/labels", chunk=2, count=16)
    with pytest.raises(DataError) as exc:
        open_stream(own_copy, IDS)
    assert str(own_copy) in str(exc.value) and "'p3'" in str(exc.value) and "\n" not in str(exc.value)


def test_cache_gone_before_first_use(own_copy):
    stream = open_stream(own_copy, IDS)
    own_copy.rename(own_copy.with_suffix(".moved"))
    with pytest.raises(DataError, match=re.escape(f"{own_copy}: slice cache not found")):
        list(stream.batches([np.arange(2)], []))
    assert not stream_threads()


def test_open_file_is_kept_while_in_use(own_copy):
    """Deleting the file after the first batch does not disturb reading (the open handle keeps it)."""
    data = load_slices(own_copy, IDS)
    batches = random_batches(len(data), 6, seed=3)
    with open_stream(own_copy, IDS, read_ahead=1) as stream:
        gen = stream.batches(batches, ["probe/pts"])
        first = [next(gen)]
        own_copy.unlink()
        assert_same_batches(first + list(gen), list(data.batches(batches, ["probe/pts"])))


def read_in_child(stream: StreamingSlices, batches: list[np.ndarray], queue) -> None:
    queue.put([{k: v.copy() for k, v in b.items()} for b in stream.batches(batches, ["landmarks/heatmaps"])])


def test_pickled_stream_reads_in_another_process(cache):
    data = load_slices(cache, ORDER)
    batches = random_batches(len(data), 4, seed=5)
    expected = list(data.batches(batches, ["landmarks/heatmaps"]))
    stream = open_stream(cache, ORDER)
    next(stream.batches(batches, []))  # the file is open here: the copies must open their own
    copy = pickle.loads(pickle.dumps(stream))
    assert copy._file is None and repr(copy) == repr(stream)
    assert_same_batches(list(copy.batches(batches, ["landmarks/heatmaps"])), expected)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=read_in_child, args=(stream, batches, queue))
    proc.start()
    got = queue.get(timeout=120)
    proc.join(60)
    assert proc.exitcode == 0
    assert_same_batches(got, expected)
    stream.close()
    copy.close()
