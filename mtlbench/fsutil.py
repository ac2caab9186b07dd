"""The one place that writes files atomically (temp name in the same folder, then rename) and words write failures.

Every write failure (disk full, permission denied, read-only file system, a
folder that cannot be created) comes out of here as one-line
:class:`~mtlbench.errors.StorageError` naming the path being written, and
never leaves a partial or temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mtlbench.errors import StorageError


def storage_error(exc: OSError, path: str | Path, tmp: str | Path | None = None) -> StorageError:
    """One line for an OSError met while writing ``path`` (through the temporary file ``tmp``).

    An error about ``path``, ``tmp`` or no file at all reads ``<path>: cannot
    write (<reason>)``; one about another file (a parent folder that cannot be
    created, an input file read inside the block) names that file instead.
    """
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    if exc.filename is not None and not _ours(Path(exc.filename), Path(path), tmp):
        return StorageError(f"{exc.filename}: {reason} (while writing {path})")
    return StorageError(f"{path}: cannot write ({reason})")


def _ours(name: Path, path: Path, tmp: str | Path | None) -> bool:
    """Whether ``name`` is ``path``, ``tmp`` or one of :func:`atomic_path`'s temporary names for ``path``."""
    name, path = Path(os.path.abspath(name)), Path(os.path.abspath(path))
    if name == path or (tmp is not None and name == Path(os.path.abspath(tmp))):
        return True
    return name.parent == path.parent and name.name.startswith(f".{path.name}.")


@contextlib.contextmanager
def storage_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised in the block into a one-line StorageError naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, path) from None


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    Owns the temporary file's whole life: whatever ends the block early (any
    exception, Ctrl-C) removes it and leaves ``path`` as it was. An OSError
    from creating the folder or the temporary file, from the block or from
    the rename becomes a one-line StorageError (see :func:`storage_error`);
    mtlbench's own errors and everything else pass through unchanged.
    """
    path = Path(path)
    with storage_errors(path):
        tmp_path = _temporary_beside(path, suffix or ".tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        _remove(tmp_path)
        raise storage_error(exc, path, tmp_path) from None
    except BaseException:
        _remove(tmp_path)
        raise


def _temporary_beside(path: Path, suffix: str) -> Path:
    """Create (empty, with the permissions a normal create would give) a temporary file in ``path``'s folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600
    except BaseException:
        _remove(tmp_path)
        raise
    return tmp_path


def _remove(path: Path) -> None:
    """Delete ``path`` if it is there; a failure to delete must not hide the error being raised."""
    with contextlib.suppress(OSError):
        path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (NaN allowed, numpy values and paths converted) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=True, default=_default) + "\n")


def _default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
