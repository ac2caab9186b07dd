"""Caches and checkpoints prove their integrity; every storage failure is one line, exit 1, no partial file.

Faults are real where the machine allows: bytes overwritten inside an HDF5
chunk (found with h5py's chunk index), a truncated file, a full disk (a small
tmpfs), a read-only folder (a tmpfs remounted read-only), permission denied (a
process running as ``nobody`` when we are root). Mounting needs root; where it
is refused the test skips with the reason. A mock-based test covers the same
code paths in addition, everywhere. docs/reliability_integrity.part.md lists
the faults and these tests.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mtlbench.cli import app
from mtlbench.config import Config
from mtlbench.data import cache as cache_mod
from mtlbench.data.cache import FORMAT_VERSION, build_cache, cache_problem, load_patient, load_slices, open_cache
from mtlbench.engine.checkpoint import digest_path, load_checkpoint, save_checkpoint
from mtlbench.errors import DataError, StorageError
from mtlbench.fsutil import atomic_path, write_json, write_text
from test_cache import make_manager, write_patient

MTLBENCH = str(Path(sys.executable).parent / "mtlbench")
IDS = ["p1", "p2", "p3"]
DECLARED = {"landmarks": ["heatmaps"]}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(d))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for n, pid in enumerate(IDS):
        write_patient(d, pid, n, slices=5 + n)
    return d


def config(root: Path) -> Config:
    return Config(
        experiment={"name": "t"},
        data={"source": "testnpz", "testnpz": {"root": str(root)}},
        preprocess={"slice_size": (16, 16)},
        model={"widths": [8, 16]},
        tasks={"segmentation": {}, "landmarks": {"params": {"sigma_mm": 3.0}}},
    )


def key_of(path: Path) -> str:
    with h5py.File(path, "r", locking=False) as f:
        return str(f.attrs["key"])


def damage_chunk(path: Path, dataset: str, chunk: int = 1, count: int = 64) -> None:
    """Overwrite ``count`` bytes in the middle of one stored chunk of ``dataset`` (the file keeps its size)."""
    with h5py.File(path, "r", locking=False) as f:
        info = f[dataset].id.get_chunk_info(chunk)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2 - count // 2)
        fh.write(bytes(count))
    assert path.stat().st_size == size


def damage_text(path: Path, needle: bytes) -> None:
    """Change one byte of the first occurrence of ``needle`` in the file (an attribute's JSON text)."""
    data = path.read_bytes()
    at = data.find(needle)
    assert at >= 0, needle
    with open(path, "r+b") as fh:
        fh.seek(at + 1)
        fh.write(b"X")


class Captured(logging.Handler):
    """The warnings mtlbench logs (the CLI's handler does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    handler = Captured()
    logs = [logging.getLogger("mtlbench.data"), logging.getLogger("mtlbench.engine")]
    for log in logs:
        log.addHandler(handler)
    yield handler.messages
    for log in logs:
        log.removeHandler(handler)


def _mount(target: Path, *options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the fault is then simulated by the mock-based test only)")
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip() or r.returncode}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Folders mounted by a test; unmounted afterwards."""
    mounted: list[Path] = []
    yield mounted
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path: Path, mounts) -> Iterator[Callable[[int], Path]]:
    """A factory: ``full_disk(kib)`` mounts a tmpfs of that size (a disk that fills up after ``kib`` KiB)."""

    def make(kib: int) -> Path:
        d = tmp_path / f"tmpfs{len(mounts)}"
        _mount(d, f"size={kib}k", "mode=0755")
        mounts.append(d)
        return d

    yield make


@pytest.fixture
def read_only(tmp_path: Path, mounts) -> Path:
    """A tmpfs remounted read-only, with an ``inside`` folder made before."""
    d = tmp_path / "ro"
    _mount(d, "size=64k", "mode=0755")
    mounts.append(d)
    (d / "inside").mkdir()
    r = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -o remount,ro is not permitted here: {r.stderr.strip()}")
    return d


def fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system is full."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        with pytest.raises(OSError) as exc:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
    assert exc.value.errno == errno.ENOSPC


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def one_line_error(stderr: str, *names: str) -> str:
    """The ``error:`` line of a CLI run's stderr, checked to be the only error text, without traceback."""
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert all(ln.startswith(("error: ", "warning: ")) for ln in stderr.splitlines() if ln.strip()), stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


# ----------------------------------------------------------------------------- the slice cache


def test_cache_datasets_carry_checksums(root, own_cache):
    path = build_cache(config(root), manager=make_manager())
    with h5py.File(path, "r", locking=False) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 4
        assert f.attrs[cache_mod.ATTRS_DIGEST] == cache_mod.attrs_digest(f.attrs)
        for pid in IDS:
            grp = f[f"patients/{pid}"]
            assert grp.attrs[cache_mod.ATTRS_DIGEST] == cache_mod.attrs_digest(grp.attrs)
            for name in ("image", "labels", "orig_labels", "targets/landmarks/heatmaps"):
                assert grp[name].fletcher32, name
    assert cache_problem(path, key_of(path), IDS, DECLARED) is None


