"""Tests for mtlbench.data.cache: key, build/reuse/rebuild, HDF5 layout, locking and concurrent reading."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest

from mtlbench import api, hookimpl
from mtlbench.api import DatasetSource, Geometry, Landmark, Patient
from mtlbench.config import Config
from mtlbench.data import cache as cache_mod
from mtlbench.assemble import make_source, make_tasks
from mtlbench.data.cache import (
    FORMAT_VERSION,
    build_cache,
    cache_file,
    cache_key,
    load_patient,
    load_slices,
    open_cache,
)
from mtlbench.data.preprocess import preprocess_patient
from mtlbench.errors import DataError
from mtlbench.plugins import new_manager

SIZE = (16, 12)


class NpzSource(DatasetSource):
    """Tiny test source: one .npz per patient (image, kidney masks, one landmark, geometry)."""

    name = "testnpz"

    class Params(api.Params):
        root: str
        fail: str | None = None

    def patient_ids(self) -> list[str]:
        return sorted(p.stem for p in Path(self.params.root).glob("*.npz"))

    def files(self, patient_id: str) -> list[str]:
        return [str(Path(self.params.root) / f"{patient_id}.npz")]

    def load(self, patient_id: str) -> Patient:
        if patient_id == self.params.fail:
            raise DataError(f"{patient_id}.npz: broken on purpose")
        d = np.load(self.files(patient_id)[0])
        geom = Geometry(size=tuple(int(v) for v in d["size"]), spacing=tuple(d["spacing"]), origin=tuple(d["origin"]))
        masks = {"kidney_right": d["right"], "kidney_left": d["left"]}
        return Patient(
            patient_id, d["image"], geom, masks, [Landmark("renal_pelvis_right", tuple(d["landmark"]))],
            {"npz": self.files(patient_id)[0]},
        )


PLUGIN = types.SimpleNamespace(register_datasets=hookimpl(lambda register: register(NpzSource)))


def make_manager():
    return new_manager(extra_plugins=[(PLUGIN, "testsrc")])


def key_of(cfg, manager):
    return cache_key(cfg, make_source(cfg, manager), make_tasks(cfg, manager))


def write_patient(root: Path, pid: str, seed: int, slices: int = 5) -> None:
    rng = np.random.default_rng(seed)
    z, y, x = slices, 20, 24
    right = np.zeros((z, y, x), bool)
    right[1:3, 4:10, 3:9] = True
    left = np.zeros((z, y, x), bool)
    left[2:4, 8:14, 12:20] = True
    geom = Geometry(size=(x, y, z), spacing=(1.2, 1.0, 3.0), origin=(-10.0, 5.0, 100.0))
    landmark = (np.array([2.0, 10.0, 12.0, 1.0]) @ geom.index_to_physical().T)[:3]
    np.savez(
        root / f"{pid}.npz",
        image=rng.uniform(-1500, 1500, (z, y, x)).astype(np.float32),
        right=right, left=left, size=np.array(geom.size), spacing=np.array(geom.spacing),
        origin=np.array(geom.origin), landmark=landmark,
    )


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path: Path, monkeypatch) -> Path:
    """A cache folder of this test only (so listings of it are meaningful)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(d))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for n, pid in enumerate(["p1", "p2", "p3"]):
        write_patient(d, pid, n, slices=5 + n)
    return d


def config(root: Path, landmarks: dict | None = None, tasks: dict | None = None, **pre) -> Config:
    return Config(
        experiment={"name": "t"},
        data={"source": "testnpz", "testnpz": {"root": str(root)}},
        preprocess={"slice_size": SIZE, **pre},
        tasks=tasks if tasks is not None else {
            "segmentation": {}, "landmarks": {"params": {"sigma_mm": 3.0, **(landmarks or {})}}
        },
    )


