"""Building the slice cache in worker processes (``resources.cache_workers``): the same file content as in
one process, the workers' warnings shown by the parent in patient order, a worker's DataError as the same
one-line error with no file left behind, and the default rule for how many workers to start."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from mtlbench.config import Config
from mtlbench.data.cache import build_cache, build_workers
from mtlbench.errors import DataError

PHANTOM = {"source": "phantom", "phantom": {"patients": 4, "seed": 0}}  # phantom004: a renal pelvis far outside


def config(tmp: Path, workers: int, data=None) -> Config:
    return Config(
        experiment={"name": f"w{workers}"},
        data=data or PHANTOM,
        preprocess={"slice_size": [32, 32]},
        resources={"cache_workers": workers},
    )


def content(path: Path) -> dict:
    """Every dataset and attribute of a cache file, by HDF5 path."""
    out: dict = {}
    with h5py.File(path, "r") as f:
        out["/attrs"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}

        def visit(name, obj):
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()}
            out[name] = (obj[...].copy() if isinstance(obj, h5py.Dataset) else None, attrs)

        f.visititems(visit)
    return out


def test_workers_write_the_same_cache_and_pass_on_their_warnings(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))  # one phantom; experiment.name names each cache
    serial = build_cache(config(tmp_path, 1))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtlbench"):
        parallel = build_cache(config(tmp_path, 2))
    assert serial != parallel
    a, b = content(serial), content(parallel)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        if name == "/attrs":
            assert a[name] == b[name]
            continue
        (da, aa), (db, ab) = a[name], b[name]
        assert aa == ab, name
        if da is not None:
            np.testing.assert_array_equal(da, db, err_msg=name)
    # phantom004 has a landmark far outside its image: the worker's warning reaches this process's log
    outside = [r for r in caplog.records if "phantom004" in r.getMessage() and "outside the image" in r.getMessage()]
    assert len(outside) == 1 and outside[0].levelno == logging.WARNING


def test_a_worker_data_error_is_the_same_one_line_error_and_leaves_no_file(tmp_path, monkeypatch):
    from mtlbench.builtin.phantom import ensure_phantom

    folder = ensure_phantom(tmp_path / "phantom", patients=4, seed=0).parent
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    with open(copy / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    broken = copy / Path(rows[2]["image"]).name
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated volume: unreadable
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    data = {"source": "manifest", "manifest": {"path": str(copy / "manifest.csv")}}
    messages = []
    for workers in (1, 2):
        with pytest.raises(DataError) as err:
            build_cache(config(tmp_path, workers, data))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and broken.name in messages[1] and "\n" not in messages[1]
    left = [p.name for p in (tmp_path / "cache" / "slices").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # neither a cache nor a temporary file (the build's lock files stay, as always)


@pytest.mark.parametrize("patients, cpus, expected", [(1, 8, 0), (7, 8, 0), (8, 8, 2), (20, 2, 2), (100, 16, 8)])
def test_default_worker_count(monkeypatch, patients, cpus, expected):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert build_workers(Config(), patients) == expected
    assert build_workers(Config(resources={"cache_workers": 3}), patients) == (min(3, patients) if min(3, patients) > 1 else 0)