def test_damaged_chunk_is_found_named_and_rebuilt(root, own_cache, warnings_logged):
    manager = make_manager()
    cfg = config(root)
    path = build_cache(cfg, manager=manager)
    good = load_patient(path, "p2").image.copy()
    damage_chunk(path, "patients/p2/image")

    problem = cache_problem(path, key_of(path), IDS, DECLARED)
    assert problem is not None and "/patients/p2/image" in problem
    with pytest.raises(DataError) as exc:
        load_patient(path, "p2")
    assert str(path) in str(exc.value) and "'p2'" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(DataError, match="'p2'.*damaged"):
        load_slices(path, ["p1", "p2"])
    assert load_patient(path, "p1").image.size  # the other patients still read

    assert build_cache(cfg, manager=manager) == path
    assert any(str(path) in m and "damaged" in m for m in warnings_logged), warnings_logged
    np.testing.assert_array_equal(load_patient(path, "p2").image, good)
    assert cache_problem(path, key_of(path), IDS, DECLARED) is None


def test_damaged_target_chunk_is_found_by_trial_readers(root, own_cache):
    path = build_cache(config(root), manager=make_manager())
    damage_chunk(path, "patients/p3/targets/landmarks/heatmaps", chunk=2, count=32)
    assert "heatmaps" in cache_problem(path, key_of(path), IDS, DECLARED)
    with pytest.raises(DataError, match="'p3'"):
        load_slices(path, ["p3"])
    load_slices(path, ["p3"], tasks=["segmentation"])  # what a trial does not read cannot fail it


def test_damaged_attribute_is_found_and_rebuilt(root, own_cache, warnings_logged):
    """String attributes live in HDF5's global heap, which has no checksum: the per-group digest catches them."""
    manager = make_manager()
    cfg = config(root)
    path = build_cache(cfg, manager=manager)
    damage_text(path, b'"spacing"')  # the first patient's geometry JSON
    assert "attributes do not match" in cache_problem(path, key_of(path), IDS, DECLARED)
    with pytest.raises(DataError, match=r"'p1': slice cache is damaged \(attributes"):
        load_patient(path, "p1", arrays=False)
    build_cache(cfg, manager=manager)
    assert any(str(path) in m for m in warnings_logged)
    assert load_patient(path, "p1", arrays=False).geometry.spacing


def test_damaged_file_attribute_is_found(root, own_cache):
    path = build_cache(config(root), manager=make_manager())
    damage_text(path, b'"preprocess"')  # the file's settings JSON
    with pytest.raises(DataError, match="file attributes do not match"):
        open_cache(path)