def test_build_writes_the_documented_layout(root):
    cfg = config(root)
    manager = make_manager()
    path = build_cache(cfg, manager=manager)
    source = make_source(cfg, manager)
    tasks = make_tasks(cfg, manager)
    key = cache_key(cfg, source, tasks)
    assert path == cache_file(cfg, key) and path.name == f"t-{key[:16]}.h5"
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [path.name]
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["complete"] and a["key"] == key and a["format_version"] == FORMAT_VERSION
        assert json.loads(a["organs"]) == ["kidney_right", "kidney_left"]
        assert json.loads(a["landmarks"]) == ["renal_pelvis_right", "renal_pelvis_left"]
        assert json.loads(a["settings"])["preprocess"]["slice_size"] == list(SIZE)
        declared = json.loads(a["targets"])
        assert list(declared) == ["landmarks"]  # segmentation learns the core labels: no target of its own
        assert declared["landmarks"] == [
            {"name": "heatmaps", "channels": 1, "dtype": "float32", "warp": "linear", "fill": 0.0, "per_slice": True}
        ]
        settings = json.loads(a["settings"])["tasks"]["landmarks"]
        assert settings["settings"]["sigma_mm"] == 3.0 and settings["task"] == "landmarks"
        assert sorted(f["patients"]) == ["p1", "p2", "p3"]
        for n, pid in enumerate(["p1", "p2", "p3"]):
            g = f["patients"][pid]
            s = 5 + n
            expect = preprocess_patient(source.load(pid), cfg, tasks)
            for name, dtype, shape, chunks, value in [
                ("image", np.float32, (s,) + SIZE, (1,) + SIZE, expect.image),
                ("labels", np.uint8, (s,) + SIZE, (1,) + SIZE, expect.labels),
                ("targets/landmarks/heatmaps", np.float32, (s, 1) + SIZE, (1, 1) + SIZE,
                 expect.targets["landmarks"]["heatmaps"]),
                ("orig_labels", np.uint8, (s, 20, 24), (1, 20, 24), expect.orig_labels),
            ]:
                ds = g[name]
                assert ds.dtype == dtype and ds.shape == shape and ds.chunks == chunks, name
                assert ds.compression == "gzip" and ds.fletcher32, name  # format 3: checksummed chunks
                np.testing.assert_array_equal(ds[...], value)
            assert f[cache_mod.target_path(pid, "landmarks", "heatmaps")].shape == (s, 1) + SIZE
            assert g["targets/landmarks/heatmaps"][...].max() > 0.9
            assert set(np.unique(g["orig_labels"][...])) == {0, 1, 2}
            np.testing.assert_allclose(g.attrs["index_to_physical"], expect.index_to_physical)
            assert Geometry.from_dict(json.loads(g.attrs["geometry"])) == expect.geometry
            assert json.loads(g.attrs["landmark_names"]) == ["renal_pelvis_right"]
            assert g.attrs["landmark_positions"].shape == (1, 3)
            assert json.loads(g.attrs["files"]) == {"npz": str(root / f"{pid}.npz")}


def test_second_build_reuses_and_key_tracks_settings_and_content(root):
    manager = make_manager()
    cfg = config(root)
    path = build_cache(cfg, manager=manager)
    mtime = path.stat().st_mtime_ns
    assert build_cache(cfg, manager=manager) == path
    assert path.stat().st_mtime_ns == mtime

    key = key_of(cfg, manager)
    # a task setting the targets depend on rebuilds; one they do not (the loss) and training settings do not
    assert key_of(config(root, landmarks={"sigma_mm": 4.0}), manager) != key
    assert key_of(config(root, landmarks={"groups": [["renal_pelvis_right"]]}), manager) != key
    assert key_of(config(root, landmarks={"loss": "mse"}), manager) == key
    assert key_of(cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.5})}), manager) == key
    # a task without targets does not enter the key; renaming a task with targets does
    lm = {"params": {"sigma_mm": 3.0}}
    seg = {"params": {"dice_weight": 1.0}}
    assert key_of(config(root, tasks={"segmentation": seg, "landmarks": lm}), manager) == key
    assert key_of(config(root, tasks={"segmentation": {}, "lm": {"use": "landmarks", **lm}}), manager) != key
    other = build_cache(config(root, slice_size=(8, 8)), manager=manager)
    assert other != path and open_cache(other).slice_size == (8, 8)

    write_patient(root, "p2", seed=99, slices=6)  # same file names, new bytes
    new_key = key_of(cfg, manager)
    assert new_key != key
    rebuilt = build_cache(cfg, manager=manager)
    assert rebuilt != path and new_key[:16] in rebuilt.name


def test_partial_or_corrupt_cache_is_rebuilt(root):
    manager = make_manager()
    cfg = config(root)
    path = build_cache(cfg, manager=manager)
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(DataError, match="incomplete"):
        open_cache(path)
    assert build_cache(cfg, manager=manager) == path
    assert open_cache(path).patients == ("p1", "p2", "p3")

    with h5py.File(path, "a") as f:
        del f["patients/p3"]
    build_cache(cfg, manager=manager)
    assert "p3" in h5py.File(path, "r", locking=False)["patients"]

    path.write_bytes(b"not hdf5 at all")
    build_cache(cfg, manager=manager)
    assert open_cache(path).key == key_of(cfg, manager)

    with h5py.File(path, "a") as f:  # a task's target missing: rebuilt too
        del f["patients/p1/targets/landmarks/heatmaps"]
    build_cache(cfg, manager=manager)
    assert "heatmaps" in h5py.File(path, "r", locking=False)["patients/p1/targets/landmarks"]


def test_failing_build_leaves_no_file(root):
    manager = make_manager()
    cfg = Config(
        experiment={"name": "t"},
        data={"source": "testnpz", "testnpz": {"root": str(root), "fail": "p2"}},
        preprocess={"slice_size": SIZE},
    )
    with pytest.raises(DataError, match="p2.npz: broken"):
        build_cache(cfg, manager=manager)
    folder = cache_file(cfg, key_of(cfg, manager)).parent
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_input_file_is_a_data_error(root):
    manager = make_manager()
    cfg = config(root)
    source = make_source(cfg, manager)
    (root / "p1.npz").rename(root / "x.bin")
    source.patient_ids = lambda: ["p1"]  # type: ignore[method-assign]
    with pytest.raises(DataError, match="p1.npz"):
        cache_key(cfg, source, make_tasks(cfg, manager))


def test_readers(root):
    cfg = config(root, landmarks={"groups": [["renal_pelvis_right"], ["renal_pelvis_left"]]})
    path = build_cache(cfg, manager=make_manager(), progress=True)
    info = open_cache(path)
    assert info.patients == ("p1", "p2", "p3") and info.slice_size == SIZE
    assert info.organs == ("kidney_right", "kidney_left")
    assert info.landmarks == ("renal_pelvis_right", "renal_pelvis_left")
    assert info.slice_targets() == [("landmarks", api.Target("heatmaps", 2, "float32", "linear", 0.0))]
    data = load_slices(path, ["p3", "p1"])
    assert len(data) == 7 + 5 and data.patients == ["p3", "p1"]
    heat = data.targets["landmarks/heatmaps"]
    assert data.image.shape == (12,) + SIZE and heat.shape == (12, 2) + SIZE
    assert load_slices(path, ["p1"], tasks=["segmentation"]).targets == {}
    assert data.patient_index.dtype == np.int32 and data.slice_index.dtype == np.int32
    np.testing.assert_array_equal(data.patient_index, [0] * 7 + [1] * 5)
    np.testing.assert_array_equal(data.slice_index, list(range(7)) + list(range(5)))
    rec = load_patient(path, "p1")
    np.testing.assert_array_equal(data.image[7:], rec.image)
    rec_heat = rec.targets["landmarks"]["heatmaps"]
    np.testing.assert_array_equal(heat[7:], rec_heat)
    assert rec_heat.shape == (5, 2) + SIZE and rec_heat[:, 0].max() > 0.9 and rec_heat[:, 1].max() == 0
    assert rec.landmarks[0].name == "renal_pelvis_right" and rec.orig_labels.shape == (5, 20, 24)
    assert rec.geometry.size == (24, 20, 5) and rec.index_to_physical.shape == (4, 4)

    organ_slices = load_slices(path, ["p1"], only_with_organs=True)
    np.testing.assert_array_equal(organ_slices.slice_index, [1, 2, 3])
    np.testing.assert_array_equal(organ_slices.labels, rec.labels[1:4])
    np.testing.assert_array_equal(load_slices(path, ["p1"], True, margin=1).slice_index, [0, 1, 2, 3, 4])

    with pytest.raises(DataError, match="no patient 'nope'"):
        load_patient(path, "nope")
    with pytest.raises(DataError, match="no patient 'nope'"):
        load_slices(path, ["p1", "nope"])
    with pytest.raises(DataError, match="not found"):
        open_cache(path.with_name("missing.h5"))


def test_builder_waits_for_the_lock(root):
    manager = make_manager()
    cfg = config(root)
    path = cache_file(cfg, key_of(cfg, manager))
    path.parent.mkdir(parents=True, exist_ok=True)
    result: list[Path] = []
    with cache_mod._exclusive_lock(path):
        worker = threading.Thread(target=lambda: result.append(build_cache(cfg, manager=manager)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and not path.exists()  # blocked on the lock, nothing written
    worker.join(60)
    assert result == [path] and open_cache(path).patients == ("p1", "p2", "p3")


def read_worker(path: str, pid: str, barrier, queue) -> None:
    """Child process: hold the cache open while the other reader does too, then read a patient."""
    with cache_mod._open_read(path):
        barrier.wait(timeout=120)
        rec = load_patient(path, pid)
        queue.put((float(rec.image.astype(np.float64).sum()), float(rec.targets["landmarks"]["heatmaps"].sum())))
        barrier.wait(timeout=120)


def test_two_processes_read_concurrently(root):
    path = build_cache(config(root), manager=make_manager())
    rec = load_patient(path, "p2")
    expected = (float(rec.image.astype(np.float64).sum()), float(rec.targets["landmarks"]["heatmaps"].sum()))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    with h5py.File(path, "r"):  # a default reader holds the file open meanwhile
        procs = [ctx.Process(target=read_worker, args=(str(path), "p2", barrier, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert results == [expected, expected]