def test_truncated_cache_is_rebuilt_with_a_warning(root, own_cache, warnings_logged):
    manager = make_manager()
    cfg = config(root)
    path = build_cache(cfg, manager=manager)
    key = key_of(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    assert cache_problem(path, key, IDS, DECLARED).startswith("unreadable: ")
    with pytest.raises(DataError) as exc:
        load_slices(path, IDS)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    build_cache(cfg, manager=manager)
    assert any(str(path) in m and "rebuilding" in m for m in warnings_logged)
    assert len(load_slices(path, IDS)) == 5 + 6 + 7


def test_old_format_is_rebuilt_not_misread(root, own_cache):
    path = build_cache(config(root), manager=make_manager())
    with h5py.File(path, "a", locking=False) as f:
        f.attrs["format_version"] = 3
    with pytest.raises(DataError, match="format 3, expected 4"):
        load_patient(path, "p1")
    assert cache_problem(path, key_of(path), IDS, DECLARED) == "format 3, expected 4"


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trial(tmp_path_factory) -> Path:
    """A real tiny trained trial folder (phantom, 32 x 32 slices, one short epoch)."""
    from mtlbench.assemble import resolve_plugins
    from mtlbench.config import validate_config
    from mtlbench.data.folds import make_folds
    from mtlbench.engine.train import run_trial
    from mtlbench.engine.trialspec import TrialSpec
    from mtlbench.testing import tiny_config

    cfg = validate_config(tiny_config(strategies={"single": {}}, overrides={"train": {"epochs": 1, "slices_per_epoch": 8}}))
    resolve_plugins(cfg)
    cache = build_cache(cfg)
    folds = make_folds(list(open_cache(cache).patients), 2, 0)
    out = tmp_path_factory.mktemp("trial")
    record = run_trial(cfg, TrialSpec(fold=0, strategy="single"), cache, folds, out, cpus=1)
    assert record["status"] == "completed"
    return out


def copy_trial(trial: Path, tmp_path: Path) -> Path:
    d = tmp_path / "trial"
    shutil.copytree(trial, d)
    return d


def predict(trial_dir: Path, out: Path):
    """``mtlbench predict`` in this process. The CLI's warning handler is made anew for each run: it keeps the
    stderr of the run that created it, which CliRunner closes afterwards."""
    log = logging.getLogger("mtlbench")
    for handler in [h for h in log.handlers if getattr(h, "_mtlbench", False)]:
        log.removeHandler(handler)
    return CliRunner().invoke(app, ["predict", str(trial_dir), "--out", str(out)])


def test_checkpoint_has_a_digest_that_sha256sum_accepts(trial):
    line = digest_path(trial / "checkpoint.pt").read_text()
    assert line.endswith("  checkpoint.pt\n") and len(line.split()[0]) == 64
    if shutil.which("sha256sum"):
        r = subprocess.run(["sha256sum", "-c", "checkpoint.pt.sha256"], cwd=trial, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "random": lambda b: np.random.default_rng(0).bytes(len(b)),
    "empty": lambda b: b"",
    "zeroed": lambda b: b[: len(b) // 2 - 1000] + bytes(2000) + b[len(b) // 2 + 1000 :],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_predict_refuses_a_damaged_checkpoint(trial, tmp_path, damage):
    d = copy_trial(trial, tmp_path)
    ckpt = d / "checkpoint.pt"
    ckpt.write_bytes(DAMAGE[damage](ckpt.read_bytes()))
    r = predict(d, tmp_path / "pred")
    assert r.exit_code == 1, r.output
    assert "damaged" in one_line_error(r.stderr, str(ckpt))
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damage_without_a_digest_is_still_one_line(trial, tmp_path, damage):
    d = copy_trial(trial, tmp_path)
    ckpt = d / "checkpoint.pt"
    digest_path(ckpt).unlink()
    ckpt.write_bytes(DAMAGE[damage](ckpt.read_bytes()))
    r = predict(d, tmp_path / "pred")
    assert r.exit_code == 1, r.output
    one_line_error(r.stderr, str(ckpt))


def test_missing_digest_warns_and_loads(trial, tmp_path, warnings_logged):
    d = copy_trial(trial, tmp_path)
    digest_path(d / "checkpoint.pt").unlink()
    r = predict(d, tmp_path / "pred")
    assert r.exit_code == 0, r.output
    assert any(str(d / "checkpoint.pt") in m and "cannot be checked" in m for m in warnings_logged), warnings_logged
    assert f"warning: {d / 'checkpoint.pt'}: no checkpoint.pt.sha256" in r.stderr
    assert list((tmp_path / "pred").iterdir())


def test_malformed_digest_is_an_error(trial, tmp_path):
    d = copy_trial(trial, tmp_path)
    digest_path(d / "checkpoint.pt").write_text("not a digest\n")
    r = predict(d, tmp_path / "pred")
    assert r.exit_code == 1
    one_line_error(r.stderr, "checkpoint.pt.sha256")


def test_empty_checkpoint_through_the_real_command(trial, tmp_path):
    """The installed command, as a user runs it: exit 1, one line on stderr (it printed only "Aborted." before)."""
    d = copy_trial(trial, tmp_path)
    (d / "checkpoint.pt").write_bytes(b"")
    r = subprocess.run([MTLBENCH, "predict", str(d), "--out", str(tmp_path / "pred")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert one_line_error(r.stderr, str(d / "checkpoint.pt")) == r.stderr.strip()


def test_resave_drops_the_old_digest_first(tmp_path, monkeypatch):
    """A save interrupted after the old digest is gone leaves a checkpoint that loads with a warning, never a wrong digest."""
    import torch

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert load_checkpoint(path)["model"]["w"].shape == (3,)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mtlbench.engine.checkpoint.write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.ones(4)}})
    assert not digest_path(path).exists()
    assert load_checkpoint(path)["model"]["w"].shape == (4,)
    assert listing(tmp_path) == ["checkpoint.pt"]


# ----------------------------------------------------------------------------- storage failures


def test_cache_build_on_a_full_disk_is_one_line_and_leaves_nothing(root, full_disk, monkeypatch):
    """h5py's own file driver crashes the process after ENOSPC (16 tracebacks, then a segfault); the build must not."""
    disk = full_disk(24)  # the cache needs about 48 KiB
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(disk))
    with pytest.raises(StorageError) as exc:
        build_cache(config(root), manager=make_manager())
    msg = str(exc.value)
    assert "No space left on device" in msg and str(disk / "slices") in msg and "\n" not in msg
    assert [p.suffix for p in (disk / "slices").iterdir()] == [".lock"]  # no cache, no temporary file


def test_cache_build_in_a_read_only_folder(root, read_only, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(read_only / "inside"))
    with pytest.raises(StorageError, match="Read-only file system") as exc:
        build_cache(config(root), manager=make_manager())
    assert str(read_only / "inside" / "slices") in str(exc.value)


def test_checkpoint_save_on_a_full_disk(full_disk):
    import torch

    disk = full_disk(16)
    with pytest.raises(StorageError, match="No space left on device") as exc:
        save_checkpoint(disk / "checkpoint.pt", {"model": {"w": torch.zeros(64, 1024)}})  # 256 KiB
    assert str(disk / "checkpoint.pt") in str(exc.value)
    assert listing(disk) == []


def test_run_folder_writes_on_a_full_disk(full_disk):
    from mtlbench.orchestrate.results import write_results

    disk = full_disk(16)
    fill(disk)
    with pytest.raises(StorageError, match=f"{disk / 'results.json'}: cannot write \\(No space left on device\\)"):
        write_results(disk, {"experiment": "x"}, [])
    assert listing(disk) == ["filler"]


def test_predict_into_a_full_disk(trial, tmp_path, full_disk):
    out = full_disk(64)
    fill(out)
    r = predict(trial, out / "pred")
    assert r.exit_code == 1, r.output
    one_line_error(r.stderr, str(out / "pred"))
    assert listing(out) == ["filler", "pred"]  # the folder itself, nothing half-written in it


def test_predict_into_a_read_only_folder(trial, read_only):
    r = predict(trial, read_only / "pred")
    assert r.exit_code == 1, r.output
    one_line_error(r.stderr, str(read_only / "pred"), "Read-only file system")
    r = predict(trial, read_only / "inside")
    assert r.exit_code == 1, r.output
    one_line_error(r.stderr, str(read_only / "inside"), "Read-only file system")


def test_run_folder_writes_in_a_read_only_folder(read_only):
    with pytest.raises(StorageError, match="Read-only file system") as exc:
        write_json(read_only / "inside" / "results.json", {})
    assert str(read_only / "inside" / "results.json") in str(exc.value)
    with pytest.raises(StorageError, match="Read-only file system") as exc:
        write_text(read_only / "new" / "config.toml", "")  # the folder cannot be created either
    assert str(read_only / "new") in str(exc.value)


def _write_as_nobody(folder: Path, name: str) -> str:
    """write_text(name) inside ``folder`` from a forked child that dropped root for ``nobody``; what it raised, as text.

    The child enters ``folder`` before dropping root, so the folders above it need not be open to nobody.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.chdir(folder)
            os.setgid(65534)
            os.setuid(65534)
            write_text(name, "x")
            message = "no error"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f"{type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        message = fh.read().decode()
    os.waitpid(pid, 0)
    return message


def test_permission_denied(tmp_path):
    """A real EACCES: a folder we may not write (root ignores permission bits, so as root we write as nobody)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        if os.geteuid() == 0:
            os.chmod(tmp_path, 0o755)
            message = _write_as_nobody(tmp_path, "locked/results.json")
            assert message == "StorageError: locked/results.json: cannot write (Permission denied)"
        else:
            with pytest.raises(StorageError) as exc:
                write_text(locked / "results.json", "x")
            assert str(exc.value) == f"{locked / 'results.json'}: cannot write (Permission denied)"
        assert listing(locked) == []
    finally:
        os.chmod(locked, 0o755)


def test_atomic_path_maps_any_os_error_and_cleans_up(tmp_path, monkeypatch):
    """The same paths with the failure injected (everywhere, root or not, mount or not)."""
    target = tmp_path / "out.json"

    with pytest.raises(StorageError, match=f"^{target}: cannot write \\(No space left on device\\)$"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert listing(tmp_path) == []

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / ".out.json.x.tmp"))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StorageError, match=f"^{target}: cannot write"):
        write_json(target, {"a": 1})
    monkeypatch.undo()
    assert listing(tmp_path) == []

    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(StorageError, match="Read-only file system"):
        write_text(target, "x")
    monkeypatch.undo()

    with pytest.raises(KeyboardInterrupt):  # not an OSError: passes through, still cleaned up
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_guarded_writer_keeps_the_first_failed_write(tmp_path):
    """The cache writer's guard, with the failure injected: later writes are skipped, the error comes out at check()."""

    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / "x.h5"
    path.write_bytes(b"")
    with cache_mod._GuardedFile(path) as raw:
        assert raw.write(b"abc") == 3
        raw.check()
        real, raw._fh = raw._fh, FullDisk()
        assert raw.write(b"defg") == 4 and raw.write(b"hi") == 2  # HDF5 is told they succeeded
        raw._fh = real
        assert raw.write(b"jk") == 2  # skipped: nothing after the first failure reaches the file
        with pytest.raises(OSError) as exc:
            raw.check()
    assert exc.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"abc"
